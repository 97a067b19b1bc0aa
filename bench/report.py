"""The README's Results section, made from the benchmarks' JSON files in bench/results/.

Each benchmark writes its own ``bench/results/<name>.json`` (and a PNG plot); this script reads
them and writes one Markdown section: the machine and the command, then per benchmark a table,
its plot and its targets (met or not, with the measured value). Everything between the two
marker lines in the README is replaced; the text around them (the explanations of missed
targets and the next steps) is written by hand.

    python bench/report.py                    # print the section
    python bench/report.py --readme README.md # replace it in the README
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
START = "<!-- bench-results:start (made by bench/report.py from bench/results/*.json) -->"
END = "<!-- bench-results:end -->"

Row = list[str]


def table(header: Row, rows: Iterable[Row], align: str) -> str:
    """A Markdown table; ``align`` has one letter per column: l(eft) or r(ight)."""
    marks = {"l": "---", "r": "---:"}
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(marks[a] for a in align) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(value: float | None, spec: str = ",.1f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def verdict(met: bool | None) -> str:
    return "–" if met is None else ("**met**" if met else "not met")


def mean_range(d: dict[str, Any] | None, spec: str = ".3f") -> str:
    if not d or d.get("mean") is None:
        return "–"
    if d.get("min") is None or d["min"] == d["max"]:
        return format(d["mean"], spec)
    return f"{d['mean']:{spec}} ({d['min']:{spec}}–{d['max']:{spec}})"


def image(name: str) -> str:
    path = RESULTS / f"{name}.png"
    return f"![{name}](bench/results/{name}.png)" if path.exists() else ""


def section(
    intro: str, header: Row, rows: list[Row], align: str, plot: str | None, targets: list[Row]
) -> str:
    """One benchmark: what it measures, its table, its plot, its targets."""
    parts = [intro, table(header, rows, align)]
    if plot:
        parts.append(image(plot))
    parts.append(table(["target", "measured", "verdict"], targets, "lll"))
    return "\n\n".join(p for p in parts if p)


# ----------------------------------------------------------------------------- benchmarks


def codec(d: dict[str, Any]) -> str:
    keep = {(1.0, 32), (0.1, 4), (0.01, 4), (0.01, 2), (0.001, 4), (0.001, 2)}
    rows = [
        [
            f"{r['params']:,}",
            f"{100 * r['topk_fraction']:g} %",
            str(r["bits"]),
            f"{r['bytes']:,}",
            f"{r['ratio']:,.0f}×",
            fmt(r["encode_mb_s"], ",.0f"),
            fmt(r["decode_mb_s"], ",.0f"),
        ]
        for r in d["results"]
        if (r["topk_fraction"], r["bits"]) in keep
    ]
    targets = [
        [_codec_target(name), f"{t['value']:,.0f} (≥ {t['target']:,.0f})", verdict(t["met"])]
        for name, t in d["targets"].items()
        if "cpu" not in name
    ]
    return section(
        f"Update size and codec speed (`bench/codec.py`; {len(d['results'])} configurations, "
        "best of 3 runs; bytes count every header, descriptor, index and scale byte; MB/s of "
        "dense float32 input).",
        [
            "parameters",
            "top-k",
            "bits",
            "bytes",
            "vs dense f32",
            "encode MB/s",
            "decode MB/s",
        ],
        rows,
        "rrrrrrr",
        "codec",
        targets,
    )


def _codec_target(name: str) -> str:
    """``ratio_top1pct_4bit@1001088`` -> ``size ratio, top-1 % 4-bit, 1,001,088 params``."""
    what, _, where = name.partition("@")
    if what.startswith("ratio_top"):
        k, bits = what[len("ratio_top") :].split("pct_")
        return f"size ratio, top-{k} % {bits[:-3]}-bit, {int(where):,} parameters"
    step = "encode" if "encode" in what else "decode"
    scope = "top-k ≤ 1 %" if where == "topk<=1%" else "all configurations"
    return f"slowest {step} MB/s, {scope}"


def compression_accuracy(d: dict[str, Any]) -> str:
    cfg = d["config"]
    rows = []
    for s in d["settings"]:
        rt = s["rounds_to_target"].get("0.90") or next(iter(s["rounds_to_target"].values()))
        reached = "–" if rt["mean"] is None else f"{rt['mean']:.1f} ({rt['n']}/{len(s['seeds'])})"
        rows.append(
            [
                s["name"],
                mean_range(s["final_accuracy"]),
                fmt(s["loss_points_vs_dense"]["mean"], "+.2f"),
                reached,
                fmt(s["upload_bytes"]["mean"], ",.0f"),
                fmt(s["ratio_vs_dense"]["mean"], ",.1f") + "×",
            ]
        )
    c = d["centralized"]
    rows.append(["centralized", mean_range(c["final_accuracy"]), "", "", "", ""])
    t = d["targets"]
    ratio = t["ratio_250x_within_1pt"]
    best = ratio["highest_ratio_any_setting"]
    within = d["summary"].get("highest_ratio_within_1pt")
    gap = t["federated_within_2pt_of_centralized"]
    targets = [
        [
            "≥ 250× fewer upload bytes, ≤ 1.0 point lost",
            (
                f"best within 1 point: {within['name']} {within['ratio']:,.0f}×; "
                if within
                else "no setting within 1 point; "
            )
            + f"highest ratio: {best['name']} {best['ratio']:,.0f}× "
            f"at {best['loss_points']:+.1f} pts",
            verdict(ratio["met"]),
        ],
        [
            "federated within 2 points of centralized",
            f"dense FedAvg {gap['gap_points']:.1f} points below",
            verdict(gap["met"]),
        ],
    ]
    return section(
        f"Accuracy per uploaded byte (`bench/compression_accuracy.py`): {cfg['devices']} "
        f"devices, Dirichlet α = {cfg['alpha']} on digits, {cfg['model']} "
        f"({cfg['num_params']:,} parameters), {cfg['rounds']} sync rounds of "
        f"{cfg['per_round']} devices, {cfg['repetitions']} seeds (mean and min–max). "
        "Loss is in accuracy points against dense FedAvg of the same seed.",
        [
            "setting",
            "final accuracy",
            "points lost",
            "rounds to 0.90",
            "upload bytes",
            "ratio",
        ],
        rows,
        "lrrrrr",
        "compression_accuracy",
        targets,
    )


def async_vs_sync(d: dict[str, Any]) -> str:
    s = d["summary"]
    speed = s["speedup_sync_over_async"]
    rows = []
    for name, v in s["per_variant"].items():
        sp = speed.get(name, {})
        per_seed = sp.get("per_repetition") or {}
        ratio = "1.0×"
        if name != "sync":
            ratio = fmt(sp.get("ratio_of_means"), ".2f") + "×"
            if per_seed.get("mean") is not None:
                ratio += f" ({per_seed['min']:.2f}–{per_seed['max']:.2f})"
        rows.append(
            [
                name,
                str(v.get("devices_in_flight") or "–"),
                f"{v['reached_target']}/{v['runs']}",
                mean_range(v["time_to_target_s"], ".1f"),
                ratio,
                mean_range(v.get("round_time_mean_s"), ".2f"),
                mean_range(v.get("round_time_p90_s"), ".2f"),
                mean_range(v["final_accuracy"]),
                f"{v['updates_applied_stale']}/{v['updates_applied_fresh']}",
            ]
        )
    p = d["parameters"]
    agg = p["variants"]["sync"]["aggregation"]
    worst = s.get("headline_speedup_min_over_seeds")
    targets = [
        [
            f"async ≥ {s['speedup_target']}× faster to {s['target_accuracy']} accuracy, "
            "same devices in flight",
            f"{s['headline_variant']} (decided before the run): {fmt(worst, '.2f')}× on its "
            f"least favourable seed, {fmt(s['headline_speedup_ratio_of_means'], '.2f')}× ratio "
            f"of means (FedBuff reports {s['fedbuff_reported']}×)",
            verdict(s["target_met"]),
        ]
    ]
    return section(
        f"Async (FedBuff) vs sync under faults (`bench/async_vs_sync.py`): real coordinator "
        f"and {p['devices']} agents over HTTPS, {int(100 * p['faults']['dropout'])} % dropout, "
        f"log-normal straggler delays (median {p['faults']['median_s']} s, p99 "
        f"{p['faults']['p99_s']:.1f} s), {p['repetitions']} seeds (mean and min–max). "
        f"Both sides have {p['devices_in_flight']} devices in flight: sync picks "
        f"C = {agg['clients_per_round']} × (1 + {agg['over_selection']}) per round (the "
        f"over-selection covers the dropout), async caps its concurrency at the same number. "
        f"Time to {s['target_accuracy']} test accuracy as the coordinator recorded it; speed-up "
        "is the ratio of mean times (per-seed range in brackets); round time is the time "
        "between consecutive model versions on both sides (per-run mean and p90).",
        [
            "variant",
            "in flight",
            "reached",
            "time to target s",
            "speed-up",
            "round time mean s",
            "round time p90 s",
            "final accuracy",
            "stale/fresh applied",
        ],
        rows,
        "lrrrrrrrr",
        "async_vs_sync",
        targets,
    )


def _ingest_label(b: dict[str, Any]) -> str:
    """The row label: the backend, and its worker process count when above 1."""
    workers = int(b.get("workers", 1))
    return b["backend"] if workers == 1 else f"{b['backend']} ×{workers} workers"


def _ingest_key(b: dict[str, Any]) -> str:
    """The entry's key in the summary (as bench/ingest.py writes it)."""
    workers = int(b.get("workers", 1))
    return b["backend"] if workers == 1 else f"{b['backend']}_workers{workers}"


