"""The agent against a real coordinator over HTTPS on loopback (see conftest.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedge.edge_agent import cli
from fedge.edge_agent.agent import FatalAgentError
from fedge.edge_agent.outbox import RESIDUAL_AFTER
from fedge.edge_agent.state import State
from fedge.edge_agent.trainers import TrainResult
from fedge.shared import architectures, signing
from fedge.shared.wire import decode_model
from tests.edge_agent.conftest import SOFTMAX, LiveCoordinator, shard, wait_for

SPEC = architectures.build_spec(SOFTMAX)


class Crash(BaseException):
    """Stands for the process dying at a chosen instant."""


def completed(live: LiveCoordinator, task_id: int) -> bool:
    return live.task(task_id)["status"] == "completed"


def test_enroll_status_and_signed_requests(live, tmp_path, capsys):
    token = live.admin.create_enrollment_token(label="cli")["token"]
    state_dir = tmp_path / "dev"
    args = ["--url", live.url, "--token", token, "--ca", live.ca_file, "--state-dir"]
    assert cli.main(["enroll", *args, str(state_dir), "--name", "dev-a"]) == 0
    state = State(state_dir)
    config = state.load_config()
    device = live.admin.get_device(config.device_id)
    assert (device["name"], device["status"]) == ("dev-a", "active")
    assert device["public_key"] == signing.public_key_to_b64(state.load_key().public_key())
    assert (state_dir / "ca.pem").read_bytes() == Path(live.ca_file).read_bytes()

    # the token was for one use only; the coordinator's refusal reaches the user
    again = tmp_path / "dev2"
    assert cli.main(["enroll", *args, str(again)]) == 1
    assert "invalid_token" in capsys.readouterr().err

    capsys.readouterr()
    assert cli.main(["status", "--state-dir", str(state_dir), "--remote"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["device_id"] == config.device_id
    assert status["remote"]["device_id"] == config.device_id
    assert status["outbox"] == []


def test_one_full_round(live, digits):
    agents = [live.agent(live.enroll(f"d{i}", seed=i), shard(digits, i)) for i in range(2)]
    threads = [live.start(agent, once=True) for agent in agents]
    task = live.create_task(aggregation={"clients_per_round": 2, "min_updates": 2})
    wait_for(lambda: completed(live, task["id"]), what="the task to complete")
    live.finish(threads)
    (round_,) = live.rounds(task["id"])
    assert (round_["status"], round_["num_received"], round_["result_version"]) == (
        "closed",
        2,
        1,
    )
    assert sum(a.stats.uploaded for a in agents) == 2
    v0 = decode_model(live.admin.download_model(task["id"], 0), spec=SPEC)
    v1 = decode_model(live.admin.download_model(task["id"], 1), spec=SPEC)
    assert not np.array_equal(v0["W"], v1["W"])
    before = architectures.evaluate(SOFTMAX, v0, digits.X_test, digits.y_test)
    after = architectures.evaluate(SOFTMAX, v1, digits.X_test, digits.y_test)
    assert after["loss"] < before["loss"]
    # the metrics the agents reported reached the coordinator (each agent reports after its
    # upload, so a report may arrive after the round closed: it is folded in then)
    wait_for(
        lambda: "eval_accuracy" in live.rounds(task["id"])[0]["metrics"],
        what="the agents' metrics on the round",
    )
    # the model is cached by version and revalidated with its ETag (304)
    agent = agents[0]
    cached = agent.state.cached_model(task["id"], 0)
    assert cached is not None
    assert agent.client.download_model(task["id"], 0, etag=cached[1]) == (None, cached[1])


def test_killed_before_upload_uploads_its_outbox_after_restart_once(live, digits, tmp_path):
    state_dir = live.enroll("killed")
    data = shard(digits, 0)
    npz = tmp_path / "data.npz"
    np.savez(
        npz,
        X=np.concatenate([data.X_train, data.X_eval]),
        y=np.concatenate([data.y_train, data.y_eval]),
    )
    task = live.create_task()
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.edge_agent.agent_process",
            "--state-dir",
            str(state_dir),
            "--data",
            str(npz),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    state = State(state_dir)
    (entry,) = state.outbox.entries()
    # the residual survived the kill and is the one that goes with the saved update
    residual = state.load_residual(task["id"], SPEC)
    assert residual.norm() > 0
    expected = state.outbox.residual_file(entry, RESIDUAL_AFTER).read_bytes()
    assert state.residual_path(task["id"]).read_bytes() == expected
    assert live.rounds(task["id"])[0]["num_received"] == 0

    assert (
        cli.main(["run", "--state-dir", str(state_dir), "--data", str(npz), "--max-rounds", "0"])
        == 0
    )
    wait_for(lambda: completed(live, task["id"]), what="the task to complete")
    assert live.rounds(task["id"])[0]["num_received"] == 1
    assert State(state_dir).outbox.entries() == []
    models = live.admin.list_models(task["id"])["items"]
    assert [m["num_updates"] for m in models if m["version"] == 1] == [1]
    # the residual is still the one that went with the delivered update
    assert State(state_dir).residual_path(task["id"]).read_bytes() == expected


def test_crash_after_upload_is_counted_once(live, digits):
    state_dir = live.enroll("twice")
    agent = live.agent(state_dir, shard(digits, 1))
    upload = agent.client.upload_update

    def upload_then_crash(*args, **kwargs):
        upload(*args, **kwargs)
        raise Crash()

    agent.client.upload_update = upload_then_crash  # type: ignore[method-assign]
    task = live.create_task(aggregation={"num_rounds": 2})
    with pytest.raises(Crash):
        agent.run(once=True)
    assert len(State(state_dir).outbox.entries()) == 1

    restarted = live.agent(state_dir, shard(digits, 1))
    restarted.run(max_rounds=0)
    assert restarted.stats.duplicates == 1
    assert State(state_dir).outbox.entries() == []
    first = live.rounds(task["id"])[0]
    assert first["num_received"] == 1
    wait_for(lambda: live.task(task["id"])["current_version"] >= 1, what="version 1")
    models = live.admin.list_models(task["id"])["items"]
    assert [m["num_updates"] for m in models if m["version"] == 1] == [1]


def test_stale_update_is_discarded_cleanly(live, digits):
    b_saved = threading.Event()

    def a_waits_for_b(entry):
        assert b_saved.wait(20)

    def b_uploads_late(entry):
        b_saved.set()
        wait_for(lambda: live.task(entry.task_id)["current_version"] >= 1, what="version 1")

    a = live.agent(live.enroll("a", seed=1), shard(digits, 0), before_upload=a_waits_for_b)
    b = live.agent(live.enroll("b", seed=2), shard(digits, 1), before_upload=b_uploads_late)
    threads = [live.start(a, once=True), live.start(b, once=True)]
    task = live.create_task(
        aggregation={
            "num_rounds": 3,
            "clients_per_round": 1,
            "over_selection": 1.0,
            "max_staleness": 0,
        }
    )
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive() and not thread.errors
    assert (a.stats.uploaded, b.stats.uploaded) == (1, 0)
    assert b.stats.stale_refused == 1
    assert State(b.state.directory).outbox.entries() == []
    # the refused update left no trace in B's residual (back to what it was: zeros)
    assert b.state.load_residual(task["id"], SPEC).norm() == 0
    assert a.state.load_residual(task["id"], SPEC).norm() > 0


class BlockingTrainer:
    """Trains until told to stop (or 20 s pass)."""

    def __init__(self, model, data):
        self.started = threading.Event()
        self.stopped_after: float | None = None

    def train(self, weights, config, rng, *, should_stop=None):
        self.started.set()
        began = time.monotonic()
        while not (should_stop and should_stop()) and time.monotonic() - began < 20:
            time.sleep(0.01)
        self.stopped_after = time.monotonic() - began
        return TrainResult(weights=weights, num_examples=1, stopped=True)

    def evaluate(self, weights):
        return {}


def test_cancelled_round_stops_training(live, digits):
    trainers: list[BlockingTrainer] = []

    def factory(model, data):
        trainers.append(BlockingTrainer(model, data))
        return trainers[-1]

    agent = live.agent(live.enroll("slow"), shard(digits, 0), trainer_factory=factory)
    thread = live.start(agent, once=True)
    task = live.create_task()
    wait_for(lambda: trainers and trainers[0].started.is_set(), what="training to start")
    live.admin.cancel_task(task["id"])
    thread.join(15)
    assert not thread.is_alive()
    assert agent.stats.cancelled == 1 and agent.stats.uploaded == 0
    assert trainers[0].stopped_after is not None and trainers[0].stopped_after < 10
    assert agent.state.outbox.entries() == []


def test_revoked_device_stops_the_agent(live, digits):
    state_dir = live.enroll("revoked")
    live.admin.revoke_device(State(state_dir).load_config().device_id)
    agent = live.agent(state_dir, shard(digits, 0))
    with pytest.raises(FatalAgentError, match="device_revoked"):
        agent.run(once=True)
