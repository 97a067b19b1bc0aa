"""The agent loop against an in-memory device API (MockTransport): the flow, the outbox across
crashes, residual bookkeeping, 409 stale updates, cancellation, caching, fatal errors."""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from fedge.edge_agent.agent import Agent, FatalAgentError, Outcome, WorkRetry
from fedge.edge_agent.data import LocalData
from fedge.edge_agent.device import enroll_device, open_client
from fedge.edge_agent.errors import ServerError
from fedge.edge_agent.hooks import AgentHooks
from fedge.edge_agent.pauses import deadline_s
from fedge.edge_agent.sim.datasets import load_dataset
from fedge.edge_agent.sim.faults import FaultConfig, FaultHooks, FaultSchedule
from fedge.edge_agent.state import State
from fedge.edge_agent.trainers import NumpyTrainer
from fedge.edge_agent.transport import RetryPolicy
from fedge.shared import architectures
from fedge.shared.wire import decode_model, decode_update, encode_model
from tests.edge_agent.fake_coordinator import MODEL, FakeCoordinator

FAST_RETRY = RetryPolicy(attempts=2, base_delay=0.0, max_delay=0.0)


class Crash(BaseException):
    """Stands for the process dying at a chosen instant."""


@pytest.fixture(scope="module")
def data() -> LocalData:
    ds = load_dataset("digits", test_fraction=0.2, rng=np.random.default_rng(0))
    return LocalData(ds.X_train[:300], ds.y_train[:300], ds.X_test[:60], ds.y_test[:60])


@pytest.fixture
def fake() -> FakeCoordinator:
    return FakeCoordinator()


@pytest.fixture
def state_dir(tmp_path, fake):
    enroll_device(
        tmp_path / "device",
        url="https://coordinator.test",
        token="t",
        name="d",
        seed=11,
        transport=fake.transport(),
    )
    return tmp_path / "device"


def make_agent(state_dir, fake, data, **kwargs: Any) -> Agent:
    state = State(state_dir)
    client = open_client(state, transport=fake.transport(), retry=FAST_RETRY)
    return Agent(
        state=state,
        client=client,
        data=data,
        seed=state.load_config().seed,
        poll_wait=0.2,
        error_pause_s=0.0,
        **kwargs,
    )


def test_one_round_uploads_a_compressed_delta_and_keeps_the_residual(state_dir, fake, data):
    fake.assign(1)
    agent = make_agent(state_dir, fake, data)
    stats = agent.run(once=True)
    assert stats.uploaded == 1
    (received,) = fake.received.values()
    assert received.assignment_id == 1
    # the update is sparse and the residual holds exactly what it did not carry
    base = decode_model(fake.models[0])
    residual = agent.state.load_residual(1, architectures.build_spec(MODEL))
    trainer = NumpyTrainer(MODEL, data)
    rng = np.random.default_rng([agent.seed, 1])
    local = trainer.train(base, {"epochs": 1, "batch_size": 32, "lr": 0.1}, rng).weights
    for name in base:
        true_delta = local[name] - base[name]
        np.testing.assert_allclose(
            received.delta[name] + residual.values[name], true_delta, rtol=1e-5, atol=1e-6
        )
    nnz = sum(int((v != 0).sum()) for v in received.delta.values())
    assert nnz <= 0.06 * sum(v.size for v in base.values())
    assert agent.state.outbox.entries() == []
    # the metrics travel in the update itself: no separate report
    assert set(received.metrics) == {
        "train_loss",
        "eval_loss",
        "eval_accuracy",
        "num_eval_examples",
        "train_time_s",
        "steps",  # the built-in trainer's own metric
    }
    assert received.metrics["num_eval_examples"] == 60
    assert fake.metrics == {}
    assert not [r for r in fake.requests if r.url.path.endswith("/metrics")]


def test_crash_before_upload_uploads_the_outbox_after_restart(state_dir, fake, data):
    fake.assign(1)

    def die(entry):
        raise Crash()

    agent = make_agent(state_dir, fake, data, before_upload=die)
    with pytest.raises(Crash):
        agent.run(once=True)
    assert fake.received == {}
    (pending,) = State(state_dir).outbox.entries()

    restarted = make_agent(state_dir, fake, data)
    restarted.flush_outbox()
    (received,) = fake.received.values()
    assert received.key == pending.idempotency_key
    assert State(state_dir).outbox.entries() == []


