"""`fedge agent` as users run it: errors in plain words, a real process that trains, uploads
and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np

from fedge.edge_agent import cli
from fedge.edge_agent.state import State
from tests.edge_agent.conftest import shard, wait_for


def test_status_of_an_empty_state_dir_says_to_enroll(tmp_path, capsys):
    assert cli.main(["status", "--state-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["enrolled"] is False
    assert cli.main(["run", "--state-dir", str(tmp_path), "--data", "x.npz"]) == 1
    assert "fedge agent enroll" in capsys.readouterr().err


def test_usage_errors(capsys):
    assert cli.main(["run"]) == 2
    assert cli.main(["--help"]) == 0
    assert "enroll" in capsys.readouterr().out


def test_enroll_refuses_a_missing_ca_and_an_unreachable_url(tmp_path, capsys, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("fedge.edge_agent.transport.time.sleep", slept.append)
    args = ["enroll", "--url", "https://127.0.0.1:9", "--token", "t", "--state-dir"]
    assert cli.main([*args, str(tmp_path / "a"), "--ca", str(tmp_path / "nope.pem")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.main([*args, str(tmp_path / "b")]) == 1
    assert "unreachable" in capsys.readouterr().err
    assert len(slept) == 4  # five attempts with backoff in between
    assert not State(tmp_path / "b").is_enrolled()


def test_bad_data_is_reported(live, tmp_path, capsys):
    state_dir = live.enroll("bad-data")
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=np.zeros((3, 64)))
    assert cli.main(["run", "--state-dir", str(state_dir), "--data", str(bad)]) == 1
    assert "must hold arrays 'X' and 'y'" in capsys.readouterr().err


def test_agent_process_trains_uploads_and_stops_on_sigterm(live, digits, tmp_path):
    state_dir = live.enroll("proc")
    data = shard(digits, 2)
    npz = tmp_path / "data.npz"
    np.savez(npz, X=data.X_train, y=data.y_train)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedge.shared.cli",
            "agent",
            "run",
            "--state-dir",
            str(state_dir),
            "--data",
            str(npz),
            "--poll-wait",
            "30",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        device_id = State(state_dir).load_config().device_id
        wait_for(lambda: live.admin.get_device(device_id)["last_seen_at"], what="the agent to poll")
        task = live.create_task()
        wait_for(lambda: live.task(task["id"])["status"] == "completed", what="the round")
        # the agent is now in a 30 s long-poll; SIGTERM must end it at once, cleanly
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "uploaded update for assignment" in err
    assert "received SIGTERM" in err
    assert State(state_dir).outbox.entries() == []
    assert live.rounds(task["id"])[0]["num_received"] == 1


def test_demo_without_its_extras_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    from fedge.edge_agent.sim import demo

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real(name, *a)
    )
    assert demo.main(["--devices", "2"]) == 3
    assert "pip install 'fedge[demo]'" in capsys.readouterr().err
