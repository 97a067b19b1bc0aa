"""Test accuracy against the privacy budget: central DP-FedAvg at epsilon 1, 3 and 8 (delta = 1/n
for n = 100 devices) and a no-DP reference, on the 100-device digits fleet (issue 15).

Setting (the fleet of ``fleet_traffic.py``): digits (scikit-learn, 20 % stratified test split),
Dirichlet alpha=0.5 label skew over 100 devices, sync FedAvg (server lr 1), 20 devices per round
picked from the 100 (``over_selection`` 0, no dropouts), lossless uploads (top-k 1.0, 32 bits:
the benchmark measures privacy, not compression), 5 local epochs of batch 16 at lr 0.1.
The model is softmax regression (650 parameters) by default, ``--model mlp`` the 64-128-10 MLP
of fleet_traffic.py (9,610): the noise goes on every coordinate, so the smaller model has the
better signal-to-noise ratio at the same epsilon.

Privacy arms: ``weighting`` 'equal', ``max_staleness`` 0 and ``aggregation.privacy`` central with
``clip_norm`` C (``--clip``, default 1.0), ``expected_cohort`` 20, ``delta`` 0.01 and
``target_epsilon`` the arm's epsilon. The noise multiplier of each arm is the smallest (to 0.1 %)
for which dp-accounting's RDP accountant, with the coordinator's own ledger code
(:class:`fedge.coordinator.engine.privacy.Ledger`), keeps the planned number of rounds at
sampling rate q = 20 / 100 within the arm's epsilon. The no-DP arm uses the same weighting and
staleness settings without clipping or noise. The epsilon reported per run is what the task
view says at the end (``privacy.epsilon``), so a run that spent less (the budget stopped it, or
fewer rounds ran) shows it.

Seeds fix the test split, the partition, the initial model and the devices' training
randomness; the coordinator's noise and its choice of devices come from its CSPRNG (as in
production), so the spread over seeds includes the noise's.

What runs: the real coordinator (a child process: HTTPS on loopback, SQLite, blob store)
evaluating every model version on the test split (``bench/_fleet_bench_eval.py``), and 100 real
agents in this process (:class:`fedge.edge_agent.sim.fleet.Fleet`).

    python bench/dp_accuracy.py              # full: 4 arms x 3 seeds, 30 rounds
    python bench/dp_accuracy.py --quick      # 4 arms x 1 seed, 8 rounds (dp_accuracy.quick.json)
    python bench/dp_accuracy.py --plot-only  # redraw the PNG from the JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fleet_bench import (
    RESULTS_DIR,
    Spread,
    code_state,
    collect,
    configure_logging,
    db_rows,
    machine_info,
    now_iso,
    start_coordinator,
    task_and_fleet,
    wait_for_task,
    wait_until_seen,
    write_json,
)

from fedge.coordinator.engine.privacy import Ledger
from fedge.edge_agent.sim.datasets import load_dataset
from fedge.edge_agent.sim.fleet import Fleet
from fedge.edge_agent.sim.partition import dirichlet_partition

NAME = "dp_accuracy"
DEVICES = 100
PER_ROUND = 20
ALPHA = 0.5
DELTA = 1.0 / DEVICES
EPSILONS = (1.0, 3.0, 8.0)
MODELS = {
    "softmax": {"architecture": "softmax", "input_dim": 64, "num_classes": 10},
    "mlp": {"architecture": "mlp", "input_dim": 64, "num_classes": 10, "hidden": [128]},
}
TRAINING = {"epochs": 5, "batch_size": 16, "lr": 0.1}
LOSSLESS = {"topk_fraction": 1.0, "bits": 32, "chunk": 256, "error_feedback": False}
BUDGET_S = 1800.0

log = logging.getLogger(NAME)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 8 rounds")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON")
    p.add_argument("--seeds", type=int, nargs="*", help="seeds (full: 0 1 2; quick: 0)")
    p.add_argument("--rounds", type=int, help="planned rounds (full: 30; quick: 8)")
    p.add_argument("--model", choices=list(MODELS), default="softmax")
    p.add_argument("--clip", type=float, default=1.0, help="clip_norm (1.0)")
    p.add_argument("--output", type=Path, help="results JSON path")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def noise_for(epsilon: float, *, q: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier (relative precision 1e-3) that keeps ``rounds`` rounds at
    sampling rate ``q`` within ``epsilon`` (bisection on the coordinator's own ledger)."""

    def spent(z: float) -> float:
        return Ledger().add(q, z, rounds).epsilon(delta)

    lo, hi = 0.05, 1.0
    while spent(hi) > epsilon:
        lo, hi = hi, hi * 2
    while (hi - lo) / hi > 1e-3:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if spent(mid) <= epsilon else (mid, hi)
    return hi


