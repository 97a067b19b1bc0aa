"""`fedge admin` as users run it against a real HTTPS coordinator: paging, table and JSON
output, task changes, initial weights, watch, and one-line errors without tracebacks."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.coordinator.tls import create_ca_and_server_cert
from fedge.edge_agent import admin_cli
from fedge.edge_agent import cli as agent_cli
from fedge.edge_agent.admin_client import AdminClient
from fedge.shared import architectures, wire

SMALL = {"architecture": "softmax", "input_dim": 4, "num_classes": 3, "seed": 2}


class Cli:
    """Runs ``fedge admin`` in-process with the live coordinator's connection settings."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = admin_cli.main(list(args))
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *args: str) -> Any:
        code, out, err = self(*args)
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cli(live, capsys, monkeypatch) -> Cli:
    monkeypatch.setenv("FEDGE_URL", live.url)
    monkeypatch.setenv("FEDGE_CA", live.ca_file)
    monkeypatch.setenv("FEDGE_API_KEY", live.admin_key)
    return Cli(capsys)


def _one_clean_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_lists_page_and_all_follows_every_page(live, cli, monkeypatch) -> None:
    ids = [live.admin.create_task({"name": f"t{i}", "model": SMALL})["id"] for i in range(103)]
    newest_first = ids[::-1]

    page = cli.json("tasks", "list")
    assert [t["id"] for t in page["items"]] == newest_first[:50]
    assert page["total"] == 103
    tail = cli.json("tasks", "list", "--limit", "10", "--offset", "98")
    assert [t["id"] for t in tail["items"]] == newest_first[98:]

    monkeypatch.setattr(admin_cli, "MAX_PAGE", 40)  # three pages: 40 + 40 + 23
    every = cli.json("tasks", "list", "--all")
    assert [t["id"] for t in every["items"]] == newest_first
    assert (every["total"], every["offset"]) == (103, 0)

    code, _, err = cli("tasks", "list", "--limit", "0")
    assert code == 2 and "--limit must be between 1 and" in _one_clean_line(err)


def test_table_on_a_terminal_json_otherwise_and_the_flags_override(live, cli) -> None:
    task = live.admin.create_task({"name": "tabled", "model": SMALL})

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert admin_cli.choose_output(None, Tty()) == "table"
    assert admin_cli.choose_output(None, io.StringIO()) == "json"
    assert admin_cli.choose_output("json", Tty()) == "json"

    _, out, _ = cli("tasks", "list", "--table")
    header, row, footer = out.strip().splitlines()
    assert header.split() == ["ID", "NAME", "STATUS", "MODE", "VERSION", "ROUNDS", "REASON"]
    assert row.split() == [str(task["id"]), "tabled", "draft", "sync", "0", "20", "-"]
    assert footer == "1 of 1"
    _, out, _ = cli("--table", "tasks", "get", str(task["id"]))
    fields = dict((*line.split(None, 1), "")[:2] for line in out.strip().splitlines()[1:])
    assert fields["name"] == "tabled" and fields["status"] == "draft"
    # Not a terminal: JSON, as scripts expect; --json after the action works too.
    assert cli.json("tasks", "get", str(task["id"]))["name"] == "tabled"
    assert cli.json("tasks", "list", "--json")["items"][0]["id"] == task["id"]


def test_update_a_draft_and_the_training_of_a_running_task(live, cli, tmp_path) -> None:
    draft = live.admin.create_task({"name": "d", "model": SMALL})
    changes = tmp_path / "changes.json"
    changes.write_text(json.dumps({"aggregation": {"num_rounds": 7}}))
    updated = cli.json(
        "tasks", "update", str(draft["id"]), "--file", str(changes), "--set", "name=renamed"
    )
    assert (updated["name"], updated["aggregation"]["num_rounds"]) == ("renamed", 7)

    live.admin.start_task(draft["id"])
    running = cli.json("tasks", "update", str(draft["id"]), "--set", "training.lr=0.025")
    assert running["pending_training"]["lr"] == 0.025 and running["training"]["lr"] == 0.1

    code, _, err = cli("tasks", "update", str(draft["id"]), "--set", "aggregation.num_rounds=3")
    line = _one_clean_line(err)
    assert code == 1 and "task_not_draft" in line and "aggregation" in line
    code, _, err = cli("tasks", "update", str(draft["id"]), "--set", "lr")
    assert code == 2 and "--set 'lr': expected FIELD=VALUE" in _one_clean_line(err)
    assert live.admin.get_task(draft["id"])["aggregation"]["num_rounds"] == 7


def test_create_prints_the_tasks_warnings(live, cli, tmp_path) -> None:
    body = tmp_path / "task.json"
    body.write_text(
        json.dumps(
            {
                "name": "target",
                "model": SMALL,
                "aggregation": {"target_metric": {"name": "accuracy", "value": 0.9}},
            }
        )
    )
    code, out, err = cli("tasks", "create", "--file", str(body))
    assert code == 0 and json.loads(out)["status"] == "draft"
    (warning,) = err.strip().splitlines()
    assert warning.startswith("fedge admin: warning: aggregation.target_metric 'accuracy'")
    assert "FEDGE_EVAL_HOOK" in warning


