"""A fleet that misbehaves on purpose, and the invariants the coordinator must keep anyway.

:class:`ChaosFleet` runs one thread per device against real coordinators (one or several
processes sharing a database). Each device, on every assignment, draws (from its own seeded
``numpy.random.Generator``) one of:

- ``prompt``: upload at once;
- ``late``: wait on its cancellation long-poll until the round cancels or drops it, then
  upload anyway (a straggler; accepted late, or refused as stale);
- ``vanish``: never upload (dropped at the deadline);
- ``twice``: send the same upload twice at once, with the same Idempotency-Key;
- ``race``: send two uploads at once with different keys.

An optional operator thread pauses and resumes the task while rounds run. Every answer must
be one the protocol documents; anything else (a 500 above all) is recorded and fails the test.

:func:`check_invariants` then reads the database and checks what must hold whatever the
interleaving: every update's assignment is ``uploaded`` and every uploaded assignment has one
update; drop, completion and assignment counters equal the rows they count; no round has two
outcomes (closed exactly when it has a result version); versions run 0..current without a gap,
each built by exactly one round from exactly its applied updates.
"""

from __future__ import annotations

import secrets
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from fedge.coordinator.models import ASSIGNMENT_ACTIVE
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.wire import decode_update
from tests.support.device import API
from tests.support.rounds import Db, TestDevice, make_update, random_delta, spec_of

ACTIONS = ("prompt", "late", "vanish", "twice", "race")
#: Upload answers the protocol documents (status, error code or None for success).
UPLOAD_ANSWERS = {
    (201, None),
    (200, None),
    (409, "already_uploaded"),
    (409, "stale_update"),
    (409, "task_not_running"),
}


@dataclass
class ChaosLog:
    """What the fleet saw: answers per kind, and every answer outside the protocol."""

    answers: Counter[tuple[str, int, str | None]] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, r: httpx.Response, allowed: set[tuple[int, str | None]]) -> None:
        code = None
        if r.status_code >= 400:
            try:
                code = r.json().get("error")
            except ValueError:
                code = "<not json>"
        with self.lock:
            self.answers[(kind, r.status_code, code)] += 1
            if (r.status_code, code) not in allowed:
                self.unexpected.append(f"{kind}: {r.status_code} {r.text[:300]}")

    def failure(self, text: str) -> None:
        with self.lock:
            self.unexpected.append(text)


def _client(base_url: str, ca_file: Any) -> httpx.Client:
    return httpx.Client(
        base_url=base_url, verify=ssl.create_default_context(cafile=str(ca_file)), timeout=60
    )


class ChaosDevice(threading.Thread):
    def __init__(
        self,
        device: TestDevice,
        *,
        ca_file: Any,
        rng: np.random.Generator,
        weights: Sequence[float],
        stop: threading.Event,
        log: ChaosLog,
    ) -> None:
        super().__init__(name=f"chaos-{device.device_id[:8]}", daemon=True)
        self.device = device
        self.rng = rng
        self.weights = np.asarray(weights, float) / float(np.sum(weights))
        self.stop = stop
        self.log = log
        self.base_url = str(device.client.base_url)
        self.ca_file = ca_file
        self.num_examples = int(rng.integers(5, 30))

    def _poll(self, *, wait: int, current: int | None = None) -> dict[str, Any] | None:
        params: dict[str, Any] = {"wait": wait}
        if current is not None:
            params["current"] = current
        r = self.device.get(f"{API}/device/work", params=params)
        self.log.record("work", r, {(200, None), (204, None), (429, "rate_limited")})
        return r.json() if r.status_code == 200 else None

    def _upload_request(self, work: dict[str, Any], body: bytes, key: str) -> httpx.Request:
        return self.device.build(
            "POST", work["upload_url"], content=body, headers={"Idempotency-Key": key}
        )

    def _send(self, client: httpx.Client, request: httpx.Request) -> None:
        try:
            r = client.send(request)
        except httpx.HTTPError as exc:
            self.log.failure(f"upload transport error: {exc!r}")
            return
        self.log.record("upload", r, set(UPLOAD_ANSWERS))

    def _upload(self, work: dict[str, Any], action: str) -> None:
        delta = random_delta(spec_of(work), self.rng)
        body = make_update(work, delta=delta, num_examples=self.num_examples, rng=self.rng)
        key = secrets.token_hex(8)
        first = self._upload_request(work, body, key)
        if action not in ("twice", "race"):
            self._send(self.device.client, first)
            return
        second = self._upload_request(work, body, key if action == "twice" else key + "-b")
        # The second goes over a connection of its own, opened now: one kept idle between
        # rare uses would race the server closing it (keep-alive timeout) with a POST that
        # httpx does not retry.
        with _client(self.base_url, self.ca_file) as client:
            other = threading.Thread(target=self._send, args=(client, second))
            other.start()
            self._send(self.device.client, first)
            other.join()

    def _wait_until_stopped(self, work: dict[str, Any]) -> bool:
        """Wait on the cancellation long-poll; True once the assignment was stopped."""
        while not self.stop.is_set():
            answer = self._poll(wait=2, current=work["assignment_id"])
            if answer is not None and answer.get("status") == "cancelled":
                return True
        return False

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                work = self._poll(wait=1)
                if work is None or work.get("status") == "cancelled":
                    continue
                action = str(self.rng.choice(ACTIONS, p=self.weights))
                stopped_first = action in ("late", "vanish")
                if stopped_first and (not self._wait_until_stopped(work) or action == "vanish"):
                    continue
                self._upload(work, action)
        except Exception as exc:  # reported to the test, which fails on it
            self.log.failure(f"device thread crashed: {exc!r}")


