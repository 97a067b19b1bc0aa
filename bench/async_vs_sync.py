"""Async (FedBuff) vs sync rounds: wall-clock time to a target accuracy under faults.

Issue #7 item 2. Every run is the real platform on loopback: a coordinator child process
(HTTPS, SQLite file, blob store) and a fleet of real agents
(``fedge.edge_agent.sim.fleet.Fleet``, one thread, state directory, identity and HTTPS client per
device) with simulated faults:
* 30% dropout: a device vanishes after fetching the model (the coordinator drops it at the
  round deadline, sync, or when its lease expires, async);
* heavy-tailed log-normal straggler delays (scaled down to about a second so the benchmark
  runs in minutes; see ``_fleet_bench.LogNormalFaults``).

The same fleet (digits, Dirichlet alpha=0.5 shards, the built-in MLP 64-128-10, same training
and compression settings), the same seeds and the same fault draws are used for every variant:

* ``sync``: ``clients_per_round`` C, an over-selection that covers the dropout
  (``over_selection >= dropout / (1 - dropout)``, so the devices expected to survive a round
  are at least C), quorum ``min_updates``, a round deadline set from the delay distribution
  (about its p95);
* ``async-*``: FedBuff, buffer size K, lease, ``max_staleness``, with the staleness functions
  constant, polynomial ``(1+tau)^-0.5`` (FedBuff's) and hinge.

Both sides train with the same number of devices in flight: async's ``max_concurrency`` is
sync's devices per round, ``ceil(C * (1 + over_selection))``. The fleet is larger than that,
so both pick from idle devices. Round time is the same statistic on both sides: the time
between consecutive model versions (mean and p90 per run, spread over the seeds).

The headline speed-up is the variant decided before the run (``async-polynomial``, FedBuff's
own staleness function) and the least favourable of its per-seed ratios (sync's time to
target over async's on the same seed); the other variants are sensitivity checks.

The coordinator evaluates every model version on the held-out test split (its
``FEDGE_EVAL_HOOK``) and stops the task when that accuracy reaches the target (the task's
``target_metric``), so time-to-target is the coordinator's own record: the model version's
``created_at`` minus the task's ``started_at``. Counts (updates applied fresh/stale, refused,
assignments dropped) come from the admin API and the coordinator's SQLite file.

    python bench/async_vs_sync.py            # full run (3 repetitions)
    python bench/async_vs_sync.py --quick    # make bench
    python bench/async_vs_sync.py --plot-only
"""

from __future__ import annotations

import argparse
import itertools
import math
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
    LogNormalFaults,
    LogNormalSchedule,
    Spread,
    code_state,
    collect,
    configure_logging,
    machine_info,
    now_iso,
    start_coordinator,
    task_and_fleet,
    time_to_target,
    wait_for_task,
    write_json,
)

from fedge.edge_agent.sim.datasets import load_dataset
from fedge.edge_agent.sim.fleet import Fleet
from fedge.edge_agent.sim.partition import dirichlet_partition

