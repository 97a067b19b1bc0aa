"""`fedge demo` end to end: a coordinator process, a simulated fleet, a report."""

from __future__ import annotations

import json

import pytest

from fedge.edge_agent.sim import demo


@pytest.mark.slow
def test_small_demo_learns_and_compresses(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--devices", "8", "--rounds", "5", "--seed", "3", "--out", str(out), "--no-progress"]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    assert "bytes on the devices' sockets" in printed and "final accuracy" in printed
    assert "bodies alone:" in printed

    report = json.loads((out / "report.json").read_text())
    assert (out / "report.png").stat().st_size > 10_000
    assert report["task"]["status"] == "completed"
    accuracy = [row["accuracy"] for row in report["accuracy"]]
    assert [row["version"] for row in report["accuracy"]] == list(range(6))
    chance = report["chance_accuracy"]
    assert chance < 0.15
    # clearly above chance, and learned during the run (version 0 is the random init)
    assert accuracy[-1] > max(3 * chance, 0.4)
    assert accuracy[-1] > accuracy[0] + 0.25
    bodies = report["traffic"]["bodies"]
    assert bodies["uploads"] >= 5 * 2
    assert bodies["compression_ratio"] >= 50
    # measured, not declared: bytes really uploaded vs float32 for the same number of updates
    assert bodies["dense_upload_bytes"] == bodies["uploads"] * 4 * report["num_params"]
    assert bodies["compression_ratio"] == pytest.approx(
        bodies["dense_upload_bytes"] / bodies["upload_bytes"]
    )
    sock = report["traffic"]["socket"]
    devices = sock["per_device"]
    assert [d["device"] for d in devices] == list(range(8))
    for key in ("upload", "download", "total"):
        assert sock[key] == sum(d[key] for d in devices)
    assert sock["total"] == sock["upload"] + sock["download"]
    # the socket carries the bodies and an envelope (TLS, headers, polls) on top
    assert sock["upload"] > bodies["upload_bytes"] + 8 * 1000
    assert sock["download"] > bodies["model_bytes"] + 8 * 1000
    assert sum(d["updates"] for d in devices) == bodies["uploads"]
    assert sock["enrollment"]["upload"] > 8 * 500
    # the envelope weighs: on the socket the upload saving is well below the bodies' ratio
    ratio = sock["ratio_vs_dense"]
    assert 1.0 < ratio["upload"] < bodies["compression_ratio"]
    assert ratio["download"] >= 1.0
    assert ratio["total"] == pytest.approx(sock["dense_estimate"]["total"] / sock["total"])
    assert len(report["rounds"]) >= 5
    assert report["device_errors"] == []
    assert report["baseline"][-1]["accuracy"] > 0.8
