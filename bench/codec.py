"""Codec benchmark: compressed size and encode/decode throughput of model updates.

For a 1M- and a 10M-parameter model (a few tensors, N(0, 1) deltas from a seeded Generator)
and every top-k fraction x value bit width, it measures

* bytes of the encoded update (every header, descriptor, index and scale byte) and the ratio
  to dense float32 (4 bytes per parameter);
* encode = ``compress`` (with error feedback) + ``encode_update``;
* decode = ``decode_update`` (with spec and policy checks) + ``to_dense``; ``add_to`` into a
  float64 accumulator is timed separately (what the coordinator does instead of ``to_dense``);

throughput in MB/s of dense-equivalent input (4 bytes per parameter, MB = 10**6 bytes), best
of ``--repeat`` runs (the median is recorded too). Wall-clock throughput is the headline; the
process-CPU-time figure is recorded as well because on a shared machine wall time also counts
time spent waiting for a core. Writes bench/results/codec.json and prints a
markdown table. ``--quick`` runs small sizes once and writes nothing unless ``--output``.

    python bench/codec.py            # full run (make bench)
    python bench/codec.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedge.shared.compression import compress
from fedge.shared.feedback import Residual
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import decode_update, encode_update

FRACTIONS = (1.0, 0.1, 0.01, 0.001)
BITS = (32, 8, 4, 2, 1)
RESULTS = Path(__file__).resolve().parent / "results" / "codec.json"

# A few tensors per model, roughly like an MLP: (name, shape).
MODELS: dict[str, list[tuple[str, tuple[int, ...]]]] = {
    "100k": [("l1.w", (256, 300)), ("l1.b", (300,)), ("l2.w", (300, 80)), ("l2.b", (80,))],
    "1M": [
        ("l1.w", (512, 1024)),
        ("l1.b", (1024,)),
        ("l2.w", (1024, 448)),
        ("l2.b", (448,)),
        ("head.w", (448, 37)),
    ],
    "10M": [
        ("l1.w", (2048, 2048)),
        ("l1.b", (2048,)),
        ("l2.w", (2048, 2560)),
        ("l2.b", (2560,)),
        ("head.w", (2560, 220)),
    ],
}

TARGETS = {
    "ratio_top1pct_4bit": 200.0,
    "ratio_top0.1pct_2bit": 1500.0,
    "encode_mb_s": 200.0,
    "decode_mb_s": 200.0,
}


def _time(fn: Callable[[], Any], repeat: int) -> tuple[float, float, float, Any]:
    """Best and median wall-clock seconds, best process CPU seconds, and the last result."""
    walls, cpus = [], []
    out = None
    for _ in range(repeat):
        cpu, start = time.process_time(), time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return min(walls), statistics.median(walls), min(cpus), out


def bench_config(
    spec: ModelSpec,
    delta: dict[str, np.ndarray],
    policy: CompressionPolicy,
    *,
    repeat: int,
    seed: int,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    residual = Residual.zeros(spec)
    dense_bytes = 4 * spec.num_params

    c_best, c_med, c_cpu, c = _time(lambda: compress(delta, policy, rng, residual), repeat)
    e_best, e_med, e_cpu, blob = _time(
        lambda: encode_update(c, task_id=1, base_version=0, num_examples=32), repeat
    )
    d_best, d_med, d_cpu, decoded = _time(
        lambda: decode_update(blob, spec=spec, policy=policy), repeat
    )
    t_best, t_med, t_cpu, _ = _time(decoded.to_dense, repeat)
    acc = {t.name: np.zeros(t.shape, np.float64) for t in spec.tensors}
    a_best, a_med, a_cpu, _ = _time(lambda: decoded.add_to(acc, 0.5), repeat)

    def mbs(seconds: float) -> float:
        return dense_bytes / seconds / 1e6

    return {
        "params": spec.num_params,
        "topk_fraction": policy.topk_fraction,
        "bits": policy.bits,
        "nnz": c.nnz,
        "bytes": len(blob),
        "ratio": dense_bytes / len(blob),
        "bits_per_kept_value": 8 * len(blob) / max(1, c.nnz),
        "encode_mb_s": mbs(c_best + e_best),
        "decode_mb_s": mbs(d_best + t_best),
        "decode_add_to_mb_s": mbs(d_best + a_best),
        "encode_cpu_mb_s": mbs(c_cpu + e_cpu),
        "decode_cpu_mb_s": mbs(d_cpu + t_cpu),
        "seconds": {  # [best wall, median wall, best CPU]
            "compress": [c_best, c_med, c_cpu],
            "encode_update": [e_best, e_med, e_cpu],
            "decode_update": [d_best, d_med, d_cpu],
            "to_dense": [t_best, t_med, t_cpu],
            "add_to_f64": [a_best, a_med, a_cpu],
        },
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
        # Other work on the machine inflates wall-clock times; CPU times are less affected.
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def check_targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Size targets per model size; throughput minima over sparse and over all configs.

    The targets are stated for models of 1M parameters and more; smaller (``--quick``) runs
    are reported but not judged.
    """
    out: dict[str, Any] = {}
    results = [r for r in results if r["params"] >= 1_000_000]
    if not results:
        return {}
    for r in results:
        key = f"{r['params']}"
        if r["topk_fraction"] == 0.01 and r["bits"] == 4:
            out[f"ratio_top1pct_4bit@{key}"] = [r["ratio"], TARGETS["ratio_top1pct_4bit"]]
        if r["topk_fraction"] == 0.001 and r["bits"] == 2:
            out[f"ratio_top0.1pct_2bit@{key}"] = [r["ratio"], TARGETS["ratio_top0.1pct_2bit"]]
    groups = {
        "topk<=1%": [r for r in results if r["topk_fraction"] <= 0.01],
        "all": results,
    }
    for label, group in groups.items():
        for step in ("encode", "decode"):
            for clock in ("", "_cpu"):
                out[f"min_{step}{clock}_mb_s@{label}"] = [
                    min(r[f"{step}{clock}_mb_s"] for r in group),
                    TARGETS[f"{step}_mb_s"],
                ]
    return {k: {"value": v, "target": t, "met": v >= t} for k, (v, t) in out.items()}


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| params | top-k | bits | bytes | ratio | bits/kept | encode MB/s | decode MB/s "
        "| decode+add_to MB/s | encode MB/s (CPU) | decode MB/s (CPU) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['params']:,} | {r['topk_fraction']:g} | {r['bits']} | {r['bytes']:,} "
            f"| {r['ratio']:,.1f} | {r['bits_per_kept_value']:.2f} | {r['encode_mb_s']:,.0f} "
            f"| {r['decode_mb_s']:,.0f} | {r['decode_add_to_mb_s']:,.0f} "
            f"| {r['encode_cpu_mb_s']:,.0f} | {r['decode_cpu_mb_s']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run, no file")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per step")
    parser.add_argument("--output", type=Path, default=None, help="JSON results path")
    args = parser.parse_args(argv)
    sizes = ["100k", "1M"] if args.quick else ["1M", "10M"]
    repeat = args.repeat or (1 if args.quick else 3)
    output = args.output if (args.output or args.quick) else RESULTS

    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for size in sizes:
        spec = ModelSpec.from_dict([{"name": n, "shape": list(s)} for n, s in MODELS[size]])
        gen = np.random.default_rng(2024)
        delta = {t.name: gen.standard_normal(t.shape, dtype=np.float32) for t in spec.tensors}
        for fraction in FRACTIONS:
            for bits in BITS:
                policy = CompressionPolicy(topk_fraction=fraction, bits=bits, chunk=256)
                r = bench_config(spec, delta, policy, repeat=repeat, seed=7)
                results.append(r)
                print(
                    f"{size:>4} top-k {fraction:<6g} {bits:>2} bits: {r['bytes']:>12,} B "
                    f"x{r['ratio']:>9,.1f}  enc {r['encode_mb_s']:>7,.0f} MB/s  "
                    f"dec {r['decode_mb_s']:>7,.0f} MB/s",
                    file=sys.stderr,
                )
    targets = check_targets(results)
    report = {
        "benchmark": "codec",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "numpy": np.__version__,
        "repeat": repeat,
        "chunk": 256,
        "scope": "tensor",
        "error_feedback": True,
        "mb": "10**6 bytes of dense float32 input",
        "runtime_s": time.perf_counter() - started,
        "targets": targets,
        "results": results,
    }
    print(markdown(results))
    print()
    for name, t in targets.items():
        status = "met" if t["met"] else "MISSED"
        print(f"- {name}: {t['value']:,.1f} (target {t['target']:,.0f}) {status}")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
