"""Aggregation benchmark: time and peak memory of one round's aggregation as the number of
updates grows (10 -> 10,000) for a ~1M-parameter model (issue #7, item 4).

Everything goes through the product (see bench/_aggregate_prep.py and _aggregate_child.py):
a migrated SQLite database file and the filesystem blob store, devices enrolled, one task per
size, a sync round opened by the round engine, every update uploaded through the upload path
(``accept_upload``: decode and check, blob write, ``Update`` row), the round closed by the
engine. Then, for each size, a **fresh process** runs the engine's aggregation exactly as the
scheduler does when a round closes (``plan_aggregation`` -> ``compute`` -> ``commit_aggregation``)
and reports wall times per step, peak RSS growth (``VmHWM`` reset before the aggregation) and
the ``tracemalloc`` peak of ``compute``.

Policies: top-1% 4-bit (every upload distinct bytes, so every row names its own blob) and
top-10% 8-bit (a pool of distinct bodies; the content-addressed store keeps one blob per pool
entry, but aggregation still reads and decodes every update — counted by the child). Updates
are one-shot compressions of seeded N(0, 0.01^2) deltas.

Optionally the same aggregation for one size on PostgreSQL (a database created and dropped by
the benchmark). The database and blobs live in a tmpfs directory when there is one (the blob
store fsyncs every upload; that only slows preparation, which is not measured).

    python bench/aggregate.py              # full: 10, 100, 1000, 10000 updates
    python bench/aggregate.py --quick      # 10, 100, 1000 -> bench/results/aggregate.quick.json
    python bench/aggregate.py --plot-only  # redraw the plot from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from _aggregate_prep import (
    MODEL,
    PolicyCase,
    count_devices,
    enroll_devices,
    make_pool,
    model_spec,
    open_runtime,
    postgres_database,
    prepare_round,
)

from fedge.shared.policy import CompressionPolicy

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CHILD = HERE / "_aggregate_child.py"
SEED = 20261125
POOL_SIZE = 16
FULL_SIZES = (10, 100, 1000, 10000)
QUICK_SIZES = (10, 100, 1000)
PG_SIZE = 1000
PROFILE_SIZE = 1000
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_DATABASE = "fedge_bench_agg"
#: Target: peak aggregation memory at the largest size within this factor of the smallest.
FLAT_FACTOR = 2.0

CASES = (
    PolicyCase(
        "top1pct_4bit",
        CompressionPolicy(topk_fraction=0.01, bits=4, chunk=256, error_feedback=False),
        distinct=True,
    ),
    PolicyCase(
        "top10pct_8bit",
        CompressionPolicy(topk_fraction=0.1, bits=8, chunk=256, error_feedback=False),
        distinct=False,
    ),
)


def machine() -> dict[str, Any]:
    import sqlalchemy

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "loadavg_at_start": list(os.getloadavg()),
    }


def scratch_dir() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="fedge-bench-agg-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="fedge-bench-agg-"))


def run_child(
    url: str, blob_dir: Path, task_id: int, *, check: bool, profile: Path | None = None
) -> dict[str, Any]:
    """Aggregate in a fresh process (under py-spy, sampling at 250 Hz, with ``profile``)."""
    cmd = [sys.executable, str(CHILD), url, str(blob_dir), str(task_id), "1" if check else "0"]
    if profile is not None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        cmd = [spy, "record", "-r", "250", "--format", "raw", "-o", str(profile), "--", *cmd]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"aggregation child failed:\n{proc.stderr[-4000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("{")][-1]  # py-spy prints too
    result: dict[str, Any] = json.loads(line)
    return result


def measure_backend(
    backend: str,
    url: str,
    data_dir: Path,
    cases: list[PolicyCase],
    sizes: dict[str, list[int]],
    seed: int,
    profile_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Prepare every (policy, size) round on one database, then aggregate each in a child."""
    runtime = open_runtime(url, data_dir)
    rng = np.random.default_rng(seed)
    spec = model_spec()
    rows: list[dict[str, Any]] = []
    try:
        need = max(max(s) for s in sizes.values())
        start = time.perf_counter()
        enroll_devices(runtime, need, rng)
        print(
            f"[{backend}] enrolled {count_devices(runtime)} devices in "
            f"{time.perf_counter() - start:.1f} s",
            flush=True,
        )
        prepared = []
        for case in cases:
            pool = make_pool(case, spec, POOL_SIZE, rng)
            for size in sizes[case.name]:
                p = prepare_round(runtime, case, size, pool, rng)
                print(
                    f"[{backend}] {case.name} n={size}: {p.distinct_blobs} blobs, "
                    f"prepared in {p.seconds:.1f} s",
                    flush=True,
                )
                prepared.append((case, p))
        blob_dir = runtime.settings.blobs
    finally:
        runtime.close()
    for case, p in prepared:
        profile = None
        if profile_dir is not None and p.size == PROFILE_SIZE:
            profile_dir.mkdir(parents=True, exist_ok=True)
            profile = profile_dir / f"aggregate.{backend}.{case.name}.{p.size}.txt"
        child = run_child(url, blob_dir, p.task_id, check=p.size <= 100, profile=profile)
        row = {
            "backend": backend,
            "policy": case.name,
            "compression": case.policy.to_dict(),
            "distinct_bytes_per_upload": case.distinct,
            "updates": p.size,
            "distinct_blobs": p.distinct_blobs,
            "upload_bytes": p.upload_bytes,
            "prepare_s": p.seconds,
            **child,
        }
        s = row["seconds"]
        row["per_update_ms"] = 1000.0 * s["aggregate"] / p.size
        row["updates_per_s"] = p.size / s["aggregate"]
        rows.append(row)
        mem = row["memory"]
        print(
            f"[{backend}] {case.name} n={p.size}: aggregate {s['aggregate']:.3f} s "
            f"({row['updates_per_s']:.0f} updates/s), commit {s['commit']:.3f} s, "
            f"peak RSS +{mem['peak_rss_delta_bytes'] / 1e6:.1f} MB, "
            f"tracemalloc {mem['tracemalloc_peak_bytes'] / 1e6:.1f} MB",
            flush=True,
        )
    return rows