NAME = "async_vs_sync"
SPEEDUP_TARGET = 3.5
FEDBUFF_REPORTED = 3.3
# decided before the run: FedBuff's own staleness function at the same K and concurrency
HEADLINE_VARIANT = "async-polynomial"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced run for make bench")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON")
    p.add_argument("--reps", type=int, help="repetitions (full 3, quick 1)")
    p.add_argument("--devices", type=int, help="fleet size (full 40, quick 30)")
    p.add_argument("--target", type=float, help="target test accuracy (0.80)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clients-per-round", type=int, default=10, help="sync C (10)")
    p.add_argument(
        "--over-selection",
        type=float,
        default=0.5,
        help="sync over-selection (0.5; at least dropout/(1-dropout) = 0.43 for 30%% dropout)",
    )
    p.add_argument("--min-updates", type=int, default=6, help="sync quorum (6)")
    p.add_argument("--deadline", type=float, help="sync round deadline s (default: ~p95 delay)")
    p.add_argument("--buffer-size", type=int, default=5, help="async K (5)")
    p.add_argument(
        "--concurrency",
        type=int,
        help="async concurrency cap (default: sync's devices per round, "
        "ceil(C * (1 + over_selection)), so both have as many devices in flight)",
    )
    p.add_argument("--lease", type=float, help="async lease s (default: the sync deadline)")
    p.add_argument("--max-staleness", type=int, default=10)
    p.add_argument(
        "--recheck",
        type=float,
        default=0.2,
        help="coordinator FEDGE_LONG_POLL_RECHECK_S (0.2; the product default is 1.0)",
    )
    p.add_argument("--variants", nargs="*", help="subset of variants to run")
    p.add_argument("--budget", type=float, help="time budget per run in s")
    p.add_argument("--output", type=Path, help="results JSON path")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def variants(args: argparse.Namespace, devices: int, deadline: float) -> dict[str, dict[str, Any]]:
    """Aggregation settings (and the coordinator's long-poll re-check interval) of every
    variant; the rest of the task is shared."""
    lease = args.lease if args.lease is not None else deadline
    in_flight = sync_in_flight(args.clients_per_round, args.over_selection)
    sync = {
        "mode": "sync",
        "clients_per_round": args.clients_per_round,
        "over_selection": args.over_selection,
        "min_updates": args.min_updates,
        "round_deadline_s": deadline,
        "lease_s": deadline,
        "max_staleness": args.max_staleness,
    }
    common = {
        "mode": "async",
        "buffer_size": args.buffer_size,
        "max_concurrency": args.concurrency or in_flight,
        "lease_s": lease,
        "round_deadline_s": deadline,
        "max_staleness": args.max_staleness,
    }
    poly = {"function": "polynomial", "a": 0.5}
    recheck = args.recheck
    return {
        "sync": {"aggregation": sync, "recheck_s": recheck},
        "async-constant": {
            "aggregation": {**common, "staleness": {"function": "constant"}},
            "recheck_s": recheck,
        },
        "async-polynomial": {"aggregation": {**common, "staleness": poly}, "recheck_s": recheck},
        "async-hinge": {
            "aggregation": {**common, "staleness": {"function": "hinge", "a": 1.0, "b": 2}},
            "recheck_s": recheck,
        },
        # sensitivity: FedBuff's K=10 instead of K=5
        "async-polynomial-K10": {
            "aggregation": {**common, "buffer_size": 10, "staleness": poly},
            "recheck_s": recheck,
        },
        # sensitivity: the coordinator's default long-poll re-check (idle async devices learn
        # of a new model version only at a re-check; see the report)
        "async-polynomial-recheck1s": {
            "aggregation": {**common, "staleness": poly},
            "recheck_s": 1.0,
        },
    }


def sync_in_flight(clients_per_round: int, over_selection: float) -> int:
    """Devices a sync round picks (the coordinator's ``AggregationConfig.selected``)."""
    return math.ceil(round(clients_per_round * (1.0 + over_selection), 9))


def intervals(curve: list[dict[str, Any]]) -> list[float]:
    """Seconds between consecutive model versions (the first from the task's start)."""
    times = [0.0, *(float(p["t_s"]) for p in curve if int(p["version"]) > 0)]
    return [b - a for a, b in itertools.pairwise(times)]


