"""Pace steering, group-committed check-ins and the fair rotation of paced rounds
(docs/protocol.md, "Pace steering"; docs/rounds.md, "Paced fleets")."""

from __future__ import annotations

import itertools
import math
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select, update

from fedge.coordinator.app import create_app
from fedge.coordinator.engine import pace
from fedge.coordinator.engine.rotation import choose_paced, next_checkin, slot
from fedge.coordinator.engine.selection import Candidate
from fedge.coordinator.models import Device, UsedNonce
from fedge.coordinator.settings import Settings
from fedge.edge_agent.agent import Agent
from fedge.edge_agent.client import CoordinatorClient, _reconnect
from fedge.edge_agent.data import LocalData
from fedge.edge_agent.device import enroll_device, open_client
from fedge.edge_agent.sim.datasets import load_dataset
from fedge.edge_agent.state import State
from fedge.edge_agent.transport import RetryPolicy
from tests.coordinator.conftest import Coordinator
from tests.support.device import API, make_token
from tests.support.rounds import Db, TestDevice, create_task, fleet_of, wait_until
from tests.support.servers import serve_in_thread

PACED = {"pace_min_fleet": 1, "pace_max_s": 600.0, "pace_min_s": 5.0, "pace_window_s": 30.0}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The coordinator's test settings with pacing from the first enrolled device."""
    return settings.model_copy(update=PACED)


@pytest.fixture(autouse=True)
def _fresh_pace_state(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every request reads the fleet size and the demand again (not once per 15 s).
    monkeypatch.setattr(pace, "REFRESH_S", 0.0)


def reconnect_of(r: object) -> int:
    assert getattr(r, "status_code", None) == 204, getattr(r, "text", r)
    value = r.headers["Fedge-Reconnect"]  # type: ignore[attr-defined]
    assert value.isdigit()
    return int(value)


# -- the period and the slots (no server) ---------------------------------------------------


def test_more_demand_means_sooner_checkins() -> None:
    s = Settings(database_url="sqlite://", **PACED)
    periods = [pace.period_s(s, 20_000, demand) for demand in (0, 13, 130, 1300, 130_000)]
    assert periods[0] == s.pace_max_s  # no round to feed: the longest period
    assert all(a >= b for a, b in itertools.pairwise(periods))
    assert periods[1] > periods[3]  # strictly sooner with 100x the demand
    assert periods[-1] == s.pace_min_s  # clamped
    # The formula: N * W / (safety * D) devices' worth of check-ins per window.
    want = 20_000 * s.pace_window_s / (s.pace_safety * 130)
    assert periods[2] == pytest.approx(min(s.pace_max_s, want))
    # A larger fleet checks in less often for the same demand.
    assert pace.period_s(s, 200_000, 1300) > pace.period_s(s, 20_000, 1300)


def test_slots_spread_the_fleet_evenly_and_do_not_depend_on_the_process() -> None:
    ids = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(20_000)]
    period = 200.0
    now = 1_765_000_000.0
    due = np.array([next_checkin(d, now, period) for d in ids]) - now
    assert due.min() > 0 and due.max() <= 2 * period
    # Check-ins per second over the next period: no herd (peak within 1.5x of the mean).
    first = np.minimum(due, period)
    per_second = np.bincount(np.floor(due[due < period]).astype(int), minlength=int(period))
    assert per_second.max() <= 1.5 * per_second.mean(), per_second.max()
    assert first.size == len(ids)
    # A slot is a function of the device and the wall clock only: a restarted process (here:
    # a later call) hands out the same times, and the next period's slots are new ones.
    assert [slot(d, 7, period) for d in ids[:50]] == [slot(d, 7, period) for d in ids[:50]]
    within = [slot(d, 7, period) - 7 * period for d in ids[:500]]
    again = [slot(d, 8, period) - 8 * period for d in ids[:500]]
    assert abs(float(np.corrcoef(within, again)[0, 1])) < 0.2