def summarize(rows: list[dict[str, Any]], pg: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"flat_factor_target": FLAT_FACTOR, "policies": {}}
    met_all = True
    for name in dict.fromkeys(r["policy"] for r in rows):
        mine = sorted((r for r in rows if r["policy"] == name), key=lambda r: r["updates"])
        lo, hi = mine[0], mine[-1]
        rss_lo = lo["memory"]["peak_rss_delta_bytes"]
        rss_hi = hi["memory"]["peak_rss_delta_bytes"]
        tm_lo = lo["memory"]["tracemalloc_peak_bytes"]
        tm_hi = hi["memory"]["tracemalloc_peak_bytes"]
        rss_ratio = rss_hi / max(rss_lo, 1)
        tm_ratio = tm_hi / max(tm_lo, 1)
        met = rss_ratio <= FLAT_FACTOR and tm_ratio <= FLAT_FACTOR
        met_all = met_all and met
        out["policies"][name] = {
            "sizes": [r["updates"] for r in mine],
            "smallest": lo["updates"],
            "largest": hi["updates"],
            "peak_rss_delta_mb": [r["memory"]["peak_rss_delta_bytes"] / 1e6 for r in mine],
            "tracemalloc_peak_mb": [r["memory"]["tracemalloc_peak_bytes"] / 1e6 for r in mine],
            "peak_rss_ratio_largest_vs_smallest": rss_ratio,
            "tracemalloc_ratio_largest_vs_smallest": tm_ratio,
            "memory_flat_target_met": met,
            "aggregate_s_largest": hi["seconds"]["aggregate"],
            "total_s_largest": hi["seconds"]["total"],
            "commit_s_largest": hi["seconds"]["commit"],
            "updates_per_s_largest": hi["updates_per_s"],
            "per_update_ms_largest": hi["per_update_ms"],
        }
    out["memory_flat_target_met"] = met_all
    if pg:
        out["postgresql"] = [
            {
                "policy": r["policy"],
                "updates": r["updates"],
                "total_s": r["seconds"]["total"],
                "plan_s": r["seconds"]["plan"],
                "commit_s": r["seconds"]["commit"],
                "updates_per_s": r["updates_per_s"],
            }
            for r in pg
        ]
    return out


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["results"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, name in enumerate(dict.fromkeys(r["policy"] for r in rows)):
        mine = sorted((r for r in rows if r["policy"] == name), key=lambda r: r["updates"])
        n = [r["updates"] for r in mine]
        color = f"C{i}"
        ax_t.plot(
            n,
            [r["seconds"]["total"] for r in mine],
            "o-",
            color=color,
            label=f"{name}: total (plan+compute+commit)",
        )
        ax_t.plot(
            n,
            [r["seconds"]["aggregate"] for r in mine],
            "s--",
            color=color,
            label=f"{name}: decode+accumulate",
        )
        ax_t.plot(
            n, [r["seconds"]["commit"] for r in mine], "^:", color=color, label=f"{name}: commit"
        )
        ax_m.plot(
            n,
            [r["memory"]["peak_rss_delta_bytes"] / 1e6 for r in mine],
            "o-",
            color=color,
            label=f"{name}: peak RSS growth",
        )
        ax_m.plot(
            n,
            [r["memory"]["tracemalloc_peak_bytes"] / 1e6 for r in mine],
            "s--",
            color=color,
            label=f"{name}: tracemalloc peak (compute)",
        )
    for r in data.get("postgresql", []):
        ax_t.plot(
            [r["updates"]],
            [r["seconds"]["total"]],
            "k*",
            markersize=11,
            label=f"PostgreSQL {r['policy']}: total",
        )
    dense = data["parameters"]["num_params"] * 8 / 1e6
    ax_m.axhline(dense, color="grey", lw=0.8, ls="--", label="one dense float64 model")
    ax_t.set(
        xscale="log",
        yscale="log",
        xlabel="updates per round",
        ylabel="seconds",
        title="Aggregation wall time (SQLite)",
    )
    ax_m.set(xscale="log", xlabel="updates per round", ylabel="MB", title="Aggregation peak memory")
    ax_m.set_ylim(bottom=0)
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Aggregation of a {data['parameters']['num_params']:,}-parameter model "
        f"({'quick' if data['parameters']['quick'] else 'full'} run)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(data: dict[str, Any]) -> None:
    print(
        "\n| backend | policy | updates | plan s | decode+acc s | commit s | total s "
        "| updates/s | peak RSS MB | tracemalloc MB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in [*data["results"], *data.get("postgresql", [])]:
        s, m = r["seconds"], r["memory"]
        print(
            f"| {r['backend']} | {r['policy']} | {r['updates']} | {s['plan']:.3f} "
            f"| {s['aggregate']:.3f} | {s['commit']:.3f} | {s['total']:.3f} "
            f"| {r['updates_per_s']:.0f} | {m['peak_rss_delta_bytes'] / 1e6:.1f} "
            f"| {m['tracemalloc_peak_bytes'] / 1e6:.1f} |"
        )
    summary = data["summary"]
    for name, p in summary["policies"].items():
        verdict = "met" if p["memory_flat_target_met"] else "NOT met"
        print(
            f"{name}: peak RSS x{p['peak_rss_ratio_largest_vs_smallest']:.2f}, tracemalloc "
            f"x{p['tracemalloc_ratio_largest_vs_smallest']:.2f} from {p['smallest']} to "
            f"{p['largest']} updates -> flat-memory target (<= x{FLAT_FACTOR:g}) {verdict}; "
            f"{p['updates_per_s_largest']:.0f} updates/s at {p['largest']}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10, 100, 1000 updates")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON")
    ap.add_argument("--output", type=Path, help="results JSON (default bench/results/...)")
    ap.add_argument("--sizes", type=int, nargs="+", help="override the sizes")
    ap.add_argument(
        "--policies", nargs="+", choices=[c.name for c in CASES], help="only these policies"
    )
    ap.add_argument(
        "--dense-max",
        type=int,
        default=None,
        help="largest size for top10pct_8bit (default: same as top1pct_4bit)",
    )
    ap.add_argument(
        "--postgres-url",
        default=os.environ.get("FEDGE_TEST_POSTGRES_URL", PG_DEFAULT),
        help="admin URL of a PostgreSQL server ('' to skip)",
    )
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument(
        "--profile-dir",
        type=Path,
        help=f"run the {PROFILE_SIZE}-update aggregations under py-spy (collapsed stacks here; "
        "timings of profiled runs include the sampler's overhead)",
    )
    args = ap.parse_args()
    name = "aggregate.quick" if args.quick else "aggregate"
    output: Path = args.output or RESULTS / f"{name}.json"
    png = output.with_suffix(".png")
    if args.plot_only:
        plot(json.loads(output.read_text()), png)
        print(f"wrote {png}")
        return

    started = datetime.now(UTC)
    t0 = time.perf_counter()
    base_sizes = list(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES))
    cases = [c for c in CASES if not args.policies or c.name in args.policies]
    sizes = {
        c.name: [
            s for s in base_sizes if c.distinct or args.dense_max is None or s <= args.dense_max
        ]
        for c in cases
    }
    scratch = scratch_dir()
    pg_rows: list[dict[str, Any]] = []
    pg_note = None
    try:
        rows = measure_backend(
            "sqlite",
            f"sqlite:///{scratch / 'sqlite' / 'fedge.db'}",
            scratch / "sqlite",
            cases,
            sizes,
            args.seed,
            args.profile_dir,
        )
        if args.postgres_url:
            try:
                with postgres_database(args.postgres_url, PG_DATABASE) as url:
                    pg_rows = measure_backend(
                        "postgresql",
                        url,
                        scratch / "postgresql",
                        cases[:1],
                        {cases[0].name: [PG_SIZE]},
                        args.seed,
                    )
            except Exception as exc:
                pg_note = f"PostgreSQL comparison skipped: {type(exc).__name__}: {exc}"
                print(pg_note, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    spec = model_spec()
    data: dict[str, Any] = {
        "benchmark": "aggregate",
        "command": [sys.executable, *sys.argv],
        "parameters": {
            "quick": args.quick,
            "sizes": sizes,
            "model": MODEL,
            "num_params": spec.num_params,
            "tensors": spec.to_dict(),
            "pool_size": POOL_SIZE,
            "delta_distribution": "N(0, 0.01^2) float32, one-shot compression (no residual)",
            "strategy": "fedavg (server_lr 1.0), weighting num_examples, staleness 0",
            "postgresql_size": PG_SIZE if args.postgres_url else None,
            "scratch_filesystem": "tmpfs (/dev/shm)"
            if str(scratch).startswith("/dev/shm")
            else "default temp dir",
        },
        "seeds": {"numpy_generator": args.seed},
        "machine": machine(),
        "timestamp_start": started.isoformat(),
        "timestamp_end": datetime.now(UTC).isoformat(),
        "runtime_s": time.perf_counter() - t0,
        "results": rows,
        "postgresql": pg_rows,
        "notes": [n for n in [pg_note] if n],
    }
    data["summary"] = summarize(rows, pg_rows)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(data, indent=2) + "\n")
    plot(data, png)
    print_table(data)
    print(f"\nwrote {output} and {png} in {data['runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
