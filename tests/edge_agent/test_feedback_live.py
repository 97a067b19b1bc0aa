"""Momentum-corrected error feedback with a top-k warm-up and residual decay, end to end:
agents against a real coordinator over HTTPS on loopback (see conftest.py)."""

from __future__ import annotations

import math
import threading

from fedge.edge_agent.outbox import OutboxEntry
from fedge.edge_agent.residual_store import ResidualState
from fedge.shared import architectures
from fedge.shared.policy import CompressionPolicy
from fedge.shared.topk import topk_count
from fedge.shared.warmup import topk_fraction_at
from fedge.shared.wire import decode_update
from tests.edge_agent.conftest import SOFTMAX, shard, wait_for

SPEC = architectures.build_spec(SOFTMAX)
COMPRESSION = {
    "topk_fraction": 0.02,
    "bits": 4,
    "chunk": 64,
    "error_feedback": True,
    "momentum": 0.9,
    "warmup_rounds": 2,
    "residual_decay": 0.5,
}


def test_warmup_updates_are_accepted_and_the_memory_follows_the_versions(live, digits):
    policy = CompressionPolicy.from_dict(COMPRESSION)
    lock = threading.Lock()
    sent: list[tuple[int, int]] = []  # (base version, values carried by the first tensor)
    agents = []
    threads = []

    def keep(entry: OutboxEntry, agent_index: int) -> None:
        body = agents[agent_index].state.outbox.body(entry)
        update = decode_update(body, spec=SPEC)
        with lock:
            sent.append((update.base_version, update.tensors[0].values.size))

    for i in range(2):
        state_dir = live.enroll(f"d{i}", seed=i + 1)
        agents.append(
            live.agent(state_dir, shard(digits, i), before_upload=lambda e, i=i: keep(e, i))
        )
        threads.append(live.start(agents[-1], max_rounds=3))
    task = live.create_task(
        aggregation={"num_rounds": 3, "clients_per_round": 2, "min_updates": 2},
        compression=COMPRESSION,
    )
    assert task["compression"] == {**task["compression"], **COMPRESSION}
    wait_for(lambda: live.task(task["id"])["status"] == "completed", what="the task to end")
    live.finish(threads)
    rounds = live.rounds(task["id"])
    assert [(r["status"], r["num_received"]) for r in rounds] == [("closed", 2)] * 3
    assert sum(a.stats.uploaded for a in agents) == 6
    assert sum(a.stats.discarded + a.stats.stale_refused for a in agents) == 0

    size = math.prod(SPEC.tensors[0].shape)
    want = {v: topk_count(size, topk_fraction_at(policy, v)) for v in range(3)}
    assert sorted(sent) == sorted((v, want[v]) for v in range(3) for _ in agents)
    # the first version's updates carry more than the final fraction would allow: accepted
    # only because the coordinator follows the same warm-up
    assert want[0] > want[1] > want[2] == topk_count(size, 0.02)

    for agent in agents:
        memory = ResidualState.of(agent.state.load_residual(task["id"], SPEC))
        assert memory.version == 2  # the base version of its last update
        assert memory.velocity is not None and memory.norm() > 0
