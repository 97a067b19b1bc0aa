"""Secure aggregation through the real stack: bytes per device per round on the socket and the
coordinator's CPU per round, secure aggregation against plain uploads, by cohort size.

What runs, per (cohort size n, arm, repetition): the real coordinator (a child process: HTTPS
on loopback with its private CA, a SQLite file, a blob store) and n real agents in this process
(:class:`fedge.edge_agent.sim.fleet.Fleet`, each with its own counting relay,
:class:`fedge.edge_agent.sim.relay.CountingRelay`: the bytes crossing the device's sockets both
ways, TLS handshakes and records, HTTP headers, signed-request headers, work polls, model
downloads, and the secure-aggregation messages and phase polls). One task of ``ROUNDS`` sync
rounds with every device in every round (``clients_per_round`` = ``min_updates`` = n,
``over_selection`` 0, no drop-outs); the digits MLP 64-128-10 (9,610 parameters) on a
Dirichlet(0.5) split of scikit-learn's digits over the n devices; 1 local epoch.

Arms (same model, data, training, k = 961 = 10 % of the parameters, error feedback):

* ``plain``: fedge's regular uploads, top-k 10 % with 8-bit values (weighting ``equal``);
* ``secure``: ``aggregation.secure`` (random-k support of the same k, 16-bit grid, bound 0.1,
  graph planned for a third dropping: the complete graph at these sizes). A device polls for
  the next phase every ``POLL_S`` (scaled with n, below), and those polls are on the socket.

Measured from the task's start to its completion: relay bytes / (n * rounds); the coordinator
process's CPU time (user + system, from /proc) / rounds; wall time / rounds. The two arms of one
n run one after the other (interleaved per repetition), and the load average is recorded
before each run: the machine is shared.

    python bench/secagg_engine.py                       # n = 10 20 50 100 200, 2 repetitions
    python bench/secagg_engine.py --sizes 10 20 --reps 1
    python bench/secagg_engine.py --sizes 100 --reps 1 --append   # add a size to the JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fleet_bench import (
    RESULTS_DIR,
    code_state,
    machine_info,
    now_iso,
    task_and_fleet,
    wait_until_seen,
    write_json,
)

from fedge.edge_agent.sim.datasets import load_dataset
from fedge.edge_agent.sim.fleet import Fleet
from fedge.edge_agent.sim.local_coordinator import start_local_coordinator
from fedge.edge_agent.sim.partition import dirichlet_partition

MODEL = {"architecture": "mlp", "input_dim": 64, "hidden": [128], "num_classes": 10}
COMPRESSION = {"topk_fraction": 0.1, "bits": 8, "chunk": 64, "error_feedback": True}
SECURE = {"bound": 0.1, "grid_bits": 16, "planned_dropout": 1 / 3}
TRAINING = {"epochs": 1, "batch_size": 16, "lr": 0.1}
ROUNDS = 3
ALPHA = 0.5
SIZES = (10, 20, 50, 100, 200)
OUT = RESULTS_DIR / "secagg_engine.json"


def poll_s(n: int) -> float:
    """The secure arm's phase poll interval: about n / 0.4 s polls per second in all."""
    return max(0.2, n / 400)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def task_body(arm: str, n: int, seed: int) -> dict[str, Any]:
    aggregation: dict[str, Any] = {
        "mode": "sync",
        "num_rounds": ROUNDS,
        "clients_per_round": n,
        "over_selection": 0.0,
        "min_updates": n,
        "round_deadline_s": 600.0,
        "lease_s": 600.0,
        "weighting": "equal",
    }
    if arm == "secure":
        aggregation["secure"] = SECURE
    return {
        "name": f"secagg-engine-{arm}-{n}-{seed}",
        "model": {**MODEL, "seed": seed},
        "aggregation": aggregation,
        "compression": COMPRESSION,
        "training": TRAINING,
    }