def round_time(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and p90 (nearest rank) of the time between consecutive versions of one run."""
    gaps = np.asarray(intervals(curve), dtype=np.float64)
    if gaps.size == 0:
        return {"n": 0, "mean_s": None, "p90_s": None}
    return {
        "n": int(gaps.size),
        "mean_s": float(gaps.mean()),
        "p90_s": float(np.percentile(gaps, 90, method="inverted_cdf")),
    }


QUICK_VARIANTS = ["sync", "async-polynomial"]
FULL_VARIANTS = [
    "sync",
    "async-constant",
    "async-polynomial",
    "async-hinge",
    "async-polynomial-K10",
    "async-polynomial-recheck1s",
]


def task_body(
    name: str, agg: dict[str, Any], *, input_dim: int, num_classes: int, target: float, seed: int
) -> dict[str, Any]:
    return {
        "name": f"bench-{name}",
        "model": {
            "architecture": "mlp",
            "input_dim": input_dim,
            "num_classes": num_classes,
            "hidden": [128],
            "seed": seed,
        },
        "aggregation": {
            "strategy": "fedavg",
            "num_rounds": 1000,
            "target_metric": {"name": "accuracy", "value": target},
            **agg,
        },
        "compression": {
            "topk_fraction": 0.1,
            "bits": 8,
            "chunk": 64,
            "error_feedback": True,
            "scope": "tensor",
        },
        "training": {"epochs": 2, "batch_size": 16, "lr": 0.05},
    }


def run_one(
    name: str,
    variant: dict[str, Any],
    *,
    rep_seed: int,
    data_seed: int,
    devices: int,
    faults: LogNormalFaults,
    target: float,
    budget_s: float,
    work: Path,
) -> dict[str, Any]:
    """One variant, one repetition, on a fresh coordinator and a fresh fleet."""
    agg = variant["aggregation"]
    recheck_s = float(variant["recheck_s"])
    rng = np.random.default_rng(data_seed)
    dataset = load_dataset("digits", test_fraction=0.2, rng=rng)
    parts = dirichlet_partition(dataset.y_train, devices, 0.5, rng)
    shards = [(dataset.X_train[p], dataset.y_train[p]) for p in parts]
    body = task_body(
        name,
        agg,
        input_dim=dataset.input_dim,
        num_classes=dataset.num_classes,
        target=target,
        seed=data_seed,
    )
    root = work / f"{name}-{rep_seed}"
    wall0 = time.monotonic()
    coordinator = start_coordinator(root, (dataset.X_test, dataset.y_test), recheck_s=recheck_s)
    fleet: Fleet | None = None
    try:
        with coordinator.admin() as admin:
            task, fleet, token = task_and_fleet(
                admin,
                coordinator,
                body,
                label="bench fleet",
                root=root,
                shards=shards,
                seed=rep_seed,
            )
            fault_seeds = np.random.SeedSequence([rep_seed, 7]).spawn(devices)
            schedules = [LogNormalSchedule(faults, np.random.default_rng(s)) for s in fault_seeds]
            for device, schedule in zip(fleet.devices, schedules, strict=True):
                device.faults = schedule
            fleet.enroll(token)
            fleet.start()
            admin.start_task(task["id"])
            t0 = time.monotonic()
            final, timed_out = wait_for_task(admin, task["id"], budget_s=budget_s)
            elapsed = time.monotonic() - t0
            fleet.stop(timeout=5)
            stats = fleet.stats()
            record = collect(admin, coordinator, task["id"])
    finally:
        if fleet is not None:
            fleet.stop(timeout=5)
        coordinator.stop()
    curve = record["curve"]
    ttt = time_to_target(curve, target)
    accs = [p["accuracy"] for p in curve if p["accuracy"] is not None]
    closed = [r for r in record["rounds"] if r["status"] == "closed"]
    sync_info: dict[str, Any] = {}
    if agg["mode"] == "sync":
        sync_info = _sync_round_stats(record["rounds"])
    versions = len(curve) - 1
    return {
        "variant": name,
        "rep_seed": rep_seed,
        "aggregation": agg,
        "coordinator_long_poll_recheck_s": recheck_s,
        "status": final["status"],
        "status_reason": final.get("status_reason"),
        "timed_out": timed_out,
        "time_to_target_s": ttt,
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "versions": versions,
        "aggregations_per_s": versions / curve[-1]["t_s"]
        if versions and curve[-1]["t_s"]
        else None,
        "updates_applied_per_s": record["updates"]["applied"] / curve[-1]["t_s"]
        if versions and curve[-1]["t_s"]
        else None,
        "mean_updates_per_version": statistics.fmean(p["num_updates"] for p in curve[1:])
        if versions
        else None,
        "round_time": round_time(curve),
        "run_elapsed_s": elapsed,
        "wall_incl_setup_s": time.monotonic() - wall0,
        "curve": curve,
        "rounds_closed": len(closed),
        "rounds_failed": record["rounds_failed"],
        "updates": {k: v for k, v in record["updates"].items() if k != "byte_sizes"},
        "assignments": record["assignments"],
        "dropped": record["rounds_dropped_total"],
        "sync_rounds": sync_info,
        "timeline": record["timeline"],
        "agents": {
            "assignments": stats.agents.assignments,
            "uploaded": stats.agents.uploaded,
            "simulated_dropouts": stats.agents.dropped,
            "stale_refused": stats.agents.stale_refused,
            "cancelled_while_training": stats.agents.cancelled,
            "errors": stats.errors,
        },
    }


def _sync_round_stats(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """How sync rounds ended: on reaching C updates, at the deadline, or failed."""
    from _fleet_bench import parse_time

    durations, by_target, by_deadline = [], 0, 0
    for r in rounds:
        opened, closed, deadline = (
            parse_time(r["opened_at"]),
            parse_time(r["closed_at"]),
            parse_time(r["deadline_at"]),
        )
        if opened is None or closed is None:
            continue
        durations.append(closed - opened)
        if r["status"] == "closed":
            if deadline is not None and closed >= deadline - 0.05:
                by_deadline += 1
            else:
                by_target += 1
    return {
        "rounds": len(rounds),
        "closed_on_target": by_target,
        "closed_at_deadline": by_deadline,
        "failed": sum(1 for r in rounds if r["status"] == "failed"),
        "mean_round_s": statistics.fmean(durations) if durations else None,
        "mean_received": statistics.fmean(int(r["num_received"]) for r in rounds)
        if rounds
        else None,
        "mean_dropped": statistics.fmean(int(r["num_dropped"]) for r in rounds) if rounds else None,
    }


def r_in_flight(runs: list[dict[str, Any]]) -> int | None:
    """Devices in flight at most: sync's devices per round, async's concurrency cap."""
    if not runs:
        return None
    agg = runs[0]["aggregation"]
    if agg["mode"] == "sync":
        return sync_in_flight(agg["clients_per_round"], agg["over_selection"])
    return int(agg["max_concurrency"])


def summarize(runs: list[dict[str, Any]], names: list[str], target: float) -> dict[str, Any]:
    per_variant: dict[str, Any] = {}
    for name in names:
        mine = [r for r in runs if r["variant"] == name]
        ttt = [r["time_to_target_s"] for r in mine]
        reached = [t for t in ttt if t is not None]
        per_variant[name] = {
            "runs": len(mine),
            "reached_target": len(reached),
            "time_to_target_s": Spread([t if t is not None else math.nan for t in ttt]).to_dict(),
            "final_accuracy": Spread([r["final_accuracy"] or math.nan for r in mine]).to_dict(),
            "versions": Spread([float(r["versions"]) for r in mine]).to_dict(),
            "round_time_mean_s": Spread(
                [r["round_time"]["mean_s"] or math.nan for r in mine]
            ).to_dict(),
            "round_time_p90_s": Spread(
                [r["round_time"]["p90_s"] or math.nan for r in mine]
            ).to_dict(),
            "devices_in_flight": r_in_flight(mine),
            "aggregations_per_s": Spread(
                [r["aggregations_per_s"] or math.nan for r in mine]
            ).to_dict()["mean"],
            "updates_applied_per_s": Spread(
                [r["updates_applied_per_s"] or math.nan for r in mine]
            ).to_dict()["mean"],
            "mean_staleness_applied": Spread(
                [r["updates"]["mean_staleness_applied"] for r in mine]
            ).to_dict()["mean"],
            "median_s_version_to_assignment": Spread(
                [r["timeline"]["version_to_assigned_s"].get("median", math.nan) for r in mine]
            ).to_dict()["mean"],
            "median_s_assignment_to_upload": Spread(
                [r["timeline"]["assigned_to_upload_s"].get("median", math.nan) for r in mine]
            ).to_dict()["mean"],
            "median_s_device_idle_after_upload": Spread(
                [
                    r["timeline"]["device_idle_after_s"].get("uploaded", {}).get("median", math.nan)
                    for r in mine
                ]
            ).to_dict()["mean"],
            "median_s_device_idle_after_drop": Spread(
                [
                    r["timeline"]["device_idle_after_s"].get("dropped", {}).get("median", math.nan)
                    for r in mine
                ]
            ).to_dict()["mean"],
            "sync_rounds": [r["sync_rounds"] for r in mine] if name == "sync" else None,
            "updates_applied_fresh": sum(r["updates"]["applied_fresh"] for r in mine),
            "updates_applied_stale": sum(r["updates"]["applied_stale"] for r in mine),
            "updates_refused_stale": sum(r["agents"]["stale_refused"] for r in mine),
            "assignments_dropped": sum(r["assignments"].get("dropped", 0) for r in mine),
        }
    sync = per_variant.get("sync", {}).get("time_to_target_s", {}).get("mean")
    speedups: dict[str, Any] = {}
    for name in names:
        if name == "sync":
            continue
        mean = per_variant[name]["time_to_target_s"]["mean"]
        pairs = []
        for r_sync in (r for r in runs if r["variant"] == "sync"):
            for r in runs:
                same = r["variant"] == name and r["rep_seed"] == r_sync["rep_seed"]
                if same and r["time_to_target_s"] and r_sync["time_to_target_s"]:
                    pairs.append(r_sync["time_to_target_s"] / r["time_to_target_s"])
        speedups[name] = {
            "ratio_of_means": sync / mean if sync and mean else None,
            "per_repetition": Spread(pairs).to_dict(),
        }
    valid = {k: v["ratio_of_means"] for k, v in speedups.items() if v["ratio_of_means"]}
    best = max(valid, key=lambda k: valid[k]) if valid else None
    best_ratio = valid[best] if best else None
    headline = HEADLINE_VARIANT if HEADLINE_VARIANT in speedups else best
    head = speedups.get(headline, {}) if headline else {}
    per_rep = head.get("per_repetition", {})
    # every seed must have reached the target on both sides for a per-seed minimum to count
    complete = bool(
        headline
        and "sync" in per_variant
        and per_variant["sync"]["reached_target"] == per_variant["sync"]["runs"]
        and per_variant[headline]["reached_target"] == per_variant[headline]["runs"]
        and len(per_rep.get("values", [])) == per_variant["sync"]["runs"]
    )
    worst = per_rep.get("min") if complete else None
    return {
        "target_accuracy": target,
        "per_variant": per_variant,
        "speedup_sync_over_async": speedups,
        "headline_variant": headline,
        "headline_speedup_min_over_seeds": worst,
        "headline_speedup_ratio_of_means": head.get("ratio_of_means"),
        "best_async_variant": best,
        "best_speedup": best_ratio,
        "speedup_target": SPEEDUP_TARGET,
        "fedbuff_reported": FEDBUFF_REPORTED,
        "target_met": bool(worst is not None and worst >= SPEEDUP_TARGET),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(
        1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [2, 1, 1]}
    )
    names = list(result["summary"]["per_variant"])
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    seen: set[str] = set()
    for run in result["runs"]:
        pts = [p for p in run["curve"] if p["accuracy"] is not None]
        label = run["variant"] if run["variant"] not in seen else None
        seen.add(run["variant"])
        ax1.plot(
            [p["t_s"] for p in pts],
            [p["accuracy"] for p in pts],
            "-",
            color=colors[run["variant"]],
            alpha=0.9 if label else 0.45,
            lw=1.3,
            label=label,
        )
    target = result["summary"]["target_accuracy"]
    ax1.axhline(target, color="grey", ls=":", lw=1, label=f"target {target:.2f}")
    ax1.set_xlabel("wall-clock time since task start (s)")
    ax1.set_ylabel("test accuracy (coordinator eval hook)")
    ax1.set_ylim(0, 1)
    ax1.legend(loc="lower right")
    p = result["parameters"]
    ax1.set_title(
        f"Accuracy over time, {p['devices']} devices, {p.get('devices_in_flight', '?')} in flight"
    )
    per = result["summary"]["per_variant"]
    x = np.arange(len(names))

    def spread_bars(ax: Any, key: str, offset: float, width: float, **kw: Any) -> None:
        means = [per[n][key]["mean"] or 0.0 for n in names]
        lo = [m - (per[n][key]["min"] or m) for m, n in zip(means, names, strict=True)]
        hi = [(per[n][key]["max"] or m) - m for m, n in zip(means, names, strict=True)]
        ax.bar(x + offset, means, width, yerr=[lo, hi], capsize=3, **kw)

    spread_bars(ax2, "time_to_target_s", 0.0, 0.7, color=[colors[n] for n in names])
    ax2.set_xticks(x, names, rotation=25, ha="right")
    ax2.set_ylabel("time to target (s): mean, min-max over seeds")
    s = result["summary"]
    worst = s.get("headline_speedup_min_over_seeds")
    ax2.set_title(
        f"{s.get('headline_variant')}: {worst:.2f}x (worst seed)" if worst else "speed-up"
    )
    spread_bars(ax3, "round_time_mean_s", -0.2, 0.4, color="C0", label="mean")
    spread_bars(ax3, "round_time_p90_s", 0.2, 0.4, color="C1", label="p90")
    ax3.set_xticks(x, names, rotation=25, ha="right")
    ax3.set_ylabel("s between consecutive model versions")
    ax3.set_title("Round time (min-max over seeds)")
    ax3.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(result: dict[str, Any]) -> None:
    s = result["summary"]
    print(f"\nasync vs sync: target accuracy {s['target_accuracy']}")
    print(
        f"{'variant':<26} {'in flight':>9} {'reached':>7} {'t→target s':>12} "
        f"{'round mean s':>12} {'round p90 s':>11} {'final acc':>10} {'versions':>8} "
        f"{'fresh':>6} {'stale':>6} {'refused':>7} {'dropped':>7}"
    )

    def pm(d: dict[str, Any], spec: str = ".1f") -> str:
        return f"{d['mean']:{spec}}±{d['std']:{spec}}" if d["mean"] is not None else "-"

    for name, v in s["per_variant"].items():
        acc = v["final_accuracy"]["mean"]
        print(
            f"{name:<26} {v.get('devices_in_flight') or '-':>9} "
            f"{v['reached_target']:>3}/{v['runs']:<3} {pm(v['time_to_target_s']):>12} "
            f"{pm(v['round_time_mean_s'], '.2f'):>12} {pm(v['round_time_p90_s'], '.2f'):>11} "
            f"{acc if acc is None else f'{acc:.3f}':>10} {v['versions']['mean']:>8.1f} "
            f"{v['updates_applied_fresh']:>6} {v['updates_applied_stale']:>6} "
            f"{v['updates_refused_stale']:>7} {v['assignments_dropped']:>7}"
        )
    for name, sp in s["speedup_sync_over_async"].items():
        r, per = sp["ratio_of_means"], sp["per_repetition"]
        seeds = f" (per seed {per['min']:.2f}-{per['max']:.2f})" if per["mean"] else ""
        print(f"speedup sync/{name}: {r:.2f}x{seeds}" if r else f"speedup sync/{name}: -")
    worst = s["headline_speedup_min_over_seeds"]
    print(
        f"target {SPEEDUP_TARGET}x: {'met' if s['target_met'] else 'NOT met'} "
        f"({s['headline_variant']}, worst seed: {worst if worst is None else f'{worst:.2f}x'})"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.output or RESULTS_DIR / (f"{NAME}.quick.json" if args.quick else f"{NAME}.json")
    png = out.with_suffix(".png") if not args.quick else RESULTS_DIR / f"{NAME}.quick.png"
    if args.plot_only:
        import json

        result = json.loads(out.read_text())
        plot(result, png)
        print_summary(result)
        return 0
    configure_logging(args.verbose)
    reps = args.reps or (1 if args.quick else 3)
    devices = args.devices or (30 if args.quick else 40)
    target = args.target if args.target is not None else 0.80
    faults = LogNormalFaults()
    covering = faults.dropout / (1.0 - faults.dropout)
    if args.over_selection < covering:
        print(
            f"warning: over-selection {args.over_selection} does not cover "
            f"{faults.dropout:.0%} dropout (needs >= {covering:.3f}); sync rounds will mostly "
            "wait for their deadline",
            file=sys.stderr,
        )
    in_flight = sync_in_flight(args.clients_per_round, args.over_selection)
    if args.concurrency is not None and args.concurrency != in_flight:
        print(
            f"warning: async concurrency {args.concurrency} differs from sync's {in_flight} "
            "devices per round; the comparison is not at equal concurrency",
            file=sys.stderr,
        )
    deadline = args.deadline if args.deadline is not None else round(faults.quantile(0.95), 1)
    all_variants = variants(args, devices, deadline)
    names = args.variants or (["sync", "async-polynomial"] if args.quick else list(all_variants))
    budget = args.budget or (45.0 if args.quick else 90.0)
    started = time.monotonic()
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        for rep in range(reps):
            for name in names:
                print(f"[{time.monotonic() - started:6.1f}s] rep {rep} {name} ...", file=sys.stderr)
                run = run_one(
                    name,
                    all_variants[name],
                    rep_seed=args.seed + rep,
                    data_seed=args.seed,
                    devices=devices,
                    faults=faults,
                    target=target,
                    budget_s=budget,
                    work=Path(tmp),
                )
                runs.append(run)
                ttt = run["time_to_target_s"]
                print(
                    f"    {run['status']}: {run['versions']} versions, "
                    f"time to target {ttt if ttt is None else f'{ttt:.1f}s'}, "
                    f"final acc {run['final_accuracy']}",
                    file=sys.stderr,
                )
    result = {
        "benchmark": NAME,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "timestamp": now_iso(),
        "machine": machine_info(),
        "code": code_state(),
        "runtime_s": time.monotonic() - started,
        "parameters": {
            "quick": args.quick,
            "repetitions": reps,
            "devices": devices,
            "devices_in_flight": args.concurrency or in_flight,
            "equal_concurrency": "async max_concurrency = sync ceil(C * (1 + over_selection))",
            "over_selection_covers_dropout": args.over_selection >= covering,
            "round_time": "seconds between consecutive model versions (the first from the "
            "task's start); per run mean and p90 (nearest rank), spread over seeds",
            "headline": f"{HEADLINE_VARIANT}: least favourable per-seed speed-up",
            "dataset": "digits (sklearn, 20% stratified test split)",
            "partition": "Dirichlet alpha=0.5",
            "seeds": {"data": args.seed, "repetitions": [args.seed + r for r in range(reps)]},
            "faults": faults.to_dict(),
            "budget_per_run_s": budget,
            "target_accuracy": target,
            "target_choice": "reached by every variant in trial runs; the coordinator stops "
            "the task at the first version whose test accuracy (eval hook) reaches it",
            "task_template": task_body(
                "template", {}, input_dim=64, num_classes=10, target=target, seed=args.seed
            ),
            "variants": {n: all_variants[n] for n in names},
        },
        "runs": runs,
    }
    result["summary"] = summarize(runs, names, target)
    write_json(out, result)
    plot(result, png)
    print_summary(result)
    print(f"\nresults: {out}\nplot:    {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
