"""Agents download compressed model deltas and rebuild the broadcast model exactly; a chain
damaged on the way is refused and the agent fetches the full model instead."""

from __future__ import annotations

import ssl

import httpx

from fedge.edge_agent.client import CoordinatorClient
from fedge.edge_agent.device import open_client
from fedge.edge_agent.sim.relay import CountingRelay
from fedge.edge_agent.transport import RetryPolicy
from tests.edge_agent.conftest import LiveCoordinator, shard, wait_for

DOWNLOAD = {"topk_fraction": 0.1, "bits": 8, "chunk": 64}
ROUNDS = 4


class Corrupting(httpx.BaseTransport):
    """A real HTTPS transport that flips one byte of every delta chain it receives (binary
    answers to ``?have=``: downloads and work answers carrying a chain), as a damaged link
    would."""

    def __init__(self, ca_file: str) -> None:
        self.inner = httpx.HTTPTransport(verify=ssl.create_default_context(cafile=ca_file))
        self.damaged = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if "have" not in request.url.params or response.status_code != 200:
            return response
        if response.headers.get("content-type", "").startswith("application/json"):
            return response
        body = bytearray(response.read())
        body[-2] ^= 0x01
        self.damaged += 1
        return httpx.Response(200, headers=response.headers, content=bytes(body))

    def close(self) -> None:
        self.inner.close()


def test_agents_rebuild_models_from_deltas_and_fall_back_on_damage(
    live: LiveCoordinator, digits
) -> None:
    agents = [live.agent(live.enroll(f"d{i}", seed=i), shard(digits, i)) for i in range(2)]
    corrupting = Corrupting(live.ca_file)
    damaged = agents[1]
    damaged.client.close()
    damaged.client = open_client(
        damaged.state,
        transport=corrupting,
        retry=RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2),
    )
    threads = [live.start(agent, max_rounds=ROUNDS) for agent in agents]
    task = live.create_task(
        aggregation={"clients_per_round": 2, "min_updates": 2, "num_rounds": ROUNDS},
        compression={"download": DOWNLOAD},
    )
    task_id = task["id"]
    wait_for(lambda: live.task(task_id)["status"] == "completed", what="the task to complete")
    live.finish(threads)

    healthy = agents[0]
    # Versions 1..ROUNDS-1 came down as deltas for the healthy agent, never as full models,
    # and inside the work answers: no download request after the first.
    assert healthy.client.traffic.delta_downloads == ROUNDS - 1
    assert healthy.client.traffic.inline_deltas == ROUNDS - 1
    assert healthy.client.traffic.downloads == ROUNDS - 1
    # Version 0 (the built-in model's seeded weights) was generated on the device and only
    # confirmed with its ETag: no model bytes came down for it.
    assert healthy.client.traffic.not_modified == 1
    # ... and every work answer after the first left out the task configuration it held.
    assert healthy.client.traffic.known_configs == ROUNDS - 1
    assert healthy.stats.refused_deltas == 0
    # The damaged agent refused every damaged chain (the one in the work answer, then the one
    # it downloaded) and fetched the full model instead.
    assert corrupting.damaged == 2 * (ROUNDS - 1)
    assert damaged.stats.refused_deltas == 2 * (ROUNDS - 1)
    assert [a.stats.uploaded for a in agents] == [ROUNDS, ROUNDS]

    # What each agent holds of the last base version is the coordinator's broadcast model,
    # byte for byte (the healthy one rebuilt it, the other downloaded it).
    last = ROUNDS - 1
    with open_client(healthy.state) as client:
        served, _ = client.download_model(task_id, last)
    assert served is not None
    for agent in agents:
        cached = agent.state.cached_model(task_id, last)
        assert cached is not None and cached[0] == served
    # ... and it is not the true model: the download policy is lossy.
    assert live.admin.download_model(task_id, last) != served
    assert healthy.client.traffic.model_bytes * 3 < damaged.client.traffic.model_bytes


def test_rounds_reuse_the_agents_connections(live: LiveCoordinator, digits) -> None:
    """Every round of two agents through a counting relay: the number of TCP (and TLS)
    connections does not grow with the rounds."""
    port = httpx.URL(live.url).port
    assert port is not None
    rounds = 5
    with CountingRelay("127.0.0.1", port) as relay:
        agents, threads = [], []
        for i in range(2):
            agent = live.agent(live.enroll(f"r{i}", seed=i), shard(digits, i))
            config = agent.state.load_config()
            agent.client.close()
            agent.client = CoordinatorClient(
                f"https://localhost:{relay.port}",
                ca_file=live.ca_file,
                identity=(config.device_id, agent.state.load_key()),
            )
            agents.append(agent)
            threads.append(live.start(agent, max_rounds=rounds))
        task = live.create_task(
            aggregation={"clients_per_round": 2, "min_updates": 2, "num_rounds": rounds},
            compression={"download": DOWNLOAD},
        )
        wait_for(lambda: live.task(task["id"])["status"] == "completed", what="the task")
        live.finish(threads)
        counts = relay.counts()
    assert [a.stats.uploaded for a in agents] == [rounds, rounds]
    # At most two per agent, whatever the number of rounds: its requests, and the cancel
    # watch (opened only when training lasts longer than cancel_watch_after_s).
    assert counts.connections <= 2 * len(agents), counts


def test_a_device_joining_late_rebuilds_from_the_version_zero_it_generated(
    live: LiveCoordinator, digits
) -> None:
    """A device that first works on version 2 of a built-in model holds nothing of the task:
    it makes version 0 from the seed and downloads the chain 0 -> 2, not the model."""
    early = live.agent(live.enroll("early", seed=1), shard(digits, 0))
    task = live.create_task(  # async: whoever polls works on the current version
        aggregation={"mode": "async", "buffer_size": 1, "max_concurrency": 1, "num_rounds": 3},
        compression={"download": DOWNLOAD},
    )
    task_id = task["id"]
    live.finish([live.start(early, max_rounds=2)])
    # the second update is aggregated after its upload was answered
    wait_for(lambda: live.task(task_id)["current_version"] == 2, what="version 2")
    late = live.agent(live.enroll("late", seed=2), shard(digits, 1))
    live.finish([live.start(late, max_rounds=1)])
    wait_for(lambda: live.task(task_id)["status"] == "completed", what="the task to complete")

    traffic = late.client.traffic
    assert (late.stats.uploaded, late.stats.refused_deltas) == (1, 0)
    assert (traffic.downloads, traffic.delta_downloads, traffic.not_modified) == (1, 1, 0)
    with open_client(late.state) as client:
        served, _ = client.download_model(task_id, 2)
    assert served is not None
    assert traffic.model_bytes * 2 < len(served)
    cached = late.state.cached_model(task_id, 2)
    assert cached is not None and cached[0] == served