class Operator(threading.Thread):
    """Pauses the task and resumes it every ``every`` versions (cancelling work in flight)."""

    def __init__(
        self,
        admin: Callable[[], httpx.Client],
        db: Db,
        task_id: int,
        *,
        every: int,
        stop: threading.Event,
        log: ChaosLog,
    ) -> None:
        super().__init__(name="chaos-operator", daemon=True)
        self.admin, self.db, self.task_id, self.every = admin, db, task_id, every
        self.stop, self.log = stop, log

    def run(self) -> None:
        allowed = {(200, None), (409, "invalid_transition")}
        next_pause = self.every
        try:
            with self.admin() as admin:
                while not self.stop.wait(0.05):
                    task = self.db.task(self.task_id)
                    if task.status not in ("running", "paused"):
                        return
                    if task.current_version < next_pause:
                        continue
                    next_pause = task.current_version + self.every
                    for action in ("pause", "resume"):
                        r = admin.post(f"{API}/tasks/{self.task_id}/{action}")
                        self.log.record(f"admin {action}", r, allowed)
        except Exception as exc:
            self.log.failure(f"operator thread crashed: {exc!r}")


def run_fleet(
    devices: Sequence[TestDevice],
    *,
    ca_file: Any,
    seed: int,
    weights: Sequence[float],
    until: Callable[[], bool],
    timeout_s: float,
    operator: Callable[[threading.Event, ChaosLog], threading.Thread] | None = None,
) -> ChaosLog:
    """Run the chaos fleet until ``until()`` holds (checked every 50 ms) or ``timeout_s``."""
    stop = threading.Event()
    log = ChaosLog()
    rngs = [np.random.default_rng([seed, i]) for i in range(len(devices))]
    threads: list[threading.Thread] = [
        ChaosDevice(d, ca_file=ca_file, rng=rng, weights=weights, stop=stop, log=log)
        for d, rng in zip(devices, rngs, strict=True)
    ]
    if operator is not None:
        threads.append(operator(stop, log))
    for t in threads:
        t.start()
    finished = False
    try:
        waited = 0.0
        while waited < timeout_s:
            if until():
                finished = True
                break
            stop.wait(0.05)
            waited += 0.05
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    if not finished:
        log.failure(f"the run did not finish within {timeout_s} s")
    return log


# ---------------------------------------------------------------------------- invariants


