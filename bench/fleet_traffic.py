"""Socket bytes to reach 0.90 test accuracy: 100 devices, 20 per round, dense FedAvg against
fedge's compression both ways (issue 12).

Setting: digits (scikit-learn, 20 % stratified test split), Dirichlet alpha=0.5 label skew over
100 devices, MLP 64-128-10 (9,610 parameters), sync FedAvg (server lr 1, no server momentum),
20 devices per round (``over_selection`` 0, no dropouts, no stragglers), the same local
training (5 epochs, batch 16, SGD lr 0.1) and the same number of rounds for every arm, three
seeds (the seed fixes the test split, the partition, the initial
model, the device seeds and so all training and quantization randomness; the devices sampled per
round are the coordinator's choice).

What runs: the real coordinator (a child process: HTTPS on loopback with its private CA, a
SQLite file, a blob store) evaluating every model version on the test split through its
evaluation hook (``bench/_fleet_bench_eval.py``), and 100 real agents in this process
(:class:`fedge.edge_agent.sim.fleet.Fleet`: own Ed25519 key, state directory, HTTPS client and
shard each; long-poll wait 30 s, the agent's default; no local evaluation hold-out). Every
device talks to the coordinator through :class:`fedge.edge_agent.sim.relay.CountingRelay`, which
counts the bytes crossing its sockets both ways: TLS handshakes and records, HTTP headers,
signed-request headers, idle devices' polls, model downloads and uploads. TCP/IP headers are
not counted. The admin API (task creation, progress) goes to the coordinator directly.

Attribution: a sampler thread reads the relay's cumulative counts every 20 ms with a wall-clock
timestamp. The bytes "at" model version v are those of the first sample taken at or after the
version's ``created_at`` (the coordinator's clock, the same host), counted from the moment the
task is started (enrollment, which happens once per device, is reported separately). "To
reach 0.90" is the first version whose test accuracy is at least 0.90; the bytes of the 20 ms
before the sample (the bracket) are reported with it. Per device: all relayed bytes divided by
the 100 devices, idle ones included.

Envelope: every agent's HTTP client sends through a counting transport
(``bench/_fleet_traffic_net.py``) that classifies each request (work poll, model download,
cancel watch, upload, ...) and counts its HTTP/1.1 bytes each way (request line, headers, body;
status line, headers, body); relay bytes minus HTTP bytes are TLS records and handshakes
(``tls_and_framing``). A one-request probe on a fresh connection measures one handshake.

Arms (``ARMS``): ``dense`` (float32 both ways: update top-k 1.0 / 32 bits without error
feedback, full model downloads) and ``fedge`` (the Flower-setting headline policy: top-5 % +
4-bit updates with momentum-corrected error feedback (0.5) and 2 warm-up versions, and
compressed download deltas when the coordinator offers them: ``compression.download``, top-10 %
+ 8-bit); ``fedge-top1`` (top-1 % + 4-bit with plain error feedback, the arm of earlier runs)
and ``middle`` (top-10 % + 8-bit both ways) run when asked for (``--arms``). A
task body the coordinator refuses because of ``download`` is retried without it, and the run
says so (``download_compression``).

    python bench/fleet_traffic.py              # full: dense and fedge, 3 seeds, 50 rounds
    python bench/fleet_traffic.py --quick      # make bench: dense and fedge, 1 seed, 12 rounds
    python bench/fleet_traffic.py --plot-only  # redraw the PNG from the JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
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
    machine_info,
    now_iso,
    parse_time,
    start_coordinator,
    wait_for_task,
    write_json,
)
from _fleet_traffic_net import (
    CountingTransport,
    RequestLedger,
    Sample,
    Sampler,
    Snapshot,
    TrafficFleet,
    diff,
)

from fedge.edge_agent.admin_client import AdminClient
from fedge.edge_agent.errors import ApiError
from fedge.edge_agent.sim.datasets import load_dataset
from fedge.edge_agent.sim.partition import dirichlet_partition, label_skew
from fedge.edge_agent.sim.relay import CountingRelay
from fedge.edge_agent.transport import verify_setting
from fedge.shared import architectures

NAME = "fleet_traffic"
DEVICES = 100
PER_ROUND = 20
ALPHA = 0.5
TARGET = 0.90
POLL_WAIT_S = 30.0
SAMPLE_INTERVAL_S = 0.02
MODEL = {"architecture": "mlp", "input_dim": 64, "num_classes": 10, "hidden": [128]}
TRAINING = {"epochs": 5, "batch_size": 16, "lr": 0.1}
AGGREGATION = {"strategy": "fedavg", "server_lr": 1.0}
DENSE_UP = {"topk_fraction": 1.0, "bits": 32, "chunk": 256, "error_feedback": False}
ARMS: dict[str, dict[str, Any]] = {
    "dense": {"compression": DENSE_UP, "download": None},
    # the policy of the Flower-setting headline: top-5 % 4-bit uploads with momentum-corrected
    # error feedback and 2 warm-up versions, top-10 % 8-bit download deltas
    "fedge": {
        "compression": {
            "topk_fraction": 0.05,
            "bits": 4,
            "chunk": 256,
            "error_feedback": True,
            "scope": "tensor",
            "momentum": 0.5,
            "warmup_rounds": 2,
        },
        "download": {"topk_fraction": 0.1, "bits": 8, "chunk": 256, "scope": "tensor"},
    },
    # plain error feedback at top-1 % (the arm of earlier runs)
    "fedge-top1": {
        "compression": {
            "topk_fraction": 0.01,
            "bits": 4,
            "chunk": 256,
            "error_feedback": True,
            "scope": "tensor",
        },
        "download": {"topk_fraction": 0.1, "bits": 8, "chunk": 256, "scope": "tensor"},
    },
    "middle": {
        "compression": {
            "topk_fraction": 0.1,
            "bits": 8,
            "chunk": 256,
            "error_feedback": True,
            "scope": "tensor",
        },
        "download": {"topk_fraction": 0.1, "bits": 8, "chunk": 256, "scope": "tensor"},
    },
}
HEADLINE = "fedge"
KIND_ORDER = (
    "work_poll",
    "work_frame",
    "model_download",
    "model_delta_chain",
    "cancel_watch",
    "upload",
    "metrics_report",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced run for make bench")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON")
    p.add_argument("--arms", nargs="*", choices=list(ARMS), help="arms to run")
    p.add_argument("--seeds", type=int, nargs="*", help="seeds (full: 0 1 2; quick: 0)")
    p.add_argument("--rounds", type=int, help="rounds per run (full: 50; quick: 12)")
    p.add_argument("--epochs", type=int, help=f"local epochs ({TRAINING['epochs']})")
    p.add_argument("--lr", type=float, help=f"learning rate ({TRAINING['lr']})")
    p.add_argument("--server-momentum", type=float, default=0.0, help="FedAvgM momentum (0)")
    p.add_argument("--output", type=Path, help="results JSON path")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- one run


def task_body(
    arm: str,
    *,
    seed: int,
    rounds: int,
    training: dict[str, Any],
    aggregation: dict[str, Any],
    with_download: bool,
) -> dict[str, Any]:
    spec = ARMS[arm]
    compression = dict(spec["compression"])
    if with_download and spec["download"] is not None:
        compression["download"] = dict(spec["download"])
    return {
        "name": f"fleet-traffic-{arm}-{seed}",
        "model": {**MODEL, "seed": seed},
        "aggregation": {
            "mode": "sync",
            **aggregation,
            "num_rounds": rounds,
            "clients_per_round": PER_ROUND,
            "over_selection": 0.0,
            "min_updates": PER_ROUND,
            "round_deadline_s": 600.0,
            "lease_s": 600.0,
        },
        "compression": compression,
        "training": training,
    }


def create_task(
    admin: AdminClient, arm: str, **kwargs: Any
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Create the arm's task; (task, body, download_compression)."""
    wants_download = ARMS[arm]["download"] is not None
    body = task_body(arm, with_download=wants_download, **kwargs)
    if not wants_download:
        return admin.create_task(body), body, "dense (full model downloads)"
    try:
        return admin.create_task(body), body, "compressed deltas requested"
    except ApiError as exc:
        if exc.status is None or exc.status >= 500 or "download" not in str(exc):
            raise
        refusal = str(exc)
    body = task_body(arm, with_download=False, **kwargs)
    return (
        admin.create_task(body),
        body,
        f"NOT SUPPORTED by the commit measured (full model downloads); refusal: {refusal}",
    )