def task_body(
    arm: str, *, seed: int, rounds: int, model: str, privacy: dict[str, Any] | None
) -> dict[str, Any]:
    aggregation: dict[str, Any] = {
        "mode": "sync",
        "strategy": "fedavg",
        "server_lr": 1.0,
        "num_rounds": rounds,
        "clients_per_round": PER_ROUND,
        "over_selection": 0.0,
        "min_updates": PER_ROUND,
        "round_deadline_s": 600.0,
        "lease_s": 600.0,
        "weighting": "equal",
        "max_staleness": 0,
    }
    if privacy is not None:
        aggregation["privacy"] = privacy
    return {
        "name": f"dp-accuracy-{arm}-{seed}",
        "model": {**MODELS[model], "seed": seed},
        "aggregation": aggregation,
        "compression": LOSSLESS,
        "training": TRAINING,
    }


def run_one(
    arm: str,
    *,
    seed: int,
    rounds: int,
    model: str,
    privacy: dict[str, Any] | None,
    work: Path,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    dataset = load_dataset("digits", test_fraction=0.2, rng=rng)
    parts = dirichlet_partition(dataset.y_train, DEVICES, ALPHA, rng)
    shards = [(dataset.X_train[p], dataset.y_train[p]) for p in parts]
    root = work / f"{arm}-{seed}"
    wall0 = time.monotonic()
    coordinator = start_coordinator(root, (dataset.X_test, dataset.y_test))
    fleet: Fleet | None = None
    try:
        with coordinator.admin() as admin:
            body = task_body(arm, seed=seed, rounds=rounds, model=model, privacy=privacy)
            task, fleet, token = task_and_fleet(
                admin,
                coordinator,
                body,
                label="dp bench",
                root=root,
                shards=shards,
                seed=seed,
                eval_fraction=0.0,
            )
            fleet.enroll(token)
            fleet.start()
            # Every device must have been seen before the first round opens: the sampling
            # rate charged is picked / eligible, and an unseen device is not eligible.
            wait_until_seen(admin, DEVICES)
            admin.start_task(task["id"])
            final, timed_out = wait_for_task(admin, task["id"], budget_s=BUDGET_S)
            fleet.stop(timeout=5)
            record = collect(admin, coordinator, task["id"])
            view = admin.get_task(task["id"])
            ((stored,),) = db_rows(
                coordinator, "SELECT privacy FROM tasks WHERE id = ?", (task["id"],)
            )
    finally:
        if fleet is not None:
            fleet.stop(timeout=5)
        coordinator.stop()
    curve = record["curve"]
    accs = [p["accuracy"] for p in curve if p["accuracy"] is not None]
    spent = view.get("privacy") or {}
    return {
        "arm": arm,
        "seed": seed,
        "status": final["status"],
        "status_reason": final.get("status_reason"),
        "timed_out": timed_out,
        "versions": len(curve) - 1,
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "epsilon_spent": spent.get("epsilon"),
        "rounds_accounted": spent.get("rounds_accounted"),
        "privacy": privacy,
        # The coordinator's ledger: released rounds as [sampling rate, noise multiplier, count].
        "ledger_events": (json.loads(stored) or {}).get("events") if stored else None,
        "curve": [{"version": p["version"], "accuracy": p["accuracy"]} for p in curve],
        "updates": {k: v for k, v in record["updates"].items() if k != "byte_sizes"},
        "wall_s": time.monotonic() - wall0,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        out[arm] = {
            "final_accuracy": Spread([r["final_accuracy"] for r in mine]).to_dict(),
            "best_accuracy": Spread([r["best_accuracy"] for r in mine]).to_dict(),
            "epsilon_spent": Spread(
                [r["epsilon_spent"] for r in mine if r["epsilon_spent"] is not None]
            ).to_dict(),
            "noise_multiplier": (mine[0]["privacy"] or {}).get("noise_multiplier"),
            "versions": [r["versions"] for r in mine],
        }
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    eps = [e for e in result["parameters"]["epsilons"]]
    dp_arms = [f"eps_{e:g}" for e in eps]
    means = [summary[a]["final_accuracy"]["mean"] for a in dp_arms]
    lows = [summary[a]["final_accuracy"]["min"] for a in dp_arms]
    highs = [summary[a]["final_accuracy"]["max"] for a in dp_arms]
    yerr = [[m - lo for m, lo in zip(means, lows, strict=True)]]
    yerr.append([hi - m for m, hi in zip(means, highs, strict=True)])
    ax.errorbar(eps, means, yerr=yerr, marker="o", capsize=4, label="central DP-FedAvg")
    for run in result["runs"]:
        if run["arm"] in dp_arms and run["final_accuracy"] is not None:
            ax.scatter([run["epsilon_spent"] or 0.0], [run["final_accuracy"]], s=10, color="grey")
    ref = summary["no_dp"]["final_accuracy"]
    if ref["mean"] is not None:
        ax.axhline(ref["mean"], color="black", ls="--", label="no DP (mean)")
        ax.axhspan(ref["min"], ref["max"], color="black", alpha=0.08)
    ax.set_xscale("log")
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.minorticks_off()
    ax.set_xlabel(f"epsilon (delta = {result['parameters']['delta']:g})")
    ax.set_ylabel("final test accuracy")
    ax.set_title("accuracy vs privacy budget (mean, min-max over seeds)")
    ax.legend(loc="lower right")
    for arm in ["no_dp", *dp_arms]:
        runs = [r for r in result["runs"] if r["arm"] == arm]
        if not runs:
            continue
        length = min(len(r["curve"]) for r in runs)
        acc = np.array(
            [
                [np.nan if p["accuracy"] is None else p["accuracy"] for p in r["curve"][:length]]
                for r in runs
            ],
            dtype=float,
        )
        ax2.plot(range(length), acc.mean(axis=0), label=arm)  # unevaluated versions: gaps
    ax2.set_xlabel("model version")
    ax2.set_ylabel("test accuracy (mean over seeds)")
    ax2.set_title(f"{result['parameters']['model']}, {DEVICES} devices, {PER_ROUND}/round")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose)
    out = args.output or RESULTS_DIR / (f"{NAME}.quick.json" if args.quick else f"{NAME}.json")
    if args.plot_only:
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        return 0
    seeds = args.seeds if args.seeds else ([0] if args.quick else [0, 1, 2])
    rounds = args.rounds or (8 if args.quick else 30)
    q = PER_ROUND / DEVICES
    arms: dict[str, dict[str, Any] | None] = {"no_dp": None}
    for eps in EPSILONS:
        z = noise_for(eps, q=q, rounds=rounds, delta=DELTA)
        arms[f"eps_{eps:g}"] = {
            "mode": "central",
            "clip_norm": args.clip,
            "noise_multiplier": z,
            "expected_cohort": PER_ROUND,
            "delta": DELTA,
            "target_epsilon": eps,
        }
        log.warning("epsilon %g: noise multiplier %.4f for %d rounds at q %.2f", eps, z, rounds, q)
    started = time.monotonic()
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedge-dp-") as tmp:
        for seed in seeds:
            for arm, privacy in arms.items():
                run = run_one(
                    arm,
                    seed=seed,
                    rounds=rounds,
                    model=args.model,
                    privacy=privacy,
                    work=Path(tmp),
                )
                log.warning(
                    "%s seed %d: %s after %d versions, final accuracy %s, epsilon %s (%.0f s)",
                    arm,
                    seed,
                    run["status"],
                    run["versions"],
                    run["final_accuracy"],
                    run["epsilon_spent"],
                    run["wall_s"],
                )
                runs.append(run)
    result = {
        "benchmark": NAME,
        "command": "python bench/dp_accuracy.py" + (" " + " ".join(argv or sys.argv[1:])),
        "timestamp": now_iso(),
        "machine": machine_info(),
        "code": code_state(),
        "runtime_s": time.monotonic() - started,
        "parameters": {
            "devices": DEVICES,
            "per_round": PER_ROUND,
            "sampling_rate": q,
            "alpha": ALPHA,
            "rounds": rounds,
            "seeds": seeds,
            "model": args.model,
            "training": TRAINING,
            "compression": LOSSLESS,
            "clip_norm": args.clip,
            "delta": DELTA,
            "epsilons": list(EPSILONS),
            "noise_multipliers": {
                a: (p or {}).get("noise_multiplier") for a, p in arms.items() if p is not None
            },
            "accountant": "dp-accounting RDP, Poisson-sampled Gaussian, orders 2-64 and "
            "80-1024 (fedge.coordinator.engine.privacy.ORDERS)",
        },
        "runs": runs,
        "summary": summarize(runs),
    }
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    for arm, s in result["summary"].items():
        fa = s["final_accuracy"]
        print(
            f"{arm:8s} noise {s['noise_multiplier'] or 0:.3f}  final accuracy "
            f"{fa['mean']:.3f} ({fa['min']:.3f}-{fa['max']:.3f})  epsilon {s['epsilon_spent']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
