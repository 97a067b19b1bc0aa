"""Statistics, targets, the summary table and the plots of ``bench/compression_accuracy.py``.

Everything here works on the JSON-ready dictionaries the benchmark writes, so ``--plot-only``
can redraw the plots from a results file alone.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Targets from issue #7.
TARGET_RATIO = 250.0
TARGET_MAX_LOSS_POINTS = 1.0
TARGET_CENTRALIZED_GAP_POINTS = 2.0


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, population std, min and max of per-seed values (``None`` entries skipped)."""
    xs = np.array([v for v in values if v is not None], dtype=np.float64)
    if xs.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": float(xs.mean()),
        "std": float(xs.std()),
        "min": float(xs.min()),
        "max": float(xs.max()),
        "n": int(xs.size),
    }


def rounds_to(accuracy: Sequence[float], target: float) -> int | None:
    """First round (1-based; round 0 is the initial model) whose test accuracy >= target."""
    for r, a in enumerate(accuracy):
        if r > 0 and a >= target:
            return r
    return None


def curve_stats(curves: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    a = np.array(curves, dtype=np.float64)
    return {
        "mean": a.mean(axis=0).tolist(),
        "min": a.min(axis=0).tolist(),
        "max": a.max(axis=0).tolist(),
    }


def diagnostics(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """How much of the round's update reached the server: cosine and norm ratio of the
    aggregated decoded delta to the aggregate of the same round's uncompressed deltas (rounds
    1-10 and all rounds, mean over seeds), and the devices' mean residual norm at the end."""
    cos = np.array([r["cosine_to_uncompressed_mean_per_round"] for r in runs])
    ratio = np.array([r["norm_ratio_to_uncompressed_mean_per_round"] for r in runs])
    res = [r["mean_residual_norm_per_round"][-1] for r in runs if r["mean_residual_norm_per_round"]]
    return {
        "cosine_rounds_1_10": float(cos[:, :10].mean()),
        "cosine_all_rounds": float(cos.mean()),
        "norm_ratio_rounds_1_10": float(ratio[:, :10].mean()),
        "norm_ratio_all_rounds": float(ratio.mean()),
        "final_mean_residual_norm": float(np.mean(res)) if res else None,
    }


def summarize_setting(
    runs: list[dict[str, Any]],
    dense_runs: list[dict[str, Any]],
    *,
    targets: dict[str, float],
    last: int,
) -> dict[str, Any]:
    """Per-setting numbers over the repetitions, paired with the dense run of the same seed."""
    dense_by_seed = {r["seed"]: r for r in dense_runs}
    finals = [r["accuracy"][-1] for r in runs]
    tails = [float(np.mean(r["accuracy"][-last:])) for r in runs]
    uploads = [sum(r["upload_bytes_per_round"]) for r in runs]
    dense_up = [sum(dense_by_seed[r["seed"]]["upload_bytes_per_round"]) for r in runs]
    losses = [100.0 * (dense_by_seed[r["seed"]]["accuracy"][-1] - r["accuracy"][-1]) for r in runs]
    tail_losses = [
        100.0 * (float(np.mean(dense_by_seed[r["seed"]]["accuracy"][-last:])) - t)
        for r, t in zip(runs, tails, strict=True)
    ]
    reached = {
        name: {
            "per_seed": [rounds_to(r["accuracy"], t) for r in runs],
            **spread([rounds_to(r["accuracy"], t) for r in runs]),
        }
        for name, t in targets.items()
    }
    total_nnz = sum(sum(r["nnz_per_round"]) for r in runs)
    num_updates = sum(r["num_updates"] for r in runs)
    return {
        "seeds": [r["seed"] for r in runs],
        "final_accuracy": {"per_seed": finals, **spread(finals)},
        f"last{last}_mean_accuracy": {"per_seed": tails, **spread(tails)},
        "loss_points_vs_dense": {"per_seed": losses, **spread(losses)},
        f"last{last}_loss_points_vs_dense": {"per_seed": tail_losses, **spread(tail_losses)},
        "rounds_to_target": reached,
        "upload_bytes": {"per_seed": uploads, **spread(uploads)},
        "ratio_vs_dense": spread([d / u for d, u in zip(dense_up, uploads, strict=True)]),
        "bytes_per_update": sum(uploads) / max(1, num_updates),
        "values_per_update": total_nnz / max(1, num_updates),
        "accuracy_curve": curve_stats([r["accuracy"] for r in runs]),
        "accuracy_per_seed": [r["accuracy"] for r in runs],
        "diagnostics": diagnostics(runs),
        "cpu_s": sum(r["cpu_s"] for r in runs),
    }


def check_targets(
    settings: list[dict[str, Any]], dense: dict[str, Any], central: dict[str, Any]
) -> dict[str, Any]:
    within = [
        s
        for s in settings
        if s["name"] != "dense-f32" and s["loss_points_vs_dense"]["mean"] <= TARGET_MAX_LOSS_POINTS
    ]
    meeting = [s for s in within if s["ratio_vs_dense"]["mean"] >= TARGET_RATIO]
    max_ratio = max(
        (s for s in settings if s["name"] != "dense-f32"),
        key=lambda s: s["ratio_vs_dense"]["mean"],
    )
    gap = 100.0 * (central["final_accuracy"]["mean"] - dense["final_accuracy"]["mean"])
    return {
        "ratio_250x_within_1pt": {
            "met": bool(meeting),
            "settings_meeting": [s["name"] for s in meeting],
            "settings_within_1pt": [s["name"] for s in within],
            "highest_ratio_any_setting": {
                "name": max_ratio["name"],
                "ratio": max_ratio["ratio_vs_dense"]["mean"],
                "loss_points": max_ratio["loss_points_vs_dense"]["mean"],
            },
            "target_ratio": TARGET_RATIO,
            "target_max_loss_points": TARGET_MAX_LOSS_POINTS,
        },
        "federated_within_2pt_of_centralized": {
            "met": gap <= TARGET_CENTRALIZED_GAP_POINTS,
            "gap_points": gap,
            "target_gap_points": TARGET_CENTRALIZED_GAP_POINTS,
        },
    }


def make_summary(
    settings: list[dict[str, Any]], dense: dict[str, Any], central: dict[str, Any]
) -> dict[str, Any]:
    within = [
        s
        for s in settings
        if s["name"] != "dense-f32" and s["loss_points_vs_dense"]["mean"] <= TARGET_MAX_LOSS_POINTS
    ]

    def brief(s: dict[str, Any] | None) -> dict[str, Any] | None:
        if s is None:
            return None
        return {
            "name": s["name"],
            "final_accuracy": s["final_accuracy"]["mean"],
            "loss_points": s["loss_points_vs_dense"]["mean"],
            "ratio": s["ratio_vs_dense"]["mean"],
            "upload_bytes": s["upload_bytes"]["mean"],
        }

    best = max(within, key=lambda s: s["final_accuracy"]["mean"], default=None)
    highest = max(within, key=lambda s: s["ratio_vs_dense"]["mean"], default=None)
    return {
        "best_within_1pt": brief(best),
        "highest_ratio_within_1pt": brief(highest),
        "dense_final_accuracy": dense["final_accuracy"]["mean"],
        "centralized_accuracy": central["final_accuracy"]["mean"],
        "gap_points_centralized_minus_dense": 100.0
        * (central["final_accuracy"]["mean"] - dense["final_accuracy"]["mean"]),
    }


def table(settings: list[dict[str, Any]], central: dict[str, Any], target_key: str) -> str:
    lines = [
        f"{'setting':<20} {'final acc (min-max)':>22} {'loss pts':>8} "
        f"{'rounds->' + target_key:>16} {'upload bytes':>13} {'ratio':>8}",
    ]
    for s in settings:
        fa = s["final_accuracy"]
        rt = s["rounds_to_target"][target_key]
        reached = "-" if rt["mean"] is None else f"{rt['mean']:.1f} ({rt['n']}/{len(s['seeds'])})"
        lines.append(
            f"{s['name']:<20} {fa['mean']:>8.4f} ({fa['min']:.3f}-{fa['max']:.3f}) "
            f"{s['loss_points_vs_dense']['mean']:>8.2f} {reached:>16} "
            f"{s['upload_bytes']['mean']:>13,.0f} {s['ratio_vs_dense']['mean']:>8.1f}"
        )
    ca = central["final_accuracy"]
    lines.append(
        f"{'centralized':<20} {ca['mean']:>8.4f} ({ca['min']:.3f}-{ca['max']:.3f}) "
        f"({central['epochs']} epochs on the union of the training data)"
    )
    return "\n".join(lines)


KEY_CURVES = (
    "dense-f32",
    "top10%-8b-ef",
    "top1%-4b-ef",
    "top1%-4b-noef",
    "top0.1%-2b-ef",
    "top0.1%-2b-noef",
)


def plot(report: dict[str, Any], out_dir: Path, stem: str, suffix: str = "") -> list[Path]:
    """Accuracy vs upload bytes, accuracy per round, and (when present) the ablations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = report["settings"]
    central = report["centralized"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6))
    colors = {1.0: "black", 0.1: "tab:blue", 0.01: "tab:orange", 0.001: "tab:red"}
    for s in settings:
        fa = s["final_accuracy"]
        x = s["upload_bytes"]["mean"]
        ef = s["error_feedback"]
        ax1.errorbar(
            x,
            fa["mean"],
            yerr=[[fa["mean"] - fa["min"]], [fa["max"] - fa["mean"]]],
            fmt="o" if ef or s["name"] == "dense-f32" else "x",
            color=colors.get(s["topk"], "gray"),
            mfc=None if ef or s["name"] == "dense-f32" else "none",
            capsize=3,
        )
        label = "dense f32" if s["name"] == "dense-f32" else f"{s['bits']}b{'' if ef else ' noEF'}"
        ax1.annotate(label, (x, fa["mean"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    dense_acc = report["summary"]["dense_final_accuracy"]
    ax1.axhline(central["final_accuracy"]["mean"], color="green", ls="--", label="centralized")
    ax1.axhline(dense_acc - 0.01, color="gray", ls=":", label="dense - 1 point")
    dense_bytes = next(s for s in settings if s["name"] == "dense-f32")["upload_bytes"]["mean"]
    ax1.axvline(dense_bytes / 250.0, color="purple", ls=":", label="250x smaller than dense")
    for f, c in colors.items():
        ax1.plot([], [], "o", color=c, label="dense" if f == 1.0 else f"top-{f * 100:g}%")
    ax1.plot([], [], "x", color="gray", label="no error feedback")
    ax1.set_xscale("log")
    ax1.set_xlabel("total upload bytes (encoded wire format), log scale")
    ax1.set_ylabel("final test accuracy (mean, min-max over seeds)")
    ax1.set_title(f"{report['config']['rounds']} rounds, final accuracy vs bytes uploaded")
    ax1.legend(fontsize=8, loc="lower right")
    ax1.grid(True, which="both", alpha=0.3)

    by_name = {s["name"]: s for s in settings}
    for name in KEY_CURVES:
        s = by_name.get(name)
        if s is None:
            continue
        c = s["accuracy_curve"]
        r = np.arange(len(c["mean"]))
        ax2.plot(r, c["mean"], label=name)
        ax2.fill_between(r, c["min"], c["max"], alpha=0.15)
    cc = central["accuracy_curve"]
    ax2.plot(np.arange(len(cc["mean"])), cc["mean"], "g--", label="centralized (per round budget)")
    ax2.set_ylim(0.0, 1.0)
    ax2.set_xlabel("round")
    ax2.set_ylabel("test accuracy (mean, min-max band)")
    ax2.set_title("accuracy per round")
    ax2.legend(fontsize=8, loc="lower right")
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}{suffix}.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    ablations = report.get("ablations") or []
    if ablations:
        fig, ax = plt.subplots(figsize=(12, 5))
        names = sorted({s["name"] for a in ablations for s in a["settings"]})
        width = 0.8 / max(1, len(names))
        for j, name in enumerate(names):
            xs, ys, lo, hi = [], [], [], []
            for i, a in enumerate(ablations):
                s = next((s for s in a["settings"] if s["name"] == name), None)
                if s is None:
                    continue
                fa = s["final_accuracy"]
                xs.append(i + (j - (len(names) - 1) / 2) * width)
                ys.append(fa["mean"])
                lo.append(fa["mean"] - fa["min"])
                hi.append(fa["max"] - fa["mean"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=name)
        ax.set_xticks(range(len(ablations)))
        ax.set_xticklabels([a["name"] for a in ablations], rotation=20, ha="right", fontsize=8)
        lows = [s["final_accuracy"]["min"] for a in ablations for s in a["settings"]]
        ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
        ax.set_ylabel("final test accuracy (mean, min-max)")
        ax.set_title("ablations: one hyperparameter changed from the main configuration")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        paths.append(out_dir / f"{stem}_ablations{suffix}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# ------------------------------------------------------------ uplink ablation (issue 12)


def _points(a: float, b: float) -> float:
    return 100.0 * (a - b)


def summarize_uplink_arm(
    runs: list[dict[str, Any]],
    *,
    plain: list[dict[str, Any]] | None,
    dense: list[dict[str, Any]],
    checkpoints: Sequence[int],
    targets: Sequence[float],
) -> dict[str, Any]:
    """One arm of the uplink ablation over its seeds: accuracy after each checkpoint round,
    paired differences (same seed) against plain error feedback and dense, rounds to each
    target accuracy within the run, and the update body bytes per round."""
    plain_by_seed = {r["seed"]: r for r in plain or []}
    dense_by_seed = {r["seed"]: r for r in dense}
    at: dict[str, Any] = {}
    vs_plain: dict[str, Any] = {}
    vs_dense: dict[str, Any] = {}
    for c in checkpoints:
        accs = [r["accuracy"][c] for r in runs]
        at[str(c)] = {"per_seed": accs, **spread(accs)}
        if plain:
            d = [_points(r["accuracy"][c], plain_by_seed[r["seed"]]["accuracy"][c]) for r in runs]
            vs_plain[str(c)] = {"per_seed": d, **spread(d)}
        d = [_points(r["accuracy"][c], dense_by_seed[r["seed"]]["accuracy"][c]) for r in runs]
        vs_dense[str(c)] = {"per_seed": d, **spread(d)}
    reached = {}
    for t in targets:
        per_seed = [rounds_to(r["accuracy"], t) for r in runs]
        reached[f"{t:.2f}"] = {"per_seed": per_seed, **spread(per_seed)}
    per_round = np.array([r["upload_bytes_per_round"] for r in runs], dtype=np.float64)
    per_round_updates = np.array(
        [[r["num_updates"] / len(r["upload_bytes_per_round"])] for r in runs], dtype=np.float64
    )
    per_update = per_round / per_round_updates
    totals = {
        f"total_rounds_1_{c}": float(per_round[:, :c].sum(axis=1).mean()) for c in checkpoints
    }
    return {
        "seeds": [r["seed"] for r in runs],
        "accuracy_after_round": at,
        "points_vs_plain_ef_same_seed": vs_plain or None,
        "points_vs_dense_same_seed": vs_dense,
        "rounds_to_accuracy": reached,
        "body_bytes": {
            "per_round_mean_by_round": per_round.mean(axis=0).tolist(),
            "per_update_mean_by_round": per_update.mean(axis=0).tolist(),
            "per_round_mean": float(per_round.mean()),
            "per_update_mean": float(per_update.mean()),
            **totals,
        },
        "accuracy_curve": curve_stats([r["accuracy"] for r in runs]),
        "accuracy_per_seed": [r["accuracy"] for r in runs],
        "diagnostics": diagnostics(runs),
        "cpu_s": sum(r["cpu_s"] for r in runs),
    }


def uplink_table(group: dict[str, Any]) -> str:
    """Text table of one group of the uplink ablation."""
    cps = group["checkpoints"]
    head = f"{'arm':<28}" + "".join(f" {'acc@' + str(c):>20}" for c in cps)
    head += "".join(f" {'pts vs EF@' + str(c):>20}" for c in cps)
    head += "".join(f" {'r->' + t:>12}" for t in group["targets"])
    head += f" {'B/update':>9} {'kB r1-' + str(cps[0]):>9}"
    lines = [head]
    for a in group["arms"]:
        row = f"{a['name']:<28}"
        for c in cps:
            s = a["accuracy_after_round"][str(c)]
            row += f" {s['mean']:>7.4f} ({s['min']:.3f}-{s['max']:.3f})"
        for c in cps:
            p = (a["points_vs_plain_ef_same_seed"] or {}).get(str(c))
            cell = "" if p is None else f"{p['mean']:+.1f} ({p['min']:+.1f}..{p['max']:+.1f})"
            row += f" {cell:>20}"
        for t in group["targets"]:
            r = a["rounds_to_accuracy"][t]
            cell = "-" if r["mean"] is None else f"{r['mean']:.1f} ({r['n']}/{len(a['seeds'])})"
            row += f" {cell:>12}"
        row += f" {a['body_bytes']['per_update_mean']:>9,.0f}"
        row += f" {a['body_bytes'][f'total_rounds_1_{cps[0]}'] / 1000:>9,.1f}"
        lines.append(row)
    return "\n".join(lines)


def plot_uplink(uplink: dict[str, Any], path: Path) -> Path:
    """Accuracy per round of the key arms, one panel per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in uplink["groups"] if g.get("plot", True)]
    cols = min(4, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.axis("off")
    for ax, g in zip(axes.flat, groups, strict=False):
        for a in g["arms"]:
            if a["name"] not in g["plot_arms"]:
                continue
            c = a["accuracy_curve"]
            r = np.arange(len(c["mean"]))
            ax.plot(r, c["mean"], label=a["name"])
            ax.fill_between(r, c["min"], c["max"], alpha=0.12)
        ax.set_ylim(0.5, 1.0)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (mean, min-max band)")
        ax.set_title("\n".join(textwrap.wrap(g["title"], 48)), fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