def tls_probe(relay: CountingRelay, url: str, ca_file: str) -> dict[str, Any]:
    """Relay bytes of one request on a fresh TLS connection and of a second request on the same
    connection, against their HTTP bytes: what a handshake and the record framing cost."""
    ledger = RequestLedger()
    transport = CountingTransport(httpx.HTTPTransport(verify=verify_setting(ca_file)), ledger)
    out: dict[str, Any] = {}
    with httpx.Client(base_url=url, transport=transport) as client:
        for label in ("first_request_new_connection", "second_request_same_connection"):
            before, http_before = relay.counts(), ledger.snapshot()
            client.get("/healthz").raise_for_status()
            time.sleep(0.05)  # let the relay count the last record it forwarded
            after, http_after = relay.counts(), ledger.snapshot()
            d = diff(http_after, http_before)
            http_up = sum(k.up for k in d.values())
            http_down = sum(k.down for k in d.values())
            out[label] = {
                "socket_up": after.up - before.up,
                "socket_down": after.down - before.down,
                "http_up": http_up,
                "http_down": http_down,
                "tls_up": after.up - before.up - http_up,
                "tls_down": after.down - before.down - http_down,
                "connections": after.connections - before.connections,
            }
    return out


def run_one(
    arm: str,
    *,
    seed: int,
    rounds: int,
    work: Path,
    training: dict[str, Any],
    aggregation: dict[str, Any],
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    dataset = load_dataset("digits", test_fraction=0.2, rng=rng)
    parts = dirichlet_partition(dataset.y_train, DEVICES, ALPHA, rng)
    shards = [(dataset.X_train[p], dataset.y_train[p]) for p in parts]
    root = work / f"{arm}-{seed}"
    coordinator = start_coordinator(root, (dataset.X_test, dataset.y_test))
    port = int(coordinator.url.rsplit(":", 1)[1])
    relay = CountingRelay("127.0.0.1", port).start()
    ledger = RequestLedger()
    fleet: TrafficFleet | None = None
    sampler: Sampler | None = None
    started_wall = time.monotonic()
    try:
        url = f"https://127.0.0.1:{relay.port}"
        probe = tls_probe(relay, url, coordinator.ca_file)
        with coordinator.admin() as admin:
            task, body, download_mode = create_task(
                admin, arm, seed=seed, rounds=rounds, training=training, aggregation=aggregation
            )
            token = admin.create_enrollment_token(
                label="fleet traffic", max_uses=DEVICES, expires_in_s=3600
            )["token"]
            fleet = TrafficFleet(
                url=url,
                ca_file=coordinator.ca_file,
                root=root / "devices",
                shards=shards,
                seed=seed,
                poll_wait=POLL_WAIT_S,
                eval_fraction=0.0,
                ledger=ledger,
            )
            before_enroll = relay.counts()
            fleet.enroll(token)
            enrolled = relay.counts() - before_enroll
            fleet.start()
            sampler = Sampler(relay, ledger, SAMPLE_INTERVAL_S)
            ledger.start_window()
            first = sampler.sample()
            sampler.start()
            admin.start_task(task["id"])
            budget = 120.0 + 15.0 * rounds
            final, timed_out = wait_for_task(admin, task["id"], budget_s=budget, poll_s=0.5)
            last = sampler.stop()
            record = collect(admin, coordinator, task["id"])
    finally:
        if sampler is not None and not sampler.samples:
            sampler.sample()
        if fleet is not None:
            fleet.signal_stop()
        # Closing the relay ends the agents' open long-polls at once; each agent would log
        # the cut poll as a warning on its way out.
        agent_log = logging.getLogger("fedge.edge_agent.agent")
        level = agent_log.level
        agent_log.setLevel(logging.ERROR)
        try:
            relay.close()
            if fleet is not None:
                fleet.stop(timeout=10)
        finally:
            agent_log.setLevel(level)
        coordinator.stop()
    errors = fleet.stats().errors if fleet is not None else []
    run = analyse(
        arm,
        seed=seed,
        record=record,
        sampler=sampler,
        first=first,
        last=last,
    )
    run.update(
        {
            "task_body": body,
            "download_compression": download_mode,
            "status": final["status"],
            "status_reason": final.get("status_reason"),
            "timed_out": timed_out,
            "rounds_closed": record["rounds_closed"],
            "rounds_failed": record["rounds_failed"],
            "updates": {k: v for k, v in record["updates"].items() if k != "per_device_applied"},
            "enrollment_socket_bytes_per_device": {
                "up": enrolled.up / DEVICES,
                "down": enrolled.down / DEVICES,
                "connections": enrolled.connections,
            },
            "tls_probe": probe,
            "label_skew": label_skew(dataset.y_train, parts),
            "shard_sizes": {
                "min": int(min(len(p) for p in parts)),
                "median": float(np.median([len(p) for p in parts])),
                "max": int(max(len(p) for p in parts)),
            },
            "device_errors": errors,
            "agent_transport": fleet.transport_settings if fleet is not None else {},
            "wall_s": time.monotonic() - started_wall,
        }
    )
    return run


def _bytes(sample: Sample, base: Sample) -> dict[str, float]:
    d = sample.relay - base.relay
    return {"up": d.up, "down": d.down, "total": d.total, "connections": d.connections}


def _per_device(b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] / DEVICES for k in ("up", "down", "total")}


