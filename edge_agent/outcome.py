"""How an assignment ended for the agent, and the agent's running counts."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    UPLOADED = "uploaded"  # accepted by the coordinator
    STALE = "stale"  # refused as too stale; discarded
    DISCARDED = "discarded"  # refused for another lasting reason; discarded
    PENDING = "pending"  # still in the outbox (network trouble); retried later
    CANCELLED = "cancelled"  # the coordinator cancelled the assignment while training
    DROPPED = "dropped"  # walked away from (a hook declined it): never trained nor uploaded
    FAILED = "failed"  # could not be worked on (bad config, model unavailable)
    STOPPED = "stopped"  # the agent was asked to stop


@dataclass
class AgentStats:
    assignments: int = 0
    uploaded: int = 0
    duplicates: int = 0
    stale_accepted: int = 0
    stale_refused: int = 0
    late_uploads: int = 0  # first uploads a hook held back
    discarded: int = 0
    cancelled: int = 0
    dropped: int = 0  # assignments a hook declined (Outcome.DROPPED)
    failed: int = 0
    declined: int = 0  # failed assignments the coordinator was told of (signed decline)
    refused_deltas: int = 0  # delta chains that did not rebuild; the full model was fetched
