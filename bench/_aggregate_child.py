"""One measured aggregation, run in a fresh process by bench/aggregate.py.

Exactly the round engine's three steps (``TaskStepper._aggregate``): ``apply.plan_aggregation``
in a short transaction, ``apply.compute`` with no transaction (reads, decodes and adds every
update blob, takes the server step, writes the new model blob), ``apply.commit_aggregation``
in a short transaction (new ``ModelVersion``, updates ``applied``, round closed).

Memory: the process's peak RSS (``VmHWM``) is reset through ``/proc/self/clear_refs`` after
imports and the database connection are set up; the figure reported is the peak during the
aggregation minus the RSS just before it. Then ``compute`` runs a second time on the same plan
under ``tracemalloc`` (Python and numpy allocations; the new model blob is the same bytes, so
the content-addressed store keeps it once).

Prints one JSON object on stdout.
"""

from __future__ import annotations

import json
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

from fedge.coordinator.blobstore import BlobStore
from fedge.coordinator.db import session_scope, utcnow
from fedge.coordinator.engine import apply, rounds
from fedge.coordinator.engine.config import AggregationConfig
from fedge.coordinator.engine.eligibility import Liveness
from fedge.coordinator.models import ModelVersion, Task, Update
from fedge.coordinator.runtime import Runtime
from fedge.coordinator.settings import Settings
from fedge.shared.wire import decode_model, decode_update


class CountingBlobStore(BlobStore):
    """The product's blob store, counting reads (proof that every update is read)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads = 0
        self.read_bytes = 0

    def get(self, digest: str) -> bytes:
        data = super().get(digest)
        self.reads += 1
        self.read_bytes += len(data)
        return data


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _reference_diff(
    runtime: Runtime, plan: apply.Plan, result: apply.Result, blobs: BlobStore
) -> float:
    """Max |difference| between the new model and a dense float64 reference of the FedAvg
    step over the same decoded updates (small sizes only)."""
    base = decode_model(blobs.get(plan.base_digest), spec=plan.spec)
    total = sum(i.weight for i in plan.items)
    ref = {n: np.asarray(w, np.float64).copy() for n, w in base.items()}
    for item in plan.items:
        dense = decode_update(blobs.get(item.digest), spec=plan.spec).to_dense()
        for n, d in dense.items():
            ref[n] += plan.config.server_lr * (item.weight / total) * d.astype(np.float64)
    new = decode_model(blobs.get(result.model_digest), spec=plan.spec)
    return max(float(np.abs(new[n].astype(np.float64) - ref[n]).max()) for n in ref)


def run(url: str, blob_dir: Path, task_id: int, *, check_reference: bool) -> dict[str, Any]:
    settings = Settings(
        data_dir=blob_dir.parent, database_url=url, blob_dir=blob_dir, scheduler_enabled=False
    )
    runtime = Runtime.open(settings)
    blobs = CountingBlobStore(blob_dir)
    with runtime.engine.connect():  # connect (and pragmas) before the baseline
        pass
    can_reset = _reset_peak()
    rss_before_kb = _status_kb("VmRSS")
    hwm_before_kb = _status_kb("VmHWM")

    step_peaks_kb: dict[str, int] = {}
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    with session_scope(runtime.sessions) as session:
        task = session.get(Task, task_id)
        assert task is not None
        rnd = rounds.active_round(session, task_id)
        assert rnd is not None and rnd.status == "aggregating", "round is not aggregating"
        cfg = AggregationConfig.from_dict(task.aggregation)
        plan = apply.plan_aggregation(session, task, rnd, cfg)
    assert plan is not None
    t1 = time.perf_counter()
    step_peaks_kb["plan"] = _status_kb("VmHWM")
    cpu1 = time.process_time()
    result = apply.compute(plan, blobs, hook=None)
    cpu2 = time.process_time()
    t2 = time.perf_counter()
    step_peaks_kb["compute"] = _status_kb("VmHWM")
    with session_scope(runtime.sessions) as session:
        woken = apply.commit_aggregation(
            session, plan, result, now=utcnow(), liveness=Liveness.from_settings(settings)
        )
    t3 = time.perf_counter()
    cpu3 = time.process_time()
    hwm_after_kb = _status_kb("VmHWM")
    step_peaks_kb["commit"] = hwm_after_kb
    rss_after_kb = _status_kb("VmRSS")
    assert woken is not None, "commit found the state moved"
    reads = blobs.reads

    with session_scope(runtime.sessions) as session:
        version = session.scalar(
            select(ModelVersion).where(ModelVersion.task_id == task_id, ModelVersion.version == 1)
        )
        applied = session.scalar(
            select(func.count(Update.id)).where(
                Update.task_id == task_id, Update.status == "applied"
            )
        )
        assert version is not None and version.blob_digest == result.model_digest
        num_updates = version.num_updates

    tracemalloc.start()
    tracemalloc.reset_peak()
    t4 = time.perf_counter()
    again = apply.compute(plan, blobs, hook=None)
    traced_s = time.perf_counter() - t4
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert again.model_digest == result.model_digest, "second compute differs"

    out: dict[str, Any] = {
        "task_id": task_id,
        "updates": len(plan.items),
        "num_updates_in_version": num_updates,
        "updates_applied": applied,
        "blob_reads": reads,  # the update blobs plus the base model
        "update_blob_reads": reads - 1,
        "blob_read_bytes": blobs.read_bytes,
        "seconds": {
            "plan": t1 - t0,
            "compute": t2 - t1,
            "aggregate": result.timings["aggregate"],
            "server_step": result.timings["step"],
            "store_model": result.timings["store"],
            "commit": t3 - t2,
            "total": t3 - t0,
            "compute_under_tracemalloc": traced_s,
        },
        "cpu_seconds": {"plan": cpu1 - cpu0, "compute": cpu2 - cpu1, "commit": cpu3 - cpu2},
        "memory": {
            "peak_rss_reset": can_reset,
            "rss_before_bytes": rss_before_kb * 1024,
            "hwm_before_bytes": hwm_before_kb * 1024,
            "hwm_after_bytes": hwm_after_kb * 1024,
            "peak_rss_delta_bytes": (hwm_after_kb - rss_before_kb) * 1024,
            # Peak RSS growth reached by the end of each step (cumulative high-water mark).
            "peak_rss_delta_after_step_bytes": {
                k: (v - rss_before_kb) * 1024 for k, v in step_peaks_kb.items()
            },
            "rss_after_bytes": rss_after_kb * 1024,
            "tracemalloc_peak_bytes": traced_peak,
        },
        "model_digest": result.model_digest,
        "total_weight": result.total_weight,
    }
    if check_reference:
        out["reference_max_abs_diff"] = _reference_diff(runtime, plan, result, blobs)
    runtime.close()
    return out


def main(argv: list[str]) -> None:
    url, blob_dir, task_id, check = argv
    result = run(url, Path(blob_dir), int(task_id), check_reference=check == "1")
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