def _paced_fleet_rounds(
    n_devices: int, cohort: int, rounds: int, *, period: float, window: float, seed: int
) -> tuple[np.ndarray, list[int]]:
    """Simulate rounds every ``window`` seconds over a paced fleet whose devices check in at
    their slots: selection counts, and for every device the round it was first picked in."""
    rng = np.random.default_rng(seed)
    ids = [f"dev-{i:05d}" for i in range(n_devices)]
    counts = dict.fromkeys(ids, 0)
    first: dict[str, int] = {}
    start = 1_765_000_000.0
    for r in range(rounds):
        now = start + r * window
        # Every device was last seen at its latest slot before now (arriving 0.5 s after it:
        # a device sleeps whole seconds and its request takes a while).
        seen = {}
        for d in ids:
            at = next_checkin(d, now - 2 * period, period)
            while next_checkin(d, at, period) <= now - 0.5:
                at = next_checkin(d, at, period)
            seen[d] = datetime.fromtimestamp(at + 0.5, UTC)
        candidates = [Candidate(d, 0, 0, counts[d], seen[d]) for d in ids]
        picked = choose_paced(
            candidates,
            cohort,
            rng,
            now=datetime.fromtimestamp(now, UTC),
            period=period,
            window=window,
        )
        assert len(picked) == cohort and len(set(picked)) == cohort
        for d in picked:
            counts[d] += 1
            first.setdefault(d, r)
    return np.array([counts[d] for d in ids]), [first.get(d, rounds) for d in ids]


def test_fair_rotation_picks_every_device_within_a_bounded_number_of_rounds() -> None:
    # Without a window constraint (every device due now) the rotation is exact: each of N
    # devices is picked once in the first ceil(N / n) rounds.
    rng = np.random.default_rng(5)
    ids = [f"d{i}" for i in range(53)]
    counts = dict.fromkeys(ids, 0)
    when = datetime(2026, 1, 1, tzinfo=UTC)
    for r in range(math.ceil(53 / 10)):
        picked = choose_paced(
            [Candidate(d, 0, 0, counts[d], None) for d in ids],
            10,
            rng,
            now=when,
            period=100.0,
            window=10.0,
        )
        for d in picked:
            counts[d] += 1
        assert max(counts.values()) == 1 or r == math.ceil(53 / 10) - 1
    assert min(counts.values()) == 1
    # With the window (devices picked among those checking in during it), over three seeds:
    # everyone within 2 * ceil(N / n) rounds, and counts at most 2 apart after 40 rounds.
    for seed in (1, 2, 3):
        counts_arr, first = _paced_fleet_rounds(200, 10, 40, period=200.0, window=20.0, seed=seed)
        assert max(first) < 2 * math.ceil(200 / 10), max(first)
        assert counts_arr.sum() == 400
        assert counts_arr.max() - counts_arr.min() <= 2, np.bincount(counts_arr)


def _seen_at_their_slots(ids: list[str], now: float, period: float) -> list[Candidate]:
    out = []
    for d in ids:
        at = next_checkin(d, now - 2 * period, period)
        while next_checkin(d, at, period) <= now - 0.5:
            at = next_checkin(d, at, period)
        out.append(Candidate(d, 0, 0, 0, datetime.fromtimestamp(at + 0.5, UTC)))
    return out