def upload_path(d: dict[str, Any]) -> str:
    first = d["results"][0]
    return (
        "Upload path (`bench/upload_path.py`): the coordinator's own functions for one "
        "accepted update, in the order `accept_upload_ready` calls them, in one thread on a "
        f"fresh database and blob store per repeat ({first['uploads_per_repeat']} staged and "
        f"as many whole uploads after a warm-up, {first['repeats']} repeats, median (range); "
        f"bodies of {first['body_bytes']} bytes, every one distinct, each with a request "
        "claim); thread CPU time, so an fsync's kernel work counts and waiting for the disk "
        "does not. The two ways of storing the body run interleaved in one run "
        "(`inline_update_max_bytes` 0 and the default).\n\n" + d["table"]
    )


LADDER_KINDS = {
    "healthz": "`GET /healthz` (unsigned: HTTP, TLS, middleware)",
    "work_again": "signed work request, answered with the assignment it has",
    "work_none": "signed work request, nothing to give (204)",
    "work_assign": "signed work request that assigns",
    "upload_next_none": "upload (`next=1`), no next assignment",
    "upload_next_found": "upload (`next=1`) answered with the next assignment",
}


def _reference_note(backends: list[dict[str, Any]]) -> str:
    refs = [
        f"{b['ladder']['reference_ms']:.1f} ms ({_ingest_label(b)})"
        for b in backends
        if "reference_ms" in b.get("ladder", {})
    ]
    if not refs:
        return ""
    return (
        " A fixed piece of interpreter work took " + " and ".join(refs) + " right after each "
        "ladder: the shared machine runs the same code up to twice as slow from one hour to "
        "the next, so compare runs by it."
    )


