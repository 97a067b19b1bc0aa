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
    assert "compression ratio" in printed and "final accuracy" in printed

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
    traffic = report["traffic"]
    assert traffic["uploads"] >= 5 * 2
    assert traffic["compression_ratio"] >= 50
    # measured, not declared: bytes really uploaded vs float32 for the same number of updates
    assert traffic["dense_upload_bytes"] == traffic["uploads"] * 4 * report["num_params"]
    assert traffic["compression_ratio"] == pytest.approx(
        traffic["dense_upload_bytes"] / traffic["upload_bytes"]
    )
    assert len(report["rounds"]) >= 5
    assert report["device_errors"] == []
    assert report["baseline"][-1]["accuracy"] > 0.8
