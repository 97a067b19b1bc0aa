"""Secure aggregation over a shared sparse support: accuracy and cost (issue 17).

Everything here runs in **one process**: the protocol's messages are encoded, relayed and
decoded exactly as they would be (``fedge.shared.secagg.inprocess.run_round``), but there is no
HTTPS, no database and no round engine (``bench/secagg_engine.py`` measures the cost through
the real stack). Byte counts are the encoded messages, without HTTP or TLS bytes.

Part 1, accuracy: the 100-device digits fleet of ``compression_accuracy.py`` (in-process
simulation ``_compression_sim.py``: scikit-learn digits, Dirichlet alpha=0.5 over 100 devices,
MLP 64-128-10, 20 devices sampled per round, 2 local epochs of SGD lr 0.05, FedAvg with server
lr 1), 40 sync rounds, seeds 1, 2, 3. Every round 4 of the 20 sampled devices (drawn per round)
drop after sharing their secrets: their update counts in no arm. Arms:

- ``randk-grid-ef+secagg``: the round's shared random-k support (k = 10 % of the 9,610
  parameters), error feedback on the device, values clipped to ``[-B, B]`` and stochastically
  rounded onto a 16-bit grid, masked, summed and unmasked by the protocol (complete neighbour
  graph planned for 1/3 drop-out), mean = sum / survivors;
- ``randk-grid-ef``: the same compression, the same random numbers, summed in the clear: what the
  coordinator would compute without secure aggregation;
- ``agg-topk+secagg``, ``agg75-rand25+secagg``, ``agg50-rand50+secagg``: the same, on the
  support from the previous aggregate (``aggregate_support``): 100 %, 75 %, 50 % of k from the
  largest coordinates of the last aggregate update ``|w_r - w_(r-1)|``, the rest seeded random-k;
  ``ema-agg50-rand50+secagg``: 50 % from an exponential average of the last 8 aggregates'
  magnitudes (decay 0.5); the first round falls back to random-k;
- ``topk-8b-ef``: fedge's own compression at the same k (top-k 10 %, 8-bit per-chunk
  quantization, chunk 64, error feedback; ``compress_round``), equal weights;
- ``dense-f32``: float32 uploads, equal weights.

Part 2, cost per round as a function of the cohort size n in 10, 20, 50, 100, 200 for the same
model and k (961 values): bytes every device sends and receives in all four phases, the
coordinator's CPU time, and the devices' CPU time (mean per device); for two neighbour graphs
(``plan_degree``: planned for 1/3 drop-out, complete up to 200 devices; planned for 10 %,
34 neighbours from 100 devices) and with no drop-out or a third of the cohort dropping after
sharing (the coordinator then rebuilds their mask keys and regenerates their pairwise masks).
Plain uploads for comparison: the encoded fedge update of the same model (top-k 10 % 8-bit, and
dense float32), and the coordinator's CPU to decode and accumulate n of them. Model downloads
are the same with and without secure aggregation and are counted in neither.

    python bench/secagg.py              # full: 3 seeds, 40 rounds; n up to 200, 3 repetitions
    python bench/secagg.py --quick      # 1 seed, 5 rounds; n up to 50, 1 repetition
    python bench/secagg.py --plot-only  # redraw the PNG from the JSON
    python bench/secagg.py --accuracy-only  # part 1 only; part 2 copied from the existing JSON
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _compression_sim import FleetConfig, make_fleet, model_config, selections
from _fleet_bench import RESULTS_DIR, Spread, code_state, machine_info, now_iso, write_json
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.coordinator.engine.aggregate import Accumulator
from fedge.edge_agent.residual_store import ResidualState
from fedge.edge_agent.trainers import NumpyTrainer
from fedge.shared import architectures
from fedge.shared.compression import compress_round
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.policy import CompressionPolicy
from fedge.shared.secagg import (
    Grid,
    RoundConfig,
    SecAggError,
    aggregate_score,
    aggregate_support,
    flatten,
    mean_update,
    plan_degree,
    quantized_input,
    unflatten,
)
from fedge.shared.secagg.inprocess import Dropouts, run_round
from fedge.shared.wire import decode_update, encode_update

NAME = "secagg"
FRACTION = 0.1
GRID_BITS = 16
#: Grid bound B; chosen on exploration runs of the plain random-k arm with seed 10 (not
#: reported), 40 rounds: final accuracy 0.772 with B = 0.1 (at most 0.12 % of the values on
#: the support clipped in the first 6 rounds), 0.755 with 0.05 (0.5 %), 0.674 with 0.02 (3 %).
BOUND = 0.1
DROP_PER_ROUND = 4
#: arm -> (random share, decay, window) of ``aggregate_support`` for the aggregate-support arms
AGG_ARMS: dict[str, tuple[float, float, int]] = {
    "agg-topk+secagg": (0.0, 0.0, 1),
    "agg75-rand25+secagg": (0.25, 0.0, 1),
    "agg50-rand50+secagg": (0.5, 0.0, 1),
    "ema-agg50-rand50+secagg": (0.5, 0.5, 8),
}
ARMS = ["randk-grid-ef+secagg", "randk-grid-ef", *AGG_ARMS, "topk-8b-ef", "dense-f32"]
GRID_ARMS = {"randk-grid-ef+secagg", "randk-grid-ef", *AGG_ARMS}
COHORTS = [10, 20, 50, 100, 200]
#: (planned drop-out for ``plan_degree``, fraction of the cohort that drops after sharing)
DESIGNS = [(1 / 3, 0.0), (1 / 3, 1 / 3), (0.1, 0.0), (0.1, 0.1)]


def _entropy(seed: list[int]) -> Any:
    return np.random.default_rng(seed).bytes


def _round_config(
    n: int,
    rnd: int,
    seed: int,
    size: int,
    k: int,
    dropout: float,
    support: np.ndarray | None = None,
) -> RoundConfig:
    degree, threshold = plan_degree(n, dropout=dropout)
    return RoundConfig(
        task_id=1,
        round=rnd,
        seed=np.random.default_rng([seed, rnd, 99]).bytes(32),
        cohort=n,
        degree=degree,
        threshold=threshold,
        size=size,
        k=k,
        grid=Grid(bound=BOUND, bits=GRID_BITS),
        fixed_support=support,
    )


def run_accuracy(fleet: FleetConfig, arm: str, seed: int) -> dict[str, Any]:
    started = time.process_time()
    data, shards, _ = make_fleet(fleet, seed)
    model = model_config(fleet, data, seed)
    spec: ModelSpec = architectures.build_spec(model)
    size = spec.num_params
    k = int(np.ceil(FRACTION * size))
    weights: Weights = architectures.init_weights(model, np.random.default_rng(seed))
    trainers = [NumpyTrainer(model, shard) for shard in shards]
    keys = {
        u: Ed25519PrivateKey.from_private_bytes(bytes([u]) * 32) for u in range(fleet.per_round)
    }
    residual: dict[int, np.ndarray] = {}
    memory: dict[int, ResidualState] = {}
    topk = CompressionPolicy(topk_fraction=FRACTION, bits=8, chunk=64, error_feedback=True)
    accuracy = [architectures.evaluate(model, weights, data.X_test, data.y_test)["accuracy"]]
    clipped: list[float] = []
    exact = 0
    versions = [flatten(weights, spec)]  # the published models, oldest first
    for rnd, chosen in enumerate(selections(fleet, seed)):
        drop_rng = np.random.default_rng([seed, rnd, 5])
        dropped = set(drop_rng.choice(len(chosen), DROP_PER_ROUND, replace=False).tolist())
        support = None
        if arm in AGG_ARMS:
            share, decay, window = AGG_ARMS[arm]
            round_seed = _round_config(fleet.per_round, rnd, seed, size, k, 1 / 3).seed
            score = aggregate_score(versions[-window - 1 :], decay)
            support = aggregate_support(round_seed, size, k, score, share)
        cfg = _round_config(fleet.per_round, rnd, seed, size, k, 1 / 3, support)
        inputs: dict[int, np.ndarray] = {}
        dense_sum = Accumulator(spec)
        clip_count = 0
        for slot, device in enumerate(chosen.tolist()):
            if slot in dropped:
                inputs[slot] = np.zeros(k, np.uint32)  # never uploaded
                continue
            assignment = rnd * fleet.devices + device
            result = trainers[device].train(
                weights, fleet.training, np.random.default_rng([seed, assignment])
            )
            delta = {t.name: result.weights[t.name] - weights[t.name] for t in spec.tensors}
            rng = np.random.default_rng([seed, assignment, 1])
            if arm in GRID_ARMS:
                flat = flatten(delta, spec)
                carried = residual.get(device)
                x = (
                    flat[cfg.support]
                    if carried is None
                    else flat[cfg.support] + carried[cfg.support]
                )
                clip_count += int(np.count_nonzero(np.abs(x) > BOUND))
                inputs[slot], residual[device] = quantized_input(cfg, flat, carried, rng)
            elif arm == "topk-8b-ef":
                state = memory.setdefault(device, ResidualState.zeros(spec))
                c = compress_round(delta, topk, rng, state, base_version=rnd)
                blob = encode_update(c, task_id=1, base_version=rnd, num_examples=1)
                dense_sum.add(decode_update(blob, spec=spec, policy=topk), 1.0)
            else:
                dense_sum.add_dense(delta, 1.0)
        survivors = [s for s in range(fleet.per_round) if s not in dropped]
        if arm in GRID_ARMS:
            plain = np.sum([inputs[s].view(np.int32).astype(np.int64) for s in survivors], axis=0)
            if arm.endswith("+secagg"):
                res = run_round(
                    cfg,
                    inputs,
                    keys,
                    _entropy([seed, rnd, 3]),
                    Dropouts(after_shares=frozenset(dropped)),
                )
                total = cfg.grid.decode_sum(res.total)
                if res.included != survivors or not np.array_equal(total, plain):
                    raise AssertionError(f"round {rnd}: the unmasked sum is not the plain sum")
                exact += 1
            else:
                total = plain
            total_u32 = total.astype(np.uint32)  # the int64 sum back in Z_2^32 (exact)
            mean = unflatten(mean_update(cfg, total_u32, len(survivors)), spec)
            clipped.append(clip_count / (k * len(survivors)))
        else:
            mean = dense_sum.mean()
        weights = {name: weights[name] + mean[name] for name in weights}
        versions = [*versions[-8:], flatten(weights, spec)]
        accuracy.append(
            architectures.evaluate(model, weights, data.X_test, data.y_test)["accuracy"]
        )
    return {
        "arm": arm,
        "seed": seed,
        "accuracy": accuracy,
        "clipped_fraction_per_round": clipped,
        "rounds_checked_exact": exact,
        "cpu_s": time.process_time() - started,
    }


def plain_upload_bytes(spec: ModelSpec, seed: int) -> dict[str, int]:
    gen = np.random.default_rng(seed)
    delta = {t.name: gen.normal(0, 0.01, t.shape).astype(np.float32) for t in spec.tensors}
    out = {}
    for name, policy in {
        "topk-8b": CompressionPolicy(
            topk_fraction=FRACTION, bits=8, chunk=64, error_feedback=False
        ),
        "dense-f32": CompressionPolicy(topk_fraction=1.0, bits=32, chunk=64, error_feedback=False),
    }.items():
        c = compress_round(delta, policy, gen, None, base_version=0)
        out[name] = len(encode_update(c, task_id=1, base_version=0, num_examples=1))
    return out


def plain_coordinator_cpu(spec: ModelSpec, n: int, seed: int) -> float:
    """Decode and accumulate ``n`` top-k 8-bit uploads (what a round costs without secagg)."""
    gen = np.random.default_rng(seed)
    policy = CompressionPolicy(topk_fraction=FRACTION, bits=8, chunk=64, error_feedback=False)
    blobs = []
    for _ in range(n):
        delta = {t.name: gen.normal(0, 0.01, t.shape).astype(np.float32) for t in spec.tensors}
        c = compress_round(delta, policy, gen, None, base_version=0)
        blobs.append(encode_update(c, task_id=1, base_version=0, num_examples=1))
    start = time.process_time()
    acc = Accumulator(spec)
    for blob in blobs:
        acc.add(decode_update(blob, spec=spec, policy=policy), 1.0)
    acc.mean()
    return time.process_time() - start


def run_cost(n: int, dropout_plan: float, drop: float, rep: int, size: int) -> dict[str, Any]:
    k = int(np.ceil(FRACTION * size))
    cfg = _round_config(n, rep, 1000 + n, size, k, dropout_plan)
    gen = np.random.default_rng([n, rep, int(drop * 100)])
    keys = {u: Ed25519PrivateKey.from_private_bytes(gen.bytes(32)) for u in range(n)}
    inputs = {u: cfg.grid.quantize(gen.normal(0, 0.02, k), gen) for u in range(n)}
    gone = frozenset(gen.permutation(n)[: int(drop * n)].tolist())
    start = time.process_time()
    try:
        res = run_round(cfg, inputs, keys, gen.bytes, Dropouts(after_shares=gone))
    except SecAggError as exc:  # the planned degree did not cover this drop-out pattern
        return {"n": n, "plan": dropout_plan, "drop": drop, "failed": exc.code}
    total_cpu = time.process_time() - start
    coordinator = sum(res.coordinator_cpu_s.values())
    live = [u for u in range(n) if u not in gone]
    per_device = [res.sent_bytes[u] + res.received_bytes[u] for u in live]
    return {
        "n": n,
        "plan": dropout_plan,
        "drop": drop,
        "failed": None,
        "degree": cfg.degree,
        "threshold": cfg.threshold,
        "dropped_after_sharing": len(gone),
        "bytes_per_device_mean": statistics.fmean(per_device),
        "bytes_per_device_max": max(per_device),
        "sent_bytes_mean": statistics.fmean(res.sent_bytes[u] for u in live),
        "received_bytes_mean": statistics.fmean(res.received_bytes[u] for u in live),
        "coordinator_cpu_s": coordinator,
        "coordinator_cpu_s_by_phase": res.coordinator_cpu_s,
        "device_cpu_s_mean": (total_cpu - coordinator) / n,
    }


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    finals: dict[str, Spread] = {}
    by_seed: dict[str, dict[int, float]] = {}
    for r in data["accuracy_runs"]:
        finals.setdefault(r["arm"], Spread()).values.append(r["accuracy"][-1])
        by_seed.setdefault(r["arm"], {})[r["seed"]] = r["accuracy"][-1]
    diff = {
        arm: [
            100 * (by_seed[arm][s] - by_seed["randk-grid-ef"][s])
            for s in sorted(by_seed[arm])
            if s in by_seed.get("randk-grid-ef", {})
        ]
        for arm in by_seed
    }
    cost: dict[str, Any] = {}
    for row in data["cost_runs"]:
        key = f"plan{row['plan']:.2f}-drop{row['drop']:.2f}"
        cell = cost.setdefault(key, {}).setdefault(str(row["n"]), {"rows": [], "failed": 0})
        if row["failed"]:
            cell["failed"] += 1
        else:
            cell["rows"].append(row)
    for cells in cost.values():
        for cell in cells.values():
            rows = cell.pop("rows")
            cell["runs"] = len(rows)
            if not rows:
                continue
            cell["degree"] = rows[0]["degree"]
            cell["threshold"] = rows[0]["threshold"]
            cell["bytes_per_device_mean"] = rows[0]["bytes_per_device_mean"]
            cell["bytes_per_device_max"] = max(r["bytes_per_device_max"] for r in rows)
            for f in ("coordinator_cpu_s", "device_cpu_s_mean", "plain_coordinator_cpu_s"):
                cell[f] = Spread([r[f] for r in rows]).to_dict()
    return {
        "final_accuracy": {arm: s.to_dict() for arm, s in finals.items()},
        "final_accuracy_minus_plain_randk_points": diff,
        "cost": cost,
    }


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for arm in ARMS:
        runs = [r for r in data["accuracy_runs"] if r["arm"] == arm]
        if runs and arm != "randk-grid-ef":  # identical to its secure-aggregation arm
            curve = np.mean([r["accuracy"] for r in runs], axis=0)
            ax.plot(curve, label=arm, linestyle=":" if arm in AGG_ARMS else "-")
    ax.set(xlabel="round", ylabel="test accuracy (mean over seeds)", title="digits, 100 devices")
    ax.legend(fontsize=8)
    summary = data["summary"]["cost"]
    plain = data["plain_upload_bytes"]
    for key, cells in summary.items():
        ns = sorted(int(n) for n in cells if cells[n]["runs"])
        axes[1].plot(
            ns, [cells[str(n)]["bytes_per_device_mean"] / 1e3 for n in ns], "o-", label=key
        )
        axes[2].plot(ns, [cells[str(n)]["coordinator_cpu_s"]["mean"] for n in ns], "o-", label=key)
    first = next(iter(summary.values()))
    ns = sorted(int(n) for n in first)
    axes[1].axhline(
        plain["topk-8b"] / 1e3, color="k", linestyle=":", label="plain top-k 8-bit upload"
    )
    axes[1].axhline(
        plain["dense-f32"] / 1e3, color="grey", linestyle=":", label="plain dense upload"
    )
    axes[1].set(xlabel="cohort size n", ylabel="kB per device per round", title="device traffic")
    axes[2].plot(
        ns,
        [first[str(n)]["plain_coordinator_cpu_s"]["mean"] for n in ns],
        "k:",
        label="plain top-k",
    )
    axes[2].set(
        xlabel="cohort size n", ylabel="coordinator CPU s per round", title="coordinator CPU"
    )
    for a in axes[1:]:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument(
        "--accuracy-only",
        action="store_true",
        help="run part 1 only; copy part 2 (cost) from the existing JSON it overwrites",
    )
    ap.add_argument("--out", type=Path, help="the JSON file to write (default bench/results/)")
    args = ap.parse_args()
    suffix = ".quick" if args.quick else ""
    out = args.out or RESULTS_DIR / f"{NAME}{suffix}.json"
    png = out.with_suffix(".png")
    if args.plot_only:
        import json

        data = json.loads(out.read_text())
        plot(data, png)
        return
    seeds = [1] if args.quick else [1, 2, 3]
    rounds = 5 if args.quick else 40
    cohorts = [10, 20, 50] if args.quick else COHORTS
    reps = 1 if args.quick else 3
    fleet = FleetConfig(rounds=rounds)
    spec = architectures.build_spec(
        {"architecture": "mlp", "input_dim": 64, "num_classes": 10, "hidden": [128]}
    )
    previous: dict[str, Any] | None = None
    if args.accuracy_only:
        import json

        previous = json.loads(out.read_text())
        if previous["plain_upload_bytes"] != plain_upload_bytes(spec, 0):
            raise SystemExit("the plain upload sizes changed: rerun the cost part")
    started = now_iso()
    runs = []
    for seed in seeds:
        for arm in ARMS:
            run = run_accuracy(fleet, arm, seed)
            print(f"{arm:22s} seed {seed}: final accuracy {run['accuracy'][-1]:.4f}", flush=True)
            runs.append(run)
    cost_runs = previous["cost_runs"] if previous else []
    cost_from = {"started": previous["started"], "code": previous["code"]} if previous else None
    for plan, drop in [] if args.accuracy_only else DESIGNS:
        for n in cohorts:
            for rep in range(reps):
                row = run_cost(n, plan, drop, rep, spec.num_params)
                row["plain_coordinator_cpu_s"] = plain_coordinator_cpu(spec, n, rep)
                head = f"plan {plan:.2f} drop {drop:.2f} n {n:3d}"
                if row["failed"]:
                    print(f"{head}: round failed ({row['failed']})", flush=True)
                else:
                    print(
                        f"{head} d {row['degree']:3d}: "
                        f"{row['bytes_per_device_mean'] / 1e3:7.1f} kB/device, coordinator "
                        f"{row['coordinator_cpu_s']:.3f} s (plain "
                        f"{row['plain_coordinator_cpu_s']:.3f} s), "
                        f"device {row['device_cpu_s_mean']:.3f} s",
                        flush=True,
                    )
                cost_runs.append(row)
    data: dict[str, Any] = {
        "benchmark": NAME,
        "started": started,
        "finished": now_iso(),
        "machine": machine_info(),
        "code": code_state(),
        "settings": {
            "quick": args.quick,
            "cost_runs_copied_from": cost_from,
            "aggregate_support_arms": {
                arm: {"random_share": share, "decay": decay, "window": window}
                for arm, (share, decay, window) in AGG_ARMS.items()
            },
            "in_process": True,
            "repetitions": reps,
            "devices": fleet.devices,
            "per_round": fleet.per_round,
            "rounds": rounds,
            "seeds": seeds,
            "training": fleet.training,
            "fraction": FRACTION,
            "grid_bits": GRID_BITS,
            "grid_bound": BOUND,
            "dropped_after_sharing_per_round": DROP_PER_ROUND,
            "num_params": spec.num_params,
            "k": int(np.ceil(FRACTION * spec.num_params)),
        },
        "accuracy_runs": runs,
        "cost_runs": cost_runs,
        "plain_upload_bytes": plain_upload_bytes(spec, 0),
    }
    data["summary"] = summarize(data)
    write_json(out, data)
    plot(data, png)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
