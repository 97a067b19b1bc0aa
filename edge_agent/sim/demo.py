"""``fedge demo``: the whole platform on loopback with a simulated fleet.

1. start a real coordinator as a child process (HTTPS with its own private CA, SQLite and blob
   store in a temporary directory);
2. split a bundled dataset (digits by default) into non-IID shards (Dirichlet) and a held-out
   test split;
3. through the admin REST API: create the task, an enrollment token, start the task;
4. enroll the fleet (one state directory, identity and HTTPS client per device) and run it
   with dropouts, stragglers and offline spells until the task completes;
5. evaluate every model version on the test split, compare with centralized training, count
   bytes, print a summary and write ``report.json`` and ``report.png``.

Bytes are counted on the socket: every device talks to the coordinator through its own
:class:`~fedge.edge_agent.sim.relay.CountingRelay`, which counts what crosses it in each
direction (TLS, HTTP headers, signed headers, long polls, bodies). The update and model bodies
the agents counted are reported beside it. No second, dense fleet is run: the dense figures
are an estimate, the measured socket bytes with every update and model body replaced by a
dense float32 one (:func:`fedge.edge_agent.sim.demo_report.socket_traffic`).

The coordinator is stopped cleanly at the end and on Ctrl-C. scikit-learn, matplotlib and
tqdm are demo extras, imported lazily.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedge.edge_agent.admin_client import AdminClient
from fedge.edge_agent.client import Traffic
from fedge.edge_agent.errors import AgentError
from fedge.edge_agent.sim.datasets import DATASETS, Dataset, load_dataset
from fedge.edge_agent.sim.demo_report import (
    body_traffic,
    centralized_baseline,
    dense_body_sizes,
    evaluate_versions,
    socket_traffic,
    summary_text,
    write_report,
)
from fedge.edge_agent.sim.faults import FaultConfig
from fedge.edge_agent.sim.fleet import Fleet
from fedge.edge_agent.sim.local_coordinator import (
    CoordinatorStartError,
    LocalCoordinator,
    start_local_coordinator,
)
from fedge.edge_agent.sim.partition import dirichlet_partition, iid_partition, label_skew
from fedge.shared import architectures
from fedge.shared.wire import decode_model

log = logging.getLogger(__name__)

FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
# Coordinator settings for a quick loopback run (the child reads them from its environment).
COORDINATOR_ENV = {
    "FEDGE_LOG_LEVEL": "warning",
    "FEDGE_SCHEDULER_INTERVAL_S": "0.1",
    "FEDGE_LONG_POLL_RECHECK_S": "1.0",
}


@dataclass(frozen=True)
class DemoOptions:
    devices: int = 20
    rounds: int = 20
    mode: str = "sync"
    model: str = "mlp"
    hidden: tuple[int, ...] = (128,)
    dataset: str = "digits"
    alpha: float = 0.5
    iid: bool = False
    topk: float = 0.02
    bits: int = 4
    # models go down as compressed deltas from the previous broadcast model (1.0 and 32: dense)
    download_topk: float = 0.1
    download_bits: int = 8
    dropout: float = 0.2
    stragglers_s: float = 0.2
    offline: float = 0.05
    # 5 local epochs at lr 0.1: bench/compression_accuracy's main configuration (the lighter
    # 2 epochs at 0.05 ended 5 points lower after 20 rounds at the same wall time).
    epochs: int = 5
    batch_size: int = 16
    lr: float = 0.1
    seed: int = 0
    out: Path = Path("fedge-demo-out")
    timeout_s: float = 110.0
    progress: bool = True
    work_dir: Path | None = None
    clients_per_round: int | None = None
    round_deadline_s: float = 5.0
    extra_aggregation: dict[str, Any] = field(default_factory=dict)


def task_body(options: DemoOptions, dataset: Dataset) -> dict[str, Any]:
    """The task the demo creates through the admin API."""
    per_round = options.clients_per_round or max(2, math.ceil(options.devices * 0.4))
    per_round = min(per_round, options.devices)
    hidden = list(options.hidden) if options.model == "mlp" else []
    return {
        "name": f"demo-{options.dataset}",
        "description": "fedge demo: simulated non-IID fleet with dropouts and stragglers",
        "model": {
            "architecture": options.model,
            "input_dim": dataset.input_dim,
            "num_classes": dataset.num_classes,
            "hidden": hidden,
            "seed": options.seed,
        },
        "aggregation": {
            "mode": options.mode,
            "strategy": "fedavg",
            "num_rounds": options.rounds,
            "clients_per_round": per_round,
            "over_selection": 0.5,
            "min_updates": max(1, per_round // 2),
            "round_deadline_s": options.round_deadline_s,
            # async assignments of vanished devices expire after this (sync: the deadline)
            "lease_s": 2 * options.round_deadline_s,
            "max_staleness": 3,
            "staleness": {"function": "polynomial", "a": 0.5},
            "buffer_size": per_round,
            "max_concurrency": options.devices,
            **options.extra_aggregation,
        },
        "compression": {
            "topk_fraction": options.topk,
            "bits": options.bits,
            "chunk": 64,
            "error_feedback": True,
            "scope": "tensor",
            "download": {
                "topk_fraction": options.download_topk,
                "bits": options.download_bits,
                "chunk": 256,
                "scope": "tensor",
            },
        },
        "training": {
            "epochs": options.epochs,
            "batch_size": options.batch_size,
            "lr": options.lr,
        },
    }


def make_shards(
    options: DemoOptions, dataset: Dataset, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    if options.iid:
        parts = iid_partition(dataset.y_train.size, options.devices, rng)
    else:
        parts = dirichlet_partition(dataset.y_train, options.devices, options.alpha, rng)
    log.info("label skew of the shards: %.2f", label_skew(dataset.y_train, parts))
    return [(dataset.X_train[p], dataset.y_train[p]) for p in parts]


class _Progress:
    """A tqdm bar over rounds when asked for (tqdm is a demo extra); on a terminal-less
    stderr (CI logs, pipes) one plain line per finished round instead of redrawn bars."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        self.total = total
        self.plain = enabled and not sys.stderr.isatty()
        if enabled and not self.plain:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="rounds", unit="round", file=sys.stderr)
        self.done = 0

    def update(self, done: int, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(max(0, done - self.done))
            self.bar.set_postfix(postfix, refresh=True)
        elif self.plain and done > self.done:
            extra = " ".join(f"{k}={v}" for k, v in postfix.items())
            print(f"rounds: {done}/{self.total} {extra}".rstrip(), file=sys.stderr, flush=True)
        self.done = max(self.done, done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _wait_for_task(
    admin: AdminClient,
    task_id: int,
    *,
    rounds: int,
    timeout_s: float,
    progress: _Progress,
    fleet_gone: Callable[[], bool],
) -> dict[str, Any]:
    """Poll the task until it finishes or the time budget runs out; the last task record."""
    deadline = time.monotonic() + timeout_s
    task: dict[str, Any] = admin.get_task(task_id)
    while time.monotonic() < deadline:
        try:
            task = admin.get_task(task_id)
        except AgentError as exc:  # a slow answer is not the end of the demo
            log.warning("the coordinator did not answer (%s); asking again", exc)
            continue
        version = max(0, int(task.get("current_version", 0)))
        progress.update(min(version, rounds), status=task["status"])
        if task["status"] in FINAL_STATUSES:
            return task
        if fleet_gone():
            log.warning("every simulated device stopped; ending the demo early")
            break
        time.sleep(0.5)
    log.warning("the task did not finish within %.0f s; cancelling it", timeout_s)
    return dict(admin.cancel_task(task_id))


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run the whole demo; the report (also written to ``options.out``)."""
    started = time.monotonic()
    rng = np.random.default_rng(options.seed)
    dataset = load_dataset(  # nosec B615  # fedge's loader (bundled data), not Hugging Face's
        options.dataset, test_fraction=0.2, rng=rng
    )
    shards = make_shards(options, dataset, rng)
    body = task_body(options, dataset)
    with tempfile.TemporaryDirectory(prefix="fedge-demo-", dir=options.work_dir) as tmp:
        root = Path(tmp)
        print(f"starting a coordinator in {root} ...", file=sys.stderr)
        coordinator = start_local_coordinator(root / "coordinator", env=COORDINATOR_ENV)
        timings = {"startup_s": time.monotonic() - started}
        fleet: Fleet | None = None
        try:
            print(f"coordinator at {coordinator.url} (TLS, private CA)", file=sys.stderr)
            with coordinator.admin() as admin:
                task = admin.create_task(body)
                token = admin.create_enrollment_token(
                    label="demo fleet", max_uses=options.devices, expires_in_s=3600
                )["token"]
                fleet = Fleet(
                    url=coordinator.url,
                    ca_file=coordinator.ca_file,
                    root=root / "devices",
                    shards=shards,
                    seed=options.seed,
                    count_socket=True,
                    faults=FaultConfig(
                        dropout=options.dropout,
                        straggler_scale_s=options.stragglers_s,
                        straggler_cap_s=3.0,
                        offline=options.offline,
                        offline_s=(1.0, 4.0),
                    ),
                )
                fleet.enroll(token)
                fleet.start()
                print(
                    f"enrolled {options.devices} devices; starting task {task['id']}",
                    file=sys.stderr,
                )
                admin.start_task(task["id"])
                timings["enrolled_s"] = time.monotonic() - started
                progress = _Progress(options.rounds, options.progress)
                try:
                    final = _wait_for_task(
                        admin,
                        task["id"],
                        rounds=options.rounds,
                        timeout_s=options.timeout_s,
                        progress=progress,
                        fleet_gone=lambda: len(fleet.stats().errors) >= options.devices,
                    )
                finally:
                    progress.close()
                    fleet.stop()
                timings["trained_s"] = time.monotonic() - started
                report = _collect(options, admin, final, dataset, fleet, body)
                report["timings"] = timings
        except Exception:
            _keep_log(coordinator, options.out)
            raise
        finally:
            if fleet is not None:
                fleet.stop(timeout=5)
            _stop(coordinator)
    report["wall_time_s"] = time.monotonic() - started
    return report


def _keep_log(coordinator: LocalCoordinator, out: Path) -> None:
    """Copy the coordinator's log out of the temporary directory for a failed run."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "coordinator.log").write_text(coordinator.log_text())
    print(f"the coordinator's log is in {out / 'coordinator.log'}", file=sys.stderr)


def _stop(coordinator: LocalCoordinator) -> None:
    code = coordinator.stop()
    if code != 0:
        log.warning(
            "the coordinator exited with status %d:\n%s", code, coordinator.log_text()[-2000:]
        )


def _collect(
    options: DemoOptions,
    admin: AdminClient,
    task: dict[str, Any],
    dataset: Dataset,
    fleet: Fleet,
    body: dict[str, Any],
) -> dict[str, Any]:
    task_id = int(task["id"])
    model = body["model"]
    spec = architectures.build_spec(model)
    versions = []
    for row in admin.iterate(f"/tasks/{task_id}/models"):
        weights = decode_model(admin.download_model(task_id, row["version"]), spec=spec)
        versions.append((int(row["version"]), weights))
    accuracy = evaluate_versions(model, versions, dataset.X_test, dataset.y_test)
    rounds = list(admin.iterate(f"/tasks/{task_id}/rounds"))
    baseline = centralized_baseline(
        model,
        body["training"],
        X_train=dataset.X_train,
        y_train=dataset.y_train,
        X_test=dataset.X_test,
        y_test=dataset.y_test,
        rounds=max(v for v, _ in versions) if versions else 0,
        seed=options.seed,
    )
    stats = fleet.stats()
    clients = [d.client.traffic if d.client is not None else Traffic() for d in fleet.devices]
    dense_update, dense_model = dense_body_sizes(model)
    traffic = {
        "socket": socket_traffic(
            fleet.socket_counts(),
            clients,
            dense_update_bytes=dense_update,
            dense_model_bytes=dense_model,
        ),
        "bodies": body_traffic(
            stats,
            spec.num_params,
            [v for v, _ in versions],
            sum(c.not_modified for c in clients),
            dense_model_bytes=dense_model,
            delta_downloads=sum(c.delta_downloads for c in clients),
        ),
    }
    return {
        "dataset": options.dataset,
        "devices": options.devices,
        "mode": options.mode,
        "alpha": None if options.iid else options.alpha,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "task": {
            "id": task_id,
            "status": task["status"],
            "status_reason": task.get("status_reason"),
        },
        "model": model,
        "num_params": spec.num_params,
        "compression": body["compression"],
        "chance_accuracy": float(np.bincount(dataset.y_test).max() / dataset.y_test.size),
        "accuracy": accuracy,
        "final_accuracy": accuracy[-1]["accuracy"] if accuracy else float("nan"),
        "baseline": baseline,
        "rounds": rounds,
        "traffic": traffic,
        "counts": {
            "rounds_closed": sum(1 for r in rounds if r["status"] == "closed"),
            "rounds_failed": sum(1 for r in rounds if r["status"] == "failed"),
            "dropped": sum(int(r.get("num_dropped", 0)) for r in rounds),
            "stale": sum(int(r.get("num_stale", 0)) for r in rounds),
            "rejected": sum(int(r.get("num_rejected", 0)) for r in rounds),
            "late_uploads": stats.agents.late_uploads,
            "stale_refused": stats.agents.stale_refused,
            "simulated_dropouts": stats.agents.dropped,
            "cancelled_while_training": stats.agents.cancelled,
        },
        "device_errors": stats.errors,
    }


DEMO_EXTRAS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}


def missing_extras() -> list[str]:
    """The demo's optional dependencies that are not installed."""
    return [
        name for module, name in DEMO_EXTRAS.items() if importlib.util.find_spec(module) is None
    ]


def build_parser() -> argparse.ArgumentParser:
    d = DemoOptions()
    p = argparse.ArgumentParser(
        prog="fedge demo",
        description="Run a coordinator and a simulated fleet on loopback and report results.",
    )
    p.add_argument("--devices", type=int, default=d.devices, help=f"fleet size ({d.devices})")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"rounds ({d.rounds})")
    p.add_argument("--mode", choices=("sync", "async"), default=d.mode)
    p.add_argument("--model", choices=("softmax", "mlp"), default=d.model)
    p.add_argument("--hidden", type=int, nargs="*", default=list(d.hidden), help="MLP widths")
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    p.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet non-IID skew")
    p.add_argument("--iid", action="store_true", help="IID shards instead of Dirichlet")
    p.add_argument("--topk", type=float, default=d.topk, help="top-k fraction kept")
    p.add_argument("--bits", type=int, choices=(1, 2, 4, 8, 32), default=d.bits)
    p.add_argument(
        "--download-topk",
        type=float,
        default=d.download_topk,
        help=f"top-k fraction of the model deltas devices download ({d.download_topk}; 1 = dense)",
    )
    p.add_argument(
        "--download-bits",
        type=int,
        choices=(1, 2, 4, 8, 32),
        default=d.download_bits,
        help=f"bits of the model deltas ({d.download_bits}; 32 with top-k 1 = full models)",
    )
    p.add_argument("--dropout", type=float, default=d.dropout, help="per-round dropout prob.")
    p.add_argument(
        "--stragglers", type=float, default=d.stragglers_s, help="straggler delay scale (s)"
    )
    p.add_argument("--offline", type=float, default=d.offline, help="offline-spell prob.")
    p.add_argument("--epochs", type=int, default=d.epochs, help="local epochs per round")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=d.out, help="report directory")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="time budget (s)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    if args.devices < 2:
        raise ValueError("--devices must be at least 2")
    if args.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    return DemoOptions(
        devices=args.devices,
        rounds=args.rounds,
        mode=args.mode,
        model=args.model,
        hidden=tuple(args.hidden),
        dataset=args.dataset,
        alpha=args.alpha,
        iid=args.iid,
        topk=args.topk,
        bits=args.bits,
        download_topk=args.download_topk,
        download_bits=args.download_bits,
        dropout=args.dropout,
        stragglers_s=args.stragglers,
        offline=args.offline,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        out=args.out,
        timeout_s=args.timeout,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedge demo``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    missing = missing_extras()
    if missing:
        print(
            f"fedge demo needs {', '.join(missing)}; install them with: pip install 'fedge[demo]'",
            file=sys.stderr,
        )
        return 3
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(threadName)s %(levelname)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        options = options_from_args(args)
        report = run_demo(options)
    except KeyboardInterrupt:
        print("\ninterrupted; the coordinator was stopped", file=sys.stderr)
        return 130
    except ValueError as exc:
        print(f"fedge demo: error: {exc}", file=sys.stderr)
        return 2
    except (AgentError, CoordinatorStartError) as exc:
        print(f"fedge demo: error: {exc}", file=sys.stderr)
        return 1
    json_path, png_path = write_report(report, options.out)
    print(summary_text(report))
    print(f"\nreport: {json_path}\nplot:   {png_path}")
    return 0 if report["task"]["status"] == "completed" else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