def test_a_round_takes_the_first_half_of_its_window_and_late_devices_last() -> None:
    period, window, now = 200.0, 20.0, 1_765_000_000.0
    ids = [f"dev-{i:05d}" for i in range(2000)]
    candidates = _seen_at_their_slots(ids, now, period)
    # When each comes, from when it was last seen (the coordinator's knowledge).
    due = {
        c.device_id: next_checkin(c.device_id, c.last_seen.timestamp(), period) - now
        for c in candidates
        if c.last_seen is not None
    }
    in_window = sum(-1 <= d <= window for d in due.values())
    assert in_window > 150  # N * W / T = 200 of them come within the window
    picked = choose_paced(
        candidates,
        26,
        np.random.default_rng(0),
        now=datetime.fromtimestamp(now, UTC),
        period=period,
        window=window,
    )
    # The cohort (20 + 30 % over-selection) all come within the first half of the window,
    # so it has formed by then, and spread over that half, not bunched at its start (its
    # uploads follow a training time later, as bunched as its check-ins).
    times = np.sort([due[d] for d in picked])
    assert times.max() <= window / 2
    assert times.max() > window / 3 and times[13] > window / 8

    # A device that missed its slots (last seen periods ago, at a slot such that counting
    # whole periods from its next one puts it inside the window) comes after every device of
    # the window, also when it was selected less often.
    def late_inside(device: str) -> float | None:
        for index in range(int(now // period) - 40, int(now // period) - 2):
            seen = slot(device, index, period) + 0.5
            d = next_checkin(device, seen, period)
            if now <= d + period * math.ceil((now - d) / period) <= now + window:
                return seen
        return None

    late_id, seen = next((d, t) for d in ids if (t := late_inside(d)) is not None)
    others = [
        Candidate(c.device_id, 0, 0, 1, c.last_seen) for c in candidates if c.device_id != late_id
    ]
    late = Candidate(late_id, 0, 0, 0, datetime.fromtimestamp(seen, UTC))
    picked = choose_paced(
        [late, *others],
        26,
        np.random.default_rng(0),
        now=datetime.fromtimestamp(now, UTC),
        period=period,
        window=window,
    )
    assert late_id not in picked
    assert late_id in choose_paced(
        [late, *others],
        in_window + 5,
        np.random.default_rng(0),
        now=datetime.fromtimestamp(now, UTC),
        period=period,
        window=window,
    )


def test_reconnect_header_parsing() -> None:
    assert _reconnect("120") == 120.0
    assert _reconnect(None) is None
    assert _reconnect("-1") is None and _reconnect("1e9") is None and _reconnect("") is None
    assert _reconnect("999999") == 86400.0  # capped: a bad answer cannot silence a device
    assert _reconnect("1234567") is None


# -- over HTTPS -----------------------------------------------------------------------------


def test_idle_checkin_answers_at_once_with_a_reconnect_time_and_commits_in_batches(
    coordinator: Coordinator, db: Db
) -> None:
    with fleet_of(coordinator, 4) as fleet:
        started = time.monotonic()
        answers = [d.get(f"{API}/device/work", params={"wait": 30}) for d in fleet]
        assert time.monotonic() - started < 10  # nobody was held for the 30 s asked
        delays = [reconnect_of(r) for r in answers]
        # No demand: the longest period; a device's next slot lies within two of them.
        assert all(1 <= d <= 2 * PACED["pace_max_s"] for d in delays)
        runtime = coordinator.app.state.runtime
        batcher = runtime.pacer.batcher
        assert batcher.checkins >= 4 + 4  # the fleet's enrolment polls and these
        assert batcher.batches <= batcher.checkins
        with db.engine.connect() as conn:
            nonces = conn.execute(select(func.count()).select_from(UsedNonce)).scalar()
            seen = conn.execute(select(Device.last_seen_at)).scalars().all()
        assert nonces == 8
        assert all(s is not None for s in seen)


def test_a_replayed_checkin_is_refused_also_by_another_coordinator(
    coordinator: Coordinator, settings: Settings
) -> None:
    with fleet_of(coordinator, 1) as fleet:
        device = fleet[0]
        request = device.build("GET", f"{API}/device/work", params={"wait": 0})
        assert device.send(request).status_code == 204
        again = device.send(request)
        assert again.status_code == 401 and again.json()["error"] == "replayed_nonce"
        # A second coordinator app on the same database refuses it too: the nonce row was
        # committed before the first answer left.
        with (
            serve_in_thread(
                create_app(settings), certfile=settings.tls_cert, keyfile=settings.tls_key
            ) as url,
            TestDevice(
                url, coordinator.ca_file, key=device.key, device_id=device.device_id
            ) as other,
        ):
            replay = other.client.build_request(
                "GET", f"{API}/device/work", params={"wait": 0}, headers=dict(request.headers)
            )
            r = other.send(replay)
            assert r.status_code == 401 and r.json()["error"] == "replayed_nonce"
            # ... and a fresh check-in there is answered as usual.
            reconnect_of(other.get(f"{API}/device/work", params={"wait": 0}))


def test_two_replays_in_one_batch_one_is_refused(coordinator: Coordinator) -> None:
    import concurrent.futures

    with fleet_of(coordinator, 1) as fleet:
        device = fleet[0]
        request = device.build("GET", f"{API}/device/work", params={"wait": 0})
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: device.send(request), range(4)))
        codes = sorted(r.status_code for r in answers)
        assert codes == [204, 401, 401, 401], [r.text for r in answers]


