"""A real agent over HTTPS takes its next assignment from its upload's answer when the
coordinator has one at once (one request per update), with the delta chain to its base model,
and asks for none when it will not work on it (its last round, or a sync round)."""

from __future__ import annotations

import threading

from fedge.edge_agent.outbox import OutboxEntry
from tests.edge_agent.conftest import LiveCoordinator, shard, wait_for

DOWNLOAD = {"topk_fraction": 0.1, "bits": 8, "chunk": 64}


def test_an_agent_takes_its_next_assignment_from_the_upload_answer(
    live: LiveCoordinator, digits
) -> None:
    first_uploaded = threading.Event()
    task_id = -1

    def after_version_one(entry: OutboxEntry) -> None:
        # The second agent's first update waits until the first agent's update made version
        # 1: its upload (stale by one) is then answered with work on version 1.
        if entry.base_version == 0:
            first_uploaded.wait(20)
            wait_for(lambda: live.task(task_id)["current_version"] >= 1, what="version 1")

    first = live.agent(live.enroll("first", seed=1), shard(digits, 0))
    second = live.agent(
        live.enroll("second", seed=2), shard(digits, 1), before_upload=after_version_one
    )
    threads = [live.start(second, max_rounds=2)]
    task = live.create_task(
        aggregation={
            "mode": "async",
            "buffer_size": 1,
            "max_concurrency": 2,
            "max_staleness": 4,
            "num_rounds": 3,
        },
        compression={"download": DOWNLOAD},
    )
    task_id = task["id"]
    wait_for(lambda: second.stats.assignments >= 1, what="the second agent's first assignment")
    threads.append(live.start(first, max_rounds=1))
    wait_for(lambda: first.stats.uploaded == 1, what="the first agent's upload")
    first_uploaded.set()
    live.finish(threads)

    traffic = second.client.traffic
    assert second.stats.uploaded == 2 and second.stats.stale_accepted >= 1
    # Its second assignment came with its first upload's answer, with the chain 0 -> 1; its
    # last upload asked for nothing (it stops after two rounds).
    assert traffic.next_asked == 1 and traffic.next_with_upload == 1
    assert traffic.inline_deltas == 1 and traffic.delta_downloads == 1
    assert [version for version, _ in second.uploads] == [0, 1]
    assert first.client.traffic.next_asked == 0
    assert first.client.traffic.next_with_upload == 0


def test_a_sync_upload_asks_for_no_next_assignment(live: LiveCoordinator, digits) -> None:
    """A sync round's next assignment exists only after the round's aggregation, so an
    upload never asks for it (``next=1`` and its query would be bytes for nothing)."""
    agent = live.agent(live.enroll("sync", seed=3), shard(digits, 0))
    threads = [live.start(agent, max_rounds=2)]
    live.create_task(aggregation={"num_rounds": 2})
    live.finish(threads)

    traffic = agent.client.traffic
    assert agent.stats.uploaded == 2
    assert traffic.uploads == 2 and traffic.next_asked == 0