def _ladder_cell(kind: dict[str, Any]) -> str:
    cell = fmt(kind.get("cpu_ms_per_request"), ".2f")
    loop = kind.get("event_loop_cpu_ms_per_request")
    return cell if loop is None else f"{cell} ({loop:.2f})"


def ingest_open_loop(d: dict[str, Any]) -> str:
    """The ladder (one request at a time) and the open loop (fixed offered rates) of
    ``bench/ingest.py --rates``, with the same run's closed loop for comparison."""
    backends = [b for b in d["backends"] if "ladder" in b or "paced" in b]
    names = [_ingest_label(b) for b in backends]
    ladder_rows = [
        [text]
        + [  # ms of CPU, and the event loop's part of it
            _ladder_cell(b.get("ladder", {}).get("kinds", {}).get(kind, {})) for b in backends
        ]
        for kind, text in LADDER_KINDS.items()
    ]
    rates = sorted({r["offered_updates_per_s"] for b in backends for r in b["paced"]["runs"]})
    loop_rows = []
    for rate in rates:
        row = [fmt(rate, ",.0f")]
        for b in backends:
            got = [r for r in b["paced"]["runs"] if r["offered_updates_per_s"] == rate]
            share = [r["coordinator_cpu_share"] for r in got]
            per = [r["coordinator_cpu_ms_per_update"] for r in got if r["accepted_uploads"]]
            row.append(
                f"{min(r['updates_per_s'] for r in got):,.1f}; {min(share):.3f}–{max(share):.3f}"
                + (f"; {min(per):.2f}–{max(per):.2f}" if per else "")
            )
        loop_rows.append(row)
    fits = []
    for b in backends:
        fit = b["paced"]["fit"]
        closed = max(b["runs"], key=lambda r: r["concurrency"])
        fits.append(
            [
                _ingest_label(b),
                f"{fit['marginal_cpu_ms_per_update']:.2f} ± "
                f"{fit['marginal_cpu_ms_per_update_stderr']:.2f}",
                f"{fit['cpu_share_at_rest']:.3f}",
                f"{closed['coordinator_cpu_ms_per_update']:.2f} at "
                f"{closed['updates_per_s']:,.0f}/s (C = {closed['concurrency']})",
            ]
        )
    c = backends[0]["paced"]["concurrency"]
    repeats = d["params"].get("rate_repeats", 1)
    return "\n\n".join(
        [
            "Below saturation (`bench/ingest.py --quick --rates ...`, "
            f"C = {c}, the same coordinator start as a closed-loop run): first **one request "
            "at a time** (nothing contends), the coordinator's CPU per request of each kind "
            "(its threads' exact CPU time, with the CPU it spends at rest taken off; in "
            "brackets the event loop's thread: HTTP, TLS, middleware, signature checks), on "
            "two async tasks that never aggregate." + _reference_note(backends),
            table(
                ["request", *[f"{n}, ms CPU" for n in names]], ladder_rows, "l" + "r" * len(names)
            ),
            "Then an **open loop**: for each offered rate a fresh async task, the devices "
            "long-polling and uploading on a fixed schedule of that many updates/s in all "
            f"({repeats} passes, ascending then descending); per backend: accepted updates/s; "
            "the coordinator's share of a core (range over the passes); ms of CPU per accepted "
            "update (range):",
            table(["offered updates/s", *names], loop_rows, "r" + "l" * len(names)),
            image("ingest_open_loop"),
            "The straight line through (accepted updates/s, share of a core) over every "
            "point: its slope is the CPU of one more accepted update (± its standard error), "
            "its intercept the share at rest; beside them the closed loop of the same run "
            "(every device uploads again as soon as it can: saturated):",
            table(
                [
                    "backend",
                    "ms CPU per accepted update (slope)",
                    "share at rest",
                    "closed loop, ms CPU per update",
                ],
                fits,
                "lrrl",
            ),
        ]
    )