def test_selected_device_gets_its_assignment_at_its_checkin(
    coordinator: Coordinator, db: Db
) -> None:
    with fleet_of(coordinator, 3) as fleet:
        task_id = create_task(
            coordinator,
            aggregation={
                "clients_per_round": 2,
                "over_selection": 0.0,
                "min_updates": 2,
                "round_deadline_s": 600,
                "num_rounds": 1,
            },
        )
        wait_until(lambda: db.rounds(task_id))
        got = {}
        for device in fleet:
            r = device.get(f"{API}/device/work", params={"wait": 0})
            if r.status_code == 200:
                got[device.device_id] = r.json()
            else:
                reconnect_of(r)
        assert len(got) == 2
        assert {w["task_id"] for w in got.values()} == {task_id}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the paths are the same
def test_revoked_device_is_refused_on_the_paced_path(coordinator: Coordinator) -> None:
    with fleet_of(coordinator, 2) as fleet:
        target = fleet[0]
        with coordinator.admin() as admin:
            r = admin.post(f"{API}/devices/{target.device_id}/revoke")
            assert r.status_code == 200, r.text
        r = target.get(f"{API}/device/work", params={"wait": 0})
        assert r.status_code == 403 and r.json()["error"] == "device_revoked"
        reconnect_of(fleet[1].get(f"{API}/device/work", params={"wait": 0}))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the paths are the same
def test_late_device_and_device_with_an_off_clock_reconnect_normally(
    coordinator: Coordinator, db: Db
) -> None:
    with fleet_of(coordinator, 2) as fleet:
        late, skewed = fleet
        # ``late`` missed its slot by an hour (it was offline).
        with db.engine.begin() as conn:
            conn.execute(
                update(Device)
                .where(Device.id == late.device_id)
                .values(last_seen_at=datetime.now(UTC) - timedelta(hours=1))
            )
        assert 1 <= reconnect_of(late.get(f"{API}/device/work")) <= 2 * PACED["pace_max_s"]
        # ``skewed``'s clock is 200 s ahead (inside the 300 s window): the answer is a delay,
        # not a time on the device's clock, so it sleeps the right time all the same.
        ahead = int(time.time()) + 200
        r = skewed.get(f"{API}/device/work", params={"wait": 0}, timestamp=ahead)
        assert 1 <= reconnect_of(r) <= 2 * PACED["pace_max_s"]
        with db.engine.connect() as conn:
            seen = dict(conn.execute(select(Device.id, Device.last_seen_at)).all())
        assert datetime.now(UTC) - seen[late.device_id] < timedelta(minutes=1)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the paths are the same
def test_demand_shortens_the_reconnect_times(coordinator: Coordinator, db: Db) -> None:
    with fleet_of(coordinator, 3) as fleet:
        pacer = coordinator.app.state.runtime.pacer
        assert pacer.state.period_s == PACED["pace_max_s"]
        create_task(
            coordinator,
            aggregation={
                "clients_per_round": 50,
                "over_selection": 0.0,
                "min_updates": 50,
                "round_deadline_s": 600,
                "num_rounds": 1,
            },
        )

        def demand_seen() -> bool:  # a stale reading answers while the next one is read
            reconnect_of(fleet[0].get(f"{API}/device/work"))
            return bool(pacer.state.demand > 0)

        wait_until(demand_seen)
        delays = [reconnect_of(d.get(f"{API}/device/work")) for d in fleet]
        busy = pacer.state
        assert busy.demand == 50
        assert busy.period_s == PACED["pace_min_s"]  # 3 devices cannot feed 50 a window
        assert all(d <= 2 * busy.period_s for d in delays)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the paths are the same
