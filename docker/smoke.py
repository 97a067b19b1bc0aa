"""A short federated task against a running coordinator, driven from outside it.

Used by ``make docker-test`` against the container, and usable against any deployment. Through
the admin REST API it creates an enrollment token and a small task (softmax on scikit-learn's
bundled digits); a simulated fleet (:mod:`fedge.edge_agent.sim.fleet`: real agents, each with its
own Ed25519 key, state directory and data shard, over HTTPS with the pinned CA) enrolls and trains
until the task completes. Then it checks what an operator would: the task completed, every
round closed with updates from the devices, one model version per round, and the final model
classifies held-out digits better than the initial one.

    FEDGE_SMOKE_ADMIN_KEY=fk_... python docker/smoke.py --url https://HOST:8443 --ca ca.crt

The admin key comes from the environment so that it does not show in the process list.
Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedge.edge_agent.admin_client import AdminClient
from fedge.edge_agent.sim.datasets import load_dataset
from fedge.edge_agent.sim.fleet import Fleet
from fedge.edge_agent.sim.partition import iid_partition
from fedge.shared import architectures, wire

TERMINAL = ("completed", "cancelled", "failed")


class SmokeFailure(AssertionError):
    """A check on the deployment failed."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def wait_until(
    probe: Callable[[], Any], done: Callable[[Any], bool], *, timeout_s: float, every_s: float
) -> Any:
    """Call ``probe`` until ``done`` accepts its answer; the last answer after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if done(value) or time.monotonic() >= deadline:
            return value
        time.sleep(every_s)


def task_body(*, input_dim: int, num_classes: int, devices: int, rounds: int, seed: int) -> dict:
    return {
        "name": "deployment smoke test",
        "description": "softmax on digits; created by docker/smoke.py",
        "model": {
            "architecture": "softmax",
            "input_dim": input_dim,
            "num_classes": num_classes,
            "seed": seed,
        },
        "aggregation": {
            "mode": "sync",
            "num_rounds": rounds,
            "clients_per_round": devices,
            "over_selection": 0,
            "min_updates": max(1, devices - 1),
            "round_deadline_s": 60,
        },
        "compression": {"topk_fraction": 0.25, "bits": 8, "error_feedback": True},
        "training": {"epochs": 2, "batch_size": 32, "lr": 0.1},
    }


def accuracy(admin: AdminClient, task: dict, version: int | str, X: Any, y: Any) -> float:
    weights = wire.decode_model(admin.download_model(task["id"], version))
    return architectures.evaluate(task["model"], weights, X, y)["accuracy"]


def run(args: argparse.Namespace, admin_key: str) -> None:
    rng = np.random.default_rng(args.seed)
    data = load_dataset("digits", test_fraction=0.2, rng=rng)
    parts = iid_partition(data.y_train.size, args.devices, rng)
    shards = [(data.X_train[p], data.y_train[p]) for p in parts]
    started = time.monotonic()

    with AdminClient(args.url, admin_key, ca_file=args.ca) as admin:
        check(admin.health() == {"status": "ok"}, "/healthz did not answer ok")
        token = admin.create_enrollment_token(
            label="smoke test", max_uses=args.devices, expires_in_s=900
        )
        body = task_body(
            input_dim=data.input_dim,
            num_classes=data.num_classes,
            devices=args.devices,
            rounds=args.rounds,
            seed=args.seed,
        )
        task = admin.create_task(body)
        task_id = task["id"]
        print(f"task {task_id} created; enrolling {args.devices} devices", flush=True)

        with tempfile.TemporaryDirectory(prefix="fedge-smoke-") as root:
            fleet = Fleet(url=args.url, ca_file=args.ca, root=root, shards=shards, seed=args.seed)
            with fleet:
                device_ids = fleet.enroll(token["token"])
                fleet.start()
                admin.start_task(task_id)
                task = wait_until(
                    lambda: admin.get_task(task_id),
                    lambda t: t["status"] in TERMINAL,
                    timeout_s=args.timeout,
                    every_s=0.5,
                )
            stats = fleet.stats()

        check(
            task["status"] == "completed",
            f"task {task_id} is {task['status']} after {time.monotonic() - started:.0f} s",
        )
        check(not stats.errors, f"devices failed: {stats.errors}")
        enrolled = {d["device_id"] for d in admin.iterate("/devices", status="active")}
        check(set(device_ids) <= enrolled, "enrolled devices are missing from /devices")

        rounds = list(admin.iterate(f"/tasks/{task_id}/rounds"))
        closed = [r for r in rounds if r["status"] == "closed"]
        check(len(closed) >= args.rounds, f"{len(closed)} closed rounds, want {args.rounds}")
        min_updates = body["aggregation"]["min_updates"]
        for r in closed:
            check(
                r["num_received"] >= min_updates,
                f"round {r['number']} closed with {r['num_received']} updates (< {min_updates})",
            )
        versions = sorted(m["version"] for m in admin.iterate(f"/tasks/{task_id}/models"))
        check(
            versions == list(range(args.rounds + 1)),
            f"model versions {versions}, want 0..{args.rounds}",
        )
        check(stats.uploads >= args.rounds, f"only {stats.uploads} uploads reached the server")

        before = accuracy(admin, task, 0, data.X_test, data.y_test)
        after = accuracy(admin, task, "latest", data.X_test, data.y_test)
        check(after > before, f"held-out accuracy did not improve: {before:.3f} -> {after:.3f}")

    for r in closed:
        eval_accuracy = (r.get("metrics") or {}).get("eval_accuracy")
        reported = f", devices' eval accuracy {eval_accuracy:.3f}" if eval_accuracy else ""
        print(
            f"  round {r['number']}: {r['status']}, {r['num_received']}/{r['num_assigned']} "
            f"updates, {r['num_dropped']} dropped{reported}"
        )
    print(
        f"smoke test passed in {time.monotonic() - started:.1f} s: {len(closed)} rounds, "
        f"{stats.uploads} uploads ({stats.upload_bytes} bytes), {stats.downloads} model "
        f"downloads ({stats.model_bytes} bytes), held-out accuracy {before:.3f} -> {after:.3f}"
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="coordinator base URL")
    parser.add_argument("--ca", help="CA certificate to pin (HTTPS with a private CA)")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=240, help="seconds for the task")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.rounds < 1:
        parser.error("--devices and --rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    admin_key = os.environ.get("FEDGE_SMOKE_ADMIN_KEY", "")
    if not admin_key:
        print("smoke: set FEDGE_SMOKE_ADMIN_KEY to an admin API key", file=sys.stderr)
        return 2
    try:
        run(args, admin_key)
    except SmokeFailure as exc:
        print(f"smoke test FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
