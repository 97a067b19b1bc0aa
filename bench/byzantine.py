"""Byzantine devices against the norm bound and robust aggregation (issue 15 part A).

Setting: the 100-device digits fleet of ``fleet_traffic.py`` (scikit-learn digits, 20 %
stratified test split, Dirichlet alpha=0.5 label skew over 100 devices, MLP 64-128-10, sync
FedAvg with server lr 1, 20 devices per round, no dropouts or stragglers, 5 local epochs of SGD
lr 0.1, batch 16), float32 uploads (top-k 1.0, 32 bits, no error feedback: every device's
update reaches the coordinator as it made it) and full model downloads.

Attackers: 20 of the 100 devices (drawn per seed) are enrolled like the others and sign every
request with their own keys; they train normally and then replace the delta they upload
(``delta = w_local - w_base``) by

- ``scaled``: ``100 * delta`` (model replacement / boosting);
- ``sign_flip``: ``-4 * delta`` (the sign-flipping attack, boosted by 4 as in the robust
  aggregation literature; ``-1`` alone only slows learning down);
- ``gaussian``: ``N(0, 1)`` noise per coordinate (about 100 in L2 norm, honest updates are
  about 1).

Attackers want their updates accepted: each value is clipped to just within the task's
per-value ``max_update_abs`` (the default 1e6; the coordinator refuses larger values with 422),
which only matters once an undefended model has been driven far off.

Runs are reproducible: every arm of a seed runs on a fresh coordinator with the task's
``selection_seed`` set to the seed (each round picks the same devices, by name, in every arm;
docs/rounds.md, "Reproducible selection"), the fleet seeds each device's training by (task,
version) instead of the assignment id, the task starts once all 100 devices have polled, the
round deadline (3600 s) and the liveness window (100 polls) are long enough that no round
depends on timing, and the coordinator aggregates in assignment order. Two runs of one seed
and arm give the same accuracy curve; an attacked arm differs from the clean arm of its seed
by the attack (and the defence) alone. Each run records a digest of its cohorts, and the
summary says whether they were equal in every arm of each seed.

Arms, each on a fresh coordinator and fleet per seed:

- ``clean``: no attackers, no defence (the reference);
- ``<attack>+defence``: attackers, with the defence ``--defence`` names (``DEFENCES``); the
  default ``krum6q8``: an adaptive L2 norm bound (clip to the running 80th percentile of the
  norms, at most 10) and Multi-Krum with f = 6, averaging the 14 of a round's 20 updates with
  the lowest scores. f = 6 covers a round's attackers in about 94 % of rounds (4 expected of
  20, hypergeometric);
- ``clean+defence``: no attackers, with the defence (what the defence costs);
- ``<attack>``: attackers, no defence (plain weighted mean).

``krum6q8`` was chosen on exploration seeds 10-14, not on the reported seeds 0-4: the
sign-flip and Gaussian arms of ``krum6`` (the median bound), ``krum6q8`` and ``krum4q8``
(f = 4, averaging 16) against the clean run of each seed
(``bench/results/byzantine_exploration/``). ``krum6`` left the sign flip 2.5 points behind on
average (3.3 on its worst seed): clipping every update to the median of the norms slows the
honest majority down. Both 80th-percentile defences kept every (attack, seed) pair within
2 points (worst 1.95 each); ``krum6q8`` was taken for its larger f. ``--arms ... +krum``
still runs ``KRUM_DEFENCE`` next to another ``--defence``.

``--merge FILE...`` adds the runs of earlier result files for the (arm, seed) pairs not run
now (earlier results were not reproducible: compare only arms of one run). ``--jobs N`` runs N
(arm, seed) pairs at once; a ``.partial.json`` next to the output holds the runs done so far,
and ``--from-partial`` (with the same arguments) writes the results of a run stopped early
(``cut_short`` in the JSON lists the pairs missing).

Reported per arm: final test accuracy (the coordinator's evaluation hook on the held-out split,
``bench/_fleet_bench_eval.py``) over the seeds (mean, std, min, max), its difference to
``clean`` of the same seed, the updates clipped, and the accuracy curve (plotted). Headline:
the defended arms' final accuracy against the clean run's, worst seed (target: within 2
points on every seed).

    python bench/byzantine.py --jobs 6    # reported: 5 seeds, 50 rounds, 8 arms, 6 at once
    python bench/byzantine.py --quick      # make bench: 1 seed, 8 rounds
    python bench/byzantine.py --plot-only  # recompute the summary and redraw the PNG from the JSON
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
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

from fedge.edge_agent.data import LocalData
from fedge.edge_agent.sim.datasets import load_dataset
from fedge.edge_agent.sim.fleet import Fleet
from fedge.edge_agent.sim.partition import dirichlet_partition
from fedge.edge_agent.trainers import Trainer, TrainResult, builtin_trainer
from fedge.shared.modelspec import Weights

NAME = "byzantine"
DEVICES = 100
PER_ROUND = 20
BYZANTINE = 20
ALPHA = 0.5
MODEL = {"architecture": "mlp", "input_dim": 64, "num_classes": 10, "hidden": [128]}
TRAINING = {"epochs": 5, "batch_size": 16, "lr": 0.1}
COMPRESSION = {"topk_fraction": 1.0, "bits": 32, "chunk": 256, "error_feedback": False}
AGGREGATION = {
    "strategy": "fedavg",
    "server_lr": 1.0,
    "clients_per_round": PER_ROUND,
    "over_selection": 0.0,
    "min_updates": PER_ROUND,
    # A safety net only (a round closes with its 20th update): a round that missed a short
    # deadline on the loaded machine would make the run depend on timing.
    "round_deadline_s": 3600.0,
    "lease_s": 3600.0,
}
#: Devices stay eligible while seen within 100 poll intervals (capped by the coordinator at
#: 600 s), not 3: on the loaded machine a device's next poll can be late, and a round that
#: opened without it would pick another cohort.
COORDINATOR_ENV = {"FEDGE_DEVICE_LIVENESS_POLLS": "100"}
#: The adaptive norm bound of the defences: clip to the running median of the norms (at most
#: 10; honest updates here are about 1).
NORM_BOUND = {
    "max_norm": 10.0,
    "action": "clip",
    "adaptive": {"quantile": 0.5, "lr": 0.2, "initial": 1.0},
}
#: The same, clipping to the running 80th percentile: the median slows honest devices down.
NORM_BOUND_Q8 = {**NORM_BOUND, "adaptive": {**NORM_BOUND["adaptive"], "quantile": 0.8}}
DEFENCES: dict[str, dict[str, Any]] = {
    "trimmed10": {"norm_bound": NORM_BOUND, "robust": "trimmed_mean", "trim_fraction": 0.1},
    "trimmed25": {"norm_bound": NORM_BOUND, "robust": "trimmed_mean", "trim_fraction": 0.25},
    "median": {"norm_bound": NORM_BOUND, "robust": "median"},
    "bounded_mean": {"norm_bound": NORM_BOUND, "robust": "mean"},
    "krum4": {"norm_bound": NORM_BOUND, "robust": "multi_krum", "krum_byzantine": 4},
    "krum6": {"norm_bound": NORM_BOUND, "robust": "multi_krum", "krum_byzantine": 6},
    "krum8": {"norm_bound": NORM_BOUND, "robust": "multi_krum", "krum_byzantine": 8},
    "krum6q8": {"norm_bound": NORM_BOUND_Q8, "robust": "multi_krum", "krum_byzantine": 6},
    "krum4q8": {"norm_bound": NORM_BOUND_Q8, "robust": "multi_krum", "krum_byzantine": 4},
}
DEFENCE = "krum6q8"
SCALE = 100.0
SIGN_FLIP = -4.0
GAUSSIAN_SIGMA = 1.0
#: Attackers keep every value within the task's default max_update_abs (1e6) so that the
#: coordinator accepts their updates.
ATTACK_MAX_ABS = 0.99e6
ATTACKS = ("scaled", "sign_flip", "gaussian")
#: The direction-aware defence of the ``+krum`` arms: the 80th-percentile norm bound and
#: Multi-Krum with f = 6 of the 20 updates of a round, averaging the 14 best.
KRUM_DEFENCE = "krum6q8"
#: The reported arms, in the order a seed's runs start: the clean reference, the defended
#: attacks, the defence's own cost, the undefended attacks.
DEFAULT_ARMS = (
    "clean",
    *(f"{a}+defence" for a in ATTACKS),
    "clean+defence",
    *ATTACKS,
)
ARMS = (*DEFAULT_ARMS, "clean+krum", *(f"{a}+krum" for a in ATTACKS))
#: Long enough that idle polls cost the coordinator little (a new round wakes a waiting poll at
#: once); the liveness window is 100 polls, capped at 600 s.
POLL_WAIT_S = 30.0
STARTUP_TIMEOUT_S = 600.0
#: How long a run may take per round before it is cancelled: generous, because on the loaded
#: machine a round has taken 50 s (at 20 s per round, runs were cancelled after 23 versions).
WAIT_PER_ROUND_S = 90.0

log = logging.getLogger(NAME)


class ByzantineTrainer:
    """Trains like an honest device, then uploads an attacker's delta instead."""

    def __init__(self, inner: Trainer, attack: str) -> None:
        self.inner = inner
        self.attack = attack

    def train(
        self,
        weights: Weights,
        config: Mapping[str, Any],
        rng: np.random.Generator,
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        result = self.inner.train(weights, config, rng, should_stop=should_stop)
        out: Weights = {}
        for name, base in weights.items():
            base64 = np.asarray(base, dtype=np.float64)
            delta = np.asarray(result.weights[name], dtype=np.float64) - base64
            if self.attack == "scaled":
                delta *= SCALE
            elif self.attack == "sign_flip":
                delta *= SIGN_FLIP
            else:
                delta = rng.normal(0.0, GAUSSIAN_SIGMA, size=delta.shape)
            np.clip(delta, -ATTACK_MAX_ABS, ATTACK_MAX_ABS, out=delta)
            out[name] = (base64 + delta).astype(np.float32)
        return dataclasses.replace(result, weights=out)

    def evaluate(self, weights: Weights) -> dict[str, float]:
        return self.inner.evaluate(weights)


def trainer_factory(
    attack: str | None, byzantine: set[int]
) -> Callable[[Mapping[str, Any], LocalData], Trainer]:
    """Honest trainers, and attackers for the devices whose data is in ``byzantine`` (by
    identity: the fleet hands every agent its own ``LocalData``)."""

    def factory(model: Mapping[str, Any], data: LocalData) -> Trainer:
        inner = builtin_trainer(model, data)
        if attack is not None and id(data) in byzantine:
            return ByzantineTrainer(inner, attack)
        return inner

    return factory


def parse_arm(arm: str) -> tuple[str | None, bool]:
    """(attack or None, defended)."""
    base, _, suffix = arm.partition("+")
    return (None if base == "clean" else base), suffix in ("defence", "krum")


def arm_defence(arm: str, defence: str) -> str | None:
    """The ``DEFENCES`` entry an arm runs with: ``+defence`` arms ``defence`` (``--defence``),
    ``+krum`` arms ``KRUM_DEFENCE``, the others none."""
    suffix = arm.partition("+")[2]
    return {"defence": defence, "krum": KRUM_DEFENCE}.get(suffix)


def run_one(
    arm: str, *, seed: int, rounds: int, work: Path, defence: str = DEFENCE
) -> dict[str, Any]:
    attack, defended = parse_arm(arm)
    defence_name = arm_defence(arm, defence)
    rng = np.random.default_rng(seed)
    dataset = load_dataset("digits", test_fraction=0.2, rng=rng)
    parts = dirichlet_partition(dataset.y_train, DEVICES, ALPHA, rng)
    shards = [(dataset.X_train[p], dataset.y_train[p]) for p in parts]
    # The attackers: the same devices in every arm of a seed.
    chosen = np.random.default_rng([seed, 99]).choice(DEVICES, size=BYZANTINE, replace=False)
    body = {
        "name": f"{NAME}-{arm}-{seed}",
        "model": {**MODEL, "seed": seed},
        "aggregation": {
            **AGGREGATION,
            "num_rounds": rounds,
            # The same cohorts in every arm of a seed (and every run of it).
            "selection_seed": seed,
            **(DEFENCES[defence_name] if defence_name else {}),
        },
        "compression": COMPRESSION,
        "training": TRAINING,
    }
    root = work / f"{arm}-{seed}".replace("+", "_")
    wall0 = time.monotonic()
    # A generous start-up wait: on a loaded machine the coordinator's start (key generation,
    # migrations, imports) has taken more than the default 60 s.
    coordinator = start_coordinator(
        root,
        (dataset.X_test, dataset.y_test),
        startup_timeout=STARTUP_TIMEOUT_S,
        extra_env=COORDINATOR_ENV,
    )
    fleet: Fleet | None = None
    try:
        with coordinator.admin() as admin:
            task, fleet, token = task_and_fleet(
                admin,
                coordinator,
                body,
                label="byzantine bench",
                root=root,
                shards=shards,
                seed=seed,
                poll_wait=POLL_WAIT_S,
                eval_fraction=0.0,
                # Each device trains alike in every arm of a seed.
                seed_training_by_version=True,
            )
            byzantine = {id(fleet.devices[int(i)].data) for i in chosen}
            fleet.trainer_factory = trainer_factory(attack, byzantine)
            device_ids = fleet.enroll(token)
            fleet.start()
            # Every device polled before the first round: it picks from the whole fleet.
            wait_until_seen(admin, DEVICES)
            admin.start_task(task["id"])
            final, timed_out = wait_for_task(
                admin, task["id"], budget_s=120.0 + WAIT_PER_ROUND_S * rounds, poll_s=0.5
            )
            fleet.stop(timeout=10)
            record = collect(admin, coordinator, task["id"])
            attackers = {device_ids[int(i)] for i in chosen} if attack else set()
            applied = db_rows(
                coordinator,
                "SELECT device_id, norm, clip_scale FROM updates "
                "WHERE task_id = ? AND status = 'applied'",
                (task["id"],),
            )
            cohorts = db_rows(
                coordinator,
                "SELECT r.number, d.name FROM assignments a "
                "JOIN rounds r ON r.id = a.round_id JOIN devices d ON d.id = a.device_id "
                "WHERE a.task_id = ? ORDER BY r.number, d.name",
                (task["id"],),
            )
            devices = list(admin.iterate("/devices"))
            versions = sorted(
                admin.iterate(f"/tasks/{task['id']}/models"), key=lambda v: int(v["version"])
            )
    finally:
        if fleet is not None:
            fleet.stop(timeout=10)
        coordinator.stop()
    curve = record["curve"]
    final_acc = curve[-1]["accuracy"] if curve else None

    def norms(rows: list[Any]) -> dict[str, Any]:
        values = [float(r[1]) for r in rows if r[1] is not None]
        clipped = sum(1 for r in rows if r[2] is not None and float(r[2]) < 1.0)
        if not values:
            return {"n": len(rows), "clipped": clipped}
        return {
            "n": len(rows),
            "clipped": clipped,
            "norm_median": statistics.median(values),
            "norm_max": max(values),
        }

    return {
        "arm": arm,
        "seed": seed,
        "attack": attack,
        "defended": defended,
        "defence": defence_name,
        "status": final["status"],
        "status_reason": final.get("status_reason"),
        "timed_out": timed_out,
        "versions": len(curve) - 1,
        "final_accuracy": final_acc,
        "best_accuracy": max(
            (p["accuracy"] for p in curve if p["accuracy"] is not None), default=None
        ),
        "curve": [{"version": p["version"], "accuracy": p["accuracy"]} for p in curve],
        "updates_applied": {
            "honest": norms([r for r in applied if r[0] not in attackers]),
            "byzantine": norms([r for r in applied if r[0] in attackers]),
        },
        "devices_norm_clipped": sum(int(d.get("num_norm_clipped", 0)) for d in devices),
        "norm_bound_per_version": [(v.get("metrics") or {}).get("norm_bound") for v in versions],
        "rounds_failed": record["rounds_failed"],
        # The devices of every round (by name): equal in every arm of a seed when the
        # selection is reproducible.
        "cohorts_sha256": hashlib.sha256(json.dumps(cohorts).encode()).hexdigest(),
        "wall_s": time.monotonic() - wall0,
    }


def _curve_stat(run: Mapping[str, Any], start: int, stop: int | None, how: str) -> float | None:
    """Mean or minimum test accuracy over ``curve[start:stop]`` of a run (versions in order;
    index 0 is version 0)."""
    values = [p["accuracy"] for p in run["curve"][start:stop] if p["accuracy"] is not None]
    if not values:
        return None
    return float(statistics.fmean(values)) if how == "mean" else float(min(values))


def summarize(runs: list[dict[str, Any]], arms: list[str], seeds: list[int]) -> dict[str, Any]:
    by = {(r["arm"], r["seed"]): r for r in runs}
    out: dict[str, Any] = {}
    for arm in arms:
        finals = [by[(arm, s)]["final_accuracy"] for s in seeds if (arm, s) in by]
        gaps = [
            by[(arm, s)]["final_accuracy"] - by[("clean", s)]["final_accuracy"]
            for s in seeds
            if (arm, s) in by
            and ("clean", s) in by
            and by[(arm, s)]["final_accuracy"] is not None
            and by[("clean", s)]["final_accuracy"] is not None
        ]
        runs_of = [by[(arm, s)] for s in seeds if (arm, s) in by]
        out[arm] = {
            "final_accuracy": Spread(finals).to_dict(),
            # Less sensitive to where the last round happens to land than the final version.
            "last10_mean_accuracy": Spread(
                [_curve_stat(r, -10, None, "mean") for r in runs_of]
            ).to_dict(),
            "lowest_accuracy_after_version_10": Spread(
                [_curve_stat(r, 11, None, "min") for r in runs_of]
            ).to_dict(),
            "minus_clean_points": Spread([100.0 * g for g in gaps]).to_dict(),
            "byzantine_updates_clipped": sum(
                by[(arm, s)]["updates_applied"]["byzantine"]["clipped"]
                for s in seeds
                if (arm, s) in by
            ),
            "honest_updates_clipped": sum(
                by[(arm, s)]["updates_applied"]["honest"]["clipped"]
                for s in seeds
                if (arm, s) in by
            ),
        }
    digests = {s: {r.get("cohorts_sha256") for r in runs if r["seed"] == s} for s in seeds}
    out["same_cohorts_in_every_arm"] = {str(s): len(d) == 1 for s, d in digests.items() if d}
    for key, suffix in (("headline", "defence"), ("headline_krum", "krum")):
        defended = [f"{a}+{suffix}" for a in ATTACKS if f"{a}+{suffix}" in out]
        worst = None
        worst_mean = None
        for arm in defended:
            low = out[arm]["minus_clean_points"]["min"]
            if low is not None and (worst is None or low < worst[1]):
                worst = (arm, low)
            mean = out[arm]["minus_clean_points"]["mean"]
            if mean is not None and (worst_mean is None or mean < worst_mean[1]):
                worst_mean = (arm, mean)
        out[key] = {
            "target": f"+{suffix} arms: final accuracy within 2 points of the clean run "
            "(mean and every seed)",
            "attacks_present": [a for a in ATTACKS if f"{a}+{suffix}" in out],
            "worst_defended_arm": None if worst is None else worst[0],
            "worst_defended_minus_clean_points": None if worst is None else worst[1],
            "worst_mean_minus_clean_points": None if worst_mean is None else worst_mean[1],
            # Per defended arm, the seeds compared with their clean run.
            "seeds_compared": {a: len(out[a]["minus_clean_points"]["values"]) for a in defended},
            # Undecided while a defended arm lacks a seed of the run.
            "met": None
            if worst is None
            or any(len(out[a]["minus_clean_points"]["values"]) < len(seeds) for a in defended)
            else worst[1] >= -2.0,
        }
    return out


def plot(data: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    arms = data["parameters"]["arms"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {"scaled": "tab:red", "sign_flip": "tab:purple", "gaussian": "tab:orange"}
    ax = axes[0]
    for arm in arms:
        attack, defended = parse_arm(arm)
        color = "black" if attack is None else colors[attack]
        style = (":" if arm.endswith("+krum") else "-") if defended else "--"
        curves = [r["curve"] for r in runs if r["arm"] == arm]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        acc = np.array([[p["accuracy"] or 0.0 for p in c[:length]] for c in curves])
        x = [p["version"] for p in curves[0][:length]]
        ax.plot(x, acc.mean(axis=0), style, color=color, label=arm, lw=1.5)
        if len(curves) > 1:
            ax.fill_between(x, acc.min(axis=0), acc.max(axis=0), color=color, alpha=0.08)
    ax.set_xlabel("model version (round)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("accuracy per round (mean, band: min-max over seeds)")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    summary = data["summary"]
    labels = [a for a in arms if a in summary]
    means = [summary[a]["final_accuracy"]["mean"] or 0.0 for a in labels]
    lows = [
        m - (summary[a]["final_accuracy"]["min"] or 0.0) for a, m in zip(labels, means, strict=True)
    ]
    highs = [
        (summary[a]["final_accuracy"]["max"] or 0.0) - m for a, m in zip(labels, means, strict=True)
    ]
    bar_colors = [
        "black" if parse_arm(a)[0] is None else colors[str(parse_arm(a)[0])] for a in labels
    ]
    bars = ax.bar(range(len(labels)), means, yerr=[lows, highs], color=bar_colors, capsize=3)
    for bar, arm in zip(bars, labels, strict=True):
        if not parse_arm(arm)[1]:
            bar.set_hatch("//")
            bar.set_alpha(0.5)
        elif arm.endswith("+krum"):
            bar.set_hatch("..")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("final accuracy (//: no defence, ..: multi-krum; bars: min-max)")
    fig.suptitle(
        f"{DEVICES} devices ({BYZANTINE} Byzantine), {PER_ROUND}/round, digits, "
        f"{data['parameters']['rounds']} rounds, {len(data['parameters']['seeds'])} seed(s)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 8 rounds")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--arms", nargs="*", default=list(DEFAULT_ARMS), choices=ARMS)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--defence", default=DEFENCE, choices=sorted(DEFENCES), help="the defended arms' setting"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at once (each its own coordinator and fleet)"
    )
    parser.add_argument(
        "--no-clean",
        action="store_true",
        help="do not add the clean arm (its runs repeat exactly: another run's serve)",
    )
    parser.add_argument(
        "--from-partial",
        action="store_true",
        help="write the results of a run stopped early from its .partial.json (same arguments)",
    )
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument(
        "--merge",
        nargs="*",
        default=[],
        metavar="JSON",
        help="add the runs of these earlier results (same rounds) for the (arm, seed) pairs not "
        "run now; no clean arm is added then (the merged files bring it)",
    )
    parser.add_argument("--out", help="the JSON file to write (default bench/results/)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    configure_logging(args.verbose)
    suffix = ".quick" if args.quick else ""
    parser_out = getattr(args, "out", None)
    out_json = Path(parser_out) if parser_out else RESULTS_DIR / f"{NAME}{suffix}.json"
    out_png = out_json.with_suffix(".png")
    if args.plot_only:
        data = json.loads(out_json.read_text())
        p = data["parameters"]
        data["summary"] = summarize(data["runs"], p["arms"], p["seeds"])
        write_json(out_json, data)
        plot(data, out_png)
        return
    seeds = [args.first_seed] if args.quick else [args.first_seed + i for i in range(args.seeds)]
    rounds = 8 if args.quick else args.rounds
    arms = list(args.arms)
    if "clean" not in arms and not args.merge and not args.no_clean:
        arms.insert(0, "clean")
    started = time.monotonic()
    command = " ".join(["python", "bench/byzantine.py", *sys.argv[1:]])
    code = code_state()
    partial_json = out_json.with_suffix(".partial.json")
    cut_short: dict[str, Any] | None = None
    wanted = [(a, s) for s in seeds for a in arms]
    if args.from_partial:
        # A run stopped before every (arm, seed) pair was done: its finished pairs, with the
        # command and code of that run.
        partial = json.loads(partial_json.read_text())
        runs: list[dict[str, Any]] = partial["runs"]
        command, code = partial["command"], partial["code"]
        cut_short = {"started": partial["started"], "missing": []}
    else:
        runs = []
        started_at = now_iso()
        with tempfile.TemporaryDirectory(prefix="fedge-byzantine-") as tmp:
            # The pairs the headline needs (clean and the defended attacks) first, for every
            # seed; then the defence's cost and the undefended attacks.
            first = [a for a in arms if a == "clean" or all(parse_arm(a))]
            pairs = [(a, s) for s in seeds for a in first]
            pairs += [(a, s) for s in seeds for a in arms if a not in first]
            # Runs are reproducible (accuracy does not depend on timing), so they may share
            # the machine; each is a coordinator process and a fleet of its own.
            with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
                futures = [
                    pool.submit(
                        run_one, arm, seed=seed, rounds=rounds, work=Path(tmp), defence=args.defence
                    )
                    for arm, seed in pairs
                ]
                for future in concurrent.futures.as_completed(futures):
                    run = future.result()
                    runs.append(run)
                    # What is done so far, should the run be cut short (--from-partial).
                    write_json(
                        partial_json,
                        {"command": command, "code": code, "started": started_at, "runs": runs},
                    )
                    print(
                        f"{run['arm']:>20} seed {run['seed']}: final accuracy "
                        f"{run['final_accuracy']}, {run['versions']} versions, byzantine "
                        f"clipped {run['updates_applied']['byzantine']['clipped']}, "
                        f"{run['wall_s']:.0f} s",
                        flush=True,
                    )
    runs.sort(key=lambda r: (r["seed"], arms.index(r["arm"])))
    merged_from = []
    for path in args.merge:
        earlier = json.loads(Path(path).read_text())
        if earlier["parameters"]["rounds"] != rounds:
            parser.error(f"{path}: {earlier['parameters']['rounds']} rounds, not {rounds}")
        have = {(r["arm"], r["seed"]) for r in runs}
        extra = [r for r in earlier["runs"] if (r["arm"], r["seed"]) not in have]
        for r in extra:
            # Earlier files name the defence of their "+defence" arms in each run.
            r.setdefault("defence", DEFENCE if r.get("defended") else None)
        runs.extend(extra)
        merged_from.append(
            {
                "file": path,
                "timestamp": earlier.get("timestamp"),
                "command": earlier.get("command"),
                "code": earlier.get("code"),
                "load_average_1_5_15min": (earlier.get("machine") or {}).get(
                    "load_average_1_5_15min"
                ),
                "runs": len(extra),
                "merged_from": earlier.get("merged_from", []),
            }
        )
    if cut_short is not None:
        done = {(r["arm"], r["seed"]) for r in runs}
        cut_short["missing"] = [[a, s] for a, s in wanted if (a, s) not in done]
    if args.merge:
        present = {r["arm"] for r in runs}
        arms = [a for a in ARMS if a in present]
        seeds = sorted({r["seed"] for r in runs})
    data = {
        "benchmark": NAME,
        "command": command,
        "cut_short": cut_short,
        "timestamp": now_iso(),
        "machine": machine_info(),
        "code": code,
        "runtime_s": None if args.from_partial else time.monotonic() - started,
        "parameters": {
            "quick": args.quick,
            "jobs": args.jobs,
            "seeds": seeds,
            "rounds": rounds,
            "devices": DEVICES,
            "byzantine_devices": BYZANTINE,
            "clients_per_round": PER_ROUND,
            "dataset": "digits (sklearn), 20% stratified test split (sim.datasets)",
            "partition": f"Dirichlet alpha={ALPHA} over {DEVICES} devices",
            "model": MODEL,
            "training": TRAINING,
            "compression": COMPRESSION,
            "aggregation": AGGREGATION,
            "coordinator_env": COORDINATOR_ENV,
            "defence": {"name": args.defence, "aggregation": DEFENCES[args.defence]},
            "krum_defence": {"name": KRUM_DEFENCE, "aggregation": DEFENCES[KRUM_DEFENCE]},
            "defences_available": DEFENCES,
            "attacks": {
                "scaled": f"{SCALE} x delta",
                "sign_flip": f"{SIGN_FLIP} x delta",
                "gaussian": f"N(0, {GAUSSIAN_SIGMA}^2) per coordinate instead of the delta",
            },
            "arms": arms,
            "seed_meaning": "fixes the test split, partition, initial model, device seeds and "
            "the Byzantine devices; the devices sampled per round are the coordinator's choice",
        },
        "merged_from": merged_from,
        "runs": runs,
        "summary": summarize(runs, arms, seeds),
    }
    write_json(out_json, data)
    plot(data, out_png)
    print(json.dumps(data["summary"], indent=2))


if __name__ == "__main__":
    main()