def ingest(d: dict[str, Any]) -> str:
    rows = []
    for b in d["backends"]:
        for r, u in zip(b["runs"], b["upload_only"], strict=False):
            rows.append(
                [
                    _ingest_label(b),
                    str(r["concurrency"]),
                    fmt(r["updates_per_s"], ",.0f"),
                    fmt(r["upload_p50_ms"], ",.1f"),
                    fmt(r["upload_p99_ms"], ",.1f"),
                    fmt(r["coordinator_cpu_ms_per_update"], ".2f"),
                    fmt(u["coordinator_cpu_ms_per_upload_request"], ".2f"),
                ]
            )
    for r in d.get("ceiling", []):
        rows.append(
            [
                "ceiling: bare verify",
                str(r["concurrency"]),
                fmt(r["requests_per_s"], ",.0f") + " req/s",
                fmt(r["p50_ms"], ",.1f"),
                fmt(r["p99_ms"], ",.1f"),
                fmt(r.get("server_cpu_ms_per_request"), ".2f"),
                "",
            ]
        )
    s = d["summary"]
    tg = d["targets"]
    targets = []
    for b in d["backends"]:
        name = _ingest_label(b)
        v = s[_ingest_key(b)]
        targets += [
            [
                f"{name}: ≥ {tg['updates_per_s_at_500']:,} updates/s at 500 devices",
                f"{fmt(v['updates_per_s'], ',.0f')} at C = {v['at_concurrency']}",
                verdict(v["target_updates_per_s_met"]),
            ],
            [
                f"{name}: p99 < {tg['p99_ms_at_500']} ms at 500 devices",
                f"{fmt(v['upload_p99_ms'], ',.0f')} ms",
                verdict(v["target_p99_met"]),
            ],
            [
                f"{name}: ≤ {tg['cpu_ms_per_update']} ms coordinator CPU per update",
                f"{fmt(v['coordinator_cpu_ms_per_update'], '.2f')} ms "
                f"(upload request alone {fmt(v['coordinator_cpu_ms_per_upload_request'], '.2f')})",
                verdict(v["target_cpu_met"]),
            ],
        ]
        lp = v.get("longpoll")
        if lp:
            targets += [
                [
                    f"{name}: {lp['devices']:,} idle devices woken within "
                    f"{tg['longpoll_wake_s_1000']} s",
                    f"all within {fmt(lp['wake_all_within_s'], '.2f')} s",
                    verdict(lp["target_wake_met"]),
                ],
                [
                    f"{name}: idle load < {tg['idle_requests_per_device_per_25s']} request per "
                    "device per 25 s",
                    fmt(lp["idle_requests_per_device_per_25s"], ".2f"),
                    verdict(lp["target_idle_met"]),
                ],
            ]
    for w in s.get("workers_scaling", []):
        targets.append(
            [
                f"{w['backend']}: updates/s with {w['workers']} worker processes ÷ with 1, "
                f"C = {w['concurrency']} (same run)",
                f"{fmt(w['updates_per_s_ratio'], '.2f')}× "
                f"({fmt(w['updates_per_s_1_worker'], ',.0f')} → "
                f"{fmt(w['updates_per_s'], ',.0f')} updates/s; coordinator CPU "
                f"{fmt(w['coordinator_cpu_ms_per_update_1_worker'], '.2f')} → "
                f"{fmt(w['coordinator_cpu_ms_per_update'], '.2f')} ms/update)",
                verdict(None),
            ]
        )
    p = d["params"]
    return section(
        f"Ingest (`bench/ingest.py`): the coordinator in its own process (uvicorn, HTTPS"
        f"{_workers_note(d)}), "
        f"{p['procs']} load-generator processes ({p.get('longpoll_procs', p['procs'])} "
        "for the long-poll test) driving C enrolled devices that each take "
        f"work and upload a signed top-1 % 4-bit update of a {p['num_params']:,}-parameter "
        f"model{_body_note(d)}. The 2 cores are shared by "
        "coordinator and load generators, so updates/s and latency are lower bounds; "
        "coordinator CPU per update is the figure that does not depend on that.",
        [
            "backend",
            "C",
            "updates/s",
            "p50 ms",
            "p99 ms",
            "coordinator CPU ms/update",
            "upload request alone ms",
        ],
        rows,
        "lrrrrrr",
        "ingest",
        targets,
    )


def _workers_note(d: dict[str, Any]) -> str:
    counts = sorted({int(b.get("workers", 1)) for b in d["backends"]})
    if counts == [1]:
        return ""
    return (
        "; on PostgreSQL also with "
        + ", ".join(str(c) for c in counts if c > 1)
        + " worker processes on one socket (`serve --workers`), each its own start on a fresh "
        "database in the same run, its CPU that of the supervisor and its workers together"
    )


def _body_note(d: dict[str, Any]) -> str:
    runs = [r for b in d["backends"] for r in b["runs"] if "distinct_update_blobs" in r]
    if not runs:
        return (
            " (this run's bodies repeated within a model version, so the content-addressed blob "
            "store skipped the write and fsync of every repeat: the figures flatter the upload "
            "path until the benchmark, which now sends distinct bodies, is re-run)"
        )
    blobs = sum(r["distinct_update_blobs"] for r in runs)
    accepted = sum(r["uploads_accepted_total"] for r in runs)
    return (
        ", every body distinct (a fresh quantization draw each), so the content-addressed blob "
        f"store writes and fsyncs each one ({blobs:,} new update blobs for {accepted:,} "
        "accepted uploads)"
    )


def _aggregate_row(r: dict[str, Any], label: str) -> Row:
    return [
        label,
        f"{r['updates']:,}",
        fmt(r["seconds"]["total"], ".2f"),
        fmt(r["seconds"]["aggregate"], ".2f"),
        fmt(r["memory"]["peak_rss_delta_bytes"] / 1e6, ".1f"),
        fmt(r["memory"]["tracemalloc_peak_bytes"] / 1e6, ".1f"),
        fmt(r["updates_per_s"], ",.0f"),
    ]


def aggregate(d: dict[str, Any]) -> str:
    rows = [_aggregate_row(r, r["policy"]) for r in d["results"]]
    rows += [_aggregate_row(r, f"{r['policy']} (PostgreSQL)") for r in d.get("postgresql", [])]
    s = d["summary"]
    targets = [
        [
            f"{name}: peak memory flat (≤ {s['flat_factor_target']:g}×) from {v['smallest']:,} "
            f"to {v['largest']:,} updates",
            f"RSS ×{v['peak_rss_ratio_largest_vs_smallest']:.2f}, tracemalloc "
            f"×{v['tracemalloc_ratio_largest_vs_smallest']:.2f}",
            verdict(v["memory_flat_target_met"]),
        ]
        for name, v in s["policies"].items()
    ]
    p = d["parameters"]
    return section(
        f"Aggregation (`bench/aggregate.py`): one round's aggregation of a "
        f"{p['num_params']:,}-parameter model through the engine (plan, streaming decode "
        "into one dense buffer, commit), each in a fresh process; peak RSS growth and the "
        "tracemalloc peak of the compute step.",
        [
            "policy",
            "updates",
            "total s",
            "decode+sum s",
            "peak RSS growth MB",
            "tracemalloc peak MB",
            "updates/s",
        ],
        rows,
        "lrrrrrr",
        "aggregate",
        targets,
    )