def test_crash_after_upload_counts_once(state_dir, fake, data):
    fake.assign(1)
    agent = make_agent(state_dir, fake, data)
    real_upload = agent.client.upload_update

    def upload_then_die(*args, **kwargs):
        real_upload(*args, **kwargs)
        raise Crash()

    agent.client.upload_update = upload_then_die  # type: ignore[method-assign]
    with pytest.raises(Crash):
        agent.run(once=True)
    assert len(fake.received) == 1
    restarted = make_agent(state_dir, fake, data)
    restarted.flush_outbox()
    assert len(fake.received) == 1
    assert restarted.stats.duplicates == 1
    assert State(state_dir).outbox.entries() == []


def test_residual_survives_restart_and_feeds_the_next_update(state_dir, fake, data):
    spec = architectures.build_spec(MODEL)
    fake.assign(1)
    make_agent(state_dir, fake, data).run(once=True)
    kept = State(state_dir).load_residual(1, spec)
    assert kept.norm() > 0

    fake.assign(2)
    agent = make_agent(state_dir, fake, data)
    agent.run(once=True)
    second = next(r for r in fake.received.values() if r.assignment_id == 2)
    # the second update carries (part of) the first round's residual: what it sent plus what
    # is left equals the new delta plus the old residual
    base = decode_model(fake.models[0])
    rng = np.random.default_rng([agent.seed, 2])
    local = NumpyTrainer(MODEL, data).train(base, {"epochs": 1}, rng).weights
    left = State(state_dir).load_residual(1, spec)
    for name in base:
        np.testing.assert_allclose(
            second.delta[name] + left.values[name],
            local[name] - base[name] + kept.values[name],
            rtol=1e-5,
            atol=1e-6,
        )


def test_stale_update_is_discarded_and_the_residual_restored(state_dir, fake, data):
    spec = architectures.build_spec(MODEL)
    fake.assign(1)
    make_agent(state_dir, fake, data).run(once=True)
    before = State(state_dir).load_residual(1, spec).values["W"].copy()
    fake.assign(2)
    fake.stale.add(2)
    agent = make_agent(state_dir, fake, data)
    agent.run(once=True)
    assert agent.stats.stale_refused == 1
    assert [r.assignment_id for r in fake.received.values()] == [1]
    assert State(state_dir).outbox.entries() == []
    np.testing.assert_array_equal(State(state_dir).load_residual(1, spec).values["W"], before)


def test_transient_upload_failure_keeps_the_update(state_dir, fake, data):
    fake.assign(1)
    fake.fail_uploads = 2  # both attempts of the first upload fail
    agent = make_agent(state_dir, fake, data)
    with pytest.raises(ServerError, match="unavailable"):
        agent.handle(agent.client.get_work(0))
    assert len(State(state_dir).outbox.entries()) == 1
    agent.flush_outbox()
    assert len(fake.received) == 1
    assert State(state_dir).outbox.entries() == []


@pytest.mark.parametrize("deadline_in_s", [3600.0, -1.0, None])
def test_a_device_holding_an_update_retries_quickly_then_pauses_as_an_idle_one(
    state_dir, fake, data, deadline_in_s
):
    """Uploads that fail while the coordinator is away: a device holding work retries with the
    short, capped, jittered backoff of ``WorkRetry``, at most ``attempts`` times in a row and
    only before the round's deadline (docs/agent.md, "Outages"); then it takes the idle pause
    (here: the error pause, the fleet is not paced) and keeps the update until it goes out."""
    deadline = None
    if deadline_in_s is not None:
        at = datetime.now(UTC) + timedelta(seconds=deadline_in_s)
        deadline = at.isoformat()
    fake.assign(1, deadline=deadline)
    # every request tries twice (FAST_RETRY): 5 rounds of the loop see the upload fail
    fake.fail_uploads = 2 * 5
    retry = WorkRetry(attempts=3, base_s=0.1, cap_s=0.25)
    agent = make_agent(state_dir, fake, data, work_retry=retry)
    agent.error_pause_s = 7.0
    pauses: list[float] = []
    agent._pause = pauses.append  # type: ignore[method-assign]
    get_work = agent.client.get_work

    def polled(*args: Any, **kwargs: Any) -> Any:
        if fake.received:  # the update went out (from the outbox): done
            agent.stop()
            return None
        return get_work(*args, **kwargs)

    agent.client.get_work = polled  # type: ignore[method-assign]
    agent.run()
    assert agent.stats.uploaded == 1 and State(state_dir).outbox.entries() == []
    assert len(pauses) == 5, pauses
    if deadline_in_s == -1.0:  # the deadline passed: no quick retry
        assert pauses == [7.0] * 5
        return
    quick, idle = pauses[:3], pauses[3:]
    assert idle == [7.0, 7.0]  # the retries in a row are bounded
    ceilings = [0.1, 0.2, 0.25]  # base * 2**k, capped
    assert all(c / 2 <= p <= c for p, c in zip(quick, ceilings, strict=True)), quick
    assert len(set(quick)) == 3  # jittered