def _requests(snap: Snapshot) -> dict[str, int]:
    return {k: v.requests for k, v in sorted(snap.items())}


def analyse(
    arm: str,
    *,
    seed: int,
    record: dict[str, Any],
    sampler: Sampler | None,
    first: Sample,
    last: Sample,
) -> dict[str, Any]:
    assert sampler is not None
    task_started = parse_time(record["task"]["started_at"])
    assert task_started is not None
    curve = []
    for point in record["curve"]:
        if point["version"] == 0:
            at, before = first, None
        else:
            at, before = sampler.at_or_after(task_started + point["t_s"])
        b = _bytes(at, first)
        bracket = (at.relay - before.relay).total if before is not None else 0
        curve.append(
            {
                **{k: point[k] for k in ("version", "t_s", "accuracy", "loss", "num_updates")},
                "socket_up": b["up"],
                "socket_down": b["down"],
                "connections": b["connections"],
                "bracket_bytes": bracket,
                "requests": _requests(diff(at.ledger, first.ledger)),
            }
        )
    versions = [p for p in curve if p["version"] > 0]
    end_sample = sampler.at_or_after(task_started + versions[-1]["t_s"])[0] if versions else last
    reached = next(
        (p for p in versions if p["accuracy"] is not None and p["accuracy"] >= TARGET), None
    )
    final_acc = next((p["accuracy"] for p in reversed(versions) if p["accuracy"] is not None), None)
    rounds = len(versions)
    whole = _bytes(end_sample, first)
    envelope = envelope_table(diff(end_sample.ledger, first.ledger), whole, rounds)
    return {
        "arm": arm,
        "seed": seed,
        "rounds": rounds,
        "final_accuracy": final_acc,
        "rounds_to_target": reached["version"] if reached else None,
        "to_target": None
        if reached is None
        else {
            "version": reached["version"],
            "accuracy": reached["accuracy"],
            "seconds": reached["t_s"],
            "socket_bytes_per_device": _per_device(
                {
                    "up": reached["socket_up"],
                    "down": reached["socket_down"],
                    "total": reached["socket_up"] + reached["socket_down"],
                }
            ),
            "bracket_bytes_per_device": reached["bracket_bytes"] / DEVICES,
        },
        "whole_run": {
            "seconds": versions[-1]["t_s"] if versions else None,
            "socket_bytes_per_device": _per_device(whole),
            "connections": whole["connections"],
            "per_participant_round": {
                k: whole[k] / max(1, rounds * PER_ROUND) for k in ("up", "down", "total")
            },
        },
        "envelope": envelope,
        "curve": curve,
        "samples": len(sampler.samples),
    }