def _flower_rows(key: str, cfg: dict[str, Any], flwr: str) -> list[Row]:
    rows: list[Row] = []
    fl = cfg.get("flower")
    if fl:
        rows.append(
            [
                key,
                f"Flower {flwr} (×{fl['repeats']})",
                mean_range(fl["bytes_per_client_to_final_accuracy"], ",.0f"),
                mean_range(fl["rounds_to_final_accuracy"], ".0f"),
                mean_range(fl["up_bytes_per_client_per_round"], ",.0f"),
                mean_range(fl["down_bytes_per_client_per_round"], ",.0f"),
                mean_range(fl["seconds_per_round"], ".1f"),
                mean_range(fl["final_accuracy"], ".4f"),
                "1",
            ]
        )
    else:
        reason = cfg.get("flower_not_run") or "not run"
        rows.append([key, f"Flower {flwr}", f"not run: {reason}", "", "", "", "", "", ""])
    for name, s in cfg["fedge"].items():
        if not s.get("supported"):
            rows.append([key, f"fedge {name}", "not supported by the measured commit"] + [""] * 6)
            continue
        ratio = s.get("ratio_vs_flower") or {}
        rows.append(
            [
                key,
                f"fedge {name} ({s['reached_target']} seeds reach)",
                mean_range(s["bytes_per_client_to_target"], ",.0f"),
                mean_range(s["rounds_to_target"], ".1f"),
                mean_range(s["up_bytes_per_client_per_round"], ",.0f"),
                mean_range(s["down_bytes_per_client_per_round"], ",.0f"),
                mean_range(s["seconds_per_round"], ".2f"),
                mean_range(s["final_accuracy"], ".4f"),
                "–"
                if ratio.get("worst") is None
                else f"{ratio['worst']:,.1f}× ({ratio['mean']:,.1f}× on means)",
            ]
        )
    return rows


def flower_setting(d: dict[str, Any]) -> str:
    p = d["parameters"]
    rows: list[Row] = []
    flwr = ((p.get("flower") or {}).get("versions") or {}).get("flwr", "")
    for key, cfg in d["configurations"].items():
        rows += _flower_rows(key, cfg, flwr)
    h = d["summary"]["headline"]
    if h.get("policy"):
        net = h.get("ratio_worst_net_of_idle")
        measured = (
            f"{h['ratio']:,.1f}× ({h['policy']}, {h['configuration']}: fedge's worst seed "
            f"against Flower's smallest repeat, {h['ratio_worst']:,.1f}× with Flower's bytes as "
            "counted"
            + ("" if net is None else f", {net:,.1f}× net of its idle polling")
            + f"; {h['ratio_mean']:,.1f}× on means)"
        )
        targets = [
            [
                "Flower ÷ fedge socket bytes per client to Flower's final accuracy ≥ 20×",
                measured,
                verdict(h["met"]),
            ],
            ["goal beyond: ≥ 50×", measured, verdict(h["goal_met"])],
        ]
    else:
        targets = [
            [
                "Flower ÷ fedge socket bytes per client to Flower's final accuracy ≥ 20×",
                h.get("note", "–"),
                verdict(None),
            ],
        ]
    flower = p.get("flower") or {}
    versions = flower.get("versions") or {}
    flower_line = (
        f"Flower {versions.get('flwr', '?')} (numpy {versions.get('numpy', '?')}, "
        f"scikit-learn {versions.get('scikit-learn', '?')}) ran in the same run, "
        f"{p['flower_repeats']}× per configuration"
        if flower
        else f"Flower did not run ({p.get('flower_not_run')})"
    )
    commit = (d.get("code") or {}).get("commit", "?")[:10]
    intro = (
        "Flower and fedge run in the same benchmark run (`bench/flower_setting.py`, commit "
        f"`{commit}`) on the same shards, test split and initial weights (the team's Flower "
        "harness: digits, stratified 80/20 split, Dirichlet α = 0.5 over 10 clients, MLP "
        "64-128-10 from Flower's init, batch 16, lr 0.1, every client every round, FedAvg). "
        f"{flower_line}; fedge over seeds {', '.join(str(s) for s in p['seeds'])}, up to "
        f"{p['max_rounds']} rounds, 10 separate `fedge agent run` processes. Bytes are counted "
        "on the socket in both directions by a relay on each side (Flower's countproxy, fedge's "
        "CountingRelay: TLS, headers, polls and bodies), per client, up to the first round whose "
        "test accuracy reaches Flower's final one. Settings that differ: "
        + "; ".join(p["differences"])
        + ". Ranges are min–max over seeds (fedge) or repeats (Flower)."
    )
    return section(
        intro,
        [
            "local epochs",
            "system",
            "B per client to Flower's final accuracy",
            "rounds",
            "up B per client per round",
            "down B per client per round",
            "s per round",
            "final accuracy",
            "Flower ÷ fedge",
        ],
        rows,
        "llrrrrrrr",
        "flower_setting",
        targets,
    )


