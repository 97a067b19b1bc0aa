"""Ingest benchmark: how fast the coordinator accepts signed, compressed updates.

The coordinator runs in its own process (``fedge coordinator init`` + ``serve`` over HTTPS with
the certificate ``init`` made, via :func:`fedge.edge_agent.sim.local_coordinator.
start_local_coordinator`), once on SQLite (a file) and once on PostgreSQL (a fresh database
``fedge_bench``, dropped afterwards). Load generators run in ``--procs`` OTHER processes
(asyncio + ``httpx.AsyncClient``), each driving a slice of C real enrolled devices (enrollment
tokens from the admin API, seeded Ed25519 keys). Per device (``--device-mode agent``, the
default, as the agent does): long-poll for work (``wait=20``) -> upload with ``next=1`` -> take
the next assignment from the answer when it carries one, else long-poll -> repeat (``--device-
mode busy``: get work with ``wait=0``, 20 ms apart when there is none, then upload: the device
model of runs before the evening of 6 December 2026). Each request is signed with
``fedge.shared.signing``; each upload carries its own update body (an MLP 256-300-80, 101,180
parameters; top-1% 4-bit, error feedback), encoded with
``fedge.shared.compression``/``fedge.shared.wire`` from one of a few noise deltas and a fresh
draw of the stochastic quantization, so every body is distinct and the coordinator's content-
addressed blob store keeps every one (identical bodies would be found and only refreshed; by
default an update body is a row written in the upload's own transaction, a file only above
``inline_update_max_bytes``). The generators check their digests; the run counts the blobs the
coordinator added against the updates it accepted.

The task is async (FedBuff): ``max_concurrency`` above C, ``max_staleness`` large,
``buffer_size = min(100, C // 2)`` (a device works at most once per model version, so the
buffer must fill with fewer than C devices). Figures per C:

* accepted updates/s and upload latency p50/p99 (client side: request sent -> answer) in the
  measured window;
* coordinator CPU-seconds per accepted update from ``/proc/<pid>/stat`` (utime + stime, plus
  cutime + cstime) of the coordinator's whole process tree (``serve`` and, with ``--workers``
  above 1, its worker processes) before/after the window -- this INCLUDES the work requests
  and the aggregations the coordinator did in the window (primary figure: it does not depend
  on the 2-core machine being shared with the load generator);
* CPU per upload request alone: a separate pass where every device first takes one
  assignment of a task whose buffer never fills (no aggregation), then all upload at once;
  the coordinator CPU over the upload burst / uploads (and the CPU per assigning work request
  from the first half);
* the load generators' own CPU-seconds over the window (to show they are not saturated).

Ladder (on by default, ``--no-ladder`` skips it): one request at a time, no concurrency, on
two async tasks that never aggregate: the coordinator's CPU per request of each kind --
``healthz`` (HTTP, TLS and the middleware of a request that does nothing), a signed work
request that assigns, one answered with the assignment the device already has, one with
nothing to give (204), an upload whose answer carries the next assignment and one whose
answer has none. The sum for one update is what an update costs when nothing contends.

Open loop (``--rates 0,20,40,60``, at the largest C): each rate is a fresh async task whose
devices upload on a fixed schedule of that many updates/s in all (as long as the coordinator
keeps up), long-polling as agents do; the coordinator CPU share at each rate, and the
straight line through (accepted updates/s, CPU share): its slope is the CPU of one more
accepted update, its intercept the CPU the coordinator spends at rest with C devices
connected. The closed loop above measures the coordinator saturated, where contention adds
to every update; these two measure it below saturation.

Worker processes (``--workers 1,2``): on PostgreSQL each count is its own coordinator start
(``FEDGE_WORKERS``; fresh data directory and database) in the same run, recorded as its own
entry of ``backends`` (with ``workers``); the summary's ``workers_scaling`` has updates/s with
N workers over updates/s with 1 at each C, and the CPU per update of both. SQLite runs 1 (the
coordinator refuses more).

Ceiling: a bare FastAPI app (``bench/_ingest_ceiling.py``) that only verifies an Ed25519
signature over a 2 KB body, single uvicorn worker, TLS, driven by the same load generator.

Long-poll: N idle devices hold ``GET /device/work?wait=60`` (the product's maximum), spread
over ``--longpoll-procs`` load generators (8: with 2 of them, taking in 1,000 answers at once
took them 5.6 s, with 8 1.3 s, so the generators and not the coordinator set the pace); after
an idle window (coordinator CPU and requests arriving are measured) a sync task selecting all N
devices is started; the latency from sending the start request to each device's answer.

The machine has 2 cores: coordinator and load generators compete for them, so updates/s and
latency are lower bounds; CPU-seconds per update is the figure that does not depend on it.

    python bench/ingest.py              # full: C in 50/200/500, SQLite + PostgreSQL, 1000 polls
    python bench/ingest.py --quick      # C=50, SQLite, short windows, 200 polls
    python bench/ingest.py --backends postgresql --workers 1,2   # 1 vs 2 worker processes
    python bench/ingest.py --quick --no-ceiling --no-longpoll --rates 0,20,40,60
    python bench/ingest.py --plot-only  # redraw the PNG from the JSON
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import _ingest_load  # noqa: E402
from bench._ingest_load import cpu_between, thread_cpu_ns  # noqa: E402
from fedge.edge_agent.admin_client import AdminClient  # noqa: E402
from fedge.edge_agent.sim.local_coordinator import LocalCoordinator, start_local_coordinator  # noqa: E402
from fedge.shared.signing import public_key_to_b64  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_BENCH_DB = "fedge_bench"
MODEL = {"architecture": "mlp", "input_dim": 256, "num_classes": 80, "hidden": [300], "seed": 0}
COMPRESSION = {
    "topk_fraction": 0.01,
    "bits": 4,
    "chunk": 64,
    "error_feedback": True,
    "scope": "tensor",
}
TARGETS = {
    "updates_per_s_at_500": 1000.0,
    "p99_ms_at_500": 100.0,
    "cpu_ms_per_update": 1.0,
    "longpoll_wake_s_1000": 1.0,
    "idle_requests_per_device_per_25s": 1.0,
}
CEILING_QUOTED = {"rps_tls": 2700, "rps_plain": 3100, "p99_ms": 34, "tool": "wrk -c50"}


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import cryptography
    import fastapi
    import sqlalchemy
    import uvicorn

    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "httpx": httpx.__version__,
        "cryptography": cryptography.__version__,
    }


def _stat(pid: int, proc: Path) -> list[str]:
    """The fields of /proc/<pid>/stat after ``(comm)`` (comm may hold spaces): state, ppid, ...;
    utime, stime, cutime, cstime are at 11..14."""
    return (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (seconds) from /proc/<pid>/stat."""
    fields = _stat(pid, Path("/proc"))
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """``pid`` and all its descendants (zombies included), from one scan of /proc for the
    parent of every process (this kernel has no /proc/<pid>/task/<tid>/children)."""
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat(int(entry.name), proc)[1])
        except (OSError, ValueError, IndexError):  # exited meanwhile
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def tree_cpu(pid: int, proc: Path = Path("/proc")) -> tuple[float, list[int]]:
    """CPU-seconds of a process tree (a ``serve`` supervisor and its workers) and its pids.

    Sums utime + stime + cutime + cstime over ``pid`` and its descendants. cutime/cstime hold
    the CPU of children that exited and were reaped, and a zombie still shows its own
    utime/stime, so the sum is continuous when a worker dies: the difference of two samples
    counts a worker that exited (and was started again) between them -- as long as the
    process that reaps it (the supervisor) is in the tree."""
    total = 0
    pids = []
    for p in process_tree(pid, proc):
        try:
            f = _stat(p, proc)
        except OSError:
            if p == pid:
                raise
            continue  # a descendant gone between the scan and the read
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        pids.append(p)
    return total / os.sysconf("SC_CLK_TCK"), sorted(pids)