def envelope_table(snap: Snapshot, socket: dict[str, float], rounds: int) -> dict[str, Any]:
    """Requests and bytes by kind over the run (first sample to the last version)."""
    participants = max(1, rounds * PER_ROUND)
    rows = {}
    kinds = [k for k in KIND_ORDER if k in snap] + sorted(k for k in snap if k not in KIND_ORDER)
    for kind in kinds:
        c = snap[kind]
        rows[kind] = {
            **c.to_dict(),
            "requests_per_round": c.requests / max(1, rounds),
            "http_up_per_request": c.up / max(1, c.requests),
            "http_down_per_request": c.down / max(1, c.requests),
            "http_bytes_per_participant_round": (c.up + c.down) / participants,
        }
    http_up = sum(c.up for c in snap.values())
    http_down = sum(c.down for c in snap.values())
    tls_up, tls_down = socket["up"] - http_up, socket["down"] - http_down
    rows["tls_and_framing"] = {
        "socket_up_minus_http": tls_up,
        "socket_down_minus_http": tls_down,
        "new_connections": socket["connections"],
        "http_bytes_per_participant_round": (tls_up + tls_down) / participants,
    }
    return {
        "by_kind": rows,
        "socket_up": socket["up"],
        "socket_down": socket["down"],
        "http_up": http_up,
        "http_down": http_down,
        "share_of_socket_bytes": {
            kind: (
                row.get("http_up", row.get("socket_up_minus_http", 0))
                + row.get("http_down", row.get("socket_down_minus_http", 0))
            )
            / max(1, socket["total"])
            for kind, row in rows.items()
        },
    }


