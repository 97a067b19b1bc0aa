"""Upload path benchmark: the coordinator CPU of one accepted update, stage by stage, in one
thread with nothing else running.

``bench/ingest.py`` measures the whole coordinator under load (HTTPS, the event loop, worker
threads, the scheduler, the load generators on the same two cores); its figures move with the
machine's other jobs and even with the file system's state after earlier runs. This benchmark
takes the upload's own work out of that: the coordinator's functions, called in the order
:func:`fedge.coordinator.engine.updates.accept_upload_ready` calls them, on a migrated database
(an SQLite file, or a fresh PostgreSQL database ``fedge_bench_upload``) and the file blob
store, for uploads of the ingest benchmark's update (an MLP 256-300-80, 101,180 parameters,
top-1 % 4-bit, every body distinct), each with a request claim (its nonce and the device's
``last_seen_at`` are written in the upload's transaction, as over HTTP). The CPU of each stage
is ``time.thread_time()`` (user and system time of this thread: the kernel's work for an
fsync counts, waiting for the disk does not):

* ``precheck``: the read-only transaction of checks 1-2 (assignment, task, repeat);
* ``decode``: decoding and checking the body against the task (``decode_checked``);
* ``blob put``: the content-addressed write of the body (a new file, fsynced, renamed, the
  directory fsynced);
* ``write transaction``: nonce, task, device, assignment, history, the ``updates`` row, the
  assignment's end and the round's count, committed (``synchronous=FULL`` on SQLite);
* ``after commit``: the decoded-update cache and the event;
* ``accept_upload_ready``: the whole function on other assignments of the same round
  (alternating with the staged uploads, after a warm-up), as a check that the stages add up.

Each repeat is a fresh data directory and database with ``--uploads`` uploads; the figures
are the median over repeats of each stage's mean, with the range. Writes
``bench/results/upload_path.json``.

    python bench/upload_path.py                      # SQLite and PostgreSQL, 3 repeats
    python bench/upload_path.py --quick                  # SQLite, 1 x 100 (upload_path.quick.json)
    python bench/upload_path.py --backends sqlite --repeats 1 --uploads 200 --output x.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _aggregate_prep import enroll_devices, postgres_database
from ingest import COMPRESSION, MODEL, PG_ADMIN_URL

from fedge.coordinator.auth import RequestClaim, get_authenticator
from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.engine import rounds
from fedge.coordinator.engine.config import AggregationConfig
from fedge.coordinator.engine.eligibility import Liveness
from fedge.coordinator.engine.updates import (
    _Context,
    _precheck,
    accept_upload_ready,
    decode_checked,
    record_upload,
    store_body,
)
from fedge.coordinator.events import Event, publish
from fedge.coordinator.migrate import upgrade
from fedge.coordinator.models import Assignment, Task
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.schemas.tasks import TaskCreate
from fedge.coordinator.settings import Settings
from fedge.coordinator.tasks import create_task, transition
from fedge.shared.compression import compress
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import encode_update

RESULTS = Path(__file__).resolve().parent / "results" / "upload_path.json"
PG_DB = "fedge_bench_upload"
#: Whole uploads at the start of each repeat that are not counted.
WARMUP = 20
#: The default ``inline_update_max_bytes``.
INLINE_DEFAULT = Settings.model_fields["inline_update_max_bytes"].default
STAGES = ("precheck", "decode", "blob put", "write transaction", "after commit")


def _round(runtime: Runtime, n: int) -> tuple[int, ModelSpec, list[tuple[int, str]]]:
    """A started sync task whose open round assigned ``n`` devices (it never fills: it waits
    for ``n + 1`` updates); its id, model spec and the (assignment, device) pairs."""
    body = TaskCreate.model_validate(
        {
            "name": "upload-path",
            "model": MODEL,
            "aggregation": {
                "mode": "sync",
                "clients_per_round": n,
                "over_selection": 0.0,
                "min_updates": 1,
                "num_rounds": 1,
                "round_deadline_s": 86400.0,
            },
            "compression": COMPRESSION,
            "training": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        }
    )
    with session_scope(runtime.sessions) as session:
        task = create_task(session, runtime.blobs, runtime.settings, body)
        transition(session, task, "start")
        cfg = AggregationConfig.from_dict(task.aggregation)
        rnd, assigned = rounds.open_sync_round(
            session, task, cfg, now=utcnow(), liveness=Liveness.from_settings(runtime.settings)
        )
        assert rnd is not None and len(assigned) == n
        work = [
            (a.id, a.device_id)
            for a in session.scalars(
                select(Assignment).where(Assignment.round_id == rnd.id).order_by(Assignment.id)
            )
        ]
        return task.id, ModelSpec.from_dict(task.model_spec), work


def _claim(runtime: Runtime, device_id: str, i: int) -> RequestClaim:
    return RequestClaim(
        device_id=device_id,
        nonce=f"{i:032x}",
        ttl=timedelta(minutes=10),
        authenticator=get_authenticator(runtime),
    )


def _staged(
    runtime: Runtime, device_id: str, assignment_id: int, body: bytes, claim: RequestClaim
) -> dict[str, float]:
    """One upload, as accept_upload_ready does it, with each stage's thread CPU seconds."""
    cpu: dict[str, float] = {}
    clock = time.thread_time

    def timed(stage: str, fn: Callable[[], Any]) -> Any:
        start = clock()
        out = fn()
        cpu[stage] = clock() - start
        return out

    key = f"k-{claim.nonce}"
    ctx = timed(
        "precheck",
        lambda: _precheck(runtime, device_id=device_id, assignment_id=assignment_id, key=key),
    )
    assert isinstance(ctx, _Context)
    decoded = timed("decode", lambda: decode_checked(body, ctx))
    digest, inline = timed("blob put", lambda: store_body(runtime.blobs, body))

    def write() -> tuple[Any, int, bool]:
        return record_upload(
            runtime,
            ctx,
            claim,
            device_id=device_id,
            assignment_id=assignment_id,
            key=key,
            decoded=decoded,
            body=body,
            digest=digest,
            inline=inline,
        )

    _, round_id, _ = timed("write transaction", write)

    def after() -> None:
        runtime.decoded.put(digest, decoded, spec=ctx.spec, policy=ctx.policy)
        claim.recorded = True
        publish(
            Event("update.accepted", {"task": ctx.task_id, "round": round_id}),
            runtime.event_hooks,
        )

    timed("after commit", after)
    return cpu