def dp_accuracy(d: dict[str, Any]) -> str:
    s, p = d["summary"], d["parameters"]
    rows = []
    for arm, v in s.items():
        eps = v["epsilon_spent"]
        rows.append(
            [
                "no DP" if arm == "no_dp" else f"ε = {arm.removeprefix('eps_')}",
                fmt(v.get("noise_multiplier"), ".3f"),
                mean_range(eps, ".2f") if eps.get("mean") is not None else "–",
                mean_range(v["final_accuracy"]),
                mean_range(v["best_accuracy"]),
                "/".join(str(n) for n in v["versions"]),
            ]
        )
    reference = s["no_dp"]["final_accuracy"]["mean"]
    at8 = s.get("eps_8", {}).get("final_accuracy", {}).get("mean")
    gap = None if reference is None or at8 is None else reference - at8
    targets = [
        [
            "every DP run ends within its ε budget",
            ", ".join(
                f"{a}: max {fmt(v['epsilon_spent'].get('max'), '.3f')}"
                for a, v in s.items()
                if a != "no_dp"
            ),
            verdict(
                all(
                    (v["epsilon_spent"].get("max") or 0.0) <= float(a.removeprefix("eps_")) + 1e-9
                    for a, v in s.items()
                    if a != "no_dp"
                )
            ),
        ],
        ["accuracy cost of ε = 8 (no target set)", f"{fmt(gap, '.3f')} below no DP", "–"],
    ]
    return section(
        f"Accuracy vs privacy budget (`bench/dp_accuracy.py`): central DP-FedAvg on the "
        f"{p['devices']}-device digits fleet ({p['model']}, Dirichlet α = {p['alpha']}, "
        f"{p['per_round']} devices per round, q = {p['sampling_rate']}, {p['rounds']} planned "
        f"rounds, clip norm {p['clip_norm']}, δ = {p['delta']:g}), {len(p['seeds'])} seeds "
        "(mean and min–max). The noise multiplier of each ε is the accountant's for the "
        "planned rounds; ε spent is what the task view reported at the end.",
        ["arm", "noise multiplier", "ε spent", "final accuracy", "best accuracy", "versions"],
        rows,
        "lrrrrl",
        "dp_accuracy",
        targets,
    )


def byzantine(d: dict[str, Any]) -> str:
    s = d["summary"]
    p = d["parameters"]
    rows = []
    for arm in p["arms"]:
        v = s.get(arm)
        if v is None:
            continue
        gap = v["minus_clean_points"]
        rows.append(
            [
                arm,
                mean_range(v["final_accuracy"]),
                "–" if arm == "clean" else mean_range(gap, "+.1f"),
                mean_range(v.get("last10_mean_accuracy")),
                mean_range(v.get("lowest_accuracy_after_version_10")),
                str(v["byzantine_updates_clipped"]),
                str(v["honest_updates_clipped"]),
            ]
        )
    targets = []
    names = {
        "headline": p["defence"]["name"],
        "headline_krum": (p.get("krum_defence") or {}).get("name", "krum"),
    }
    for key, label in (("headline", "+defence"), ("headline_krum", "+krum")):
        label = f"{label} (`{names[key]}`)"
        h = s.get(key)
        if not h or h.get("worst_defended_arm") is None:
            continue
        present = h.get("attacks_present", [])
        targets.append(
            [
                f"{label} arms ({', '.join(present)}): final accuracy within 2 points of the "
                "clean run",
                f"worst: {h['worst_defended_arm']} "
                f"{fmt(h['worst_defended_minus_clean_points'], '+.1f')} points (least "
                "favourable seed)"
                + (
                    f", worst mean {fmt(h['worst_mean_minus_clean_points'], '+.1f')}"
                    if h.get("worst_mean_minus_clean_points") is not None
                    else ""
                )
                + (
                    "; seeds compared: "
                    + ", ".join(f"{a} {n}" for a, n in h["seeds_compared"].items())
                    if h.get("seeds_compared")
                    else ""
                ),
                verdict(h["met"]),
            ]
        )
    defence = p["defence"]
    krum = p.get("krum_defence")
    krum_text = (
        f" `+krum` arms: `{krum['name']}`: `{json.dumps(krum['aggregation'])}`."
        if krum and any(a.endswith("+krum") for a in p["arms"])
        else ""
    )
    seeds_of = {arm: sorted({r["seed"] for r in d["runs"] if r["arm"] == arm}) for arm in p["arms"]}
    same = s.get("same_cohorts_in_every_arm") or {}
    reproducible = (
        f" Every run of a seed used the same cohorts (`selection_seed`, training seeded by "
        f"device and version; cohorts identical in every arm: "
        f"{'all ' + str(len(same)) + ' seeds' if all(same.values()) else 'not for every seed'}), "
        f"so an arm differs from the clean run of its seed by the attack and the defence "
        f"alone (commit `{d['code']['commit'][:10]}`, "
        f"{d['timestamp'][:16]} UTC, {p.get('jobs', 1)} runs at once, load average "
        f"{d['machine']['load_average_1_5_15min'][0]:.0f} at the end)."
        if same
        else ""
    )
    partial = [f"{a} ({len(v)})" for a, v in seeds_of.items() if len(v) != len(p["seeds"])]
    partial_text = f" Arms with fewer seeds (seeds run): {', '.join(partial)}." if partial else ""
    if d.get("cut_short"):
        partial_text += (
            f" The run was stopped before it finished (the time it had); "
            f"{len(d['cut_short']['missing'])} (arm, seed) pairs were not run."
        )
    return section(
        f"Byzantine devices (`bench/byzantine.py`): {p['devices']} agents over HTTPS, "
        f"{p['byzantine_devices']} of them validly enrolled attackers, {p['clients_per_round']} "
        f"per round, digits, {p['rounds']} rounds, {len(p['seeds'])} seeds (mean and min–max). "
        f"Attacks: {'; '.join(f'{k}: {v}' for k, v in p['attacks'].items())}. `+defence` arms: "
        f"`{defence['name']}`: `{json.dumps(defence['aggregation'])}`.{krum_text}"
        f"{partial_text}{reproducible}{_byzantine_provenance(d, bool(same))} "
        "([docs/robustness.md](docs/robustness.md)).",
        [
            "arm",
            "final accuracy",
            "vs clean (points)",
            "last 10 versions mean",
            "lowest after version 10",
            "Byzantine clipped",
            "honest clipped",
        ],
        rows,
        "lrrrrrr",
        "byzantine",
        targets,
    ) + _byzantine_per_seed(d)


