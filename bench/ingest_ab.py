"""Before/after of the coordinator's hot path: interleaved quick ingest runs of an earlier
revision and of this checkout, measured in one window on the same machine.

The earlier revision is checked out in a git worktree with its own virtual environment (made
with ``make install`` there), and both run their own ``bench/ingest.py --quick --backends
sqlite --concurrency 50 --no-ceiling --no-longpoll``; this checkout runs it in both device
modes (``agent``: long-polls and takes the next assignment from the upload's answer; ``busy``:
work polls without a wait, the earlier revision's only mode). Runs are interleaved (base,
head-busy, head-agent, base, ...) so that load from other jobs on the shared machine falls on
all of them alike; compare the ratios, not the absolute milliseconds.

    python bench/ingest_ab.py --base 098bec6 --repeats 3     # bench/results/ingest_ab.json
    python bench/ingest_ab.py --from-dir DIR                  # summarize runs already made
    python bench/ingest_ab.py --chain DIR1,DIR2,DIR3          # successive revisions

``--chain`` takes checkouts of successive revisions (each with its ``.venv`` made already),
runs each in agent mode, interleaved (DIR1, DIR2, DIR3, DIR1, ...), and gives each one's CPU
per update against the one before it and against the first. ``--settings`` does the same for
coordinator settings on this checkout: ``NAME:VAR=VALUE[;VAR=VALUE]`` arms, comma-separated
(``rows:`` sets nothing), each run with ``--coordinator-env`` for its variables.

    python bench/ingest_ab.py --settings "files:FEDGE_INLINE_UPDATE_MAX_BYTES=0,rows:" \
        --repeats 3 --output bench/results/ingest_ab_inline.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ARMS = ("base", "head-busy", "head-agent")
QUICK = ["--quick", "--backends", "sqlite", "--concurrency", "50", "--no-ceiling", "--no-longpoll"]


def run_arm(arm: str, base_dir: Path, out: Path, extra: list[str] | None = None) -> None:
    """One quick run of ``arm``; ``extra`` options go to every arm (the earlier revision's
    ``bench/ingest.py`` must know them)."""
    directory = base_dir if arm == "base" else ROOT
    mode = [] if arm == "base" else ["--device-mode", arm.split("-")[1]]
    cmd = [str(directory / ".venv/bin/python"), "bench/ingest.py", *QUICK, *mode, *(extra or [])]
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(
            [*cmd, "--output", str(out)], cwd=directory, stdout=log, stderr=log, check=True
        )


def run_chain_arm(directory: Path, out: Path, extra: list[str]) -> None:
    """One quick run, in agent mode, of the checkout ``directory``."""
    cmd = [str(directory / ".venv/bin/python"), "bench/ingest.py", *QUICK, "--device-mode", "agent"]
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(
            [*cmd, *extra, "--output", str(out)], cwd=directory, stdout=log, stderr=log, check=True
        )


def revision(directory: Path) -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=directory, capture_output=True, text=True
    ).stdout.strip()


def summarize(directory: Path, names: tuple[str, ...] | list[str] = ARMS) -> dict[str, Any]:
    arms: dict[str, Any] = {}
    for arm in names:
        runs = []
        for path in sorted(directory.glob(f"{arm}-*.json")):
            backend = json.loads(path.read_text())["backends"][0]
            steady, alone = backend["runs"][0], backend["upload_only"][0]
            runs.append(
                {
                    "coordinator_cpu_ms_per_update": steady["coordinator_cpu_ms_per_update"],
                    "updates_per_s": steady["updates_per_s"],
                    "work_requests_per_update": steady["work_requests"]
                    / max(1, steady["accepted_uploads"]),
                    "upload_request_alone_cpu_ms": alone["coordinator_cpu_ms_per_upload_request"],
                    "assigning_work_request_cpu_ms": alone["coordinator_cpu_ms_per_assign_request"],
                    "load_average_1min": steady["load_average_1_5min"][0],
                    "accepted_uploads": steady["accepted_uploads"],
                    "coordinator_cpu_s": steady["coordinator_cpu_s"],
                    "window_s": steady["window_s"],
                    # one request at a time (revisions that have the ladder)
                    "ladder_cpu_ms": {
                        kind: k["cpu_ms_per_request"]
                        for kind, k in backend.get("ladder", {}).get("kinds", {}).items()
                    },
                }
            )
        if runs:
            cpu = [r["coordinator_cpu_ms_per_update"] for r in runs]
            kinds = sorted({kind for r in runs for kind in r["ladder_cpu_ms"]})
            arms[arm] = {
                "runs": runs,
                "cpu_ms_per_update_median": statistics.median(cpu),
                "cpu_ms_per_update_range": [min(cpu), max(cpu)],
                "ladder_cpu_ms_median": {
                    kind: statistics.median(
                        r["ladder_cpu_ms"][kind] for r in runs if kind in r["ladder_cpu_ms"]
                    )
                    for kind in kinds
                },
            }
    if "base" in arms:
        base = arms["base"]["cpu_ms_per_update_median"]
        for arm in arms.values():
            arm["cpu_per_update_vs_base"] = arm["cpu_ms_per_update_median"] / base
    return arms


def cpu_fit(runs: list[dict[str, Any]]) -> dict[str, float] | None:
    """Least squares of a run's coordinator CPU-seconds on its accepted updates: the slope is
    the CPU of one more update (ms), the intercept what the window cost without any (as a
    share of a core: scheduler ticks, long-polls checking again). On a loaded machine the
    load generators are starved and accept fewer updates in the window, which inflates CPU
    per update (the fixed part is spread over fewer); the slope does not depend on that."""
    if len(runs) < 2 or len({r["accepted_uploads"] for r in runs}) < 2:
        return None
    n = np.array([r["accepted_uploads"] for r in runs], dtype=float)
    cpu = np.array([r["coordinator_cpu_s"] for r in runs], dtype=float)
    slope, intercept = np.polyfit(n, cpu, 1)
    window = statistics.mean(r["window_s"] for r in runs)
    return {
        "marginal_cpu_ms_per_update": float(slope * 1000),
        "fixed_cpu_share_of_a_core": float(intercept / window),
    }


def summarize_chain(directory: Path, names: list[str]) -> dict[str, Any]:
    """:func:`summarize` of successive revisions, each against the one before and the first
    (ratios of medians, and the range of the ratios of runs made in the same round)."""
    arms = summarize(directory, names)
    for arm in arms.values():
        arm["fit"] = cpu_fit(arm["runs"])
    for i, name in enumerate(names):
        if i == 0 or name not in arms or names[i - 1] not in arms:
            continue
        cpu = [r["coordinator_cpu_ms_per_update"] for r in arms[name]["runs"]]
        for label, other in (("previous", names[i - 1]), ("first", names[0])):
            ref = [r["coordinator_cpu_ms_per_update"] for r in arms[other]["runs"]]
            paired = [a / b for a, b in zip(cpu, ref, strict=False)]
            arms[name][f"cpu_per_update_vs_{label}"] = (
                arms[name]["cpu_ms_per_update_median"] / arms[other]["cpu_ms_per_update_median"]
            )
            arms[name][f"cpu_per_update_vs_{label}_paired_range"] = [min(paired), max(paired)]
    return arms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="098bec6", help="the earlier git revision")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--from-dir", type=Path, default=None, help="summarize existing runs")
    ap.add_argument(
        "--base-dir",
        type=Path,
        default=None,
        help="a checkout of the earlier revision with its .venv made already (no worktree)",
    )
    ap.add_argument("--arms", default=",".join(ARMS), help="comma list of the arms to run")
    ap.add_argument(
        "--measure-s", type=float, default=None, help="each run's steady window (s; default 8)"
    )
    ap.add_argument(
        "--chain",
        default=None,
        help="comma list of checkouts of successive revisions (each with its .venv), run "
        "interleaved in agent mode",
    )
    ap.add_argument(
        "--settings",
        default=None,
        help="comma list of NAME:VAR=VALUE[;VAR=VALUE] arms of coordinator settings, run on "
        "this checkout interleaved in agent mode",
    )
    ap.add_argument("--output", type=Path, default=RESULTS / "ingest_ab.json")
    args = ap.parse_args()
    started = datetime.now(UTC).isoformat()
    if args.chain is not None or args.settings is not None:
        main_chain(args, started)
        return
    if args.from_dir is not None:
        runs_dir = args.from_dir
    else:
        runs_dir = Path(tempfile.mkdtemp(prefix="fedge-ingest-ab-"))
        arms = args.arms.split(",")
        extra = [] if args.measure_s is None else ["--measure-s", str(args.measure_s)]
        if args.base_dir is not None:
            for rep in range(1, args.repeats + 1):
                for arm in arms:
                    run_arm(arm, args.base_dir, runs_dir / f"{arm}-{rep}.json", extra)
        else:
            base_dir = runs_dir / "base-checkout"
            subprocess.run(
                ["git", "worktree", "add", "-q", str(base_dir), args.base], cwd=ROOT, check=True
            )
            try:
                subprocess.run(["make", "install"], cwd=base_dir, check=True)
                for rep in range(1, args.repeats + 1):
                    for arm in arms:
                        run_arm(arm, base_dir, runs_dir / f"{arm}-{rep}.json", extra)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(base_dir)], cwd=ROOT)
    result = {
        "benchmark": "ingest_ab",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "base_revision": args.base,
        "head_revision": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "each_run": " ".join(
            ["bench/ingest.py", *QUICK]
            + ([] if args.measure_s is None else ["--measure-s", str(args.measure_s)])
        ),
        "started": started,
        "notes": [
            "Interleaved runs in one window on the shared 2-core machine (other jobs ran: see "
            "load_average_1min); compare ratios.",
            "base and head-busy use the same device model (work polls without a wait, then "
            "upload); head-agent long-polls and takes the next assignment from the upload's "
            "answer, as the agent does.",
        ],
        "arms": summarize(runs_dir),
    }
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v.get("cpu_ms_per_update_median") for k, v in result["arms"].items()}))
    print(f"wrote {args.output}")


def chain_arms(args: argparse.Namespace) -> list[tuple[str, Path, list[str]]]:
    """(name, checkout, extra options) of each arm of ``--chain`` or ``--settings``."""
    if args.chain is not None:
        dirs = [Path(d).resolve() for d in args.chain.split(",")]
        return [(f"{i}-{revision(d)}", d, []) for i, d in enumerate(dirs)]
    arms = []
    for arm in args.settings.split(","):
        name, _, assignments = arm.partition(":")
        extra = [
            option
            for assignment in assignments.split(";")
            if assignment
            for option in ("--coordinator-env", assignment)
        ]
        arms.append((name, ROOT, extra))
    return arms


def main_chain(args: argparse.Namespace, started: str) -> None:
    arms = chain_arms(args)
    names = [name for name, _, _ in arms]
    runs_dir = args.from_dir or Path(tempfile.mkdtemp(prefix="fedge-ingest-chain-"))
    extra = [] if args.measure_s is None else ["--measure-s", str(args.measure_s)]
    if args.from_dir is None:
        for rep in range(1, args.repeats + 1):
            for name, directory, own in arms:
                run_chain_arm(directory, runs_dir / f"{name}-{rep}.json", [*extra, *own])
    result = {
        "benchmark": "ingest_ab_chain",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "revisions": names,
        "settings": args.settings,
        "each_run": " ".join(["bench/ingest.py", *QUICK, "--device-mode", "agent", *extra]),
        "started": started,
        "finished": datetime.now(UTC).isoformat(),
        "runs_dir": str(runs_dir),
        "notes": [
            "Successive revisions run interleaved in one window on the shared 2-core machine "
            "(other jobs ran: see load_average_1min); compare the ratios. Paired ranges: the "
            "ratio of the runs of the same round (repeat).",
        ],
        "arms": summarize_chain(runs_dir, names),
    }
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    for name in names:
        arm = result["arms"].get(name, {})
        print(
            name,
            arm.get("cpu_ms_per_update_median"),
            arm.get("cpu_per_update_vs_previous"),
            arm.get("cpu_per_update_vs_first"),
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
