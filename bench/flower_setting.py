"""fedge in the setting measured for Flower 1.42 on this machine.

Setting: digits (scikit-learn, 20% stratified test split), Dirichlet alpha=0.5 over 10
clients, MLP 64-128-10 (9,610 parameters, 38.4 kB as float32), FedAvg, 10 rounds, every client
in every round, no artificial delays and no faults. Flower's figures on this machine: about
22 s per round, about 62 kB uploaded per client per round, about 390 MiB memory per client,
0.903 test accuracy (centralized training of the same model: 0.969).

What runs: the real coordinator (a child process: HTTPS on loopback with its private CA, a
SQLite file, a blob store) and 10 real agents, each a separate ``fedge agent run`` process
(``python -m fedge.shared.cli agent run --data shard.npz``). The benchmark enrolls the devices with
the library call ``enroll_device`` (so their seeds are fixed) and creates the task through the
admin REST API. Measured after the fact from the coordinator:

* seconds per round: each round's ``closed_at - opened_at`` (admin API), and the task's
  ``finished_at - started_at`` divided by the rounds;
* upload bytes per client per round: the size of every update request body as the
  coordinator received it (``updates.byte_size`` in its SQLite file; the agent's training
  metrics travel inside it), plus any separate metrics report (an upload without a metrics
  block whose assignment has metrics: that JSON body re-encoded with httpx's own encoder);
  HTTP headers and TLS framing are not counted;
* memory per client: peak resident set size (``VmHWM`` in ``/proc/<pid>/status``) of every
  agent process, read just before it is stopped;
* test accuracy: the coordinator's evaluation hook on the held-out test split (every model
  version), and the final version downloaded and evaluated again here;
* centralized accuracy: the same model trained by the product's trainer on the pooled
  training data (``fedge.edge_agent.sim.demo_report.centralized_baseline``), for the same number of
  epochs as the federated run and for a long run (the figure Flower's 0.969 corresponds to).

Compression policies (each on a fresh coordinator and fresh agents): ``top1pct-4bit-ef`` (the
headline: top-1% per tensor, 4-bit values, error feedback), and for the trade-off
``top1pct-4bit-ef-global``, ``top10pct-8bit-ef``, ``top0.1pct-4bit-ef`` (full run only) and
``dense`` float32 (reference). Training: 5 local epochs, batch 16, SGD lr 0.1 (the main
configuration of ``bench/compression_accuracy.py``; Flower's local settings are not recorded
here; ``--epochs 2 --lr 0.05``, the demo's earlier settings, is the lighter alternative),
plain FedAvg on the server. Targets: rounds at least 20x faster than Flower, at least 250x
fewer upload bytes per client per round, at most a quarter of its memory per client, test
accuracy at least 0.903.

    python bench/flower_setting.py            # full run
    python bench/flower_setting.py --quick    # make bench
    python bench/flower_setting.py --plot-only
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fleet_bench import (
    RESULTS_DIR,
    code_state,
    collect,
    configure_logging,
    db_rows,
    machine_info,
    now_iso,
    parse_time,
    seconds_between,
    start_coordinator,
    summary_stats,
    wait_for_task,
    write_json,
)

from fedge.coordinator.blobstore import BlobStore
from fedge.edge_agent.admin_client import AdminClient
from fedge.edge_agent.device import enroll_device
from fedge.edge_agent.sim.datasets import load_dataset
from fedge.edge_agent.sim.demo_report import centralized_baseline
from fedge.edge_agent.sim.partition import dirichlet_partition
from fedge.shared import architectures
from fedge.shared.wire import decode_model, decode_update

NAME = "flower_setting"
CLIENTS = 10
ROUNDS = 10
FLOWER = {
    "seconds_per_round": 22.0,
    "upload_bytes_per_client_per_round": 62_000,
    "memory_mib_per_client": 390.0,
    "test_accuracy": 0.903,
    "centralized_accuracy": 0.969,
    "model_bytes": 38_000,
}
TARGETS = {
    "round_speedup": 20.0,  # fedge rounds at least 20x faster
    "upload_reduction": 250.0,  # at least 250x fewer bytes per client per round
    "memory_fraction": 0.25,  # at most a quarter of Flower's memory per client
    "accuracy": 0.903,  # no lower than Flower's
}
MODEL = {"architecture": "mlp", "input_dim": 64, "num_classes": 10, "hidden": [128]}
TRAINING = {"epochs": 5, "batch_size": 16, "lr": 0.1}
POLICIES: dict[str, dict[str, Any]] = {
    "top1pct-4bit-ef": {
        "topk_fraction": 0.01,
        "bits": 4,
        "chunk": 256,
        "error_feedback": True,
        "scope": "tensor",
    },
    "top10pct-8bit-ef": {
        "topk_fraction": 0.1,
        "bits": 8,
        "chunk": 256,
        "error_feedback": True,
        "scope": "tensor",
    },
    "top1pct-4bit-ef-global": {
        "topk_fraction": 0.01,
        "bits": 4,
        "chunk": 256,
        "error_feedback": True,
        "scope": "global",
    },
    "top0.1pct-4bit-ef": {
        "topk_fraction": 0.001,
        "bits": 4,
        "chunk": 256,
        "error_feedback": True,
        "scope": "global",
    },
    "dense": {"topk_fraction": 1.0, "bits": 32, "chunk": 256, "error_feedback": False},
}
HEADLINE = "top1pct-4bit-ef"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced run for make bench")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON")
    p.add_argument("--policies", nargs="*", choices=list(POLICIES), help="policies to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help=f"local epochs ({TRAINING['epochs']})")
    p.add_argument("--lr", type=float, help=f"learning rate ({TRAINING['lr']})")
    p.add_argument("--batch-size", type=int, help=f"batch size ({TRAINING['batch_size']})")
    p.add_argument("--output", type=Path, help="results JSON path")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def _agent_command(state_dir: Path, data: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedge.shared.cli",
        "agent",
        "-q",
        "run",
        "--state-dir",
        str(state_dir),
        "--data",
        str(data),
        "--poll-wait",
        "30",
        "--eval-fraction",
        "0",
    ]


def _proc_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS of a live process in kB (``/proc/<pid>/status``)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


def _metrics_body_bytes(coordinator: Any, task_id: int) -> list[int]:
    """Bytes of the separate metrics reports (``POST .../metrics``), one entry per upload.

    The agent puts its metrics in the update's metrics block (counted in the update's own
    size) and then sends no report; an upload without that block whose assignment has
    metrics was followed by a report, sized here as httpx encodes it."""
    blobs = BlobStore(coordinator.data_dir / "blobs")
    rows = db_rows(
        coordinator,
        "SELECT a.metrics, u.blob_digest FROM assignments a JOIN updates u "
        "ON u.assignment_id = a.id WHERE a.task_id = ?",
        (task_id,),
    )
    sizes = []
    for raw, digest in rows:
        metrics = json.loads(raw) if raw else {}
        if not metrics or decode_update(blobs.get(digest)).metrics:
            sizes.append(0)
        else:
            sizes.append(len(httpx.Request("POST", "https://x/", json=metrics).content))
    return sizes


def run_policy(
    policy_name: str,
    *,
    seed: int,
    work: Path,
    dataset: Any,
    shards: list[Any],
    training: dict[str, Any],
) -> dict[str, Any]:
    """One federated run with one compression policy on a fresh coordinator."""
    model = {**MODEL, "seed": seed}
    body = {
        "name": f"flower-setting-{policy_name}",
        "model": model,
        "aggregation": {
            "mode": "sync",
            "strategy": "fedavg",
            "num_rounds": ROUNDS,
            "clients_per_round": CLIENTS,
            "over_selection": 0.0,
            "min_updates": CLIENTS,
            "round_deadline_s": 300.0,
            "lease_s": 300.0,
        },
        "compression": POLICIES[policy_name],
        "training": training,
    }
    root = work / policy_name
    coordinator = start_coordinator(root, (dataset.X_test, dataset.y_test))
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    memory: list[dict[str, int]] = []
    try:
        with AdminClient(
            coordinator.url, coordinator.admin_key, ca_file=coordinator.ca_file
        ) as admin:
            task = admin.create_task(body)
            token = admin.create_enrollment_token(
                label="flower setting", max_uses=CLIENTS, expires_in_s=3600
            )["token"]
            seeds = np.random.SeedSequence([seed, 11]).generate_state(CLIENTS)
            for i, (X, y) in enumerate(shards):
                state_dir = root / f"agent-{i:02d}"
                enroll_device(
                    state_dir,
                    url=coordinator.url,
                    token=token,
                    ca_file=coordinator.ca_file,
                    name=f"client-{i:02d}",
                    seed=int(seeds[i]),
                )
                data = root / f"shard-{i:02d}.npz"
                np.savez(data, X=X, y=y)
                log = open(root / f"agent-{i:02d}.log", "wb")  # noqa: SIM115
                logs.append(log)
                procs.append(
                    subprocess.Popen(
                        _agent_command(state_dir, data), stdout=log, stderr=subprocess.STDOUT
                    )
                )
            admin.start_task(task["id"])
            final, timed_out = wait_for_task(admin, task["id"], budget_s=240.0)
            memory = [_proc_status(p.pid) for p in procs]
            record = collect(admin, coordinator, task["id"])
            last = max(int(p["version"]) for p in record["curve"])
            spec = architectures.build_spec(model)
            weights = decode_model(admin.download_model(task["id"], last), spec=spec)
            local_eval = architectures.evaluate(model, weights, dataset.X_test, dataset.y_test)
            metrics_sizes = _metrics_body_bytes(coordinator, task["id"])
            closing = db_rows(
                coordinator,
                "SELECT r.closed_at, MAX(u.received_at) FROM rounds r "
                "JOIN updates u ON u.round_id = r.id "
                "WHERE r.task_id = ? AND r.status = 'closed' GROUP BY r.id",
                (task["id"],),
            )
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for log in logs:
            log.close()
        coordinator.stop()
    rounds = [r for r in record["rounds"] if r["status"] == "closed"]
    durations = []
    for r in rounds:
        opened, closed = parse_time(r["opened_at"]), parse_time(r["closed_at"])
        if opened is not None and closed is not None:
            durations.append(closed - opened)
    started = parse_time(record["task"]["started_at"])
    finished = parse_time(record["task"]["finished_at"])
    sizes = record["updates"]["byte_sizes"]
    hwm_mib = [m["VmHWM"] / 1024 for m in memory if "VmHWM" in m]
    per_round_updates = statistics.fmean(sizes) if sizes else None
    per_round_metrics = statistics.fmean(metrics_sizes) if metrics_sizes else 0.0
    return {
        "policy": policy_name,
        "compression": POLICIES[policy_name],
        "status": final["status"],
        "status_reason": final.get("status_reason"),
        "timed_out": timed_out,
        "rounds_closed": len(rounds),
        "rounds_failed": record["rounds_failed"],
        "round_seconds": durations,
        "seconds_per_round": statistics.fmean(durations) if durations else None,
        "task_seconds_per_round": (finished - started) / len(rounds)
        if started and finished and rounds
        else None,
        "updates_received": record["updates"]["received"],
        "update_body_bytes": {
            "mean": per_round_updates,
            "min": min(sizes) if sizes else None,
            "max": max(sizes) if sizes else None,
            "total": sum(sizes),
        },
        "metrics_body_bytes_mean": per_round_metrics,
        "upload_bytes_per_client_per_round": (per_round_updates or 0.0) + per_round_metrics,
        "dense_update_bytes": 4 * architectures.build_spec(model).num_params,
        "agent_memory_kib": memory,
        "agent_peak_rss_mib": {
            "mean": statistics.fmean(hwm_mib) if hwm_mib else None,
            "max": max(hwm_mib) if hwm_mib else None,
            "min": min(hwm_mib) if hwm_mib else None,
        },
        "round_time_breakdown": {
            **record["timeline"],
            "last_upload_to_round_closed_s": summary_stats(
                [seconds_between(last_upload, closed) for closed, last_upload in closing]
            ),
        },
        "curve": record["curve"],
        "final_accuracy_hook": next(
            (p["accuracy"] for p in reversed(record["curve"]) if p["accuracy"] is not None),
            None,
        ),
        "final_accuracy_local_eval": local_eval["accuracy"],
        "final_version": last,
    }


def _targets(run: dict[str, Any]) -> dict[str, Any]:
    spr = run["seconds_per_round"]
    up = run["upload_bytes_per_client_per_round"]
    mem = run["agent_peak_rss_mib"]["max"]
    acc = run["final_accuracy_local_eval"]
    speed = FLOWER["seconds_per_round"] / spr if spr else None
    reduction = FLOWER["upload_bytes_per_client_per_round"] / up if up else None
    fraction = mem / FLOWER["memory_mib_per_client"] if mem else None
    return {
        "round_speedup": {
            "value": speed,
            "target": TARGETS["round_speedup"],
            "met": bool(speed and speed >= TARGETS["round_speedup"]),
        },
        "upload_reduction": {
            "value": reduction,
            "target": TARGETS["upload_reduction"],
            "met": bool(reduction and reduction >= TARGETS["upload_reduction"]),
        },
        "upload_reduction_update_body_only": {
            "value": FLOWER["upload_bytes_per_client_per_round"] / run["update_body_bytes"]["mean"]
            if run["update_body_bytes"]["mean"]
            else None,
            "note": "information only: without the metrics report body",
        },
        "memory_fraction_of_flower": {
            "value": fraction,
            "target_at_most": TARGETS["memory_fraction"],
            "met": bool(fraction is not None and fraction <= TARGETS["memory_fraction"]),
        },
        "accuracy": {
            "value": acc,
            "target_at_least": TARGETS["accuracy"],
            "met": bool(acc is not None and acc >= TARGETS["accuracy"]),
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 4, figsize=(15, 4))
    labels = ["Flower 1.42", *[r["policy"] for r in runs]]
    colors = ["C7", *[f"C{i}" for i in range(len(runs))]]
    panels = [
        ("seconds per round", FLOWER["seconds_per_round"], "seconds_per_round", True),
        (
            "upload bytes per client per round",
            FLOWER["upload_bytes_per_client_per_round"],
            "upload_bytes_per_client_per_round",
            True,
        ),
        ("peak memory per client (MiB)", FLOWER["memory_mib_per_client"], None, False),
        ("test accuracy", FLOWER["test_accuracy"], "final_accuracy_local_eval", False),
    ]
    for ax, (title, flower, key, log) in zip(axes, panels, strict=True):
        if key is None:
            values = [flower, *[r["agent_peak_rss_mib"]["max"] or 0.0 for r in runs]]
        else:
            values = [flower, *[r[key] or 0.0 for r in runs]]
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)), labels, rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        for i, v in enumerate(values):
            ax.annotate(
                f"{v:.3g}",
                (i, v),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    axes[3].set_ylim(0, 1.05)
    central = result["centralized"]["same_epochs_accuracy"]
    axes[3].axhline(central, color="grey", ls=":", lw=1, label=f"centralized {central:.3f}")
    axes[3].legend(fontsize=7, loc="lower right")
    fig.suptitle("fedge vs Flower 1.42: digits, Dirichlet 0.5, 10 clients, MLP, FedAvg, 10 rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(result: dict[str, Any]) -> None:
    print("\nfedge in Flower's setting (10 clients, 10 rounds)")
    print(
        f"{'run':<18} {'s/round':>8} {'upload B':>9} {'peak MiB':>9} {'accuracy':>9} "
        f"{'speedup':>8} {'reduct.':>8} {'mem frac':>8}"
    )
    f = FLOWER
    print(
        f"{'Flower 1.42':<18} {f['seconds_per_round']:>8.2f} "
        f"{f['upload_bytes_per_client_per_round']:>9.0f} {f['memory_mib_per_client']:>9.0f} "
        f"{f['test_accuracy']:>9.3f}"
    )
    for r in result["runs"]:
        t = r["targets"]
        print(
            f"{r['policy']:<18} {r['seconds_per_round']:>8.3f} "
            f"{r['upload_bytes_per_client_per_round']:>9.0f} "
            f"{r['agent_peak_rss_mib']['max']:>9.1f} {r['final_accuracy_local_eval']:>9.3f} "
            f"{t['round_speedup']['value']:>7.1f}x {t['upload_reduction']['value']:>7.1f}x "
            f"{t['memory_fraction_of_flower']['value']:>8.3f}"
        )
    c = result["centralized"]
    print(
        f"centralized (same model, product trainer): {c['same_epochs_accuracy']:.3f} after "
        f"{c['same_epochs']} epochs, {c['long_accuracy']:.3f} after {c['long_epochs']} epochs"
    )
    for name, t in result["summary"]["targets_headline"].items():
        if "met" in t:
            print(f"target {name}: {'met' if t['met'] else 'NOT met'} ({t['value']})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.output or RESULTS_DIR / (f"{NAME}.quick.json" if args.quick else f"{NAME}.json")
    png = RESULTS_DIR / (f"{NAME}.quick.png" if args.quick else f"{NAME}.png")
    if args.output:
        png = out.with_suffix(".png")
    if args.plot_only:
        stored = json.loads(out.read_text())
        plot(stored, png)
        print_summary(stored)
        return 0
    configure_logging(args.verbose)
    training = dict(TRAINING)
    for key, value in (("epochs", args.epochs), ("lr", args.lr), ("batch_size", args.batch_size)):
        if value is not None:
            training[key] = value
    policies = args.policies or (["top1pct-4bit-ef", "dense"] if args.quick else list(POLICIES))
    started = time.monotonic()
    rng = np.random.default_rng(args.seed)
    dataset = load_dataset("digits", test_fraction=0.2, rng=rng)
    parts = dirichlet_partition(dataset.y_train, CLIENTS, 0.5, rng)
    shards = [(dataset.X_train[p], dataset.y_train[p]) for p in parts]
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedge-flower-") as tmp:
        for name in policies:
            print(f"[{time.monotonic() - started:6.1f}s] {name} ...", file=sys.stderr)
            run = run_policy(
                name,
                seed=args.seed,
                work=Path(tmp),
                dataset=dataset,
                shards=shards,
                training=training,
            )
            run["targets"] = _targets(run)
            runs.append(run)
    model = {**MODEL, "seed": args.seed}
    epochs = ROUNDS * int(training["epochs"])
    long_rounds = ROUNDS * (3 if args.quick else 5)
    central = centralized_baseline(
        model,
        training,
        X_train=dataset.X_train,
        y_train=dataset.y_train,
        X_test=dataset.X_test,
        y_test=dataset.y_test,
        rounds=long_rounds,
        seed=args.seed,
    )
    same = central[ROUNDS]["accuracy"]
    result: dict[str, Any] = {
        "benchmark": NAME,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "timestamp": now_iso(),
        "machine": machine_info(),
        "code": code_state(),
        "runtime_s": time.monotonic() - started,
        "parameters": {
            "quick": args.quick,
            "seed": args.seed,
            "dataset": (
                "digits (sklearn), 20% stratified test split (fedge.edge_agent.sim.datasets)"
            ),
            "partition": "Dirichlet alpha=0.5 over 10 clients",
            "shard_sizes": [len(p) for p in parts],
            "model": MODEL,
            "training": training,
            "rounds": ROUNDS,
            "clients_per_round": CLIENTS,
            "agents": (
                "10 separate `python -m fedge.shared.cli agent run` processes, --eval-fraction 0"
            ),
            "policies": {n: POLICIES[n] for n in policies},
            "flower": FLOWER,
            "targets": TARGETS,
        },
        "centralized": {
            "same_epochs": epochs,
            "same_epochs_accuracy": same,
            "long_epochs": (len(central) - 1) * int(training["epochs"]),
            "long_accuracy": central[-1]["accuracy"],
            "history": central,
        },
        "runs": runs,
    }
    headline = next((r for r in runs if r["policy"] == HEADLINE), runs[0])
    result["summary"] = {
        "headline_policy": headline["policy"],
        "seconds_per_round": headline["seconds_per_round"],
        "upload_bytes_per_client_per_round": headline["upload_bytes_per_client_per_round"],
        "agent_peak_rss_mib_max": headline["agent_peak_rss_mib"]["max"],
        "test_accuracy": headline["final_accuracy_local_eval"],
        "centralized_accuracy_same_epochs": same,
        "targets_headline": headline["targets"],
        "targets_per_policy": {r["policy"]: r["targets"] for r in runs},
        "all_targets_met_by": [
            r["policy"] for r in runs if all(t.get("met", True) for t in r["targets"].values())
        ],
    }
    write_json(out, result)
    plot(result, png)
    print_summary(result)
    print(f"\nresults: {out}\nplot:    {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