def test_agent_client_reads_the_reconnect_time(coordinator: Coordinator) -> None:
    with fleet_of(coordinator, 1) as fleet:
        device = fleet[0]
        client = CoordinatorClient(
            coordinator.url,
            ca_file=str(coordinator.ca_file),
            identity=(device.device_id, device.key),
        )
        try:
            assert client.get_work(30) is None
            assert client.reconnect_s is not None and 1 <= client.reconnect_s <= 1200
            client.drop_connection()  # the next request opens a new connection
            assert client.get_work(0) is None
        finally:
            client.close()


@pytest.fixture
def long_poll_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"pace_min_fleet": 10})


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the paths are the same
def test_small_fleet_keeps_the_long_poll(
    long_poll_settings: Settings, coordinator: Coordinator
) -> None:
    with fleet_of(coordinator, 2) as fleet:
        device = fleet[0]
        with (
            serve_in_thread(
                create_app(long_poll_settings),
                certfile=long_poll_settings.tls_cert,
                keyfile=long_poll_settings.tls_key,
            ) as url,
            TestDevice(url, coordinator.ca_file, key=device.key, device_id=device.device_id) as d,
        ):
            started = time.monotonic()
            r = d.get(f"{API}/device/work", params={"wait": 1})
            assert r.status_code == 204 and "Fedge-Reconnect" not in r.headers
            assert time.monotonic() - started >= 0.9  # held for the wait, as before


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the paths are the same
def test_a_paced_agent_does_not_retry_at_once_when_the_coordinator_is_down(
    coordinator: Coordinator, settings: Settings, tmp_path: Path
) -> None:
    """A paced device's check-in that fails is tried once, then the agent pauses a random
    part of its pacing interval (a restart is not followed by a herd of retries); a device
    that was never paced retries and pauses as before."""
    data = load_dataset("digits", test_fraction=0.2, rng=np.random.default_rng(0))
    local = LocalData(data.X_train[:40], data.y_train[:40], data.X_test[:10], data.y_test[:10])
    token = make_token(coordinator, max_uses=2)
    retry = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02)
    with serve_in_thread(
        create_app(settings), certfile=settings.tls_cert, keyfile=settings.tls_key
    ) as url:
        for name in ("paced", "fresh"):
            enroll_device(
                tmp_path / name, url=url, token=token, ca_file=str(coordinator.ca_file), seed=3
            )
        paced_state = State(tmp_path / "paced")
        paced_sleeps: list[float] = []
        paced = open_client(paced_state, retry=retry, sleep=paced_sleeps.append)
        assert paced.get_work(0) is None
        assert paced.reconnect_s is not None  # told its slot: a paced device
        # The slot is a hashed phase of the 600 s period, so now and then it is due within the
        # 5 s floor (the pause is the floor then): a known interval shows the random part in
        # every run.
        interval = paced.reconnect_s = 300.0
        paced.drop_connection()  # as the agent does before a long sleep
    # The coordinator is gone.
    fresh_state = State(tmp_path / "fresh")
    fresh_sleeps: list[float] = []
    fresh = open_client(fresh_state, retry=retry, sleep=fresh_sleeps.append)
    pauses: dict[str, float] = {}
    for name, state, client in (("paced", paced_state, paced), ("fresh", fresh_state, fresh)):
        agent = Agent(
            state=state,
            client=client,
            data=local,
            seed=7,
            error_pause_s=5.0,
            report_capabilities=False,
        )

        def pause(seconds: float, agent: Agent = agent, name: str = name) -> None:
            pauses[name] = seconds
            agent.stop()

        agent._pause = pause  # type: ignore[method-assign]
        agent.run()
        client.close()
    assert paced_sleeps == []  # tried once, no retry at once
    assert 5.0 <= pauses["paced"] <= interval and pauses["paced"] != 5.0
    assert len(fresh_sleeps) == retry.attempts - 1  # the client's retries, as before
    assert pauses["fresh"] == 5.0