# ----------------------------------------------------------------------------- summary


def spread(values: list[float | None]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    out: dict[str, Any] = {"values": values, "n": len(vals)}
    if vals:
        out.update(
            mean=statistics.fmean(vals),
            std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
            min=min(vals),
            max=max(vals),
        )
    return out


def summarize_arm(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def to(key: str) -> list[float | None]:
        return [
            r["to_target"]["socket_bytes_per_device"][key] if r["to_target"] else None for r in runs
        ]

    def whole(key: str) -> list[float | None]:
        return [r["whole_run"]["socket_bytes_per_device"][key] for r in runs]

    def ppr(key: str) -> list[float | None]:
        return [r["whole_run"]["per_participant_round"][key] for r in runs]

    kinds = sorted({k for r in runs for k in r["envelope"]["by_kind"]})
    envelope = {}
    for kind in kinds:
        rows = [r["envelope"]["by_kind"].get(kind) for r in runs]
        rows = [x for x in rows if x is not None]
        envelope[kind] = {
            key: statistics.fmean(float(x[key]) for x in rows)
            for key in rows[0]
            if isinstance(rows[0][key], int | float)
        }
    return {
        "seeds": [r["seed"] for r in runs],
        "reached_target": sum(1 for r in runs if r["to_target"]),
        "rounds_to_target": spread([r["rounds_to_target"] for r in runs]),
        "final_accuracy": spread([r["final_accuracy"] for r in runs]),
        "to_target_bytes_per_device": {k: spread(to(k)) for k in ("up", "down", "total")},
        "whole_run_bytes_per_device": {k: spread(whole(k)) for k in ("up", "down", "total")},
        "per_participant_round": {k: spread(ppr(k)) for k in ("up", "down", "total")},
        "envelope_mean_over_seeds": envelope,
        "download_compression": sorted({r["download_compression"] for r in runs}),
    }


def compare(by_arm: dict[str, list[dict[str, Any]]], arm: str) -> dict[str, Any]:
    """Paired (same seed) dense / arm ratios of socket bytes, and accuracy gaps."""
    dense = {r["seed"]: r for r in by_arm.get("dense", [])}
    ratios, whole, gaps = [], [], []
    for r in by_arm[arm]:
        d = dense.get(r["seed"])
        if d is None:
            continue
        if d["to_target"] and r["to_target"]:
            ratios.append(
                d["to_target"]["socket_bytes_per_device"]["total"]
                / r["to_target"]["socket_bytes_per_device"]["total"]
            )
        else:
            ratios.append(None)
        whole.append(
            d["whole_run"]["socket_bytes_per_device"]["total"]
            / r["whole_run"]["socket_bytes_per_device"]["total"]
        )
        if d["final_accuracy"] is not None and r["final_accuracy"] is not None:
            gaps.append(100.0 * (d["final_accuracy"] - r["final_accuracy"]))
    reached = [x for x in ratios if x is not None]
    gap = spread(gaps)
    return {
        "ratio_to_target_per_seed": ratios,
        "ratio_to_target": spread(ratios),
        "ratio_to_target_headline_min": min(reached)
        if reached and len(reached) == len(ratios)
        else None,
        "ratio_whole_run": spread(whole),
        "accuracy_gap_points_per_seed": gaps,
        "accuracy_gap_points": gap,
        "targets": {
            "ratio_at_least_100x": {
                "value": min(reached) if reached and len(reached) == len(ratios) else None,
                "met": bool(reached and len(reached) == len(ratios) and min(reached) >= 100.0),
            },
            "accuracy_within_1pt": {
                "value": gap.get("mean"),
                "met": bool(gap.get("mean") is not None and gap["mean"] <= 1.0),
            },
        },
    }


def fmt_bytes(v: float | None) -> str:
    if v is None:
        return "-"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.0f} B"


def print_summary(result: dict[str, Any]) -> None:
    p = result["parameters"]
    print(
        f"\nfleet traffic: {DEVICES} devices, {PER_ROUND} per round, {p['rounds']} rounds, "
        f"seeds {p['seeds']}; socket bytes per device (relay, both directions, TLS included)"
    )
    print(
        f"{'arm':<8} {'reached':>7} {'rounds→0.90':>12} {'to 0.90 up':>11} {'down':>10} "
        f"{'total':>10} {'whole run':>10} {'final acc':>16}"
    )
    for arm, s in result["summary"]["arms"].items():
        rt = s["rounds_to_target"]
        fa = s["final_accuracy"]
        tt = s["to_target_bytes_per_device"]
        print(
            f"{arm:<8} {s['reached_target']:>5}/{len(s['seeds'])} "
            f"{rt.get('mean', float('nan')):>12.1f} {fmt_bytes(tt['up'].get('mean')):>11} "
            f"{fmt_bytes(tt['down'].get('mean')):>10} {fmt_bytes(tt['total'].get('mean')):>10} "
            f"{fmt_bytes(s['whole_run_bytes_per_device']['total'].get('mean')):>10} "
            f"{fa.get('mean', float('nan')):.3f} ±{fa.get('std', float('nan')):.3f}"
        )
        for kind, row in s["envelope_mean_over_seeds"].items():
            if "requests_per_round" in row:
                print(
                    f"    {kind:<22} {row['requests_per_round']:7.1f} req/round "
                    f"{row['http_up_per_request']:8.0f} B up {row['http_down_per_request']:8.0f} "
                    f"B down per request, {row['new_connections']:.0f} new connections, "
                    f"{row['closed_by_server']:.0f} closed by the server"
                )
            else:
                print(
                    f"    {kind:<22} {row['http_bytes_per_participant_round']:8.0f} B per "
                    f"participant-round, {row['new_connections']:.0f} new connections"
                )
    for arm, c in result["summary"]["comparisons"].items():
        print(
            f"dense/{arm}: socket bytes to 0.90 per seed {c['ratio_to_target_per_seed']}, "
            f"least {c['ratio_to_target_headline_min']}; whole run "
            f"{c['ratio_whole_run'].get('mean')}; accuracy gap "
            f"{c['accuracy_gap_points'].get('mean')} points"
        )


# ----------------------------------------------------------------------------- plot


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "dense": "tab:red",
        "fedge": "tab:blue",
        "middle": "tab:green",
        "fedge-top1": "tab:purple",
    }
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    for run in result["runs"]:
        pts = [p for p in run["curve"] if p["accuracy"] is not None]
        mb = [max(1e-3, (p["socket_up"] + p["socket_down"]) / DEVICES / 1e6) for p in pts]
        acc = [p["accuracy"] for p in pts]
        label = f"{run['arm']} (seed {run['seed']})"
        ax.plot(mb, acc, color=colors.get(run["arm"], "grey"), lw=1.2, alpha=0.8, label=label)
        if run["to_target"]:
            t = run["to_target"]
            ax.plot(
                t["socket_bytes_per_device"]["total"] / 1e6,
                t["accuracy"],
                "o",
                color=colors.get(run["arm"], "grey"),
                ms=4,
            )
    ax.axhline(TARGET, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("cumulative socket MB per device (relay, up + down, TLS included)")
    ax.set_ylabel("test accuracy (coordinator's evaluation hook)")
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    ax.set_title("accuracy vs bytes on the wire", fontsize=10)
    arms = list(result["summary"]["arms"])
    found = {k for a in arms for k in result["summary"]["arms"][a]["envelope_mean_over_seeds"]}
    kinds = [k for k in (*KIND_ORDER, "tls_and_framing") if k in found]
    kinds += sorted(found - set(kinds))
    width = 0.8 / max(1, len(arms))
    for j, arm in enumerate(arms):
        rows = result["summary"]["arms"][arm]["envelope_mean_over_seeds"]
        vals = [rows.get(k, {}).get("http_bytes_per_participant_round", 0.0) for k in kinds]
        xs = np.arange(len(kinds)) + (j - (len(arms) - 1) / 2) * width
        bx.bar(xs, vals, width, color=colors.get(arm, "grey"), label=arm)
    bx.set_xticks(range(len(kinds)), kinds, rotation=25, ha="right", fontsize=8)
    bx.set_yscale("log")
    bx.set_ylabel("bytes per participating device per round (up + down)")
    bx.set_title("by request kind (HTTP bytes; TLS = relay minus HTTP)", fontsize=10)
    bx.legend(fontsize=7)
    p = result["parameters"]
    fig.suptitle(
        f"{DEVICES} devices, {PER_ROUND} per round, digits Dirichlet {ALPHA}, MLP 64-128-10, "
        f"{p['rounds']} rounds, seeds {p['seeds']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.output or RESULTS_DIR / (f"{NAME}.quick.json" if args.quick else f"{NAME}.json")
    png = out.with_suffix(".png")
    if args.plot_only:
        stored = json.loads(out.read_text())
        plot(stored, png)
        print_summary(stored)
        return 0
    configure_logging(args.verbose)
    training = dict(TRAINING)
    if args.epochs is not None:
        training["epochs"] = args.epochs
    if args.lr is not None:
        training["lr"] = args.lr
    aggregation = dict(AGGREGATION)
    if args.server_momentum:
        aggregation["server_momentum"] = args.server_momentum
    arms = args.arms or ["dense", "fedge"]
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    rounds = args.rounds or (12 if args.quick else 50)
    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedge-fleet-traffic-") as tmp:
        for seed in seeds:
            for arm in arms:
                print(
                    f"[{time.monotonic() - started:7.1f}s] {arm} seed {seed} ...", file=sys.stderr
                )
                run = run_one(
                    arm,
                    seed=seed,
                    rounds=rounds,
                    work=Path(tmp),
                    training=training,
                    aggregation=aggregation,
                )
                t = run["to_target"]
                print(
                    f"    {run['status']}, {run['rounds']} versions, final accuracy "
                    f"{run['final_accuracy']}, to {TARGET}: "
                    + (
                        f"v{t['version']}, {fmt_bytes(t['socket_bytes_per_device']['total'])}"
                        " per device"
                        if t
                        else "not reached"
                    )
                    + ", whole run "
                    + fmt_bytes(run["whole_run"]["socket_bytes_per_device"]["total"])
                    + f" per device ({run['wall_s']:.0f} s)",
                    file=sys.stderr,
                )
                runs.append(run)
    by_arm = {a: [r for r in runs if r["arm"] == a] for a in arms}
    spec = architectures.build_spec({**MODEL, "seed": 0})
    result: dict[str, Any] = {
        "benchmark": NAME,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "timestamp": now_iso(),
        "machine": machine_info(),
        "code": code_state(),
        "runtime_s": time.monotonic() - started,
        "parameters": {
            "quick": args.quick,
            "seeds": seeds,
            "rounds": rounds,
            "devices": DEVICES,
            "clients_per_round": PER_ROUND,
            "over_selection": 0.0,
            "faults": "none (no dropouts, no stragglers)",
            "dataset": "digits (sklearn), 20% stratified test split (sim.datasets)",
            "partition": f"Dirichlet alpha={ALPHA} over {DEVICES} devices, min 5 samples",
            "model": MODEL,
            "num_params": spec.num_params,
            "dense_model_bytes": 4 * spec.num_params,
            "training": training,
            "aggregation": aggregation,
            "agent": {
                "poll_wait_s": POLL_WAIT_S,
                "eval_fraction": 0.0,
                "fleet": "in-process fleet.Fleet, one thread, key, state dir, HTTPS client each",
            },
            "arms": {a: ARMS[a] for a in arms},
            "target_accuracy": TARGET,
            "counting": (
                "CountingRelay between every device and the coordinator: application bytes on "
                "its sockets both ways (TLS handshakes and records, HTTP, polls), no TCP/IP "
                "headers; from just before the task starts (after enrollment) to the sample at "
                "or after each version's created_at, sampled every "
                f"{SAMPLE_INTERVAL_S * 1000:.0f} ms; per device = total / {DEVICES}"
            ),
        },
        "runs": runs,
    }
    result["summary"] = {
        "arms": {a: summarize_arm(rs) for a, rs in by_arm.items() if rs},
        "comparisons": {a: compare(by_arm, a) for a in arms if a != "dense" and "dense" in by_arm},
        "headline_arm": HEADLINE,
    }
    write_json(out, result)
    plot(result, png)
    print_summary(result)
    print(f"\nresults: {out}\nplot:    {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
