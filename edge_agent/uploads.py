"""The update step of the agent loop: make the update durable, then send it and settle it.

:func:`save_update` compresses ``local - base`` with the task's policy and the error-feedback
memory (residual, and with momentum-corrected error feedback the velocity and the model version
they belong to: one residual file, :mod:`fedge.edge_agent.residual_store`), encodes it, commits
it (with its idempotency key and the memory of before and after) to the outbox, then makes the
new memory current (see :mod:`fedge.edge_agent.outbox` for why in that order). A discarded
update restores the memory of before, velocity and version included.
:func:`upload_entry` sends an outbox entry and removes it on success, or discards it (restoring
the residual it advanced) when the coordinator refuses it for good, e.g. 409 stale_update.
Errors that a later attempt may cure (network, 5xx, 429, clock skew) propagate and leave the
entry in the outbox.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping

import numpy as np

from fedge.edge_agent import local_dp
from fedge.edge_agent.client import CoordinatorClient, Work
from fedge.edge_agent.errors import ApiError, DeviceRevoked, StaleUpdate
from fedge.edge_agent.outbox import RESIDUAL_BEFORE, OutboxEntry, new_idempotency_key
from fedge.edge_agent.outcome import AgentStats, Outcome
from fedge.edge_agent.pauses import deadline_s
from fedge.edge_agent.residual_store import ResidualState
from fedge.edge_agent.state import State
from fedge.shared.compression import compress_round
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import encode_update
from fedge.shared.wiremetrics import split_metrics

log = logging.getLogger(__name__)

# Errors after which the device cannot go on: it must be re-enrolled.
FATAL_CODES = frozenset({"device_revoked", "unknown_device"})
# Refusals that may pass (clock, replay, a signature made during a key rotation): keep the
# update and try again later.
TRANSIENT_AUTH_CODES = frozenset({"clock_skew", "replayed_nonce", "invalid_signature"})


def refused_for_good(exc: ApiError) -> bool:
    """True when uploading the same update again cannot succeed (so it is discarded)."""
    if exc.status is None or exc.status >= 500 or exc.status == 429:
        return False
    lasting = not isinstance(exc, DeviceRevoked)
    return lasting and exc.code not in FATAL_CODES | TRANSIENT_AUTH_CODES


def local_delta(
    work: Work,
    *,
    spec: ModelSpec,
    base: Weights,
    local: Weights,
    noise_rng: np.random.Generator | None = None,
) -> Weights:
    """``local - base``; under local differential privacy (``training.local_dp``) clipped and
    noised (:mod:`fedge.edge_agent.local_dp`; ``noise_rng`` defaults to a CSPRNG-seeded
    generator)."""
    delta = {t.name: local[t.name] - base[t.name] for t in spec.tensors}
    dp = local_dp.settings_of(work.training)
    if dp is not None:
        clip_norm, noise_multiplier = dp
        delta = local_dp.privatize(
            delta, clip_norm=clip_norm, noise_multiplier=noise_multiplier, rng=noise_rng
        )
    return delta


def save_update(
    state: State,
    work: Work,
    *,
    spec: ModelSpec,
    policy: CompressionPolicy,
    base: Weights,
    local: Weights,
    num_examples: int,
    metrics: Mapping[str, float],
    seed: int,
    noise_rng: np.random.Generator | None = None,
) -> OutboxEntry:
    """Compress, encode and durably save the update; then advance the residual.

    The training and evaluation metrics travel inside the update (its metrics block). Under
    local differential privacy (``training.local_dp``) the delta is clipped and noised first
    (:mod:`fedge.edge_agent.local_dp`; ``noise_rng`` defaults to a CSPRNG-seeded generator).
    """
    delta = local_delta(work, spec=spec, base=base, local=local, noise_rng=noise_rng)
    residual = None
    if policy.error_feedback:
        residual = ResidualState.of(state.load_residual(work.task_id, spec))
    before = copy.deepcopy(residual)
    rng = np.random.default_rng([seed, work.assignment_id, 1])
    compressed = compress_round(delta, policy, rng, residual, base_version=work.base_version)
    # in the update itself: no separate report; what it cannot carry is named in the log
    carried, refused = split_metrics(metrics)
    for name, why in refused.items():
        log.warning("metric %r left out of the update: %s", name, why)
    body = encode_update(
        compressed,
        task_id=work.task_id,
        base_version=work.base_version,
        num_examples=num_examples,
        metrics=carried,
    )
    dense = 4 * spec.num_params
    log.info(
        "update compressed to %d bytes (%.0fx smaller than %d dense bytes)",
        len(body),
        dense / max(1, len(body)),
        dense,
    )
    entry = OutboxEntry(
        assignment_id=work.assignment_id,
        task_id=work.task_id,
        base_version=work.base_version,
        upload_url=work.upload_url,
        idempotency_key=new_idempotency_key(),
        num_examples=num_examples,
        created_at=time.time(),
        has_residual=residual is not None,
        deadline=deadline_s(work.deadline),
    )
    state.outbox.add(entry, body, residual_before=before, residual_after=residual)
    if residual is not None:
        state.save_residual(work.task_id, residual)
    return entry


def upload_entry(
    state: State,
    client: CoordinatorClient,
    entry: OutboxEntry,
    *,
    stats: AgentStats,
    uploads: list[tuple[int, int]],
    next_work: bool = False,
    have: tuple[int, int] | None = None,
) -> Outcome:
    """Send one outbox entry and settle it, counting in ``stats`` and appending
    ``(base version, bytes)`` to ``uploads`` when accepted. ``next_work`` and ``have``: ask
    for the next assignment in the answer (:meth:`CoordinatorClient.upload_update`)."""
    body = state.outbox.body(entry)
    try:
        receipt = client.upload_update(
            entry.upload_url, body, entry.idempotency_key, next_work=next_work, have=have
        )
    except StaleUpdate as exc:
        log.info(
            "update for assignment %d is too stale (%s); discarding it",
            entry.assignment_id,
            exc.detail,
        )
        discard_entry(state, entry)
        stats.stale_refused += 1
        return Outcome.STALE
    except ApiError as exc:
        if not refused_for_good(exc):
            raise
        log.warning(
            "the coordinator refused the update for assignment %d (%s); discarding it",
            entry.assignment_id,
            exc,
        )
        discard_entry(state, entry)
        stats.discarded += 1
        return Outcome.DISCARDED
    state.outbox.remove(entry)
    stats.uploaded += 1
    uploads.append((entry.base_version, len(body)))
    if receipt.get("duplicate"):
        stats.duplicates += 1
    staleness = int(receipt.get("staleness") or 0)
    if staleness > 0:
        stats.stale_accepted += 1
    log.info(
        "uploaded update for assignment %d (%d bytes, staleness %d%s)",
        entry.assignment_id,
        len(body),
        staleness,
        ", already received before" if receipt.get("duplicate") else "",
    )
    return Outcome.UPLOADED


def discard_entry(state: State, entry: OutboxEntry) -> None:
    """Drop a refused update and restore the residual it had advanced."""
    state.restore_residual(entry.task_id, state.outbox.residual_file(entry, RESIDUAL_BEFORE))
    state.outbox.remove(entry)