def test_upload_initial_weights_from_npz_or_wire_format(live, cli, tmp_path) -> None:
    task = live.admin.create_task({"name": "w", "model": SMALL})
    rng = np.random.default_rng(5)
    weights = architectures.init_weights(SMALL, rng)
    npz = tmp_path / "weights.npz"
    np.savez(npz, **{name: 2 * a for name, a in weights.items()})
    version = cli.json("models", "upload-initial", str(task["id"]), "--file", str(npz))
    assert version["version"] == 0
    got = wire.decode_model(live.admin.download_model(task["id"], 0))
    for name, a in weights.items():
        np.testing.assert_array_equal(got[name], (2 * a).astype(np.float32))

    blob = tmp_path / "weights.bin"
    blob.write_bytes(wire.encode_model(weights))
    cli.json("models", "upload-initial", str(task["id"]), "--file", str(blob))
    got = wire.decode_model(live.admin.download_model(task["id"], 0))
    np.testing.assert_array_equal(got["W"], weights["W"].astype(np.float32))

    bad = tmp_path / "bad.npz"
    np.savez(bad, W=weights["W"])
    code, _, err = cli("models", "upload-initial", str(task["id"]), "--file", str(bad))
    assert code == 2 and f"{bad} does not match task {task['id']}'s spec: missing b" in err
    _one_clean_line(err)
    code, _, err = cli("models", "upload-initial", str(task["id"]), "--file", "nope.npz")
    assert code == 2 and "weights file nope.npz does not exist" in _one_clean_line(err)
    got = wire.decode_model(live.admin.download_model(task["id"], 0))
    np.testing.assert_array_equal(got["W"], weights["W"].astype(np.float32))


def test_watch_shows_each_new_state_and_ends_with_the_task(live, cli) -> None:
    task = live.admin.create_task(
        {"name": "watched", "model": SMALL, "aggregation": {"num_rounds": 2}}
    )
    live.admin.start_task(task["id"])
    code, out, _ = cli("tasks", "watch", str(task["id"]), "--once", "--table")
    assert code == 0 and f"task {task['id']} 'watched': running, version 0" in out
    assert "ROUND  STATUS" in out

    polls: list[float] = []

    def cancel_between_polls(seconds: float) -> bool:
        polls.append(seconds)
        live.admin.cancel_task(task["id"])
        return False

    stream = io.StringIO()
    with AdminClient(live.url, live.admin_key, ca_file=live.ca_file) as client:
        last = admin_cli.watch(
            client,
            task["id"],
            output="json",
            stream=stream,
            interval_s=0.5,
            wait=cancel_between_polls,
        )
    states = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [s["task"]["status"] for s in states] == ["running", "cancelled"]
    assert last["status"] == "cancelled" and polls == [0.5]


# ------------------------------------------------------------------------------ errors


@pytest.fixture
def no_backoff(monkeypatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr("fedge.edge_agent.transport.time.sleep", slept.append)
    return slept


def test_ca_file_problems_name_the_file_in_one_line(live, capsys, tmp_path) -> None:
    not_pem = tmp_path / "ca.der"
    not_pem.write_bytes(b"\x30\x82\x01\x0a not a certificate")
    cases = [
        (tmp_path / "missing.crt", "does not exist"),
        (not_pem, "holds no PEM certificate"),
        (tmp_path, "is a directory"),
    ]
    for ca, says in cases:
        code = admin_cli.main(
            ["--url", live.url, "--key", live.admin_key, "--ca", str(ca), "tasks", "list"]
        )
        line = _one_clean_line(capsys.readouterr().err)
        assert code == 1, ca
        assert f"CA file {ca}" in line and says in line, line


def test_a_certificate_from_another_ca_is_a_tls_error_not_unreachable(
    live, capsys, tmp_path, no_backoff
) -> None:
    other = create_ca_and_server_cert(tmp_path / "other-ca")
    code = admin_cli.main(
        ["--url", live.url, "--key", "k", "--ca", str(other.ca_cert), "tasks", "list"]
    )
    line = _one_clean_line(capsys.readouterr().err)
    assert code == 1
    assert "tls_untrusted" in line and live.url in line and "unreachable" not in line
    assert "tls/ca.crt" in line
    assert no_backoff == []  # a verification failure is not retried


def test_unreachable_names_the_url(capsys, no_backoff) -> None:
    url = "https://127.0.0.1:9"
    assert admin_cli.main(["--url", url, "--key", "k", "tasks", "list"]) == 1
    line = _one_clean_line(capsys.readouterr().err)
    assert f"unreachable: cannot reach {url}" in line


def test_file_arguments_name_the_file(cli, tmp_path) -> None:
    missing = tmp_path / "task.json"
    code, _, err = cli("tasks", "create", "--file", str(missing))
    assert code == 2 and f"task file {missing} does not exist" in _one_clean_line(err)
    missing.write_text("{not json")
    code, _, err = cli("tasks", "create", "--file", str(missing))
    assert code == 2 and f"task file {missing} is not JSON" in _one_clean_line(err)


def test_the_agent_names_a_ca_file_that_is_not_pem(tmp_path, capsys) -> None:
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("hello")
    args = ["enroll", "--url", "https://127.0.0.1:9", "--token", "t"]
    assert agent_cli.main([*args, "--state-dir", str(tmp_path / "s"), "--ca", str(not_pem)]) == 1
    line = _one_clean_line(capsys.readouterr().err)
    assert f"CA file {not_pem}" in line and "PEM" in line


def test_a_real_fedge_admin_process_prints_no_traceback(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("hello")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "fedge.shared.cli", "admin", "--url", "https://127.0.0.1:9"),
            *("--key", "k", "--ca", str(not_pem), "tasks", "list"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert _one_clean_line(done.stderr).startswith("fedge admin: error: ca_file_not_pem: CA file")