def check_invariants(
    db: Db,
    task_id: int,
    *,
    model_check: Callable[[Weights, list[Weights], list[float]], Weights] | None = None,
    assert_close: Callable[[Weights, Weights], None] | None = None,
) -> list[str]:
    """Every violation of the invariants in the module docstring (empty when all hold)."""
    task = db.task(task_id)
    rounds = db.rounds(task_id)
    assignments = db.assignments(task_id)
    updates = db.updates(task_id)
    bad: list[str] = []

    by_assignment: dict[int, list[Any]] = {}
    for u in updates:
        by_assignment.setdefault(u.assignment_id, []).append(u)
    status_of = {a.id: a.status for a in assignments}
    for u in updates:
        if status_of.get(u.assignment_id) != "uploaded":
            bad.append(
                f"update {u.id} ({u.status}) has assignment {u.assignment_id} in status "
                f"{status_of.get(u.assignment_id)}"
            )
    for a in assignments:
        n = len(by_assignment.get(a.id, []))
        if a.status == "uploaded" and n != 1:
            bad.append(f"assignment {a.id} is uploaded with {n} updates")
        if a.status != "uploaded" and n:
            bad.append(f"assignment {a.id} is {a.status} but has {n} updates")

    # Counters equal the rows they count (each test has its own database, one task).
    for rnd in rounds:
        mine = [a for a in assignments if a.round_id == rnd.id]
        dropped = sum(a.status == "dropped" for a in mine)
        if rnd.num_dropped != dropped:
            bad.append(f"round {rnd.number}: num_dropped {rnd.num_dropped}, {dropped} dropped")
        if rnd.num_assigned != len(mine):
            bad.append(f"round {rnd.number}: num_assigned {rnd.num_assigned}, {len(mine)} rows")
    for device_id in sorted({a.device_id for a in assignments}):
        device = db.device(device_id)
        mine = [a for a in assignments if a.device_id == device_id]
        counts = Counter(a.status for a in mine)
        got = (device.num_assigned, device.num_completed, device.num_dropped)
        want = (len(mine), counts["uploaded"], counts["dropped"])
        if got != want:
            bad.append(f"device {device_id}: (assigned, completed, dropped) {got}, rows {want}")

    # One outcome per round; versions without gaps, each from exactly one round.
    active = [r for r in rounds if r.status in ("open", "aggregating")]
    if len(active) > 1:
        bad.append(f"{len(active)} active rounds")
    if task.status in ("completed", "cancelled", "failed") and active:
        bad.append(f"task is {task.status} with an active round")
    for rnd in rounds:
        if rnd.status == "closed" and (rnd.result_version is None or rnd.closed_at is None):
            bad.append(f"round {rnd.number} closed without a result version")
        if rnd.status != "closed" and rnd.result_version is not None:
            bad.append(f"round {rnd.number} is {rnd.status} with result {rnd.result_version}")
        if rnd.status == "failed" and not rnd.status_reason:
            bad.append(f"round {rnd.number} failed without a reason")
    results = sorted(r.result_version for r in rounds if r.result_version is not None)
    if results != list(range(1, task.current_version + 1)):
        bad.append(f"result versions {results} for current version {task.current_version}")
    for version in range(1, task.current_version + 1):
        row = db.version(task_id, version)
        producer = [r for r in rounds if r.result_version == version]
        if row is None:
            bad.append(f"version {version} missing")
            continue
        if len(producer) != 1 or row.round_id != producer[0].id:
            bad.append(f"version {version}: rounds {[r.number for r in producer]}")
        applied = [u for u in updates if u.status == "applied" and u.applied_version == version]
        if row.num_updates != len(applied) or not applied:
            bad.append(f"version {version}: num_updates {row.num_updates}, {len(applied)} rows")
        if producer and producer[0].num_received != len(applied):
            bad.append(f"version {version}: round num_received {producer[0].num_received}")
        if model_check is not None and assert_close is not None and applied:
            spec = ModelSpec.from_dict(task.model_spec)
            deltas = [
                decode_update(db.blobs.get(u.blob_digest), spec=spec).to_dense() for u in applied
            ]
            base = db.weights(task_id, version - 1)
            want = model_check(base, deltas, [u.weight for u in applied])
            try:
                assert_close(db.weights(task_id, version), want)
            except AssertionError as exc:
                bad.append(f"version {version} is not its base plus its updates: {exc}")
    for u in updates:
        if (u.status == "applied") != (u.applied_version is not None):
            bad.append(f"update {u.id} is {u.status} with applied_version {u.applied_version}")
    if task.status in ("completed", "cancelled", "failed"):
        if any(a.status in ASSIGNMENT_ACTIVE for a in assignments):
            bad.append(f"task is {task.status} with active assignments")
        if any(u.status == "accepted" for u in updates):
            bad.append(f"task is {task.status} with accepted updates")
    return bad