def _byzantine_per_seed(d: dict[str, Any]) -> str:
    """Each arm's final accuracy minus the clean run's of the same seed, per seed."""
    seeds = d["parameters"]["seeds"]
    by = {(r["arm"], r["seed"]): r["final_accuracy"] for r in d["runs"]}
    rows = []
    for arm in d["parameters"]["arms"]:
        if arm == "clean":
            continue
        gaps = [
            None
            if by.get((arm, seed)) is None or by.get(("clean", seed)) is None
            else 100.0 * (by[(arm, seed)] - by[("clean", seed)])
            for seed in seeds
        ]
        known = [g for g in gaps if g is not None]
        rows.append(
            [
                arm,
                *(fmt(g, "+.1f") for g in gaps),
                fmt(sum(known) / len(known) if known else None, "+.1f"),
                fmt(min(known) if known else None, "+.1f"),
            ]
        )
    clean = ["clean (final accuracy)", *(fmt(by.get(("clean", seed)), ".3f") for seed in seeds)]
    return "\n\nPer seed, points against the clean run of the same seed:\n\n" + table(
        ["arm", *(f"seed {seed}" for seed in seeds), "mean", "worst"],
        [[*clean, "", ""], *rows],
        "l" + "r" * (len(seeds) + 2),
    )


def _byzantine_provenance(d: dict[str, Any], reproducible: bool = False) -> str:
    """Which run of the script each arm comes from, when the results merge several runs."""
    chain: list[dict[str, Any]] = [d]
    while chain[-1].get("merged_from"):
        chain.extend(chain[-1]["merged_from"])
    if len(chain) == 1:
        return ""
    parts = []
    for run in chain:
        words = run["command"].split()
        arms = words[words.index("--arms") + 1 :] if "--arms" in words else []
        arms = arms[: next((j for j, w in enumerate(arms) if w.startswith("--")), len(arms))]
        what = ", ".join(arms) if arms else "the other arms"
        load = run.get("load_average_1_5_15min") or run.get("machine", {}).get(
            "load_average_1_5_15min"
        )
        parts.append(
            f"{what}: commit `{run['code']['commit'][:10]}`, {run['timestamp'][:16]} UTC"
            + (f", load average {load[0]:.0f}" if load else "")
        )
    return (
        " The arms come from "
        + str(len(chain))
        + " runs of the script, merged (`merged_from` in the JSON; an arm run later replaces "
        "the earlier runs of its seeds): "
        + "; ".join(parts)
        + (
            ". The runs are reproducible, so arms of different runs of one commit compare as "
            "arms of one run would."
            if reproducible
            else ". A run is not reproducible (device ids, so the cohorts and each device's "
            "random streams, differ between runs), so arms of different runs differ by that "
            "noise too."
        )
    )