def test_a_held_deadline_bounds_the_quick_retries():
    rng = np.random.default_rng(0)
    retry = WorkRetry(attempts=8, base_s=1.0, cap_s=30.0)
    draws = [retry.pause_s(k, None, rng) for k in range(1, 9)]
    assert all(d is not None for d in draws)
    assert [
        min(30.0, 2.0 ** (k - 1)) / 2 <= d <= min(30.0, 2.0 ** (k - 1))  # type: ignore[operator]
        for k, d in enumerate(draws, 1)
    ] == [True] * 8
    assert retry.pause_s(9, None, rng) is None  # bounded
    assert retry.pause_s(0, None, rng) is None
    # Within the deadline: never more than half the time left, none once it passed.
    assert all(0.5 <= retry.pause_s(6, 2.0, rng) <= 1.0 for _ in range(100))  # type: ignore[operator]
    assert retry.pause_s(1, 0.0, rng) is None and retry.pause_s(1, -5.0, rng) is None
    assert (
        deadline_s("2026-12-07T12:00:00+00:00") == datetime(2026, 12, 7, 12, tzinfo=UTC).timestamp()
    )
    assert deadline_s("2026-12-07T12:00:00Z") == deadline_s("2026-12-07T12:00:00+00:00")
    assert deadline_s(None) is None and deadline_s("soon") is None
    assert deadline_s("2026-12-07T12:00:00") is None  # no zone: not trusted


class BlockingTrainer:
    """Trains "forever" until told to stop; reports when it started."""

    def __init__(self, model, data):
        self.started = threading.Event()

    def train(self, weights, config, rng, *, should_stop=None):
        from fedge.edge_agent.trainers import TrainResult

        self.started.set()
        deadline = time.monotonic() + 10
        while not (should_stop and should_stop()) and time.monotonic() < deadline:
            time.sleep(0.01)
        return TrainResult(weights=weights, num_examples=1, stopped=True)

    def evaluate(self, weights):
        return {}


def test_cancelled_round_stops_training(state_dir, fake, data):
    trainers: list[BlockingTrainer] = []

    made = threading.Event()

    def factory(model, local):
        trainers.append(BlockingTrainer(model, local))
        made.set()
        return trainers[-1]

    fake.assign(1)
    agent = make_agent(state_dir, fake, data, trainer_factory=factory)
    work = agent.client.get_work(0)

    def cancel_when_training():
        if made.wait(5) and trainers[0].started.wait(5):
            fake.cancel(1)

    helper = threading.Thread(target=cancel_when_training)
    helper.start()
    started = time.monotonic()
    outcome = agent.handle(work)
    helper.join(5)
    assert not helper.is_alive()
    assert outcome is Outcome.CANCELLED
    assert time.monotonic() - started < 5
    assert fake.received == {} and State(state_dir).outbox.entries() == []


def test_stop_ends_training_without_uploading(state_dir, fake, data):
    holder: list[BlockingTrainer] = []

    made = threading.Event()

    def factory(model, local):
        holder.append(BlockingTrainer(model, local))
        made.set()
        return holder[-1]

    fake.assign(1)
    agent = make_agent(state_dir, fake, data, trainer_factory=factory)
    runner = threading.Thread(target=agent.run)
    runner.start()
    assert made.wait(5), "the agent never made a trainer"
    assert holder[0].started.wait(5)
    agent.stop()
    runner.join(5)
    assert not runner.is_alive()
    assert fake.received == {}