def tree_cpu_s(pid: int) -> float:
    return tree_cpu(pid)[0]


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


def device_keys(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(32) for _ in range(n)]


# ----------------------------------------------------------------------------- setup


def pg_database(action: str) -> str:
    """Create (``create``) or drop (``drop``) the bench database; its URL."""
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {PG_BENCH_DB} WITH (FORCE)"))
            if action == "create":
                conn.execute(text(f"CREATE DATABASE {PG_BENCH_DB}"))
    finally:
        engine.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{PG_BENCH_DB}"


def coordinator_env(db_url: str | None, max_connections: int, workers: int = 1) -> dict[str, str]:
    """The coordinator's settings; ``max_connections`` and the threads are per worker process."""
    env = {
        "FEDGE_LOG_LEVEL": "warning",
        "FEDGE_WORKERS": str(workers),
        # The bench drives each device far above a real device's rate.
        "FEDGE_DEVICE_RATE_PER_MINUTE": "10000000",
        "FEDGE_MAX_CONNECTIONS": str(max_connections),
        "FEDGE_WORKER_THREADS": str(max_connections + 64),
        "PYTHONPATH": str(ROOT),
    }
    if db_url:
        env["FEDGE_DATABASE_URL"] = db_url
    return env


async def _enroll_all(url: str, ca: str, token: str, keys: list[bytes]) -> list[str]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    sem = asyncio.Semaphore(32)
    async with httpx.AsyncClient(base_url=url, verify=ca, timeout=60) as client:

        async def one(i: int, key: bytes) -> str:
            pub = public_key_to_b64(Ed25519PrivateKey.from_private_bytes(key).public_key())
            async with sem:
                r = await client.post(
                    "/api/v1/device/enroll",
                    json={"token": token, "public_key": pub, "name": f"bench-{i}"},
                )
            r.raise_for_status()
            return str(r.json()["device_id"])

        return list(await asyncio.gather(*(one(i, k) for i, k in enumerate(keys))))


def enroll(coord: LocalCoordinator, admin: AdminClient, keys: list[bytes]) -> list[str]:
    token = admin.create_enrollment_token(label="bench", max_uses=len(keys))["token"]
    return asyncio.run(_enroll_all(coord.url, coord.ca_file, token, keys))


def async_task(admin: AdminClient, name: str, *, buffer_size: int, concurrency: int) -> int:
    body = {
        "name": name,
        "model": MODEL,
        "aggregation": {
            "mode": "async",
            "strategy": "fedavg",
            "num_rounds": 1_000_000,
            "max_staleness": 1_000_000,
            "buffer_size": buffer_size,
            "max_concurrency": concurrency,
            "lease_s": 600.0,
            "staleness": {"function": "polynomial", "a": 0.5},
        },
        "compression": COMPRESSION,
        "training": {"epochs": 1, "batch_size": 32, "lr": 0.1},
    }
    task_id = int(admin.create_task(body)["id"])
    admin.start_task(task_id)
    return task_id