def secagg(d: dict[str, Any]) -> str:
    s = d["summary"]
    p = d["settings"]
    plain = d["plain_upload_bytes"]
    diff = s["final_accuracy_minus_plain_randk_points"]
    rows = [
        [
            f"`{arm}`",
            mean_range(v),
            ", ".join(f"{x:+.1f}" for x in diff.get(arm, [])) or "–",
        ]
        for arm, v in s["final_accuracy"].items()
    ]
    worst = max(abs(x) for x in diff["randk-grid-ef+secagg"])
    checked = sum(r.get("rounds_checked_exact", 0) for r in d["accuracy_runs"])
    cost_rows = []
    for key, cells in s["cost"].items():
        plan, drop = key.removeprefix("plan").split("-drop")
        for n in sorted(cells, key=int):
            c = cells[n]
            if not c["runs"]:
                cost_rows.append([plan, drop, n, *["–"] * 6, f"{c['failed']}"])
                continue
            cost_rows.append(
                [
                    plan,
                    drop,
                    n,
                    f"{c['degree']} / {c['threshold']}",
                    f"{c['bytes_per_device_mean'] / 1e3:,.1f}",
                    f"{c['bytes_per_device_mean'] / plain['topk-8b']:,.1f}×",
                    mean_range(c["coordinator_cpu_s"]),
                    mean_range(c["plain_coordinator_cpu_s"]),
                    mean_range(c["device_cpu_s_mean"]),
                    f"{c['failed']}",
                ]
            )
    intro = (
        f"Secure aggregation (`bench/secagg.py`, **in one process**: every protocol message "
        f"encoded, relayed and decoded, but no HTTPS, database or round engine; "
        f"[docs/secure-aggregation.md](docs/secure-aggregation.md)). Accuracy: the "
        f"{p['devices']}-device digits fleet, {p['per_round']} per round, {p['rounds']} rounds, "
        f"{len(p['seeds'])} seeds, {p['dropped_after_sharing_per_round']} devices per round "
        f"dropping after sharing; shared support k = {p['k']} of {p['num_params']:,} "
        f"({100 * p['fraction']:g} %), {p['grid_bits']}-bit grid, bound {p['grid_bound']}, "
        "error feedback; `randk` is the seeded random-k support, `agg-topk`, `agg75-rand25`, "
        "`agg50-rand50` the support from the previous aggregate (100 %, 75 %, 50 % of k from "
        "its largest coordinates, the rest seeded random-k), `ema-agg50-rand50` half from an "
        "exponential average (decay 0.5) of the last 8 aggregates' magnitudes; the top-k and "
        "dense arms are fedge's regular uploads (equal weights). The support changes no byte "
        "count (every masked upload is 4 k bytes either way). Final accuracy (mean and "
        "min–max) and the difference to random-k summed in the clear, per seed:"
    )
    accuracy = table(["arm", "final accuracy", "vs randk-grid-ef (points)"], rows, "lrr")
    cost_intro = (
        f"Cost per round against the cohort size n (same model and k): bytes every device "
        f"sends and receives in the four phases (mean over the devices that stayed), as a "
        f"multiple of a plain top-k 10 % 8-bit upload ({plain['topk-8b']:,} bytes; dense "
        f"float32: {plain['dense-f32']:,}), and the coordinator's CPU per round against "
        f"decoding and accumulating n plain top-k uploads, and the devices' mean CPU; "
        f"{p.get('repetitions', 3)} repetitions (mean and min–max). "
        f"Graph planned for a drop-out of 1/3 or 0.1 (`plan_degree`), with that share of the "
        f"cohort dropping after sharing or none."
    )
    cost = table(
        [
            "planned drop-out",
            "dropped",
            "n",
            "d / t",
            "kB per device",
            "vs plain upload",
            "coordinator CPU s",
            "plain coordinator CPU s",
            "device CPU s",
            "failed",
        ],
        cost_rows,
        "rrrrrrrrrr",
    )
    targets = [
        [
            "accuracy with secure aggregation within 1 point of the same compression without it",
            f"{worst:.1f} points (the unmasked sum equal to the plain sum in all {checked} "
            "secure-aggregation rounds)",
            verdict(worst <= 1.0),
        ],
    ]
    by_seed = {
        arm: [r["accuracy"][-1] for r in d["accuracy_runs"] if r["arm"] == arm]
        for arm in ("randk-grid-ef+secagg", "topk-8b-ef")
    }
    gaps = [100 * (a - b) for a, b in zip(*by_seed.values(), strict=True)]
    targets.append(
        [
            "cost of the shared random support against fedge's top-k at the same k",
            f"{min(gaps):+.1f} points (least favourable seed; mean {sum(gaps) / len(gaps):+.1f})",
            "–",
        ]
    )
    agg = {a: v for a, v in diff.items() if "agg" in a}
    if agg:
        best = max(agg, key=lambda a: min(agg[a]))
        beats = [a for a, v in agg.items() if min(v) > 0]
        targets.append(
            [
                "support from the previous aggregate against random-k, every seed",
                f"best `{best}`: {', '.join(f'{x:+.1f}' for x in agg[best])} points per seed; "
                f"better on every seed: {', '.join(f'`{a}`' for a in beats) or 'none'}",
                "–",
            ]
        )
    full = s["cost"].get("plan0.33-drop0.33", {})
    largest = max((int(n) for n, c in full.items() if c["runs"]), default=None)
    if largest is not None:
        c = full[str(largest)]
        cpu = c["coordinator_cpu_s"]["max"] / c["plain_coordinator_cpu_s"]["mean"]
        targets.append(
            [
                f"traffic and coordinator CPU at n = {largest}, a third dropping",
                f"{c['bytes_per_device_mean'] / plain['topk-8b']:,.0f}× a plain top-k upload per "
                f"device; coordinator CPU {cpu:,.1f}× plain (worst repetition)",
                "–",
            ]
        )
    parts = [intro, accuracy, cost_intro, cost, image("secagg")]
    parts.append(table(["target", "measured", "verdict"], targets, "lll"))
    return "\n\n".join(x for x in parts if x)


SECTIONS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("codec", "Update size and codec speed", codec),
    ("compression_accuracy", "Compression vs accuracy", compression_accuracy),
    ("async_vs_sync", "Async vs sync under faults", async_vs_sync),
    ("ingest", "Ingest at scale", ingest),
    ("ingest_open_loop", "Ingest below saturation", ingest_open_loop),
    ("upload_path", "Upload path, stage by stage", upload_path),
    ("aggregate", "Aggregation at scale", aggregate),
    ("flower_setting", "Against Flower in its own setting", flower_setting),
    ("dp_accuracy", "Differential privacy: accuracy vs ε", dp_accuracy),
    ("byzantine", "Byzantine devices", byzantine),
    ("secagg", "Secure aggregation", secagg),
]


def machine_line(found: dict[str, dict[str, Any]]) -> str:
    for d in found.values():
        m = d.get("machine")
        if isinstance(m, dict):
            cpu = m.get("cpu_count") or m.get("cpus") or "?"
            plat = m.get("platform") or m.get("system") or ""
            py = m.get("python") or m.get("python_version") or ""
            return f"{cpu} cores, {plat}, Python {py}".strip(", ")
    return "unknown"


def render(results: Path = RESULTS) -> str:
    found: dict[str, dict[str, Any]] = {}
    for name, _, _ in SECTIONS:
        path = results / f"{name}.json"
        if path.exists():
            found[name] = json.loads(path.read_text())
    parts = [
        START,
        "",
        f"Measured with the scripts as `make bench-full` runs them, on this project's machine "
        f"({machine_line(found)}; "
        "shared with other jobs, so compare ratios within one run rather than absolute "
        "times). Raw figures: `bench/results/*.json`.",
    ]
    for name, title, fn in SECTIONS:
        parts += ["", f"### {title}", ""]
        if name in found:
            parts.append(fn(found[name]))
        else:
            parts.append(f"_No results yet: run `python bench/{name}.py`._")
    parts += ["", END]
    return "\n".join(p for p in parts if p is not None)


def splice(text: str, section: str) -> str:
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        return head + section + tail
    return text.rstrip("\n") + "\n\n## Results\n\n" + section + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", type=Path, help="replace the section in this file")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    section = render(args.results)
    if args.readme:
        args.readme.write_text(splice(args.readme.read_text(), section))
        print(f"wrote the Results section of {args.readme}", file=sys.stderr)
    else:
        print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