def run_once(url: str, data_dir: Path, uploads: int, seed: int, inline: int) -> dict[str, Any]:
    """One fresh runtime (``inline_update_max_bytes = inline``): a warm-up, then ``uploads``
    staged and as many whole uploads."""
    rng = np.random.default_rng(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(url)
    runtime = Runtime.open(
        Settings(
            data_dir=data_dir,
            database_url=url,
            scheduler_enabled=False,
            inline_update_max_bytes=inline,
        )
    )
    try:
        n = WARMUP + 2 * uploads
        enroll_devices(runtime, n, rng)
        task_id, spec, work = _round(runtime, n)
        policy = CompressionPolicy.from_dict(COMPRESSION)
        delta = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in spec.tensors}
        # A fresh quantization draw each: every body is distinct, every blob a new file.
        bodies = [
            encode_update(
                compress(delta, policy, rng), task_id=task_id, base_version=0, num_examples=10
            )
            for _ in work
        ]
        staged: list[dict[str, float]] = []
        whole: list[float] = []
        # Alternate the two kinds (after a warm-up of whole uploads that is not counted), so
        # that both meet the same state of the database, the caches and the file system.
        for i, ((assignment, device), body) in enumerate(zip(work, bodies, strict=True)):
            claim = _claim(runtime, device, i)
            if i < WARMUP or i % 2:
                start = time.thread_time()
                accept_upload_ready(
                    runtime,
                    device_id=device,
                    assignment_id=assignment,
                    key=f"w-{i}",
                    body=body,
                    claim=claim,
                )
                if i >= WARMUP:
                    whole.append(time.thread_time() - start)
            else:
                staged.append(_staged(runtime, device, assignment, body, claim))
        with session_scope(runtime.sessions, read_only=True) as session:
            task = session.get(Task, task_id)
            assert task is not None and task.status == "running"
    finally:
        runtime.close()
    means = {stage: statistics.fmean(s[stage] for s in staged) for stage in STAGES}
    return {
        "stages_ms": {stage: 1000 * v for stage, v in means.items()},
        "sum_ms": 1000 * sum(means.values()),
        "accept_upload_ready_ms": 1000 * statistics.fmean(whole),
        "body_bytes": len(bodies[0]),
    }