def _one_round_events(
    coordinator: Coordinator, url: str, tmp_path: Path
) -> tuple[list[tuple[str, object]], float | None]:
    """An agent on ``url`` works one round of a one-device task, then is stopped at its next
    pause or work poll: the agent's requests and pauses in order, and the reconnect time its
    client holds after the upload."""
    data = load_dataset("digits", test_fraction=0.2, rng=np.random.default_rng(0))
    local = LocalData(data.X_train[:40], data.y_train[:40], data.X_test[:10], data.y_test[:10])
    enroll_device(
        tmp_path / "d", url=url, token=make_token(coordinator), ca_file=str(coordinator.ca_file)
    )
    state = State(tmp_path / "d")
    client = open_client(state)
    assert client.get_work(0) is None  # seen (and, when paced, told its slot) before the task
    task_id = create_task(
        coordinator,
        model={"architecture": "softmax", "input_dim": 64, "num_classes": 10},
        aggregation={
            "clients_per_round": 1,
            "over_selection": 0.0,
            "min_updates": 1,
            "round_deadline_s": 600,
            "num_rounds": 2,
        },
    )
    events: list[tuple[str, object]] = []
    after_upload: list[float | None] = []
    agent = Agent(state=state, client=client, data=local, seed=1, poll_wait=1.0)
    get_work, upload = client.get_work, client.upload_update

    def polled(*args: object, **kwargs: object) -> object:
        if after_upload:  # the first poll after the upload ends the run
            events.append(("poll", None))
            agent.stop()
            return None
        work = get_work(*args, **kwargs)  # type: ignore[arg-type]
        events.append(("work" if work is not None else "idle", task_id))
        return work

    def uploaded(*args: object, **kwargs: object) -> object:
        receipt = upload(*args, **kwargs)  # type: ignore[arg-type]
        events.append(("upload", None))
        after_upload.append(client.reconnect_s)
        return receipt

    def pause(seconds: float) -> None:
        events.append(("pause", seconds))
        if after_upload:
            agent.stop()

    client.get_work = polled  # type: ignore[method-assign]
    client.upload_update = uploaded  # type: ignore[method-assign]
    agent._pause = pause  # type: ignore[method-assign]
    try:
        agent.run()
    finally:
        client.close()
    assert after_upload, events
    return events, after_upload[0]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the paths are the same
def test_a_paced_upload_answer_carries_the_reconnect_time_and_the_agent_sleeps(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    """An accepted upload without a next assignment tells a paced device when to check in
    (its next slot, as an idle check-in is told): the agent sleeps that long instead of
    checking in right after uploading."""
    events, reconnect = _one_round_events(coordinator, coordinator.url, tmp_path)
    assert reconnect is not None and 1 <= reconnect <= 2 * PACED["pace_max_s"]
    at = events.index(("upload", None))
    assert events[at - 1][0] == "work"
    assert events[at + 1 :] == [("pause", reconnect)], events  # no poll before the sleep


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the paths are the same
def test_a_small_fleet_polls_right_after_an_upload_as_before(
    long_poll_settings: Settings, coordinator: Coordinator, tmp_path: Path
) -> None:
    with serve_in_thread(
        create_app(long_poll_settings),
        certfile=long_poll_settings.tls_cert,
        keyfile=long_poll_settings.tls_key,
    ) as url:
        events, reconnect = _one_round_events(coordinator, url, tmp_path)
    assert reconnect is None  # no Fedge-Reconnect on the upload's answer
    at = events.index(("upload", None))
    assert events[at + 1 :] == [("poll", None)], events