def buffer_for(c: int) -> int:
    """The async task's buffer for C devices: half of them (a device works once per model
    version, so the buffer must fill with fewer than C), at most 100."""
    return max(1, min(100, c // 2))


def fleet_task(admin: AdminClient, name: str, c: int) -> int:
    """The steady windows' async task for C devices (:func:`buffer_for`, concurrency 10 C)."""
    return async_task(admin, name, buffer_size=buffer_for(c), concurrency=10 * c)


def sync_task(admin: AdminClient, name: str, n: int) -> int:
    body = {
        "name": name,
        "model": MODEL,
        "aggregation": {
            "mode": "sync",
            "strategy": "fedavg",
            "num_rounds": 1,
            "clients_per_round": n,
            "over_selection": 0.0,
            "min_updates": 1,
            "round_deadline_s": 600.0,
        },
        "compression": COMPRESSION,
        "training": {"epochs": 1, "batch_size": 32, "lr": 0.1},
    }
    return int(admin.create_task(body)["id"])


# ----------------------------------------------------------------------------- phases


def run_workers(
    cfgs: list[dict[str, Any]], *, between: Any = None, events: bool = False
) -> list[dict[str, Any]]:
    """Start one process per config, optionally run ``between(readies, go)`` in this process
    while they work, and collect their result dicts."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    readies = [ctx.Event() for _ in cfgs] if events else []
    go = ctx.Event() if events else None
    procs = []
    for i, cfg in enumerate(cfgs):
        args: tuple[Any, ...] = (cfg, out) + ((readies[i], go) if events else ())
        p = ctx.Process(target=_ingest_load.worker, args=args, daemon=True)
        p.start()
        procs.append(p)
    extra = between(readies, go) if between is not None else None
    results = [out.get(timeout=900) for _ in cfgs]
    for p in procs:
        p.join(timeout=30)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"load generator failed: {errors}")
    if extra is not None:
        results.append({"between": extra})
    return results


def count_blobs(root: Path, db_url: str) -> int:
    """Blobs in the coordinator's store: files (not its temporary files) and the rows of its
    database (update bodies up to ``inline_update_max_bytes``, stored in the upload's own
    transaction)."""
    from sqlalchemy import create_engine, text

    files = 0
    if root.is_dir():
        files = sum(1 for f in root.rglob("*") if f.is_file() and not f.name.startswith(".tmp-"))
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = int(conn.execute(text("SELECT count(*) FROM blobs")).scalar_one())
    finally:
        engine.dispose()
    return files + rows


def split(items: list[Any], parts: int) -> list[list[Any]]:
    return [items[i::parts] for i in range(parts) if items[i::parts]]


def steady(
    coord: LocalCoordinator,
    devices: list[tuple[str, str]],
    *,
    procs: int,
    warmup_s: float,
    measure_s: float,
    seed: int,
    profile: Path | None = None,
    workers: int = 1,
    device_mode: str = "agent",
    rate: float | None = None,
) -> dict[str, Any]:
    """The closed loop (every device uploads again as soon as it can), or with ``rate`` the
    open loop: ``rate`` uploads/s offered in all, split evenly over the processes."""
    t_start = time.time() + 3.0  # processes start and import first
    t0 = t_start + warmup_s
    t1 = t0 + measure_s
    base = {
        "phase": "steady",
        "url": coord.url,
        "ca_file": coord.ca_file,
        "model": MODEL,
        "compression": COMPRESSION,
        "t_start": t_start,
        "t0": t0,
        "t1": t1,
        "t_end": t1 + 0.5,
        "device_mode": device_mode,
    }
    parts = split(devices, procs)
    if rate is not None:
        base["rate"] = rate / len(parts)
    cfgs = [{**base, "devices": part, "seed": seed + i} for i, part in enumerate(parts)]
    pid = coord.process.pid

    def between(_r: Any, _g: Any) -> dict[str, Any]:
        spy = None
        time.sleep(max(0.0, t0 - time.time()))
        c0, pids0 = tree_cpu(pid)
        if profile is not None:
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(measure_s)),
                    "--rate",
                    "200",
                    "--format",
                    "raw" if profile.suffix == ".txt" else "flamegraph",
                    "--output",
                    str(profile),
                    "--nonblocking",
                    # the supervisor only waits: sample its workers
                    *(["--subprocesses"] if workers > 1 else []),
                    # .txt: collapsed stacks of the GIL holder only (where the CPU goes)
                    *(["--gil"] if profile.suffix == ".txt" else []),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        time.sleep(max(0.0, t1 - time.time()))
        c1, pids1 = tree_cpu(pid)
        if spy is not None:
            spy.wait(timeout=60)
        return {"coord_cpu_s": c1 - c0, "pids0": pids0, "pids1": pids1}

    results = run_workers(cfgs, between=between)
    sampled = results.pop()["between"]
    coord_cpu = sampled["coord_cpu_s"]
    lat = [x for r in results for x in r["latencies"]]
    uploads = sum(r["in_window"]["uploads"] for r in results)
    work = sum(r["in_window"]["work"] for r in results)
    work_200 = sum(r["in_window"]["work_200"] for r in results)
    codes: dict[str, int] = {}
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["codes"].items():
            codes[k] = codes.get(k, 0) + v
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    gen_cpu = [r["cpu_s"] for r in results]
    built = sum(r["bodies"]["built"] for r in results)
    return {
        "concurrency": len(devices),
        "window_s": measure_s,
        "accepted_uploads": uploads,
        "updates_per_s": uploads / measure_s,
        "upload_p50_ms": None if not lat else 1000 * (pct(lat, 50) or 0.0),
        "upload_p99_ms": None if not lat else 1000 * (pct(lat, 99) or 0.0),
        "work_requests": work,
        "work_requests_assigned": work_200,
        "next_with_upload": sum(r["in_window"]["next_with_upload"] for r in results),
        "device_mode": device_mode,
        "coordinator_cpu_s": coord_cpu,
        "coordinator_cpu_ms_per_update": 1000 * coord_cpu / uploads if uploads else None,
        "coordinator_cpu_share": coord_cpu / measure_s,
        # the coordinator's process tree (supervisor + workers) at the window's start and end:
        # different pids mean a worker was started again within the window
        "coordinator_pids_start_end": [sampled["pids0"], sampled["pids1"]],
        "loadgen_procs": len(cfgs),
        "loadgen_cpu_s": gen_cpu,
        "loadgen_cpu_share_per_proc": [c / measure_s for c in gen_cpu],
        "loadgen_body_build_cpu_s": [r["body_build_s_in_window"] for r in results],
        "bodies_built": built,
        "bodies_redrawn_as_repeats": sum(r["bodies"]["redrawn"] for r in results),
        "offered_updates_per_s": rate,
        "schedule_slots_skipped": sum(r["slots_skipped"] for r in results),
        "status_counts": codes,
        "client_errors": errors,
        # the machine is shared: how busy it was (runnable tasks, 1 and 5 min) at the end
        "load_average_1_5min": list(os.getloadavg()[:2]),
    }


def upload_only(
    coord: LocalCoordinator, devices: list[tuple[str, str]], *, procs: int, seed: int
) -> dict[str, Any]:
    """Coordinator CPU per assigning work request and per upload request, measured apart."""
    base = {
        "phase": "assign_upload",
        "url": coord.url,
        "ca_file": coord.ca_file,
        "model": MODEL,
        "compression": COMPRESSION,
    }
    cfgs = [
        {**base, "devices": part, "seed": seed + i} for i, part in enumerate(split(devices, procs))
    ]
    pid = coord.process.pid
    marks: dict[str, float] = {}

    def between(readies: list[Any], go: Any) -> dict[str, float]:
        marks["assign0"] = tree_cpu_s(pid)
        for ev in readies:
            ev.wait(timeout=300)
        time.sleep(0.3)
        marks["assign1"] = tree_cpu_s(pid)
        go.set()
        return marks

    results = run_workers(cfgs, between=between, events=True)
    results.pop()
    # Wait until the coordinator is done with the burst (answers are in; CPU settles).
    time.sleep(0.5)
    c_end = tree_cpu_s(pid)
    uploads = sum(len(r["latencies"]) for r in results)
    assigned = sum(r["assigned"] for r in results)
    lat = [x for r in results for x in r["latencies"]]
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    upload_cpu = c_end - marks["assign1"]
    return {
        "devices": len(devices),
        "assigned": assigned,
        "accepted_uploads": uploads,
        "coordinator_cpu_s_assign": marks["assign1"] - marks["assign0"],
        "coordinator_cpu_ms_per_assign_request": (
            1000 * (marks["assign1"] - marks["assign0"]) / assigned if assigned else None
        ),
        "coordinator_cpu_s_upload": upload_cpu,
        "coordinator_cpu_ms_per_upload_request": 1000 * upload_cpu / uploads if uploads else None,
        "burst_s": span,
        "burst_upload_p50_ms": None if not lat else 1000 * (pct(lat, 50) or 0.0),
        "burst_upload_p99_ms": None if not lat else 1000 * (pct(lat, 99) or 0.0),
        "status_counts": [r["codes"] for r in results],
    }


def longpoll(
    coord: LocalCoordinator,
    admin: AdminClient,
    devices: list[tuple[str, str]],
    *,
    procs: int,
    idle_s: float,
) -> dict[str, Any]:
    n = len(devices)
    task_id = sync_task(admin, f"bench-longpoll-{n}", n)
    wait = 60
    base = {
        "phase": "longpoll",
        "url": coord.url,
        "ca_file": coord.ca_file,
        "wait": wait,
        "poll_for_s": idle_s + 90,
        "timeout": 200.0,
    }
    cfgs = [{**base, "devices": part} for part in split(devices, procs)]
    pid = coord.process.pid
    marks: dict[str, float] = {}

    def between(readies: list[Any], _go: Any) -> dict[str, float]:
        for ev in readies:
            ev.wait(timeout=300)
        time.sleep(1.0)  # every poll is in
        marks["idle_t0"] = time.time()
        c0 = tree_cpu_s(pid)
        time.sleep(idle_s)
        marks["idle_cpu_s"] = tree_cpu_s(pid) - c0
        marks["idle_t1"] = time.time()
        marks["open_sent"] = time.time()
        admin.start_task(task_id)
        marks["open_answered"] = time.time()
        return marks

    results = run_workers(cfgs, between=between, events=True)
    results.pop()
    answered = sorted(t for r in results for t in r["answered"])
    sent = sum(r["requests_sent"] for r in results)
    wake = [t - marks["open_sent"] for t in answered]
    codes: dict[str, int] = {}
    for r in results:
        for k, v in r["codes"].items():
            codes[k] = codes.get(k, 0) + v
    # Requests sent beyond the first poll of each device, other than after the wake-up:
    # re-polls of devices whose wait ended (each device sends one per `wait` seconds).
    answered_before_open = sum(1 for t in answered if t < marks["open_sent"])
    extra = sent - n
    admin.cancel_task(task_id)
    return {
        "devices": n,
        "wait_s": wait,
        "answered": len(answered),
        "answered_before_open": answered_before_open,
        "start_request_s": marks["open_answered"] - marks["open_sent"],
        "wake_p50_s": pct(wake, 50),
        "wake_p99_s": pct(wake, 99),
        "wake_max_s": max(wake) if wake else None,
        "wake_all_within_s": max(wake) if len(wake) == n else None,
        "idle_window_s": idle_s,
        "idle_coordinator_cpu_s": marks["idle_cpu_s"],
        "idle_coordinator_cpu_share": marks["idle_cpu_s"] / idle_s,
        "requests_sent_total": sent,
        "requests_beyond_first_poll": extra,
        "idle_requests_per_device_per_25s_protocol": 25.0 / wait,
        "status_counts": codes,
        "loadgen_cpu_s": [r["cpu_s"] for r in results],
    }


def ceiling(
    tls_dir: Path, cs: list[int], *, procs: int, warmup_s: float, measure_s: float, seed: int
) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="fedge-ceiling-"))
    port_file = work / "port"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "_ingest_ceiling.py"),
            str(tls_dir / "server.crt"),
            str(tls_dir / "server.key"),
            str(port_file),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out = []
    try:
        deadline = time.time() + 30
        while not port_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        url = f"https://127.0.0.1:{int(port_file.read_text())}"
        time.sleep(1.0)
        for c in cs:
            t_start = time.time() + 3.0
            t0, t1 = t_start + warmup_s, t_start + warmup_s + measure_s
            base = {
                "phase": "ceiling",
                "url": url,
                "ca_file": str(tls_dir / "ca.crt"),
                "t_start": t_start,
                "t0": t0,
                "t1": t1,
                "t_end": t1 + 0.3,
            }
            per = [len(p) for p in split(list(range(c)), procs)]
            cfgs = [{**base, "concurrency": k, "seed": seed + i} for i, k in enumerate(per)]

            def between(_r: Any, _g: Any, t0: float = t0, t1: float = t1) -> dict[str, float]:
                time.sleep(max(0.0, t0 - time.time()))
                c0 = proc_cpu_s(proc.pid)
                time.sleep(max(0.0, t1 - time.time()))
                return {"cpu": proc_cpu_s(proc.pid) - c0}

            results = run_workers(cfgs, between=between)
            cpu = results.pop()["between"]["cpu"]
            lat = [x for r in results for x in r["latencies"]]
            out.append(
                {
                    "concurrency": c,
                    "requests_per_s": len(lat) / measure_s,
                    "p50_ms": 1000 * (pct(lat, 50) or 0.0),
                    "p99_ms": 1000 * (pct(lat, 99) or 0.0),
                    "server_cpu_ms_per_request": 1000 * cpu / len(lat) if lat else None,
                    "loadgen_cpu_s": [r["cpu_s"] for r in results],
                    "window_s": measure_s,
                }
            )
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        shutil.rmtree(work, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- run


def label(b: dict[str, Any]) -> str:
    """``postgresql``, or ``postgresql x2 workers`` for a run with more worker processes."""
    workers = int(b.get("workers", 1))
    return b["backend"] if workers == 1 else f"{b['backend']} x{workers} workers"


def summary_key(b: dict[str, Any]) -> str:
    """The run's key in the summary: the backend (1 worker) or ``<backend>_workers<N>``."""
    workers = int(b.get("workers", 1))
    return b["backend"] if workers == 1 else f"{b['backend']}_workers{workers}"


def _profile_path(args: argparse.Namespace, tag: str) -> Path | None:
    """Where ``--profile`` puts the py-spy record of a steady window (``tag`` tells them
    apart): a flame graph under bench/results, or collapsed stacks next to the given .txt."""
    if not args.profile:
        return None
    if args.profile.endswith(".txt"):
        given = Path(args.profile)
        return given.with_name(f"{given.stem}_{tag}.txt")
    return RESULTS / f"ingest_profile_{tag}_{args.profile}.svg"


def run_backend(
    backend: str,
    args: argparse.Namespace,
    p: dict[str, Any],
    keys: list[bytes],
    *,
    workers: int = 1,
    with_longpoll: bool = False,
) -> tuple[dict[str, Any], Path | None]:
    """One coordinator start (fresh data directory, fresh PostgreSQL database) with
    ``workers`` processes, measured at every C."""
    work = Path(tempfile.mkdtemp(prefix=f"fedge-ingest-{backend}-w{workers}-"))
    db_url = pg_database("create") if backend == "postgresql" else None
    max_conn = max(1000, p["longpoll_devices"] + 100)
    out: dict[str, Any] = {"backend": backend, "workers": workers, "runs": [], "upload_only": []}
    name = label(out)
    tls_copy: Path | None = None
    coord = start_local_coordinator(
        work / "data",
        env={**coordinator_env(db_url, max_conn, workers), **dict(args.coordinator_env)},
        startup_timeout=180.0,
    )
    try:
        tls_copy = Path(tempfile.mkdtemp(prefix="fedge-tls-"))
        shutil.copytree(work / "data" / "tls", tls_copy, dirs_exist_ok=True)
        admin = coord.admin(timeout=120)
        n_dev = max(max(p["concurrency"]), p["longpoll_devices"] if with_longpoll else 0)
        t = time.time()
        ids = enroll(coord, admin, keys[:n_dev])
        out["enroll_s"] = time.time() - t
        out["enrolled"] = len(ids)
        devices = [(d, k.hex()) for d, k in zip(ids, keys, strict=False)]
        blobs = work / "data" / "blobs"
        store_db = db_url or f"sqlite:///{work / 'data' / 'fedge.db'}"
        for c in p["concurrency"]:
            sub = devices[:c]
            task_id = fleet_task(admin, f"bench-steady-{c}", c)
            # after version 0 (the same model every task)
            blobs_before = count_blobs(blobs, store_db)
            profile = None
            if c == max(p["concurrency"]):
                tag = backend if workers == 1 else f"{backend}_workers{workers}"
                profile = _profile_path(args, tag)
            r = steady(
                coord,
                sub,
                procs=args.procs,
                warmup_s=p["warmup_s"],
                measure_s=p["measure_s"],
                seed=args.seed,
                profile=profile,
                workers=workers,
                device_mode=args.device_mode,
            )
            task = admin.get_task(task_id)
            r["buffer_size"] = buffer_for(c)
            r["model_versions_at_end"] = task.get("current_version")
            admin.cancel_task(task_id)
            # every accepted update must be a blob of its own (and every model version)
            r["blob_files_added"] = count_blobs(blobs, store_db) - blobs_before
            r["uploads_accepted_total"] = r["status_counts"].get("upload_201", 0)
            r["distinct_update_blobs"] = r["blob_files_added"] - int(
                r["model_versions_at_end"] or 0
            )
            out["runs"].append(r)
            print(
                f"  {name:10s} C={c:4d}: {r['updates_per_s']:7.1f} updates/s  "
                f"p50 {r['upload_p50_ms'] or 0:7.1f} ms  p99 {r['upload_p99_ms'] or 0:7.1f} ms  "
                f"coord CPU {r['coordinator_cpu_ms_per_update'] or 0:6.2f} ms/update  "
                "loadgen CPU share "
                + ", ".join(f"{x:.2f}" for x in r["loadgen_cpu_share_per_proc"])
                + f"  blobs: {r['distinct_update_blobs']} new update blobs for "
                f"{r['uploads_accepted_total']} accepted uploads",
                flush=True,
            )
            task_id = async_task(
                admin, f"bench-upload-only-{c}", buffer_size=100_000, concurrency=10 * c
            )
            u = upload_only(coord, sub, procs=args.procs, seed=args.seed)
            admin.cancel_task(task_id)
            out["upload_only"].append(u)
            print(
                f"  {name:10s} C={c:4d}: upload request alone "
                f"{u['coordinator_cpu_ms_per_upload_request'] or 0:.2f} ms CPU, assigning work "
                f"request {u['coordinator_cpu_ms_per_assign_request'] or 0:.2f} ms CPU",
                flush=True,
            )
        if p["ladder"] and workers == 1:
            out["ladder"] = ladder(coord, admin, devices[: max(p["concurrency"])], args)
        if p.get("rates"):
            out["paced"] = paced(coord, admin, devices[: max(p["concurrency"])], args, p)
        if with_longpoll:
            lp = longpoll(
                coord,
                admin,
                devices[: p["longpoll_devices"]],
                procs=args.longpoll_procs,
                idle_s=p["idle_s"],
            )
            out["longpoll"] = lp
            print(
                f"  {name:10s} long-poll {lp['devices']} devices: all answered within "
                f"{lp['wake_all_within_s']} s (p50 {lp['wake_p50_s']}), idle coordinator CPU "
                f"share {lp['idle_coordinator_cpu_share']:.2f}",
                flush=True,
            )
        admin.close()
    finally:
        coord.stop()
        if db_url:
            pg_database("drop")
        shutil.rmtree(work, ignore_errors=True)
    return out, tls_copy


def ladder(
    coord: LocalCoordinator,
    admin: AdminClient,
    devices: list[tuple[str, str]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The coordinator's CPU per request of each kind, one request at a time (the load
    generator's ``ladder`` phase) on two async tasks that never aggregate; the CPU the
    coordinator spends at rest (measured just before, over 2 s) is taken off each kind's."""
    pid = coord.process.pid
    task_ids = [
        async_task(admin, f"bench-ladder-{i}", buffer_size=100_000, concurrency=10 * len(devices))
        for i in range(2)
    ]
    c0, t0 = thread_cpu_ns(pid), time.time()
    time.sleep(2.0)
    rest_share = cpu_between(c0, thread_cpu_ns(pid)) / (time.time() - t0)
    cfg = {
        "phase": "ladder",
        "url": coord.url,
        "ca_file": coord.ca_file,
        "model": MODEL,
        "compression": COMPRESSION,
        "devices": devices,
        "seed": args.seed + 7,
        "pid": pid,
        "repeats": 4,
    }
    (result,) = run_workers([cfg])
    for task_id in task_ids:
        admin.cancel_task(task_id)
    kinds = result["kinds"]
    for name, k in kinds.items():
        cpu = k["coordinator_cpu_s"] - rest_share * k["wall_s"]
        k["cpu_ms_per_request"] = 1000 * cpu / k["requests"] if k["requests"] else None
        k["event_loop_cpu_ms_per_request"] = (
            1000 * k["event_loop_cpu_s"] / k["requests"] if k["requests"] else None
        )
        k["all_as_expected"] = k["statuses"] == {str(k["expected_status"]): k["requests"]}
        print(
            f"  ladder {name:18s} {k['requests']:5d} requests  "
            f"{k['cpu_ms_per_request'] or 0:6.2f} ms CPU each (event loop "
            f"{k['event_loop_cpu_ms_per_request'] or 0:5.2f})  statuses {k['statuses']}",
            flush=True,
        )
    print(f"  ladder reference work: {result['reference_ms']:.1f} ms", flush=True)
    return {
        "devices": len(devices),
        "rest_cpu_share": rest_share,
        "kinds": kinds,
        # the same fixed interpreter work timed in the load generator right after: runs on
        # machines of different speed (the shared host's load) differ in this too
        "reference_ms": result["reference_ms"],
    }


def paced(
    coord: LocalCoordinator,
    admin: AdminClient,
    devices: list[tuple[str, str]],
    args: argparse.Namespace,
    p: dict[str, Any],
) -> dict[str, Any]:
    """The open loop: for each offered rate (``--rates``; ascending, then descending on the
    next repeat), a fresh async task and a steady window at that rate; then the straight line
    through (accepted updates/s, coordinator CPU share): its slope is the CPU of one more
    accepted update, its intercept the CPU the coordinator spends with C devices connected
    and nothing uploaded."""
    c = len(devices)
    runs = []
    for rep in range(p["rate_repeats"]):
        order = p["rates"] if rep % 2 == 0 else list(reversed(p["rates"]))
        for rate in order:
            task_id = fleet_task(admin, f"bench-paced-{rate:g}-{rep}", c)
            r = steady(
                coord,
                devices,
                procs=args.procs,
                warmup_s=p["warmup_s"],
                measure_s=p["measure_s"],
                seed=args.seed + 1000 * (rep + 1),
                device_mode=args.device_mode,
                rate=rate,
                profile=_profile_path(args, f"paced{rate:g}") if rate and rep == 0 else None,
            )
            admin.cancel_task(task_id)
            r["repeat"] = rep
            runs.append(r)
            print(
                f"  paced C={c}: offered {rate:6.1f}/s accepted {r['updates_per_s']:6.1f}/s  "
                f"coord CPU share {r['coordinator_cpu_share']:.3f}  "
                f"{r['coordinator_cpu_ms_per_update'] or 0:6.2f} ms/update  "
                f"p99 {r['upload_p99_ms'] or 0:6.1f} ms",
                flush=True,
            )
    return {"concurrency": c, "runs": runs, "fit": open_loop_fit(runs)}


def open_loop_fit(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Least squares of coordinator CPU share on accepted updates/s: the slope (ms of CPU per
    accepted update, with its standard error) and the intercept (share of a core at rest)."""
    x = np.array([r["updates_per_s"] for r in runs])
    y = np.array([r["coordinator_cpu_share"] for r in runs])
    if len(runs) < 3 or np.ptp(x) == 0:
        return None
    (slope, intercept), cov = np.polyfit(x, y, 1, cov=True)
    return {
        "marginal_cpu_ms_per_update": 1000 * float(slope),
        "marginal_cpu_ms_per_update_stderr": 1000 * float(np.sqrt(cov[0, 0])),
        "cpu_share_at_rest": float(intercept),
        "points": len(runs),
        "max_residual_share": float(np.max(np.abs(y - (slope * x + intercept)))),
    }


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for b in res["backends"]:
        best = max(b["runs"], key=lambda r: r["concurrency"])
        name = summary_key(b)
        s[name] = {
            "backend": b["backend"],
            "workers": int(b.get("workers", 1)),
            "label": label(b),
            "at_concurrency": best["concurrency"],
            "updates_per_s": best["updates_per_s"],
            "upload_p99_ms": best["upload_p99_ms"],
            "coordinator_cpu_ms_per_update": best["coordinator_cpu_ms_per_update"],
            "coordinator_cpu_ms_per_upload_request": b["upload_only"][-1][
                "coordinator_cpu_ms_per_upload_request"
            ],
            "target_updates_per_s_met": best["concurrency"] >= 500
            and best["updates_per_s"] >= TARGETS["updates_per_s_at_500"],
            "target_p99_met": best["concurrency"] >= 500
            and (best["upload_p99_ms"] or 1e9) < TARGETS["p99_ms_at_500"],
            "target_cpu_met": (best["coordinator_cpu_ms_per_update"] or 1e9)
            <= TARGETS["cpu_ms_per_update"],
        }
        if b.get("paced", {}).get("fit"):
            s[name]["paced_fit"] = b["paced"]["fit"]
        if "longpoll" in b:
            lp = b["longpoll"]
            s[name]["longpoll"] = {
                "devices": lp["devices"],
                "wake_all_within_s": lp["wake_all_within_s"],
                "target_wake_met": lp["devices"] >= 1000
                and lp["wake_all_within_s"] is not None
                and lp["wake_all_within_s"] <= TARGETS["longpoll_wake_s_1000"],
                "idle_requests_per_device_per_25s": lp["idle_requests_per_device_per_25s_protocol"],
                "target_idle_met": lp["idle_requests_per_device_per_25s_protocol"]
                < TARGETS["idle_requests_per_device_per_25s"],
                "idle_coordinator_cpu_share": lp["idle_coordinator_cpu_share"],
            }
    scaling = workers_scaling(res["backends"])
    if scaling:
        s["workers_scaling"] = scaling
    if res.get("ceiling"):
        top = max(res["ceiling"], key=lambda r: r["requests_per_s"])
        s["ceiling_best_requests_per_s"] = top["requests_per_s"]
    return s


def workers_scaling(backends: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per backend, worker count above 1 and C: updates/s with N workers / with 1 worker
    (both coordinator starts of this run), and coordinator CPU per update of both."""
    out = []
    base = {b["backend"]: b for b in backends if int(b.get("workers", 1)) == 1}
    for b in backends:
        workers = int(b.get("workers", 1))
        one = base.get(b["backend"])
        if workers == 1 or one is None:
            continue
        by_c = {r["concurrency"]: r for r in one["runs"]}
        for r in b["runs"]:
            r1 = by_c.get(r["concurrency"])
            if r1 is None:
                continue
            out.append(
                {
                    "backend": b["backend"],
                    "workers": workers,
                    "concurrency": r["concurrency"],
                    "updates_per_s_1_worker": r1["updates_per_s"],
                    "updates_per_s": r["updates_per_s"],
                    "updates_per_s_ratio": (
                        r["updates_per_s"] / r1["updates_per_s"] if r1["updates_per_s"] else None
                    ),
                    "coordinator_cpu_ms_per_update_1_worker": r1["coordinator_cpu_ms_per_update"],
                    "coordinator_cpu_ms_per_update": r["coordinator_cpu_ms_per_update"],
                    "upload_p99_ms_1_worker": r1["upload_p99_ms"],
                    "upload_p99_ms": r["upload_p99_ms"],
                }
            )
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    open_loop = [b for b in res["backends"] if b.get("paced", {}).get("fit")]
    cols = 3 if open_loop else 2
    fig, axes = plt.subplots(1, cols, figsize=(5.5 * cols, 4.2))
    ax1, ax2 = axes[0], axes[1]
    if open_loop:
        ax3 = axes[2]
        for b in open_loop:
            runs, fit = b["paced"]["runs"], b["paced"]["fit"]
            x = np.array([r["updates_per_s"] for r in runs])
            (dots,) = ax3.plot(
                x, [r["coordinator_cpu_share"] for r in runs], "o", label=f"{label(b)} (open loop)"
            )
            xs = np.linspace(0, x.max(), 2)
            ax3.plot(
                xs,
                fit["cpu_share_at_rest"] + xs * fit["marginal_cpu_ms_per_update"] / 1000,
                "-",
                color=dots.get_color(),
                label=f"slope {fit['marginal_cpu_ms_per_update']:.2f} ms/update",
            )
        ax3.set(
            xlabel="accepted updates/s (offered at a fixed rate)",
            ylabel="coordinator CPU (share of a core)",
        )
        ax3.legend(fontsize=8)
        ax3.grid(alpha=0.3)
    for b in res["backends"]:
        cs = [r["concurrency"] for r in b["runs"]]
        ax1.plot(cs, [r["updates_per_s"] for r in b["runs"]], "o-", label=label(b))
        ax2.plot(cs, [r["upload_p99_ms"] or np.nan for r in b["runs"]], "o-", label=label(b))
    if res.get("ceiling"):
        cs = [r["concurrency"] for r in res["ceiling"]]
        ax1.plot(
            cs, [r["requests_per_s"] for r in res["ceiling"]], "k--", label="ceiling: bare verify"
        )
        ax2.plot(cs, [r["p99_ms"] for r in res["ceiling"]], "k--", label="ceiling: bare verify")
    ax1.axhline(TARGETS["updates_per_s_at_500"], color="r", lw=0.8, ls=":", label="target")
    ax2.axhline(TARGETS["p99_ms_at_500"], color="r", lw=0.8, ls=":", label="target")
    ax1.set(xlabel="concurrent devices C", ylabel="accepted updates/s (ceiling: requests/s)")
    ax2.set(xlabel="concurrent devices C", ylabel="upload latency p99 (ms)", yscale="log")
    ax1.set_yscale("log")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(
        "fedge coordinator ingest (HTTPS, 100k-param top-1% 4-bit updates; 2 shared cores)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(res: dict[str, Any]) -> None:
    print(
        "\nbackend                C   updates/s  p50 ms  p99 ms  coord ms CPU/update  "
        "upload-only ms CPU"
    )
    for b in res["backends"]:
        for r, u in zip(b["runs"], b["upload_only"], strict=False):
            print(
                f"{label(b):21s} {r['concurrency']:4d} {r['updates_per_s']:9.1f} "
                f"{r['upload_p50_ms'] or 0:7.1f} {r['upload_p99_ms'] or 0:7.1f} "
                f"{r['coordinator_cpu_ms_per_update'] or 0:20.2f} "
                f"{u['coordinator_cpu_ms_per_upload_request'] or 0:18.2f}"
            )
    for r in res.get("ceiling", []):
        print(
            f"{'ceiling':21s} {r['concurrency']:4d} {r['requests_per_s']:9.1f} {r['p50_ms']:7.1f} "
            f"{r['p99_ms']:7.1f} {r['server_cpu_ms_per_request'] or 0:20.2f}"
        )
    for w in res.get("summary", {}).get("workers_scaling", []):
        print(
            f"{w['backend']} C={w['concurrency']}: {w['workers']} workers / 1 worker = "
            f"{w['updates_per_s_ratio'] or 0:.2f}x updates/s ({w['updates_per_s_1_worker']:.1f} "
            f"-> {w['updates_per_s']:.1f}); coordinator CPU "
            f"{w['coordinator_cpu_ms_per_update_1_worker'] or 0:.2f} -> "
            f"{w['coordinator_cpu_ms_per_update'] or 0:.2f} ms/update"
        )
    print(json.dumps(res.get("summary", {}), indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--procs", type=int, default=2, help="load-generator processes")
    ap.add_argument(
        "--longpoll-procs",
        type=int,
        default=8,
        help="load-generator processes of the long-poll test (with 2, receiving 1,000 answers "
        "took the generators 5.6 s, with 8 1.3 s: they, not the coordinator, set the pace)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", default=None, help="comma list: sqlite,postgresql")
    ap.add_argument("--concurrency", default=None, help="comma list of C")
    ap.add_argument(
        "--workers",
        default="1",
        help="comma list of coordinator worker process counts (serve --workers), each its own "
        "coordinator start on a fresh database; PostgreSQL only (SQLite runs 1)",
    )
    ap.add_argument(
        "--device-mode",
        choices=["agent", "busy"],
        default="agent",
        help="steady phase: 'agent' long-polls for work and takes the next assignment from "
        "the upload's answer (what the agent does); 'busy' polls without a wait every 20 ms "
        "(the device model of runs before the evening of 6 December 2026)",
    )
    ap.add_argument(
        "--measure-s", type=float, default=None, help="steady window (s; default 8 quick, 15)"
    )
    ap.add_argument(
        "--rates",
        default=None,
        help="comma list of offered updates/s for the open-loop runs at the largest C (e.g. "
        "0,20,40,60: 0 holds the devices with work in hand and uploads nothing); the slope of "
        "CPU against accepted updates/s is the CPU of one more update",
    )
    ap.add_argument("--rate-repeats", type=int, default=1, help="passes over --rates")
    ap.add_argument(
        "--no-ladder",
        action="store_true",
        help="skip the CPU per request of each kind, one request at a time",
    )
    ap.add_argument("--no-ceiling", action="store_true")
    ap.add_argument("--no-longpoll", action="store_true")
    ap.add_argument(
        "--profile",
        default=None,
        help="py-spy record of the steady window at the largest C and of each open-loop rate "
        "(first pass): a flame graph tag, or FILE.txt for collapsed stacks of the GIL holder "
        "in FILE_<backend>.txt and FILE_paced<rate>.txt",
    )
    ap.add_argument(
        "--coordinator-env",
        action="append",
        default=[],
        type=lambda text: tuple(text.split("=", 1)),
        metavar="VAR=VALUE",
        help="a setting of the coordinator's (repeatable), e.g. FEDGE_INLINE_UPDATE_MAX_BYTES=0",
    )
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()
    out_path = args.output or RESULTS / ("ingest.quick.json" if args.quick else "ingest.json")
    png = out_path.with_suffix(".png")
    if args.plot_only:
        plot(json.loads(out_path.read_text()), png)
        print(f"wrote {png}")
        return
    if args.quick:
        p: dict[str, Any] = {
            "concurrency": [50],
            "backends": ["sqlite"],
            "warmup_s": 3.0,
            "measure_s": 8.0,
            "longpoll_devices": 200,
            "idle_s": 10.0,
        }
    else:
        p = {
            "concurrency": [50, 200, 500],
            "backends": ["sqlite", "postgresql"],
            "warmup_s": 5.0,
            "measure_s": 15.0,
            "longpoll_devices": 1000,
            "idle_s": 30.0,
        }
    if args.measure_s is not None:
        p["measure_s"] = args.measure_s
    if args.backends:
        p["backends"] = args.backends.split(",")
    if args.concurrency:
        p["concurrency"] = [int(x) for x in args.concurrency.split(",")]
    p["workers"] = [int(x) for x in args.workers.split(",")]
    p["rates"] = [float(x) for x in args.rates.split(",")] if args.rates else []
    p["rate_repeats"] = args.rate_repeats
    p["ladder"] = not args.no_ladder
    if args.no_longpoll:
        p["longpoll_devices"] = 0
    p["longpoll_on"] = p["backends"][0] if p["longpoll_devices"] else ""
    started = datetime.now(UTC).isoformat()
    n_keys = max(max(p["concurrency"]), p["longpoll_devices"])
    keys = device_keys(n_keys, args.seed)
    res: dict[str, Any] = {
        "benchmark": "ingest",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "params": {
            **p,
            "procs": args.procs,
            "device_mode": args.device_mode,
            "longpoll_procs": args.longpoll_procs,
            "model": MODEL,
            "num_params": 256 * 300 + 300 + 300 * 80 + 80,
            "compression": COMPRESSION,
            "coordinator_env": {**coordinator_env("<db>", 0), **dict(args.coordinator_env)},
            "update_key_hash": hashlib.sha256(b"".join(keys[:1])).hexdigest()[:12],
        },
        "seeds": {"seed": args.seed, "device_keys": "numpy default_rng(seed).bytes(32) each"},
        "machine": machine_info(),
        "started": started,
        "targets": TARGETS,
        "ceiling_quoted": CEILING_QUOTED,
        "notes": [
            "2 cores shared by coordinator and load generators: updates/s and latency are "
            "lower bounds; CPU-seconds per update does not depend on it.",
            "coordinator_cpu_ms_per_update includes the work requests and the aggregations "
            "the coordinator did in the window.",
            "coordinator_cpu_ms_per_upload_request (upload_only): uploads alone, no aggregation.",
            "Coordinator runs with FEDGE_LOG_LEVEL=warning (no access log) like the ceiling.",
            "Coordinator CPU is that of its whole process tree (the `serve` process and, with "
            "--workers N > 1, its N worker processes): utime + stime + cutime + cstime summed "
            "over the process and its descendants (a scan of /proc for parent pids) at the "
            "window's start and end. cutime/cstime carry the CPU of a worker that exited and "
            "was reaped by the supervisor, so a worker restarted within the window is counted "
            "(coordinator_pids_start_end shows the tree at both samples).",
            "With several worker counts (--workers), each count is its own coordinator start "
            "on a fresh data directory and database in the same run; summary.workers_scaling "
            "gives updates/s(N workers) / updates/s(1 worker) at each C. The long-poll test "
            "runs only with the first worker count of its backend.",
        ],
        "backends": [],
    }
    tls_dir: Path | None = None
    for backend in p["backends"]:
        counts = p["workers"] if backend == "postgresql" else [1]
        if backend != "postgresql" and any(w != 1 for w in p["workers"]):
            res["notes"].append(
                f"{backend}: measured with 1 worker process only (--workers {args.workers} "
                "asked): the coordinator refuses --workers above 1 on SQLite."
            )
        for i, workers in enumerate(counts):
            name = label({"backend": backend, "workers": workers})
            print(f"{name}:", flush=True)
            out, tls = run_backend(
                backend,
                args,
                p,
                keys,
                workers=workers,
                with_longpoll=backend == p["longpoll_on"] and i == 0,
            )
            res["backends"].append(out)
            if tls_dir is None:
                tls_dir = tls
            elif tls is not None:
                shutil.rmtree(tls, ignore_errors=True)
    if not args.no_ceiling and tls_dir is not None:
        print("ceiling:", flush=True)
        res["ceiling"] = ceiling(
            tls_dir,
            p["concurrency"],
            procs=args.procs,
            warmup_s=p["warmup_s"],
            measure_s=p["measure_s"],
            seed=args.seed,
        )
    res["finished"] = datetime.now(UTC).isoformat()
    res["summary"] = summarize(res)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, png)
    print_summary(res)
    print(f"wrote {out_path} and {png}")


if __name__ == "__main__":
    main()
