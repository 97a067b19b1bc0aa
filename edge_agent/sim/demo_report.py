"""The demo's results: accuracy per model version, a centralized baseline, traffic, plot.

Model versions are downloaded through the admin API and evaluated on the held-out test split
with :func:`fedge.shared.architectures.evaluate`. The baseline trains the same model on the pooled
training data of all devices, with the same optimizer settings, for the same number of local
epochs per round, so "round r" means comparable work. matplotlib is a demo extra, imported
lazily.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedge.edge_agent.data import LocalData
from fedge.edge_agent.trainers import NumpyTrainer
from fedge.shared import architectures
from fedge.shared.modelspec import Weights


def evaluate_versions(
    model: Mapping[str, Any], versions: Sequence[tuple[int, Weights]], X: np.ndarray, y: np.ndarray
) -> list[dict[str, float]]:
    """Test loss and accuracy of each (version, weights)."""
    out = []
    for version, weights in versions:
        result = architectures.evaluate(model, weights, X, y)
        out.append({"version": version, **result})
    return out


def centralized_baseline(
    model: Mapping[str, Any],
    training: Mapping[str, Any],
    *,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    rounds: int,
    seed: int,
) -> list[dict[str, float]]:
    """Accuracy after 0..rounds rounds of centralized training (``epochs`` epochs each)."""
    data = LocalData(X_train, y_train, X_test, y_test)
    trainer = NumpyTrainer(model, data)
    rng = np.random.default_rng(seed)
    weights = architectures.init_weights(model, np.random.default_rng(int(model.get("seed", 0))))
    history = [{"round": 0, **architectures.evaluate(model, weights, X_test, y_test)}]
    for r in range(1, rounds + 1):
        weights = trainer.train(weights, training, rng).weights
        history.append({"round": r, **architectures.evaluate(model, weights, X_test, y_test)})
    return history


def summary_text(report: Mapping[str, Any]) -> str:
    """The table and totals printed at the end of a demo."""
    lines = [
        "",
        f"fedge demo: {report['devices']} devices, {report['mode']} mode, "
        f"{report['model']['architecture']} on {report['dataset']} "
        f"(Dirichlet alpha={report['alpha']}), top-k {report['compression']['topk_fraction']}, "
        f"{report['compression']['bits']}-bit values",
        "",
        f"{'round':>5}  {'version':>7}  {'federated acc':>13}  {'centralized acc':>15}  "
        f"{'updates':>7}  {'dropped':>7}  {'stale':>5}",
    ]
    central = {row["round"]: row["accuracy"] for row in report["baseline"]}
    rounds = {row["result_version"]: row for row in report["rounds"] if row.get("result_version")}
    for row in report["accuracy"]:
        version = row["version"]
        r = rounds.get(version, {})
        lines.append(
            f"{r.get('number', ''):>5}  {version:>7}  {row['accuracy']:>13.3f}  "
            f"{central.get(version, float('nan')):>15.3f}  {r.get('num_received', ''):>7}  "
            f"{r.get('num_dropped', ''):>7}  {r.get('num_stale', ''):>5}"
        )
    t = report["traffic"]
    c = report["counts"]
    lines += [
        "",
        f"uploads: {t['uploads']} updates, {_size(t['upload_bytes'])} "
        f"(dense float32 would be {_size(t['dense_upload_bytes'])}): "
        f"compression ratio {t['compression_ratio']:.1f}x",
        f"downloads: {t['downloads']} models, {_size(t['model_bytes'])} "
        f"({t['not_modified']} answered from cache with 304)",
        f"rounds: {c['rounds_closed']} closed, {c['rounds_failed']} failed",
        f"faults injected: {c.get('simulated_dropouts', 0)} devices vanished mid-training, "
        f"{c['late_uploads']} uploads held back by offline spells, "
        f"{c.get('cancelled_while_training', 0)} stragglers stopped by cancellation",
        f"coordinator saw: {c['dropped']} assignments dropped at deadlines, {c['stale']} updates "
        f"stale but accepted (weighted down), {c['stale_refused']} refused as too stale",
        f"final accuracy: federated {report['final_accuracy']:.3f}, "
        f"centralized {report['baseline'][-1]['accuracy']:.3f}; "
        f"wall time {report['wall_time_s']:.1f} s",
    ]
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def write_report(report: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``report.json`` and ``report.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    png_path = out_dir / "report.png"
    plot(report, png_path)
    return json_path, png_path


def plot(report: Mapping[str, Any], path: Path) -> None:
    import matplotlib  # demo extra, imported lazily

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    fed = report["accuracy"]
    ax1.plot([r["version"] for r in fed], [r["accuracy"] for r in fed], "o-", label="federated")
    base = report["baseline"]
    ax1.plot([r["round"] for r in base], [r["accuracy"] for r in base], "s--", label="centralized")
    ax1.axhline(report["chance_accuracy"], color="grey", lw=0.8, ls=":", label="chance")
    ax1.set_xlabel("round (model version)")
    ax1.set_ylabel("test accuracy")
    ax1.set_ylim(0, 1)
    ax1.legend()
    ax1.set_title("Accuracy on the held-out test split")
    cum = [c for c in report["traffic"]["cumulative"] if c["dense_bytes"] > 0]
    xs = [c["version"] for c in cum]
    ax2.plot(xs, [c["upload_bytes"] / 1e3 for c in cum], "o-", label="uploaded (compressed)")
    ax2.plot(xs, [c["dense_bytes"] / 1e3 for c in cum], "s--", label="dense float32")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax2.set_xlabel("round (model version)")
    ax2.set_ylabel("cumulative upload (kB)")
    ax2.legend()
    ax2.set_title(f"Upload traffic ({report['traffic']['compression_ratio']:.0f}x smaller)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
