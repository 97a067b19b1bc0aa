"""Accuracy per uploaded byte: dense float32 FedAvg vs top-k x quantization, with and without
error feedback, on a non-IID fleet (issue #7).

Fleet: 100 simulated devices holding Dirichlet(alpha=0.5) label-skewed shards of scikit-learn's
digits (``fedge.edge_agent.sim``: ``datasets`` / ``partition``; 20 % stratified held-out test split,
about 14 training examples per device), an MLP 64-128-10 (9,610 parameters) trained by the
built-in numpy trainer. Sync rounds; every round 20 of the 100 devices are sampled uniformly
without replacement, as a deployment that asks a fraction of its fleet each round; the same
devices (per round and seed) for every setting. Settings: dense float32 (the product's
uncompressed policy: top-k 1.0, 32 bits, no error feedback, which encodes plain float32
tensors) and top-k fraction in {0.1, 0.01, 0.001} x {8, 4, 2} bits, each with and without error
feedback (18 compressed settings), plus centralized training of the same model (same initial
weights, same test split) on the union of the training data for ``rounds x epochs`` epochs with
the same batch size and learning rate (``fedge.edge_agent.sim.demo_report.centralized_baseline``;
it has converged long before). Every setting runs the same number of rounds, for 3 seeds; the seed
fixes the split, the partition, the initial model, the device sampling and all training and
quantization randomness, so reruns give the same accuracies and bytes.

**In-process, no HTTP**: this measures the algorithm's accuracy per byte, not the service.
Each update is nevertheless produced and consumed as in deployment (``bench/_compression_sim.py``):
the agent's ``compress`` + ``encode_update`` with a per-device error-feedback residual kept
across rounds, the coordinator's ``decode_update`` + ``Accumulator`` (weight = num_examples)
+ server strategy. Upload bytes are the lengths of the encoded wire-format updates; the ratio
is the dense run's bytes over the setting's bytes (same number of updates, same seed).

Main configuration, the same for every setting and all of it settable in a task's config:
``training = {epochs: 5, batch_size: 16, lr: 0.1}``, ``aggregation = {strategy: fedavg,
server_lr: 1.0, server_momentum: 0.9}`` (FedAvgM), ``compression.chunk = 64`` and
``scope = tensor`` (as the demo), 40 rounds. The demo's earlier training config (2 epochs,
lr 0.05, no server momentum; the demo now trains 5 epochs at lr 0.1) is one of the ablations:
it leaves dense 4 points below centralized and compressed settings far behind in 40 rounds.
The full run's ablations change one thing at a time (demo training, no server momentum,
server_lr 3, all devices every round, 60 rounds, global top-k, a 64-512-10 model) for dense,
top-1 %/4-bit with and without EF and top-0.1 %/2-bit with EF. ``wire_ceiling`` records the
byte ratio of a single update for larger hidden layers: the fixed header and per-tensor
descriptors (56 bytes for this model in format version 2) bound the ratio of a small model.
Per setting, ``diagnostics`` says how much of each round's update reached the server (cosine
and norm ratio of the aggregated decoded delta to the aggregate of the same round's
uncompressed deltas).

Targets (reported met / not met, never asserted): a setting with >= 250x fewer upload bytes
than dense at <= 1.0 accuracy point lost (mean over seeds of the paired final-accuracy
difference, same rounds); dense federated accuracy within 2 points of centralized. Rounds to
target: first round with test accuracy >= 0.90, and >= the dense run's mean final accuracy
minus one point.

Uplink ablation (issue 12, ``uplink_ablation`` in the JSON, ``compression_accuracy_uplink.png``):
accuracy at equal local work in Flower's setting (10 clients, Dirichlet 0.5, 1 local epoch,
batch 16, lr 0.1, plain FedAvg, 20 rounds, top-1 % + 4-bit, chunk 256) for the policy's
``momentum`` (0.5, 0.9), ``warmup_rounds`` (2, 4) and ``residual_decay`` (0.8, 0.5), with all
10 clients and with 5 of 10 per round; the best combination of each is then run at top-2 % and
top-5 %, on three seeds not used to choose it, and in the main configuration. Per arm: accuracy
after rounds 10 and 20 (mean, spread, and the paired difference to plain error feedback of the
same seed), rounds to 0.85 and 0.90, and update body bytes per round and per update.

    python bench/compression_accuracy.py              # full: 40 rounds, 3 seeds, ablations
    python bench/compression_accuracy.py --quick      # 20 rounds, 1 seed, 3 settings
    python bench/compression_accuracy.py --plot-only  # redraw the PNGs from the JSON
    python bench/compression_accuracy.py --uplink-only  # only the uplink ablation, into the JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _compression_report import (
    check_targets,
    make_summary,
    plot,
    plot_uplink,
    spread,
    summarize_setting,
    summarize_uplink_arm,
    table,
    uplink_table,
)
from _compression_sim import (
    DENSE,
    FleetConfig,
    Setting,
    run_centralized,
    run_federated,
    wire_ceiling,
)

NAME = "compression_accuracy"
RESULTS = Path(__file__).resolve().parent / "results"
TOPK = (0.1, 0.01, 0.001)
BITS = (8, 4, 2)
LAST = 5  # rounds averaged for the "last rounds" accuracy

MAIN = FleetConfig(
    devices=100,
    per_round=20,
    rounds=40,
    alpha=0.5,
    hidden=(128,),
    training={"epochs": 5, "batch_size": 16, "lr": 0.1},
    aggregation={"strategy": "fedavg", "server_lr": 1.0, "server_momentum": 0.9},
    chunk=64,
    scope="tensor",
)
ABLATION_SETTINGS = (
    DENSE,
    Setting(0.01, 4, True),
    Setting(0.01, 4, False),
    Setting(0.001, 2, True),
)
ABLATIONS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    (
        "demo training",
        "the demo's earlier training config: 2 epochs, lr 0.05, plain FedAvg (no server momentum)",
        {
            "training": {"epochs": 2, "batch_size": 16, "lr": 0.05},
            "aggregation": {"strategy": "fedavg", "server_lr": 1.0},
        },
    ),
    (
        "no server momentum",
        "plain FedAvg (server_momentum 0), otherwise the main config",
        {"aggregation": {"strategy": "fedavg", "server_lr": 1.0}},
    ),
    (
        "server_lr 3",
        "plain FedAvg with server_lr 3.0 instead of momentum",
        {"aggregation": {"strategy": "fedavg", "server_lr": 3.0}},
    ),
    ("all devices", "all 100 devices every round", {"per_round": 100}),
    ("60 rounds", "60 rounds instead of 40", {"rounds": 60}),
    (
        "global top-k",
        "compression scope 'global' (one top-k over the whole update)",
        {"scope": "global"},
    ),
    ("hidden 512", "a larger model, MLP 64-512-10 (38,410 parameters)", {"hidden": (512,)}),
)


# Uplink accuracy at equal local work (issue 12): Flower's setting at 1 local epoch.
UPLINK = FleetConfig(
    devices=10,
    per_round=10,
    rounds=20,
    alpha=0.5,
    hidden=(128,),
    training={"epochs": 1, "batch_size": 16, "lr": 0.1},
    aggregation={"strategy": "fedavg", "server_lr": 1.0},
    chunk=256,
    scope="tensor",
)
UPLINK_HALF = dataclasses.replace(UPLINK, per_round=5)
UPLINK_CHECKPOINTS = (10, 20)
UPLINK_TARGETS = (0.85, 0.90)
MOMENTA = (0.5, 0.9)
WARMUPS = (2, 4)
DECAYS = (0.8, 0.5)
UPLINK_FRACTIONS = (0.02, 0.05)
PLAIN_EF = Setting(0.01, 4, True)
NO_EF = Setting(0.01, 4, False)
CONFIRM_SEED_OFFSET = 3  # the confirmation runs use the next seeds, unseen by the choice
UPLINK_DESCRIPTION = (
    "Uplink accuracy at equal local work (issue 12). Flower's setting: digits, Dirichlet 0.5 "
    "over 10 clients, MLP 64-128-10, 1 local epoch, batch 16, SGD lr 0.1, plain FedAvg "
    "(server_lr 1, no server momentum), 20 sync rounds; compression chunk 256, scope tensor, "
    "4-bit values. Every arm of a group sees the same data, initial model, client sampling and "
    "training randomness per seed; only the compression policy differs. Accuracy after round "
    "10 is read from the same 20-round run (rounds are deterministic per seed, so it equals a "
    "10-round run). Phase 1 crosses momentum {0, 0.5, 0.9} x warmup_rounds {0, 2, 4} (all "
    "clients) and momentum x warmup_rounds {0, 4} x residual_decay {1, 0.8, 0.5} (5 of 10 "
    "clients, where devices miss versions) at top-1 %; the best arm of each group (rule in "
    "'best') is then run at top-2 % and top-5 %, on three unseen seeds, and in the main "
    "configuration of this benchmark. 'points_vs_plain_ef_same_seed' pairs each arm with "
    "plain error feedback (momentum 0, no warm-up, no decay) at the same top-k fraction and "
    "seed. Byte figures are update bodies (the encoded wire-format update) as the "
    "coordinator receives them; HTTP headers, TLS and downloads are not counted here "
    "(no socket: in-process simulation)."
)


def uplink_phase1(quick: bool) -> list[tuple[str, str, FleetConfig, list[Setting]]]:
    """(key, title, fleet, arms) of the first phase: every combination of the techniques."""
    if quick:
        full = [DENSE, PLAIN_EF, Setting(0.01, 4, True, 0.9, 4)]
        half = [DENSE, PLAIN_EF, Setting(0.01, 4, True, 0.9, 4, 0.5)]
    else:
        full = [DENSE, NO_EF, PLAIN_EF] + [
            Setting(0.01, 4, True, m, w)
            for m in (0.0, *MOMENTA)
            for w in (0, *WARMUPS)
            if (m, w) != (0.0, 0)
        ]
        half = [DENSE, NO_EF, PLAIN_EF] + [
            Setting(0.01, 4, True, m, w, d)
            for m in (0.0, *MOMENTA)
            for w in (0, WARMUPS[-1])
            for d in (1.0, *DECAYS)
            if (m, w, d) != (0.0, 0, 1.0)
        ]
    return [
        ("all10", "all 10 clients every round", UPLINK, full),
        ("half", "5 of the 10 clients per round (uniform)", UPLINK_HALF, half),
    ]


def _run_jobs(jobs: list[Job], workers: int, t0: float) -> list[dict[str, Any]]:
    order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))
    results: dict[int, dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {i: pool.submit(_run, jobs[i]) for i in order}
        for n, i in enumerate(order, 1):
            results[i] = futures[i].result()
            if n % 20 == 0 or n == len(jobs):
                print(f"  {n}/{len(jobs)} runs ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return [results[i] for i in range(len(jobs))]


def _best(arms: list[dict[str, Any]], last: int) -> dict[str, Any]:
    """The error-feedback arm with the highest mean accuracy after the last round (then after
    the first checkpoint)."""
    candidates = [a for a in arms if a["error_feedback"]]
    return max(
        candidates,
        key=lambda a: (
            a["accuracy_after_round"][str(last)]["mean"],
            a["accuracy_after_round"][str(UPLINK_CHECKPOINTS[0])]["mean"],
        ),
    )


def run_uplink(args: argparse.Namespace) -> dict[str, Any]:
    """The uplink ablation: momentum-corrected error feedback, top-k warm-up and residual
    decay at top-1 % / 4 bits in Flower's setting, then the best combinations at 2 % and 5 %,
    on unseen seeds, and in the main configuration."""
    t0 = time.perf_counter()
    quick = args.quick
    reps = 1 if quick else 3
    seeds = [args.seed + i for i in range(reps)]
    confirm_seeds = [args.seed + CONFIRM_SEED_OFFSET + i for i in range(reps)]
    rounds = 10 if quick else UPLINK.rounds
    checkpoints = (10,) if quick else UPLINK_CHECKPOINTS
    targets = [f"{t:.2f}" for t in UPLINK_TARGETS]

    def fleet_of(f: FleetConfig) -> FleetConfig:
        return dataclasses.replace(f, rounds=rounds) if f.devices == UPLINK.devices else f

    def group(
        key: str,
        title: str,
        fleet: FleetConfig,
        arms: list[Setting],
        runs: dict[tuple[str, int], dict[str, Any]],
        group_seeds: list[int],
        cps: tuple[int, ...],
        plain_of: dict[str, str],
        plot_arms: list[str],
    ) -> dict[str, Any]:
        out = []
        dense = [runs[(DENSE.name, sd)] for sd in group_seeds]
        for st in arms:
            plain_name = plain_of.get(st.name)
            plain = [runs[(plain_name, sd)] for sd in group_seeds] if plain_name else None
            summary = summarize_uplink_arm(
                [runs[(st.name, sd)] for sd in group_seeds],
                plain=plain,
                dense=dense,
                checkpoints=cps,
                targets=UPLINK_TARGETS,
            )
            out.append(
                {
                    "name": st.name,
                    "topk": st.topk,
                    "bits": st.bits,
                    "error_feedback": st.ef,
                    "momentum": st.momentum,
                    "warmup_rounds": st.warmup,
                    "residual_decay": st.decay,
                    "policy": fleet.policy_of(st).to_dict(),
                    "paired_with": plain_name,
                    **summary,
                }
            )
        return {
            "key": key,
            "title": title,
            "fleet": _fleet_dict(fleet),
            "seeds": group_seeds,
            "checkpoints": list(cps),
            "targets": targets,
            "arms": out,
            "plot_arms": plot_arms,
        }

    def execute(
        specs: list[tuple[str, FleetConfig, list[Setting], list[int]]],
    ) -> dict[str, dict[tuple[str, int], dict[str, Any]]]:
        jobs: list[Job] = [
            (key, fleet, st, sd) for key, fleet, arms, sds in specs for st in arms for sd in sds
        ]
        results = _run_jobs(jobs, args.workers, t0)
        by_group: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
        for job, result in zip(jobs, results, strict=True):
            assert job[2] is not None
            by_group.setdefault(job[0], {})[(job[2].name, job[3])] = result
        return by_group

    # phase 1: every combination at top-1 % / 4 bits
    phase1 = [(k, t, fleet_of(f), arms) for k, t, f, arms in uplink_phase1(quick)]
    runs1 = execute([(k, f, arms, seeds) for k, _, f, arms in phase1])
    groups = []
    best: dict[str, Setting] = {}
    for key, title, fleet, arms in phase1:
        plain_of = {st.name: PLAIN_EF.name for st in arms if st.ef and st != PLAIN_EF}
        key_arms = [DENSE.name, PLAIN_EF.name]
        g = group(key, title, fleet, arms, runs1[key], seeds, checkpoints, plain_of, key_arms)
        b = _best(g["arms"], checkpoints[-1])
        best[key] = next(st for st in arms if st.name == b["name"])
        singles = [
            Setting(0.01, 4, True, momentum=best[key].momentum),
            Setting(0.01, 4, True, warmup=best[key].warmup),
            Setting(0.01, 4, True, decay=best[key].decay),
        ]
        present = {a["name"] for a in g["arms"]}
        wanted = [*key_arms, *(s.name for s in singles), b["name"]]
        g["plot_arms"] = [n for n in dict.fromkeys(wanted) if n in present]
        groups.append(g)

    if quick:
        return {
            "quick": True,
            "description": UPLINK_DESCRIPTION,
            "groups": groups,
            "best": {k: v.name for k, v in best.items()},
            "runtime_s": time.perf_counter() - t0,
        }

    # phase 2: the best combinations at 2 % and 5 %, on unseen seeds, in the main configuration
    full, half = fleet_of(UPLINK), fleet_of(UPLINK_HALF)

    def at(f: float, st: Setting) -> Setting:
        return dataclasses.replace(st, topk=f)

    frac_full = [at(f, s) for f in UPLINK_FRACTIONS for s in (PLAIN_EF, best["all10"])]
    frac_half = [at(f, s) for f in UPLINK_FRACTIONS for s in (PLAIN_EF, best["half"])]
    confirm_full = [DENSE, PLAIN_EF, best["all10"]]
    confirm_half = [DENSE, PLAIN_EF, best["half"]]
    # the main configuration asks whether a default is supported: momentum alone (no byte
    # cost) and both best combinations, under server momentum and partial participation
    main_arms = list(
        dict.fromkeys(
            [DENSE, PLAIN_EF, Setting(0.01, 4, True, MOMENTA[0]), best["all10"], best["half"]]
        )
    )
    runs2 = execute(
        [
            ("frac-all10", full, frac_full, seeds),
            ("frac-half", half, frac_half, seeds),
            ("confirm-all10", full, confirm_full, confirm_seeds),
            ("confirm-half", half, confirm_half, confirm_seeds),
            ("main", MAIN, main_arms, seeds),
        ]
    )
    # the fraction arms pair with plain error feedback at the same fraction and use phase 1's
    # dense runs of the same seeds
    for key, src in (("frac-all10", "all10"), ("frac-half", "half")):
        for sd in seeds:
            runs2[key][(DENSE.name, sd)] = runs1[src][(DENSE.name, sd)]
    frac_plain = {
        at(f, st).name: at(f, PLAIN_EF).name for f in UPLINK_FRACTIONS for st in best.values()
    }

    def names(arms: list[Setting]) -> list[str]:
        return [a.name for a in arms]

    groups += [
        group(
            "frac-all10",
            "top-2 % and top-5 % at 4 bits, all 10 clients",
            full,
            frac_full,
            runs2["frac-all10"],
            seeds,
            checkpoints,
            frac_plain,
            names(frac_full),
        ),
        group(
            "frac-half",
            "top-2 % and top-5 % at 4 bits, 5 of 10 clients",
            half,
            frac_half,
            runs2["frac-half"],
            seeds,
            checkpoints,
            frac_plain,
            names(frac_half),
        ),
        group(
            "confirm-all10",
            f"unseen seeds {confirm_seeds}, all 10 clients",
            full,
            confirm_full,
            runs2["confirm-all10"],
            confirm_seeds,
            checkpoints,
            {best["all10"].name: PLAIN_EF.name},
            names(confirm_full),
        ),
        group(
            "confirm-half",
            f"unseen seeds {confirm_seeds}, 5 of 10 clients",
            half,
            confirm_half,
            runs2["confirm-half"],
            confirm_seeds,
            checkpoints,
            {best["half"].name: PLAIN_EF.name},
            names(confirm_half),
        ),
        group(
            "main",
            "main configuration (100 devices, 20 per round, 5 epochs, FedAvgM 0.9, chunk 64)",
            MAIN,
            main_arms,
            runs2["main"],
            seeds,
            (10, 20, MAIN.rounds),
            {st.name: PLAIN_EF.name for st in main_arms if st.ef and st != PLAIN_EF},
            names(main_arms),
        ),
    ]
    return {
        "quick": False,
        "description": UPLINK_DESCRIPTION,
        "seeds": seeds,
        "confirm_seeds": confirm_seeds,
        "best": {
            "all10": best["all10"].name,
            "half": best["half"].name,
            "rule": "among the error-feedback arms at top-1 % / 4 bits of phase 1 (seeds "
            f"{seeds}), the highest mean accuracy after round {checkpoints[-1]} (ties: after "
            f"round {checkpoints[0]}); 'all10' is used with every client each round, 'half' "
            "with 5 of 10 and in the main configuration",
        },
        "groups": groups,
        "runtime_s": time.perf_counter() - t0,
    }


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def all_settings() -> list[Setting]:
    return [DENSE] + [Setting(f, b, ef) for f in TOPK for b in BITS for ef in (True, False)]


def quick_settings() -> list[Setting]:
    return [DENSE, Setting(0.01, 4, True), Setting(0.01, 4, False)]


Job = tuple[str, FleetConfig, Setting | None, int]


def _run(job: Job) -> dict[str, Any]:
    _group, fleet, setting, seed = job
    if setting is None:
        return run_centralized(fleet, seed, rounds=fleet.rounds)
    return run_federated(fleet, setting, seed)


def _cost(job: Job) -> float:
    """Rough relative CPU cost, to start the longest jobs first."""
    _, fleet, setting, _ = job
    if setting is None:
        return 0.5
    epochs = float(fleet.training.get("epochs", 1))
    return fleet.per_round * fleet.rounds * epochs * fleet.hidden[0]


def _fleet_dict(fleet: FleetConfig) -> dict[str, Any]:
    d = dataclasses.asdict(fleet)
    d["hidden"] = list(fleet.hidden)
    return d


def _group_report(
    fleet: FleetConfig,
    settings: list[Setting],
    runs: dict[tuple[str, int], dict[str, Any]],
    seeds: list[int],
) -> list[dict[str, Any]]:
    dense_runs = [runs[(DENSE.name, s)] for s in seeds]
    dense_final = float(np.mean([r["accuracy"][-1] for r in dense_runs]))
    targets = {"0.90": 0.90, "dense_minus_1pt": dense_final - 0.01}
    out = []
    for st in settings:
        s = summarize_setting(
            [runs[(st.name, seed)] for seed in seeds], dense_runs, targets=targets, last=LAST
        )
        policy = fleet.policy(st.topk, st.bits, st.ef).to_dict()
        out.append(
            {
                "name": st.name,
                "topk": st.topk,
                "bits": st.bits,
                "error_feedback": st.ef,
                "policy": policy,
                "targets_accuracy": targets,
                **s,
            }
        )
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    fleet = dataclasses.replace(MAIN, rounds=args.rounds) if args.rounds else MAIN
    if args.quick and not args.rounds:
        fleet = dataclasses.replace(fleet, rounds=20)
    reps = args.reps or (1 if args.quick else 3)
    seeds = [args.seed + i for i in range(reps)]
    settings = quick_settings() if args.quick else all_settings()
    ablations = [] if (args.quick or args.no_ablations) else list(ABLATIONS)

    jobs: list[Job] = [("main", fleet, st, seed) for st in settings for seed in seeds]
    jobs += [("main", fleet, None, seed) for seed in seeds]
    ablation_fleets = {}
    for name, _, overrides in ablations:
        af = dataclasses.replace(fleet, **overrides)
        ablation_fleets[name] = af
        jobs += [(name, af, st, seed) for st in ABLATION_SETTINGS for seed in seeds]
    order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))
    results: dict[int, dict[str, Any]] = {}
    done = 0
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {i: pool.submit(_run, jobs[i]) for i in order}
        for i in order:
            results[i] = futures[i].result()
            done += 1
            if done % 10 == 0 or done == len(jobs):
                print(
                    f"  {done}/{len(jobs)} runs done ({time.perf_counter() - t0:.0f} s)",
                    file=sys.stderr,
                )

    def runs_of(group: str) -> dict[tuple[str, int], dict[str, Any]]:
        return {
            (job[2].name, job[3]): results[i]
            for i, job in enumerate(jobs)
            if job[0] == group and job[2] is not None
        }

    main_settings = _group_report(fleet, settings, runs_of("main"), seeds)
    central_runs = [results[i] for i, job in enumerate(jobs) if job[0] == "main" and not job[2]]
    central_finals = [r["accuracy"][-1] for r in central_runs]
    central = {
        "method": "fedge.edge_agent.sim.demo_report.centralized_baseline: NumpyTrainer on the "
        "union of the devices' training data, training.epochs epochs per round, same init and "
        "test split",
        "epochs": central_runs[0]["epochs"],
        "seeds": seeds,
        "final_accuracy": {"per_seed": central_finals, **spread(central_finals)},
        "best_accuracy": spread([max(r["accuracy"]) for r in central_runs]),
        "accuracy_curve": {
            k: v
            for k, v in zip(
                ("mean", "min", "max"),
                (
                    np.mean([r["accuracy"] for r in central_runs], axis=0).tolist(),
                    np.min([r["accuracy"] for r in central_runs], axis=0).tolist(),
                    np.max([r["accuracy"] for r in central_runs], axis=0).tolist(),
                ),
                strict=True,
            )
        },
    }
    dense = main_settings[0]
    ablation_reports = []
    for name, description, overrides in ablations:
        af = ablation_fleets[name]
        ablation_reports.append(
            {
                "name": name,
                "description": description,
                "overrides": {
                    k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()
                },
                "settings": _group_report(af, list(ABLATION_SETTINGS), runs_of(name), seeds),
            }
        )
    ceiling = wire_ceiling(
        [128] if args.quick else [128, 256, 512, 1024, 2048],
        [Setting(f, b, False) for f in TOPK for b in BITS],
        chunk=fleet.chunk,
        scope=fleet.scope,
        seed=args.seed,
    )
    first = next(iter(runs_of("main").values()))
    return {
        "benchmark": NAME,
        "command": " ".join([sys.executable, *sys.argv]),
        "argv": sys.argv[1:],
        "quick": args.quick,
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "runtime_s": time.perf_counter() - t0,
        "workers": args.workers,
        "machine": machine_info(),
        "config": {
            **_fleet_dict(fleet),
            "dataset": "digits (scikit-learn load_digits), stratified 20 % test split",
            "model": f"mlp 64-{'-'.join(map(str, fleet.hidden))}-10",
            "num_params": first["num_params"],
            "label_skew": first["label_skew"],
            "seeds": seeds,
            "repetitions": reps,
            "sampling": f"{fleet.per_round} of {fleet.devices} devices per round, uniform "
            "without replacement, same devices for every setting",
            "weighting": "num_examples (sync rounds, staleness 0)",
            "last_rounds_averaged": LAST,
            "dense_encoding": "policy topk_fraction=1.0, bits=32, error_feedback=False "
            "(fedge.shared.policy.DENSE with the task's chunk/scope): plain float32 tensors",
        },
        "settings": main_settings,
        "centralized": central,
        "targets": check_targets(main_settings, dense, central),
        "ablations": ablation_reports,
        "uplink_ablation": None if args.no_uplink else run_uplink(args),
        "wire_ceiling": ceiling,
        "summary": {
            **make_summary(main_settings, dense, central),
            "highest_ratio_any_setting": check_targets(main_settings, dense, central)[
                "ratio_250x_within_1pt"
            ]["highest_ratio_any_setting"],
            "wire_fixed_bytes_per_update": ceiling[0]["fixed_header_bytes"],
            "dense_bytes_per_update": ceiling[0]["dense_bytes"],
            "ratio_ceiling_for_this_model": ceiling[0]["dense_bytes"]
            / ceiling[0]["fixed_header_bytes"],
        },
    }


def print_report(report: dict[str, Any]) -> None:
    print(table(report["settings"], report["centralized"], "0.90"))
    for a in report.get("ablations", []):
        print(f"\nablation '{a['name']}': {a['description']}")
        for s in a["settings"]:
            fa = s["final_accuracy"]
            print(
                f"  {s['name']:<18} {fa['mean']:.4f} ({fa['min']:.3f}-{fa['max']:.3f}) "
                f"loss {s['loss_points_vs_dense']['mean']:+.2f} pts  "
                f"ratio {s['ratio_vs_dense']['mean']:.1f}"
            )
    print("\ndiagnostics (cosine / norm ratio of the aggregated sent delta to this round's")
    print("uncompressed aggregate, rounds 1-10):")
    for s in report["settings"]:
        d = s["diagnostics"]
        print(
            f"  {s['name']:<18} {d['cosine_rounds_1_10']:.2f} / {d['norm_ratio_rounds_1_10']:.2f}"
        )
    print("\nbytes of one update (ratio to dense float32) by hidden width:")
    for row in report["wire_ceiling"]:
        if row["setting"] in ("top1%-4b", "top0.1%-2b"):
            print(
                f"  hidden {row['hidden']:>5} ({row['num_params']:>7,} params) {row['setting']:<11}"
                f" {row['bytes']:>7,} B of which {row['fixed_header_bytes']} fixed: "
                f"{row['ratio']:.1f}x"
            )
    print("\ntargets:")
    for name, t in report["targets"].items():
        print(f"- {name}: {'met' if t['met'] else 'NOT met'}  {json.dumps(t)}")
    print("\nsummary:", json.dumps(report["summary"], indent=2))
    print_uplink(report.get("uplink_ablation"))


def print_uplink(uplink: dict[str, Any] | None) -> None:
    if not uplink:
        return
    print("\nuplink ablation (Flower's setting, 1 local epoch):")
    for g in uplink["groups"]:
        print(f"\n{g['title']} (seeds {g['seeds']}):")
        print(uplink_table(g))
    print("\nbest:", json.dumps(uplink["best"], indent=1))


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 rounds, 1 seed, 3 settings")
    parser.add_argument("--plot-only", action="store_true", help="redraw PNGs from the JSON")
    parser.add_argument("--rounds", type=int, default=None, help="override the round count")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (seeds)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--no-ablations", action="store_true", help="skip the ablations")
    parser.add_argument("--no-uplink", action="store_true", help="skip the uplink ablation")
    parser.add_argument(
        "--uplink-only",
        action="store_true",
        help="run only the uplink ablation and put it into the existing results file",
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON results path")
    args = parser.parse_args(argv)
    output = args.output or RESULTS / (f"{NAME}.quick.json" if args.quick else f"{NAME}.json")
    # compression_accuracy.json -> compression_accuracy.png, compression_accuracy_ablations.png;
    # compression_accuracy.quick.json -> compression_accuracy.quick.png (git-ignored)
    stem, _, suffix = output.name.removesuffix(".json").partition(".")
    if args.plot_only:
        report = json.loads(output.read_text())
    elif args.uplink_only:
        report = json.loads(output.read_text()) if output.exists() else {"benchmark": NAME}
        report["uplink_ablation"] = run_uplink(args)
        report["uplink_ablation"]["command"] = " ".join([sys.executable, *sys.argv])
        report["uplink_ablation"]["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        report["uplink_ablation"]["machine"] = machine_info()
        output.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote the uplink ablation into {output}", file=sys.stderr)
    else:
        report = run(args)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {output}", file=sys.stderr)
    if "settings" in report:
        print_report(report)
        for path in plot(report, output.parent, stem, f".{suffix}" if suffix else ""):
            print(f"wrote {path}", file=sys.stderr)
    else:
        print_uplink(report.get("uplink_ablation"))
    if report.get("uplink_ablation"):
        tail = f".{suffix}" if suffix else ""
        path = plot_uplink(report["uplink_ablation"], output.parent / f"{stem}_uplink{tail}.png")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