def run_one(arm: str, n: int, seed: int, work: Path) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    data = load_dataset("digits", test_fraction=0.2, rng=rng)
    parts = dirichlet_partition(data.y_train, n, ALPHA, rng)
    shards = [(data.X_train[p], data.y_train[p]) for p in parts]
    root = work / f"{arm}-{n}-{seed}"
    env = {
        "FEDGE_LOG_LEVEL": "warning",
        "FEDGE_SCHEDULER_INTERVAL_S": "0.1",
        "FEDGE_DEVICE_RATE_PER_MINUTE": "100000",
    }
    coordinator = start_local_coordinator(root / "coordinator", env=env, startup_timeout=60)
    fleet: Fleet | None = None
    load = os.getloadavg()
    try:
        with coordinator.admin() as admin:
            task, fleet, token = task_and_fleet(
                admin,
                coordinator,
                task_body(arm, n, seed),
                label="secagg bench",
                root=root,
                shards=shards,
                seed=seed,
                poll_wait=30.0,
                eval_fraction=0.0,
                count_socket=True,
            )
            fleet.enroll(token)
            fleet.start()
            for device in fleet.devices:
                assert device.agent is not None
                device.agent.secagg_poll_s = poll_s(n)
            # Every device must be live before the first round opens (a cohort of n).
            wait_until_seen(admin, n)
            up0 = sum(d.relay.counts().up for d in fleet.devices if d.relay)
            down0 = sum(d.relay.counts().down for d in fleet.devices if d.relay)
            cpu0, wall0 = cpu_s(coordinator.process.pid), time.monotonic()
            admin.start_task(task["id"])
            budget = time.monotonic() + 300 + 5 * n
            status = "running"
            while time.monotonic() < budget:
                status = admin.get_task(task["id"])["status"]
                if status != "running":
                    break
                time.sleep(0.2)
            cpu1, wall1 = cpu_s(coordinator.process.pid), time.monotonic()
            up1 = sum(d.relay.counts().up for d in fleet.devices if d.relay)
            down1 = sum(d.relay.counts().down for d in fleet.devices if d.relay)
            rounds = admin.list_rounds(task["id"], limit=50)["items"]
    finally:
        if fleet is not None:
            fleet.stop(timeout=20)
        coordinator.stop()
    closed = [r for r in rounds if r["status"] == "closed"]
    per = max(1, len(closed))
    return {
        "arm": arm,
        "n": n,
        "seed": seed,
        "status": status,
        "rounds_closed": len(closed),
        "rounds_failed": sum(r["status"] == "failed" for r in rounds),
        "cohort": [r.get("num_assigned") for r in rounds],
        "bytes_up_per_device_round": (up1 - up0) / (n * per),
        "bytes_down_per_device_round": (down1 - down0) / (n * per),
        "bytes_per_device_round": (up1 - up0 + down1 - down0) / (n * per),
        "coordinator_cpu_s_per_round": (cpu1 - cpu0) / per,
        "wall_s_per_round": (wall1 - wall0) / per,
        "loadavg_before": load,
        "secagg_poll_s": poll_s(n) if arm == "secure" else None,
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for n in sorted({r["n"] for r in runs}):
        row: dict[str, Any] = {"n": n}
        for arm in ("plain", "secure"):
            mine = [r for r in runs if r["n"] == n and r["arm"] == arm and r["rounds_closed"]]
            for key in (
                "bytes_per_device_round",
                "coordinator_cpu_s_per_round",
                "wall_s_per_round",
            ):
                values = [r[key] for r in mine]
                row[f"{arm}_{key}"] = {
                    "median": statistics.median(values) if values else None,
                    "min": min(values) if values else None,
                    "max": max(values) if values else None,
                }
        pairs = [
            (s, p)
            for s in runs
            for p in runs
            if s["n"] == p["n"] == n
            and s["seed"] == p["seed"]
            and s["arm"] == "secure"
            and p["arm"] == "plain"
            and s["rounds_closed"]
            and p["rounds_closed"]
        ]
        for key in ("bytes_per_device_round", "coordinator_cpu_s_per_round"):
            ratios = [s[key] / p[key] for s, p in pairs if p[key]]
            row[f"ratio_{key}"] = {
                "min": min(ratios) if ratios else None,
                "max": max(ratios) if ratios else None,
            }
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--append", action="store_true", help="keep the runs already in --out (other sizes)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("fedge.edge_agent").setLevel(logging.ERROR)
    runs: list[dict[str, Any]] = []
    if args.append and args.out.exists():
        runs = list(json.loads(args.out.read_text())["runs"])
    started = now_iso()
    with tempfile.TemporaryDirectory(prefix="secagg-engine-") as tmp:
        for n in args.sizes:
            for rep in range(args.reps):
                arms = ("plain", "secure") if rep % 2 == 0 else ("secure", "plain")
                for arm in arms:
                    run = run_one(arm, n, 1 + rep, Path(tmp))
                    line = (
                        f"n={n} {arm} rep {rep}: {run['bytes_per_device_round']:.0f} B/device"
                        f"/round, coordinator {run['coordinator_cpu_s_per_round']:.3f} CPU s"
                        f"/round, {run['rounds_closed']} closed, load "
                        f"{run['loadavg_before'][0]:.1f}"
                    )
                    print(line, flush=True)
                    runs.append(run)
                    write_json(
                        args.out,
                        {
                            "started": started,
                            "machine": machine_info(),
                            "code": code_state(),
                            "settings": {
                                "model": MODEL,
                                "compression": COMPRESSION,
                                "secure": SECURE,
                                "training": TRAINING,
                                "rounds": ROUNDS,
                                "alpha": ALPHA,
                                "reps": args.reps,
                                "sizes": sorted({r["n"] for r in runs}),
                            },
                            "runs": runs,
                            "summary": summarize(runs),
                        },
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
