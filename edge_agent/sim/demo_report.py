"""The demo's results: accuracy per model version, a centralized baseline, traffic, plot.

Traffic is counted twice. On the socket (:func:`socket_traffic`): every byte each device sent
and received through its counting relay, TLS records, HTTP and signed headers, long polls and
bodies alike, per device and for the fleet. And as bodies (:func:`body_traffic`): the update
and model bodies the agents counted. The ratio against dense is an estimate, not a second
run: the same requests with every update body a dense float32 update and every model body a
dense float32 model (the measured socket bytes, plus the difference in body size, plus 22
bytes of TLS 1.3 record overhead per 16 KiB of it).

Model versions are downloaded through the admin API and evaluated on the held-out test split
with :func:`fedge.shared.architectures.evaluate`. The baseline trains the same model on the pooled
training data of all devices, with the same optimizer settings, for the same number of local
epochs per round, so "round r" means comparable work. matplotlib is a demo extra, imported
lazily.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedge.edge_agent.client import Traffic
from fedge.edge_agent.data import LocalData
from fedge.edge_agent.sim.fleet import DeviceSocket, FleetStats
from fedge.edge_agent.trainers import NumpyTrainer
from fedge.shared import architectures
from fedge.shared.compression import compress
from fedge.shared.modelspec import Weights
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import encode_model, encode_update

#: TLS 1.3 application data: at most 16 KiB of plaintext per record, each record adding a
#: 5-byte header, a 1-byte content type and a 16-byte AEAD tag.
TLS_RECORD_PLAINTEXT = 16384
TLS_RECORD_OVERHEAD = 22

DENSE_ESTIMATE = (
    "estimate, no dense fleet was run: the measured socket bytes with every update body "
    "replaced by a dense float32 update and every model body by a dense float32 model "
    f"(size difference + {TLS_RECORD_OVERHEAD} B of TLS per {TLS_RECORD_PLAINTEXT // 1024} KiB); "
    "retried uploads and the update's metrics block are counted at the compressed size, so "
    "the estimate errs low"
)


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


def dense_body_sizes(model: Mapping[str, Any]) -> tuple[int, int]:
    """Wire sizes of a dense float32 update (top-k 1.0, 32 bits, no metrics block) and of a
    dense float32 model of ``model``: the bodies a dense system sends and receives."""
    weights = architectures.init_weights(model, np.random.default_rng(0))
    policy = CompressionPolicy(topk_fraction=1.0, bits=32, error_feedback=False)
    update = compress(weights, policy, np.random.default_rng(0))
    update_bytes = len(encode_update(update, task_id=1, base_version=1, num_examples=1))
    return update_bytes, len(encode_model(weights))


def _with_tls(extra_body_bytes: float) -> float:
    """Socket bytes that ``extra_body_bytes`` more (or fewer) bytes of bodies take in TLS."""
    return extra_body_bytes * (1.0 + TLS_RECORD_OVERHEAD / TLS_RECORD_PLAINTEXT)


def _ratio(dense: float, measured: float) -> float | None:
    return dense / measured if measured > 0 else None


def socket_traffic(
    sockets: Sequence[DeviceSocket],
    clients: Sequence[Traffic],
    *,
    dense_update_bytes: int,
    dense_model_bytes: int,
) -> dict[str, Any]:
    """Socket bytes per device and for the fleet (after enrollment; enrollment apart), with
    the dense estimate (see :data:`DENSE_ESTIMATE`) and the ratios against it."""
    if len(sockets) != len(clients):
        raise ValueError("one socket count and one body count per device")
    per_device: list[dict[str, Any]] = []
    for sock, bodies in zip(sockets, clients, strict=True):
        up, down = sock.work.up, sock.work.down
        dense_up = up + round(_with_tls(bodies.uploads * dense_update_bytes - bodies.upload_bytes))
        dense_down = down + round(
            _with_tls(bodies.downloads * dense_model_bytes - bodies.model_bytes)
        )
        per_device.append(
            {
                "device": sock.index,
                "upload": up,
                "download": down,
                "total": up + down,
                "connections": sock.work.connections,
                "updates": bodies.uploads,
                "update_body_bytes": bodies.upload_bytes,
                "models": bodies.downloads,
                "model_body_bytes": bodies.model_bytes,
                "not_modified": bodies.not_modified,
                "dense_estimate": {
                    "upload": dense_up,
                    "download": dense_down,
                    "total": dense_up + dense_down,
                },
                "ratio_vs_dense": {
                    "upload": _ratio(dense_up, up),
                    "download": _ratio(dense_down, down),
                    "total": _ratio(dense_up + dense_down, up + down),
                },
            }
        )
    up = sum(d["upload"] for d in per_device)
    down = sum(d["download"] for d in per_device)
    dense_up = sum(d["dense_estimate"]["upload"] for d in per_device)
    dense_down = sum(d["dense_estimate"]["download"] for d in per_device)
    enrolled_up = sum(s.enrollment.up for s in sockets)
    enrolled_down = sum(s.enrollment.down for s in sockets)
    return {
        "counted": "bytes crossing each device's TCP connections to the coordinator (TLS "
        "records, HTTP and signed headers, long polls, bodies), by a counting relay per "
        "device; enrollment apart",
        "devices": len(per_device),
        "upload": up,
        "download": down,
        "total": up + down,
        "connections": sum(d["connections"] for d in per_device),
        "enrollment": {
            "upload": enrolled_up,
            "download": enrolled_down,
            "total": enrolled_up + enrolled_down,
        },
        "dense_estimate": {
            "upload": dense_up,
            "download": dense_down,
            "total": dense_up + dense_down,
            "update_body_bytes": dense_update_bytes,
            "model_body_bytes": dense_model_bytes,
            "method": DENSE_ESTIMATE,
        },
        "ratio_vs_dense": {
            "upload": _ratio(dense_up, up),
            "download": _ratio(dense_down, down),
            "total": _ratio(dense_up + dense_down, up + down),
        },
        "per_device": per_device,
    }


def body_traffic(
    stats: FleetStats,
    num_params: int,
    versions: Sequence[int],
    not_modified: int,
    *,
    dense_model_bytes: int,
    delta_downloads: int = 0,
) -> dict[str, Any]:
    """Update and model bodies as the agents counted them (no envelope), against dense
    float32 values (4 bytes per parameter per update) and dense float32 models;
    ``delta_downloads`` of the downloads were delta chains rather than whole models."""
    dense_per_update = 4 * num_params
    cumulative = []
    up, dense = 0, 0
    for version in versions:
        count, nbytes = stats.uploads_by_base_version.get(version - 1, (0, 0))
        up += nbytes
        dense += count * dense_per_update
        cumulative.append({"version": version, "upload_bytes": up, "dense_bytes": dense})
    return {
        "uploads": stats.uploads,
        "upload_bytes": stats.upload_bytes,
        "dense_upload_bytes": stats.uploads * dense_per_update,
        "compression_ratio": stats.uploads * dense_per_update / max(1, stats.upload_bytes),
        "downloads": stats.downloads,
        "delta_downloads": delta_downloads,
        "model_bytes": stats.model_bytes,
        "dense_model_bytes": stats.downloads * dense_model_bytes,
        "not_modified": not_modified,
        "cumulative": cumulative,
    }


def summary_text(report: Mapping[str, Any]) -> str:
    """The table and totals printed at the end of a demo."""
    lines = [
        "",
        f"fedge demo: {report['devices']} devices, {report['mode']} mode, "
        f"{report['model']['architecture']} on {report['dataset']} "
        f"(Dirichlet alpha={report['alpha']}), updates top-k "
        f"{report['compression']['topk_fraction']} {report['compression']['bits']}-bit, "
        f"{_downloads(report['compression'])}",
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
    lines += traffic_lines(report["traffic"])
    c = report["counts"]
    lines += [
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


def traffic_lines(traffic: Mapping[str, Any]) -> list[str]:
    """Socket bytes (fleet, then per device), then the bodies."""
    sock, b = traffic["socket"], traffic["bodies"]
    dense, ratio = sock["dense_estimate"], sock["ratio_vs_dense"]
    enrolled = sock["enrollment"]
    lines = [
        "",
        f"bytes on the devices' sockets (TLS, HTTP and signed headers, polls, bodies; a "
        f"counting relay per device; {sock['devices']} devices, enrollment apart):",
        f"{'':>10}  {'measured':>10}  {'dense':>10}  {'vs dense':>8}",
    ]
    for key in ("upload", "download", "total"):
        lines.append(
            f"{key:>10}  {_size(sock[key]):>10}  {_size(dense[key]):>10}  {_times(ratio[key]):>8}"
        )
    lines += [
        "dense: an estimate, not a second run: the same requests with float32 update and model "
        "bodies",
        f"enrollment: {_size(enrolled['upload'])} up, {_size(enrolled['download'])} down",
        "",
        f"{'device':>6}  {'updates':>7}  {'models':>6}  {'upload':>9}  {'download':>9}  "
        f"{'total':>9}  {'vs dense':>8}",
    ]
    for d in sock["per_device"]:
        lines.append(
            f"{d['device']:>6}  {d['updates']:>7}  {d['models']:>6}  {_size(d['upload']):>9}  "
            f"{_size(d['download']):>9}  {_size(d['total']):>9}  "
            f"{_times(d['ratio_vs_dense']['total']):>8}"
        )
    lines += [
        "",
        f"bodies alone: {b['uploads']} update bodies {_size(b['upload_bytes'])} (dense float32 "
        f"values {_size(b['dense_upload_bytes'])}, {b['compression_ratio']:.1f}x); "
        f"{b['downloads']} model bodies ({b.get('delta_downloads', 0)} of them delta chains) "
        f"{_size(b['model_bytes'])} (dense float32 {_size(b['dense_model_bytes'])}); "
        f"{b['not_modified']} answered 304 from cache",
    ]
    return lines


def _downloads(compression: Mapping[str, Any]) -> str:
    down = compression.get("download") or {}
    topk, bits = down.get("topk_fraction", 1.0), down.get("bits", 32)
    if topk == 1.0 and bits == 32:
        return "full float32 models down"
    return f"model deltas top-k {topk} {bits}-bit"


def _times(ratio: float | None) -> str:
    return "-" if ratio is None or not math.isfinite(ratio) else f"{ratio:.1f}x"


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
    ax1.xaxis.get_major_locator().set_params(integer=True)
    sock = report["traffic"]["socket"]
    keys = ("upload", "download", "total")
    x = np.arange(len(keys))
    measured = [sock[k] / 1e6 for k in keys]
    dense = [sock["dense_estimate"][k] / 1e6 for k in keys]
    ax2.bar(x - 0.2, measured, 0.4, label="measured on the socket")
    ax2.bar(x + 0.2, dense, 0.4, label="dense float32 bodies (estimate)", alpha=0.6)
    for i, k in enumerate(keys):
        ax2.annotate(
            _times(sock["ratio_vs_dense"][k]),
            (x[i] + 0.2, dense[i]),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax2.set_xticks(x, list(keys))
    ax2.set_ylabel("MB, all devices, TLS included")
    ax2.legend(loc="upper left")
    ax2.set_title(f"Bytes on the devices' sockets ({sock['devices']} devices)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