def measure(
    backend: str, uploads: int, repeats: int, modes: dict[str, int]
) -> list[dict[str, Any]]:
    """Each mode (name -> ``inline_update_max_bytes``) ``repeats`` times, interleaved."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
    for r in range(repeats):
        for name, inline in modes.items():
            with tempfile.TemporaryDirectory(prefix=f"fedge-upload-path-{backend}-") as tmp:
                data_dir = Path(tmp) / "data"
                if backend == "sqlite":
                    url = f"sqlite:///{tmp}/fedge.db"
                    runs[name].append(run_once(url, data_dir, uploads, r, inline))
                else:
                    with postgres_database(PG_ADMIN_URL, PG_DB) as url:
                        runs[name].append(run_once(url, data_dir, uploads, r, inline))
            last = runs[name][-1]
            print(
                f"  {backend} {name} repeat {r + 1}: {last['sum_ms']:.3f} ms staged, "
                f"{last['accept_upload_ready_ms']:.3f} ms whole",
                flush=True,
            )

    def spread(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    return [
        {
            "backend": backend,
            "mode": name,
            "inline_update_max_bytes": modes[name],
            "uploads_per_repeat": uploads,
            "repeats": repeats,
            "body_bytes": got[0]["body_bytes"],
            "stages_ms": {s: spread([run["stages_ms"][s] for run in got]) for s in STAGES},
            "sum_ms": spread([run["sum_ms"] for run in got]),
            "accept_upload_ready_ms": spread([run["accept_upload_ready_ms"] for run in got]),
        }
        for name, got in runs.items()
    ]


def table(results: list[dict[str, Any]]) -> str:
    def cell(v: dict[str, float]) -> str:
        return f"{v['median']:.3f} ({v['min']:.3f}-{v['max']:.3f})"

    lines = [
        "| stage, thread CPU ms per upload | "
        + " | ".join(f"{r['backend']}, {r['mode']}" for r in results)
        + " |",
        "|---|" + "---:|" * len(results),
    ]
    for stage in STAGES:
        lines.append(
            f"| {stage} | " + " | ".join(cell(r["stages_ms"][stage]) for r in results) + " |"
        )
    lines.append("| sum of the stages | " + " | ".join(cell(r["sum_ms"]) for r in results) + " |")
    lines.append(
        "| `accept_upload_ready` whole | "
        + " | ".join(cell(r["accept_upload_ready_ms"]) for r in results)
        + " |"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--uploads", type=int, default=300, help="uploads per repeat and kind")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="SQLite, 1 repeat of 100 uploads")
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.backends, args.repeats, args.uploads = "sqlite", 1, 100
    if args.output is None:
        args.output = RESULTS.with_suffix(".quick.json") if args.quick else RESULTS
    started = datetime.now(UTC).isoformat(timespec="seconds")
    modes = {"body in a file": 0, "body in the transaction": INLINE_DEFAULT}
    results = [
        r for b in args.backends.split(",") for r in measure(b, args.uploads, args.repeats, modes)
    ]
    print(table(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "started": started,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpus": __import__("os").cpu_count(),
                "results": results,
                "table": table(results),
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
