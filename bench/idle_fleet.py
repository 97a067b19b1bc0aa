"""A large idle fleet against one coordinator: pace steering, check-in cost, round formation.

``python bench/idle_fleet.py [--devices 20000] [--procs 3] [--seed 0]``

Setup: one coordinator (``fedge coordinator serve``, SQLite, HTTPS on loopback) and N
enrolled devices, each with its own Ed25519 key. Enrolling 20,000 devices one request at a
time would take minutes, so the benchmark's setup writes the device rows in bulk into the
coordinator's database (:func:`bulk_enroll`: the same columns ``POST /device/enroll`` writes,
each public key checked with the coordinator's strict key check); every request after that is
signed and verified as usual.

A sync task (softmax on 4 features, ``clients_per_round`` 100, ``over_selection`` 0.3,
``min_updates`` 100) runs all along: its rounds are the demand the coordinator paces the fleet
for (``pace_window_s`` 30 s, ``pace_safety`` 3, ``pace_max_s`` 3600: a period of about
1,540 s for 20,000 devices, 13 check-ins a second).

The devices run in ``--procs`` processes, many virtual devices per process (asyncio). A
device checks in with ``GET /device/work?wait=30`` over a new TLS connection (a paced device
closes its connection before a sleep longer than the keep-alive), sleeps the
``Fedge-Reconnect`` time of a 204, and on an assignment "trains" for ``--train-s`` seconds
(30; holding no connection), then uploads a small update over a new connection and sleeps the
``Fedge-Reconnect`` time of the upload's answer (an answer without it: checks in again on that
connection, as devices did before the upload answer carried it).

A failed request is handled as the agent does (:mod:`fedge.edge_agent.pauses`): an idle
device's check-in is tried once, then a pause uniformly random between 5 s and the last
reconnect time (``paced_retry_s``); a device that holds a trained update retries its upload
with the agent's short, jittered, capped backoff within the assignment's deadline
(``WorkRetry``), then pauses as an idle one (an upload answered 5xx or 429 counts as
failed). The fleet starts as if paced for a while:
each device was last seen at its latest slot (0.5 s after it, as a device that sleeps whole
seconds arrives), the device processes come up first, the task starts once they are ready,
and each device checks in first at its first slot after that moment. Time scale: real time
(1:1), no compression.

Measured: check-ins per second as the devices send them and as they arrive at the
coordinator (the time its group commit recorded each check-in's nonce, read back from its
``used_nonces`` rows after the run; the uploads' nonces left out), in per-second and 5-second
counts: peak / mean, each with the median peak / mean of independent Poisson counts of the
same mean and bin count; also as scheduled (when each check-in was meant to be sent) and how
late the loaded simulator sent them (a check-in counts as sent once its TLS connection is
open, so the lateness holds the coordinator's handshake too); after the restart, how the
retries of the check-ins that failed during the outage spread (their pauses as a share of the
interval, and when they came). Coordinator CPU from
``/proc/<pid>/stat`` (utime + stime of the coordinator process) per 1,000 enrolled devices,
each round's formation time (from ``opened_at`` to the moment its 100th device received its
assignment; also each round's assigned and received counts and arrival times), and every
device's selection count; then the coordinator is restarted (SIGTERM, serve again on the same
port) and the check-in rate from its return to 300 s after it stopped is measured again. The
load average (1, 5, 15 min) is recorded at the start, before the restart and at the end.
Results: ``bench/results/idle_fleet.json`` and ``idle_fleet.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import secrets
import ssl
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._fleet_bench import code_state  # noqa: E402
from bench.ingest import machine_info, proc_cpu_s  # noqa: E402
from fedge.coordinator.engine.pace import period_s  # noqa: E402
from fedge.coordinator.engine.rotation import next_checkin  # noqa: E402
from fedge.coordinator.settings import Settings  # noqa: E402
from fedge.edge_agent.pauses import WorkRetry, deadline_s, paced_retry_s  # noqa: E402
from fedge.edge_agent.sim.local_coordinator import (  # noqa: E402
    LocalCoordinator,
    _child_env,
    _command,
    _wait_until_healthy,
    start_local_coordinator,
)
from fedge.edge_agent.transport import RetryPolicy  # noqa: E402
from fedge.shared.compression import compress  # noqa: E402
from fedge.shared.modelspec import ModelSpec  # noqa: E402
from fedge.shared.policy import CompressionPolicy  # noqa: E402
from fedge.shared.signing import sign_request  # noqa: E402
from fedge.shared.wire import encode_update  # noqa: E402

API = "/api/v1"
#: The agent's pause after a failed check-in (``Agent(error_pause_s=...)``'s default).
ERROR_PAUSE_S = 5.0
RESULTS = ROOT / "bench" / "results"
COHORT = 100
OVER_SELECTION = 0.3
PACE = {
    "FEDGE_PACE_WINDOW_S": "30",
    "FEDGE_PACE_SAFETY": "3",
    "FEDGE_PACE_MIN_S": "30",
    "FEDGE_PACE_MAX_S": "3600",
    "FEDGE_PACE_MIN_FLEET": "5000",
    # a single client address runs the whole fleet: the per-process caps are per device
    "FEDGE_MAX_CONNECTIONS": "2000",
    "FEDGE_LOG_LEVEL": "warning",  # no access log line per check-in
    "FEDGE_WORKER_THREADS": "2100",
}


def bulk_enroll(
    database_url: str, keys: list[bytes], rng: np.random.Generator, *, period: float
) -> tuple[list[str], list[float]]:
    """Write enrolled device rows in bulk (the benchmark's setup; see the module docstring),
    each device last seen at its latest slot (as in a fleet paced for a while): its ids and
    the times of their next slots."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from sqlalchemy import insert

    from fedge.coordinator.db import make_engine
    from fedge.coordinator.models import Device
    from fedge.shared.signing import public_key_from_b64, public_key_to_b64

    now = datetime.now(UTC)
    rows = []
    ids: list[str] = []
    nexts: list[float] = []
    for i, raw in enumerate(keys):
        public = public_key_to_b64(Ed25519PrivateKey.from_private_bytes(raw).public_key())
        public_key_from_b64(public)  # the coordinator's strict check
        device_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        ids.append(device_id)
        upcoming = next_checkin(device_id, time.time(), period)
        previous = next_checkin(device_id, upcoming - 2 * period, period)
        while (later := next_checkin(device_id, previous, period)) < upcoming:
            previous = later
        nexts.append(upcoming)
        rows.append(
            {
                "id": device_id,
                "name": f"sim-{i}",
                "public_key": public,
                "status": "active",
                "capabilities": {},
                "tags": [],
                "enrolled_at": now,
                # as a device that came for that slot (0.5 s after it: it sleeps whole
                # seconds, and a request takes a while)
                "last_seen_at": datetime.fromtimestamp(previous + 0.5, UTC),
                "num_assigned": 0,
                "num_completed": 0,
                "num_dropped": 0,
                "num_declined": 0,
            }
        )
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            for start in range(0, len(rows), 2000):
                conn.execute(insert(Device), rows[start : start + 2000])
    finally:
        engine.dispose()
    return ids, nexts


# -- the simulated devices (one process each slice) -----------------------------------------


class _Http:
    """A minimal HTTP/1.1 client over one TLS connection (asyncio streams)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(
        self, method: str, target: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("connection closed")
        status = int(status_line.split()[1])
        got: dict[str, str] = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            got[name.strip().lower()] = value.strip()
        length = int(got.get("content-length", "0"))
        data = await self.reader.readexactly(length) if length else b""
        return status, got, data

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


def _signed(
    key: Any, device_id: str, method: str, path: str, params: dict[str, Any], body: bytes = b""
) -> tuple[str, dict[str, str]]:
    query = urlencode(sorted(params.items()))
    headers = sign_request(
        key, device_id=device_id, method=method, path=path, query=query, body=body
    )
    return (f"{path}?{query}" if query else path), headers


def _update_body(work: dict[str, Any], rng: np.random.Generator) -> bytes:
    spec = ModelSpec.from_dict(work["spec"])
    delta = {t.name: rng.normal(0, 0.01, t.shape).astype(np.float32) for t in spec.tensors}
    policy = CompressionPolicy.from_dict(work["compression"])
    return encode_update(
        compress(delta, policy, rng),
        task_id=work["task_id"],
        base_version=work["base_version"],
        num_examples=10,
    )


async def _device(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    device_id: str,
    raw_key: bytes,
    *,
    first_at: float,
    end_at: float,
    train_s: float,
    period: float,
    seed: int,
    log: dict[str, list[Any]],
    sem: asyncio.Semaphore,
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.from_private_bytes(raw_key)
    rng = np.random.default_rng(seed)
    retry_rng = random.Random(seed)
    policy = RetryPolicy()
    config: dict[str, Any] = {}
    work: dict[str, Any] | None = None
    await asyncio.sleep(max(0.0, min(first_at, end_at) - time.time()))
    intended = first_at  # when this device means to send its next check-in
    failures = 0
    # As the agent: paced since the fleet started (the last interval it was told, here its
    # period); a failed check-in is followed by the agent's paced pause.
    reconnect: float | None = period
    work_retry = WorkRetry()
    while time.time() < end_at:
        delay = 0.0
        retry = failures > 0
        trained = work is not None  # holds an update to upload (not one just received)
        try:
            async with sem:
                reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
            http = _Http(reader, writer)
            try:
                uploaded = work is not None
                told: float | None = None
                if work is not None:  # trained: upload
                    told = await _upload(http, key, device_id, work, rng, log)
                    work = None
                if told is not None:  # the upload's answer said when to check in
                    delay = told
                else:  # (an answer without it: check in on the same connection, as before)
                    delay, work = await _checkin(
                        http,
                        key,
                        device_id,
                        config,
                        log,
                        retry=retry,
                        after_upload=uploaded,
                        intended=intended,
                    )
            finally:
                await http.close()
            failures = 0
            if work is None:
                reconnect = delay
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, ValueError):
            log["errors"].append(time.time())
            failures += 1
            quick = None
            if trained and work is not None:  # holds work: the agent's quick retries
                deadline = deadline_s(work.get("deadline"))
                left = None if deadline is None else deadline - time.time()
                quick = work_retry.pause_s(failures, left, rng)
            if quick is not None:
                delay = quick
                log["work_retries"].append((time.time(), delay))
            elif reconnect is None:  # unpaced: the client's own retries first
                delay = policy.backoff(min(failures - 1, 10), retry_rng)
            else:  # paced: tried once, then the agent's pause (pauses.paced_retry_s)
                delay = paced_retry_s(reconnect, ERROR_PAUSE_S, rng)
                log["paced_pauses"].append((time.time(), delay, reconnect))
        if work is not None and not (trained and failures):
            delay = train_s  # local training, holding no connection
        intended = time.time() + delay
        await asyncio.sleep(max(0.0, min(delay, end_at - time.time())))


async def _checkin(
    http: _Http,
    key: Any,
    device_id: str,
    config: dict[str, Any],
    log: dict[str, list[Any]],
    *,
    retry: bool,
    after_upload: bool,
    intended: float,
) -> tuple[float, dict[str, Any] | None]:
    """One check-in: (seconds until the next one, None) or (0, the assignment)."""
    params: dict[str, Any] = {"wait": 30}
    if config:
        params["known"] = config["config_digest"]
    target, headers = _signed(key, device_id, "GET", f"{API}/device/work", params)
    now = time.time()
    log["checkins"].append(now)
    log["intended"].append(intended)
    if retry:
        log["retries"].append(now)
    if after_upload:
        log["after_upload"].append(now)
    status, got, data = await http.request("GET", target, headers)
    if status == 204:
        return float(got.get("fedge-reconnect", "30")), None
    if status != 200:
        raise ConnectionError(f"check-in answered {status}")
    work = json.loads(data)
    if "spec" in work:
        config.update(work)
    work = {**config, **work}
    log["assigned"].append((work["round_id"], work["assignment_id"], time.time()))
    return 0.0, work


async def _upload(
    http: _Http,
    key: Any,
    device_id: str,
    work: dict[str, Any],
    rng: np.random.Generator,
    log: dict[str, list[Any]],
) -> float | None:
    """Upload an update: the ``Fedge-Reconnect`` time of an accepted upload's answer."""
    body = _update_body(work, rng)
    target, headers = _signed(key, device_id, "POST", work["upload_url"], {}, body)
    # its nonce, to tell the coordinator's record of this request from the check-ins'
    log["upload_nonces"].append(headers["Authorization"].split(" ", 1)[1].split(".")[2])
    headers.update(
        {
            "Idempotency-Key": secrets.token_hex(8),
            "Prefer": "return=minimal",
            "Content-Type": "application/octet-stream",
        }
    )
    status, got, _ = await http.request("POST", target, headers, body)
    log["uploads"].append((status, time.time()))
    if status >= 500 or status == 429:  # the update is kept and sent again
        raise ConnectionError(f"upload answered {status}")
    told = got.get("fedge-reconnect")
    if status not in (200, 201) or told is None:
        return None
    log["upload_reconnect"].append(float(told))
    return float(told)


def _worker(
    url: str,
    ca_file: str,
    devices: list[tuple[str, bytes, int]],
    period: float,
    train_s: float,
    out: Any,
) -> None:
    """One process of simulated devices: says it is ready, receives (start, end), and runs
    every device from its first slot after ``start`` (so that no device's first check-in
    waits for the process to come up)."""
    parts = urlsplit(url)
    ctx = ssl.create_default_context(cafile=ca_file)
    log: dict[str, list[Any]] = {
        "checkins": [],
        "retries": [],
        "after_upload": [],
        "intended": [],
        "assigned": [],
        "uploads": [],
        "upload_nonces": [],
        "upload_reconnect": [],
        "paced_pauses": [],
        "work_retries": [],
        "errors": [],
    }
    out.send("ready")
    start, end_at = out.recv()

    async def main() -> None:
        sem = asyncio.Semaphore(64)  # handshakes in flight per process
        await asyncio.gather(
            *(
                _device(
                    parts.hostname or "127.0.0.1",
                    parts.port or 443,
                    ctx,
                    d,
                    k,
                    first_at=next_checkin(d, start, period),
                    end_at=end_at,
                    train_s=train_s,
                    period=period,
                    seed=seed,
                    log=log,
                    sem=sem,
                )
                for d, k, seed in devices
            )
        )

    cpu0 = time.process_time()
    asyncio.run(main())
    log["cpu_s"] = [time.process_time() - cpu0]
    out.send(log)
    out.close()


# -- the run --------------------------------------------------------------------------------


def _restart(coord: LocalCoordinator, port: int, env: dict[str, str]) -> tuple[float, float]:
    """Stop the coordinator and serve the same data on the same port: (stopped, ready)."""
    coord.stop(timeout=30)
    stopped = time.time()
    log = open(coord.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
    coord.process = subprocess.Popen(
        _command(
            "serve",
            "--data-dir",
            str(coord.data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-file",
            str(coord.data_dir / "port"),
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_child_env(env),
    )
    coord._log = log
    _wait_until_healthy(coord, coord.data_dir / "port", 180)
    return stopped, time.time()


def _per_second(times: np.ndarray, start: float, end: float) -> np.ndarray:
    inside = times[(times >= start) & (times < end)]
    return np.bincount((inside - start).astype(int), minlength=int(end - start))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    from sqlalchemy import create_engine, select

    rng = np.random.default_rng(args.seed)
    data = Path(args.data_dir)
    env = dict(PACE)
    coord = start_local_coordinator(data, env=env)
    port = int(urlsplit(coord.url).port or 0)
    db_url = f"sqlite:///{(data / 'fedge.db').resolve()}"
    try:
        settings = Settings(database_url=db_url, **{k[6:].lower(): v for k, v in PACE.items()})
        demand = float(np.ceil(COHORT * (1 + OVER_SELECTION)))
        period = period_s(settings, args.devices, demand)
        t = time.time()
        keys = [rng.bytes(32) for _ in range(args.devices)]
        ids, nexts = bulk_enroll(db_url, keys, rng, period=period)
        enroll_s = time.time() - t
        del nexts
        # The device processes come up first (importing, building 20,000 keys and coroutines
        # takes a while on a loaded machine); the task starts once they are all ready, and
        # each device checks in first at its first slot after that.
        seeds = rng.integers(0, 2**31, args.devices)
        slices = np.array_split(np.arange(args.devices), args.procs)
        ctx = mp.get_context("spawn")
        pipes, procs = [], []
        for part in slices:
            here, there = ctx.Pipe(duplex=True)
            devices = [(ids[i], keys[i], int(seeds[i])) for i in part]
            p = ctx.Process(
                target=_worker,
                args=(coord.url, coord.ca_file, devices, period, args.train_s, there),
            )
            p.start()
            pipes.append(here)
            procs.append(p)
        for pipe in pipes:
            if pipe.recv() != "ready":
                raise RuntimeError("a device process did not come up")
        with httpx.Client(
            base_url=coord.url,
            verify=ssl.create_default_context(cafile=coord.ca_file),
            headers={"Authorization": f"Bearer {coord.admin_key}"},
            timeout=60,
        ) as admin:
            r = admin.post(
                f"{API}/tasks",
                json={
                    "name": "paced",
                    "model": {"architecture": "softmax", "input_dim": 4, "num_classes": 2},
                    "aggregation": {
                        "mode": "sync",
                        "clients_per_round": COHORT,
                        "over_selection": OVER_SELECTION,
                        "min_updates": COHORT,
                        "round_deadline_s": 300,
                        "num_rounds": 100000,
                    },
                },
            )
            r.raise_for_status()
            task_id = r.json()["id"]
            # The devices run from before the start: the first round may pick a device whose
            # slot comes while this request is answered.
            start = time.time()
            admin.post(f"{API}/tasks/{task_id}/start").raise_for_status()
        restart_at = start + args.before_restart
        end_at = restart_at + args.after_restart
        for pipe in pipes:
            pipe.send((start, end_at))
        load = {"at_start": os.getloadavg()}
        warm = start + args.warmup
        time.sleep(max(0.0, warm - time.time()))
        cpu0, t0 = proc_cpu_s(coord.process.pid), time.time()
        cpu_samples = [(t0, cpu0)]  # once a second, for the split of the CPU
        while (due := cpu_samples[-1][0] + 1.0) < restart_at:
            time.sleep(max(0.0, due - time.time()))
            cpu_samples.append((time.time(), proc_cpu_s(coord.process.pid)))
        time.sleep(max(0.0, restart_at - time.time()))
        cpu1, t1 = proc_cpu_s(coord.process.pid), time.time()
        load["before_restart"] = os.getloadavg()
        stopped, ready = _restart(coord, port, env)
        print(f"restarted: down {ready - stopped:.1f} s", file=sys.stderr, flush=True)
        time.sleep(max(0.0, ready + 5 - time.time()))
        cpu2, t2 = proc_cpu_s(coord.process.pid), time.time()
        time.sleep(max(0.0, end_at - 1 - time.time()))
        cpu3, t3 = proc_cpu_s(coord.process.pid), time.time()
        load["at_end"] = os.getloadavg()
        logs = [pipe.recv() for pipe in pipes]
        for p in procs:
            p.join(60)
    finally:
        coord.stop(timeout=30)

    checkins = np.sort(np.concatenate([np.array(lg["checkins"]) for lg in logs]))
    assigned = [a for lg in logs for a in lg["assigned"]]
    uploads = [u for lg in logs for u in lg["uploads"]]
    errors = np.concatenate([np.array(lg["errors"]) for lg in logs]) if logs else np.array([])
    retries = np.concatenate([np.array(lg["retries"]) for lg in logs])
    # The check-ins of devices that just uploaded (they come together, a training time
    # after their round's devices checked in) against the rest (the idle fleet's).
    after_upload = np.sort(np.concatenate([np.array(lg["after_upload"]) for lg in logs]))
    idle_only = np.setdiff1d(checkins, after_upload)
    # When each check-in was meant to be sent (its slot as told, or the end of a training or
    # a pause) against when the loaded simulator sent it: the spread the design gives, and
    # the lateness the machine added.
    sent = np.concatenate([np.array(lg["checkins"]) for lg in logs])
    meant = np.concatenate([np.array(lg["intended"]) for lg in logs])
    in_steady = (sent >= t0) & (sent < t1)
    late_s = (sent - meant)[in_steady]
    steady = _per_second(checkins, t0, t1)
    after_end = max(ready + 10, end_at - 1)
    after = _per_second(checkins, ready, after_end)

    engine = create_engine(db_url)
    from fedge.coordinator.models import Device, Round, UsedNonce

    with engine.connect() as conn:
        nonce_rows = conn.execute(select(UsedNonce.nonce, UsedNonce.expires_at)).all()
        rounds = conn.execute(
            select(
                Round.id,
                Round.number,
                Round.opened_at,
                Round.closed_at,
                Round.status,
                Round.num_assigned,
            ).where(Round.task_id == task_id)
        ).all()
        counts = np.array(conn.execute(select(Device.num_assigned)).scalars().all())
    engine.dispose()
    by_round: dict[int, list[float]] = {}
    for round_id, _, at in assigned:
        by_round.setdefault(int(round_id), []).append(at)
    formation = []
    for round_id, number, opened_at, closed_at, status, num_assigned in rounds:
        got = sorted(by_round.get(int(round_id), []))
        opened = opened_at.replace(tzinfo=UTC).timestamp()
        formed = got[COHORT - 1] - opened if len(got) >= COHORT else None
        delays = np.array(got) - opened
        formation.append(
            {
                "number": number,
                "status": status,
                "assigned": num_assigned,
                "received": len(got),
                "formation_s": formed,
                "received_s_median": float(np.median(delays)) if got else None,
                "received_s_max": float(delays.max()) if got else None,
                "open_s": (closed_at.replace(tzinfo=UTC).timestamp() if closed_at else t3) - opened,
                "during_restart": bool(
                    opened < ready
                    and (closed_at is None or closed_at.replace(tzinfo=UTC).timestamp() > stopped)
                ),
            }
        )
    formed_s = [f["formation_s"] for f in formation if f["formation_s"] is not None]
    # Where the check-ins arrived: the coordinator records every request's nonce with
    # ``expires_at`` = its clock when it recorded the request (a check-in: its batch) + twice
    # the signature window; the uploads' nonces are left out.
    ttl = 2 * settings.signature_skew_s
    upload_nonces = {n for lg in logs for n in lg["upload_nonces"]}
    arrived = np.sort(
        np.array(
            [
                expires.replace(tzinfo=UTC).timestamp() - ttl
                for nonce, expires in nonce_rows
                if nonce not in upload_nonces
            ]
        )
    )
    c_steady = _per_second(arrived, t0, t1)
    c_after = _per_second(arrived, ready, after_end)
    # Whether the simulator was starved: how late each check-in was sent, overall and in the
    # busiest seconds of what it sent.
    late_all = sent - meant
    top = np.argsort(steady)[-5:]
    second = np.floor(sent - t0).astype(int)
    in_top = in_steady & np.isin(second, top)
    pauses = np.array([p for lg in logs for p in lg["paced_pauses"]]).reshape(-1, 3)
    outage = pauses[(pauses[:, 0] >= stopped - 5) & (pauses[:, 0] < ready)]
    retried_at = retries[retries >= ready] - ready
    work_pauses = np.array([p for lg in logs for p in lg["work_retries"]]).reshape(-1, 2)
    told_after_upload = np.array([t for lg in logs for t in lg["upload_reconnect"]])
    n_k = args.devices / 1000
    window = float(PACE["FEDGE_PACE_WINDOW_S"])
    steady_cpu = (cpu1 - cpu0) / (t1 - t0)
    after_cpu = (cpu3 - cpu2) / (t3 - t2)
    result = {
        "devices": args.devices,
        "procs": args.procs,
        "seed": args.seed,
        "time_scale": "1:1 (real time, no compression)",
        "train_s": args.train_s,
        "settings": {k: float(v) for k, v in PACE.items() if "PACE" in k},
        "task": {
            "clients_per_round": COHORT,
            "over_selection": OVER_SELECTION,
            "min_updates": COHORT,
            "demand_per_window": demand,
        },
        "period_s": period,
        "bulk_enroll_s": enroll_s,
        "load_average_1_5_15": load,
        "steady": {
            "seconds": t1 - t0,
            "checkins": int(steady.sum()),
            "retried_checkins": int(((retries >= t0) & (retries < t1)).sum()),
            **_herd(steady, rng),
            "idle_checkins_only": _herd(_per_second(idle_only, t0, t1), rng),
            "as_scheduled": _herd(_per_second(np.sort(meant), t0, t1), rng),
            "sent_late_s": {
                "median": float(np.median(late_s)),
                "p90": float(np.quantile(late_s, 0.9)),
                "p99": float(np.quantile(late_s, 0.99)),
                "max": float(late_s.max()),
                "share_over_1s": float((late_s > 1).mean()),
                "share_over_5s": float((late_s > 5).mean()),
                "median_in_the_5_busiest_sent_seconds": float(np.median(late_all[in_top]))
                if in_top.any()
                else None,
            },
            "as_arrived_at_coordinator": {
                "checkins": int(c_steady.sum()),
                **_herd(c_steady, rng),
            },
            "coordinator_cpu_split": _cpu_split(
                cpu_samples, checkins, after_upload, np.array([t for _, t in uploads]), assigned
            ),
            "expected_per_s": args.devices / period,
            "coordinator_cpu_share": steady_cpu,
            "coordinator_cpu_pct_per_1000_devices": 100 * steady_cpu / n_k,
            "coordinator_cpu_ms_per_checkin": 1000 * (cpu1 - cpu0) / max(1, int(steady.sum())),
        },
        "restart": {
            "down_s": ready - stopped,
            "failed_requests": int(errors.size),
            "retried_checkins_after": int((retries >= ready).sum()),
            "seconds_measured": int(after.size),
            **_herd(after, rng),
            "idle_checkins_only": _herd(_per_second(idle_only, ready, after_end), rng),
            "as_arrived_at_coordinator": {
                "checkins": int(c_after.sum()),
                **_herd(c_after, rng),
            },
            "paced_retries": {
                # the pauses chosen after the check-ins that failed during the outage, as a
                # share of the pacing interval they were drawn from (uniform: quantiles
                # near 0.25 / 0.5 / 0.75), and when those retries came after the return
                "paused_after_failures": int(outage.shape[0]),
                "pause_over_interval_quantiles_25_50_75": (
                    np.quantile(outage[:, 1] / outage[:, 2], [0.25, 0.5, 0.75]).tolist()
                    if outage.size
                    else None
                ),
                "retries_after_return": int(retried_at.size),
                "retry_s_after_return_quantiles_10_50_90": (
                    np.quantile(retried_at, [0.1, 0.5, 0.9]).tolist() if retried_at.size else None
                ),
                "retries_in_first_30s": int((retried_at < 30).sum()),
                "retries_per_s_peak": int(np.bincount(retried_at.astype(int)).max())
                if retried_at.size
                else 0,
            },
            # devices holding a trained update whose upload failed: their quick retries
            "work_retries": {
                "pauses": int(work_pauses.shape[0]),
                "pause_s_max": float(work_pauses[:, 1].max()) if work_pauses.size else None,
            },
            "coordinator_cpu_pct_per_1000_devices": 100 * after_cpu / n_k,
        },
        "rounds": {
            "opened": len(rounds),
            "formed": len(formed_s),
            "formation_s_median": float(np.median(formed_s)) if formed_s else None,
            "formation_s_max": float(np.max(formed_s)) if formed_s else None,
            "window_s": float(PACE["FEDGE_PACE_WINDOW_S"]),
            "formed_within_window": int(sum(f <= window for f in formed_s)),
            "detail": formation,
        },
        "selection_counts": {
            "histogram": {str(k): int(v) for k, v in enumerate(np.bincount(counts))},
            "max": int(counts.max()),
            "selected_devices": int((counts > 0).sum()),
            "assignments": int(counts.sum()),
        },
        "uploads": {
            "accepted": sum(1 for s, _ in uploads if s in (200, 201)),
            "all": len(uploads),
            "checkins_right_after_upload": int(after_upload.size),
            "reconnect_told_s": {
                "answers": int(told_after_upload.size),
                "min": float(told_after_upload.min()) if told_after_upload.size else None,
                "median": float(np.median(told_after_upload)) if told_after_upload.size else None,
                "max": float(told_after_upload.max()) if told_after_upload.size else None,
            },
        },
        "loadgen_cpu_s": [lg["cpu_s"][0] for lg in logs],
        "per_second": {  # check-ins sent in each second (for plots and checks)
            "steady": steady.tolist(),
            "steady_idle_only": _per_second(idle_only, t0, t1).tolist(),
            "steady_as_scheduled": _per_second(np.sort(meant), t0, t1).tolist(),
            "after_restart": after.tolist(),
            "steady_as_arrived": c_steady.tolist(),
            "after_restart_as_arrived": c_after.tolist(),
        },
        "machine": machine_info(),
    }
    _plot(steady, after, c_steady, c_after, result, Path(args.out).with_suffix(".png"))
    return result


def _cpu_split(
    samples: list[tuple[float, float]],
    checkins: np.ndarray,
    after_upload: np.ndarray,
    upload_times: np.ndarray,
    assigned: list[tuple[Any, Any, float]],
) -> dict[str, float]:
    """The coordinator's CPU in 5 s bins of the steady window, fitted (least squares) as
    ``base + idle * idle check-ins + upload * uploads + assign * assignments`` (an upload
    whose answer carried no reconnect time comes with the check-in after it): the share of
    the idle fleet is ``base`` plus its check-ins (``base`` also holds the scheduler's ticks,
    counted as idle)."""
    times = np.array([t for t, _ in samples])
    cpu = np.array([c for _, c in samples])
    edges = times[::5]
    if edges.size < 6:
        return {}
    used = np.diff(cpu[::5])
    at = np.array([a for _, _, a in assigned]) if assigned else np.array([])
    ups = np.histogram(upload_times, edges)[0]
    assigns = np.histogram(at, edges)[0]
    idle = np.histogram(checkins, edges)[0] - np.histogram(after_upload, edges)[0] - assigns
    x = np.column_stack([np.diff(edges), idle, ups, assigns]).astype(float)
    coef, *_ = np.linalg.lstsq(x, used, rcond=None)
    seconds = float(edges[-1] - edges[0])
    idle_share = float(coef[0] + coef[1] * idle.sum() / seconds)
    return {
        "bins": int(used.size),
        "base_cpu_share": float(coef[0]),
        "ms_per_idle_checkin": 1000 * float(coef[1]),
        "ms_per_upload": 1000 * float(coef[2]),
        "ms_per_assignment_checkin": 1000 * float(coef[3]),
        "idle_fleet_cpu_share": idle_share,
        "round_work_cpu_share": float(used.sum() / seconds) - idle_share,
    }


def _poisson_peak(mean: float, bins: int, rng: np.random.Generator) -> float:
    """The median peak/mean of ``bins`` Poisson counts of this mean: what independent,
    perfectly spread check-ins would show (the floor of the figure on that bin size)."""
    draws = rng.poisson(mean, size=(200, bins))
    return float(np.median(draws.max(axis=1) / draws.mean(axis=1)))


def _herd(per_second: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """Peak / mean of the check-in counts in 1 s and 5 s bins, each with the Poisson
    reference for the same bin size and number of bins."""
    n = per_second.size // 5 * 5
    five = per_second[:n].reshape(-1, 5).sum(axis=1)
    return {
        "checkins_per_s_mean": float(per_second.mean()),
        "checkins_per_s_peak": int(per_second.max()),
        "peak_over_mean": float(per_second.max() / per_second.mean()),
        "peak_over_mean_poisson_reference": _poisson_peak(
            float(per_second.mean()), per_second.size, rng
        ),
        "peak_over_mean_5s_bins": float(five.max() / five.mean()),
        "peak_over_mean_5s_bins_poisson_reference": _poisson_peak(
            float(five.mean()), five.size, rng
        ),
    }


def _plot(
    steady: np.ndarray,
    after: np.ndarray,
    c_steady: np.ndarray,
    c_after: np.ndarray,
    result: dict[str, Any],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    gap = steady.size + 5
    ax.plot(np.arange(steady.size), steady, lw=0.7, color="C0", label="sent (simulator)")
    ax.plot(gap + np.arange(after.size), after, lw=0.7, color="C0")
    ax.plot(np.arange(c_steady.size), c_steady, lw=0.7, color="C1", label="arrived (coordinator)")
    ax.plot(gap + np.arange(c_after.size), c_after, lw=0.7, color="C1")
    ax.axvline(gap - 2.5, color="grey", lw=0.6)
    ax.axhline(result["steady"]["expected_per_s"], color="k", lw=0.6, ls="--", label="N / T")
    ax.set_xlabel("second of the measurement")
    ax.set_ylabel("check-ins per second")
    ax.set_title(
        f"{result['devices']} paced devices, period {result['period_s']:.0f} s; steady | after "
        "a restart; peak/mean as arrived "
        f"{result['steady']['as_arrived_at_coordinator']['peak_over_mean']:.2f} | "
        f"{result['restart']['as_arrived_at_coordinator']['peak_over_mean']:.2f}, as sent "
        f"{result['steady']['peak_over_mean']:.2f} | {result['restart']['peak_over_mean']:.2f}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20_000)
    parser.add_argument("--procs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--train-s", type=float, default=30.0)
    parser.add_argument("--before-restart", type=float, default=260.0)
    parser.add_argument(
        "--after-restart",
        type=float,
        default=300.0,
        help="seconds from stopping the coordinator to the end (its downtime included)",
    )
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--out", default=str(RESULTS / "idle_fleet.json"))
    args = parser.parse_args()
    if not args.data_dir:
        import tempfile

        args.data_dir = tempfile.mkdtemp(prefix="fedge-idle-fleet-")
    os.makedirs(RESULTS, exist_ok=True)
    state = code_state()  # before the run: what was measured
    result = {**state, **run(args)}
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2, default=str))
    print(json.dumps({k: v for k, v in result["rounds"].items() if k != "detail"}, indent=2))


if __name__ == "__main__":
    main()