def _etag(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest() + '"'


def test_model_is_cached_and_revalidated_with_its_etag(state_dir, fake, data):
    # Not the weights the task's seed generates: the first download brings the model.
    fake.set_model(0, architectures.init_weights(MODEL, np.random.default_rng(5)))
    generated = encode_model(architectures.generated_weights(MODEL))
    fake.assign(1)
    fake.assign(2)
    agent = make_agent(state_dir, fake, data)
    agent.run(max_rounds=2)
    model_requests = [r for r in fake.requests if "/models/" in r.url.path]
    assert len(model_requests) == 2
    assert model_requests[0].headers["If-None-Match"] == _etag(generated)
    assert model_requests[1].headers["If-None-Match"] == _etag(fake.models[0])
    assert agent.client.traffic.downloads == 1 and agent.client.traffic.not_modified == 1
    assert agent.state.cached_model(1, 0)[0] == fake.models[0]


def test_seeded_version_zero_is_generated_and_only_confirmed(state_dir, fake, data):
    """The coordinator broadcasts a built-in model's seeded weights as version 0: the agent
    makes them itself and the download answers 304 with no model bytes."""
    assert fake.models[0] == encode_model(architectures.generated_weights(MODEL))
    fake.assign(1)
    agent = make_agent(state_dir, fake, data)
    agent.run(once=True)
    assert agent.stats.uploaded == 1
    assert agent.client.traffic.not_modified == 1
    assert agent.client.traffic.downloads == agent.client.traffic.model_bytes == 0
    assert agent.state.cached_model(1, 0) == (fake.models[0], _etag(fake.models[0]))


def test_corrupt_cached_model_is_downloaded_again(state_dir, fake, data):
    fake.assign(1)
    agent = make_agent(state_dir, fake, data)
    cached_etag = _etag(fake.models[0])
    agent.state.cache_model(1, 0, b"garbage", cached_etag)
    agent.run(once=True)
    assert agent.stats.uploaded == 1
    assert agent.state.cached_model(1, 0)[0] == fake.models[0]


def test_revoked_device_stops_the_agent(state_dir, fake, data):
    fake.revoked.add("dev1")
    agent = make_agent(state_dir, fake, data)
    with pytest.raises(FatalAgentError, match="enroll it again"):
        agent.run(once=True)


def test_bad_policy_gives_the_assignment_up_once(state_dir, fake, data):
    fake.assign(1, compression={"topk_fraction": 2.0})
    fake.assign(2)
    agent = make_agent(state_dir, fake, data)
    stats = agent.run(max_rounds=2)
    assert stats.failed == 1 and stats.uploaded == 1


class RecordingHooks(AgentHooks):
    """Records when the agent calls its hooks and what it can see at that moment."""

    def __init__(self, agent_state: State, *, keep: bool = True) -> None:
        self.state = agent_state
        self.keep = keep
        self.calls: list[tuple[Any, ...]] = []

    def keep_assignment(self, work):
        self.calls.append(("keep", work.assignment_id))
        return self.keep

    def before_training(self, work, interrupted):
        self.calls.append(("train", work.assignment_id, interrupted.is_set()))

    def before_first_upload(self, work, stop):
        saved = [e.assignment_id for e in self.state.outbox.entries()]
        self.calls.append(("upload", work.assignment_id, saved))
        return False


def test_hooks_are_called_at_their_points_and_only_for_fresh_updates(state_dir, fake, data):
    fake.fail_uploads = 2  # both attempts fail: update 1 stays in the outbox, flushed later
    fake.assign(1)
    fake.assign(2)
    hooks = RecordingHooks(State(state_dir))
    agent = make_agent(state_dir, fake, data, hooks=hooks)
    stats = agent.run(max_rounds=1)  # assignment 1 was interrupted, so 2 is the one counted
    assert hooks.calls == [
        ("keep", 1),
        ("train", 1, False),
        ("upload", 1, [1]),  # already durable in the outbox
        ("keep", 2),
        ("train", 2, False),
        ("upload", 2, [2]),  # the flush of 1 did not pass through the hook
    ]
    assert stats.uploaded == 2 and stats.late_uploads == 0 and stats.dropped == 0


def test_a_declining_hook_makes_the_agent_walk_away(state_dir, fake, data):
    fake.assign(1)
    hooks = RecordingHooks(State(state_dir), keep=False)
    agent = make_agent(state_dir, fake, data, hooks=hooks, cancel_poll_wait=0.1)
    fake.cancel(1)
    stats = agent.run(once=True)
    assert hooks.calls == [("keep", 1)]
    assert stats.dropped == 1 and fake.received == {} and agent.state.outbox.entries() == []


def test_a_waiting_hook_is_interrupted_by_cancellation(state_dir, fake, data):
    class Straggler(AgentHooks):
        interrupted_in_time = False

        def before_training(self, work, interrupted):
            fake.cancel(work.assignment_id)
            Straggler.interrupted_in_time = interrupted.wait(10)

    fake.assign(1)
    agent = make_agent(state_dir, fake, data, hooks=Straggler(), cancel_poll_wait=0.1)
    outcome = agent.handle(agent.client.get_work(0))
    assert Straggler.interrupted_in_time
    assert outcome is Outcome.CANCELLED and fake.received == {}


def test_simulated_dropout_never_uploads(state_dir, fake, data):
    fake.assign(1)
    schedule = FaultSchedule(FaultConfig(dropout=1.0), np.random.default_rng(0))
    agent = make_agent(state_dir, fake, data, hooks=FaultHooks(schedule), cancel_poll_wait=0.1)
    fake.cancel(1)  # the coordinator gives up on it; the vanished device just leaves it
    stats = agent.run(once=True)
    assert stats.dropped == 1 and fake.received == {}


def test_offline_spell_uploads_late(state_dir, fake, data):
    fake.assign(1)
    schedule = FaultSchedule(
        FaultConfig(offline=1.0, offline_s=(0.05, 0.05)), np.random.default_rng(0)
    )
    agent = make_agent(state_dir, fake, data, hooks=FaultHooks(schedule))
    stats = agent.run(once=True)
    assert stats.late_uploads == 1 and stats.uploaded == 1


def test_saved_update_header_names_task_version_and_examples(state_dir, fake, data):
    fake.assign(1)

    def keep(entry):
        raise Crash()

    agent = make_agent(state_dir, fake, data, before_upload=keep)
    with pytest.raises(Crash):
        agent.run(once=True)
    (entry,) = agent.state.outbox.entries()
    decoded = decode_update(agent.state.outbox.body(entry))
    assert (decoded.task_id, decoded.base_version, decoded.num_examples) == (1, 0, 300)
    assert decoded.bits == 4 and decoded.topk_fraction == 0.05


class BrokenTrainer:
    def __init__(self, model, data):
        pass

    def train(self, weights, config, rng, *, should_stop=None):
        raise ZeroDivisionError("bug in user code")

    def evaluate(self, weights):
        return {}


def test_a_failing_trainer_gives_the_assignment_up_without_stopping_the_agent(
    state_dir, fake, data
):
    fake.assign(1)
    agent = make_agent(state_dir, fake, data, trainer_factory=BrokenTrainer)
    assert agent.handle(agent.client.get_work(0)) is Outcome.FAILED
    assert agent.stats.failed == 1 and fake.received == {}
    assert agent.state.outbox.entries() == []


class DivergingTrainer(BrokenTrainer):
    def train(self, weights, config, rng, *, should_stop=None):
        from fedge.edge_agent.trainers import TrainResult

        return TrainResult({k: np.full_like(v, np.nan) for k, v in weights.items()}, 10)


def test_a_diverged_model_is_not_uploaded(state_dir, fake, data):
    fake.assign(1)
    agent = make_agent(state_dir, fake, data, trainer_factory=DivergingTrainer)
    assert agent.handle(agent.client.get_work(0)) is Outcome.FAILED
    assert fake.received == {} and agent.state.outbox.entries() == []
    assert not agent.state.residual_path(1).exists()


def test_short_training_is_not_watched_and_long_training_is(state_dir, fake, data):
    """The cancel watch starts after cancel_watch_after_s: a round that trains faster costs no
    watch request; a straggler still hears of its cancellation."""

    def watches() -> int:
        return sum(1 for r in fake.requests if "current" in r.url.params)

    fake.assign(1)
    agent = make_agent(state_dir, fake, data, cancel_watch_after_s=30.0, cancel_poll_wait=0.1)
    assert agent.run(once=True).uploaded == 1
    assert watches() == 0

    class Straggler(AgentHooks):
        def before_training(self, work, interrupted):
            interrupted.wait(0.3)  # longer than the watch delay below
            fake.cancel(work.assignment_id)
            interrupted.wait(10)

    fake.assign(2)
    agent = make_agent(
        state_dir, fake, data, hooks=Straggler(), cancel_watch_after_s=0.2, cancel_poll_wait=0.1
    )
    assert agent.handle(agent.client.get_work(0)) is Outcome.CANCELLED
    assert watches() >= 1


# -- capabilities and declines ---------------------------------------------------------------


def test_the_agent_reports_what_it_can_do_once_per_run(state_dir, fake, data):
    fake.assign(1)
    fake.assign(2)
    agent = make_agent(state_dir, fake, data)
    agent.run(max_rounds=2)
    assert fake.reports == [
        {
            "trainers": ["mlp", "softmax"],
            "feature_shape": [64],
            "label_kind": "class",
            "num_examples": 300,
            "poll_interval_s": 1.0,  # its 0.2 s wait, counted as at least a second
        }
    ]
    custom = make_agent(state_dir, fake, data, trainer_factory=NumpyTrainer)
    assert custom.capabilities()["trainers"] == []
    named = make_agent(state_dir, fake, data, trainer_factory=NumpyTrainer, trainers=["x:y"])
    assert named.capabilities()["trainers"] == ["x:y"]


@pytest.mark.parametrize(
    ("extra", "reason", "downloads"),
    [
        ({"compression": {"topk_fraction": 2.0}}, "bad_config", 0),
        ({"model": {**MODEL, "input_dim": 13}}, "data_mismatch", 0),
        ({"training": {"trainer": "fedge_no_such_package.trainers:make"}}, "no_trainer", 0),
        ({"base_version": 7}, "model_unavailable", 1),  # the fake has no version 7
    ],
)
def test_an_assignment_the_device_cannot_work_on_is_declined_at_once(
    state_dir, fake, data, extra, reason, downloads
):
    fake.assign(1, **extra)
    agent = make_agent(state_dir, fake, data)
    assert agent.handle(agent.client.get_work(0)) is Outcome.FAILED
    assert fake.declines[1]["reason"] == reason and fake.declines[1]["detail"]
    assert (agent.stats.failed, agent.stats.declined) == (1, 1)
    assert sum("/models/" in r.url.path for r in fake.requests) == downloads
    assert fake.received == {}


def test_a_failing_trainer_declines_with_its_error(state_dir, fake, data):
    fake.assign(1)
    agent = make_agent(state_dir, fake, data, trainer_factory=BrokenTrainer)
    assert agent.handle(agent.client.get_work(0)) is Outcome.FAILED
    assert fake.declines[1] == {
        "reason": "training_failed",
        "detail": "training failed: ZeroDivisionError('bug in user code')",
    }


class ChattyTrainer(NumpyTrainer):
    """Reports more own metrics than an update carries, and a NaN."""

    def evaluate(self, weights):
        own = {f"m{i:02d}": float(i) for i in range(34)}
        return {**super().evaluate(weights), **own, "f1": float("nan")}


def test_own_metrics_travel_and_what_cannot_is_named_in_the_log(state_dir, fake, data, caplog):
    fake.assign(1)
    agent = make_agent(state_dir, fake, data, trainer_factory=ChattyTrainer)
    with caplog.at_level("WARNING", logger="fedge.edge_agent.uploads"):
        assert agent.run(once=True).uploaded == 1
    (received,) = fake.received.values()
    own = {k: v for k, v in received.metrics.items() if k.startswith("m")}
    # 32 own metrics at most, the first in name order (the trainer's "steps" comes after)
    assert own == {f"m{i:02d}": float(i) for i in range(32)}
    assert "steps" not in received.metrics and "eval_accuracy" in received.metrics
    left_out = {r.getMessage().split("'")[1]: r.getMessage() for r in caplog.records}
    assert set(left_out) == {"f1", "m32", "m33", "steps"}
    assert "finite" in left_out["f1"]
    assert all("over the limit of 32" in left_out[n] for n in ("m32", "m33", "steps"))


def test_an_update_refused_for_good_is_not_trained_again(state_dir, fake, data):
    """A 422 refusal that leaves the assignment open (the coordinator answers it to the next
    work poll again) is declined, not retrained and uploaded in a loop until its deadline."""
    fake.assign(1)
    fake.refused.add(1)
    fake.assign(2)
    agent = make_agent(state_dir, fake, data)
    agent.run(max_rounds=2)
    uploads = [r for r in fake.requests if r.url.path.endswith("/assignments/1/update")]
    assert len(uploads) == 1
    assert fake.declines[1]["reason"] == "other"
    assert agent.stats.discarded == 1 and agent.stats.declined == 1
    assert [r.assignment_id for r in fake.received.values()] == [2]
