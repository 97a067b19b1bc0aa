"""The admin REST client and `fedge admin` (MockTransport units, then a real coordinator)."""

from __future__ import annotations

import json

import httpx
import pytest

from fedge.edge_agent import admin_cli, errors
from fedge.edge_agent.admin_client import AdminClient
from fedge.edge_agent.sim.local_coordinator import CoordinatorStartError, parse_admin_key
from fedge.edge_agent.transport import RetryPolicy


def test_bearer_key_paths_and_pagination():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        offset = int(request.url.params["offset"])
        items = [{"id": i} for i in range(offset, min(offset + 2, 5))]
        return httpx.Response(200, json={"items": items, "total": 5, "limit": 2, "offset": offset})

    client = AdminClient("https://c.test", "secret", transport=httpx.MockTransport(handler))
    assert [d["id"] for d in client.iterate("/devices", page_size=2)] == [0, 1, 2, 3, 4]
    assert all(r.headers["Authorization"] == "Bearer secret" for r in seen)
    assert [r.url.path for r in seen] == ["/api/v1/devices"] * 3
    assert [r.url.params["offset"] for r in seen] == ["0", "2", "4"]


def test_errors_are_mapped_and_4xx_not_retried():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(409, json={"error": "invalid_transition", "detail": "draft"})

    client = AdminClient(
        "https://c.test", "k", transport=httpx.MockTransport(handler), retry=RetryPolicy()
    )
    with pytest.raises(errors.Conflict) as exc:
        client.pause_task(3)
    assert exc.value.code == "invalid_transition" and len(calls) == 1
    assert calls[0].url.path == "/api/v1/tasks/3/pause"
    with pytest.raises(ValueError, match="unknown task action"):
        client.task_action(3, "explode")


def test_parse_admin_key():
    output = (
        "Initialized a fedge coordinator in /x\n"
        "Bootstrap admin API key (shown only this once; store it somewhere safe now):\n"
        "\n"
        "    fa_abcdefghijklmnopqrstuvwxyz012345\n"
        "\n"
        "Next steps:\n"
    )
    assert parse_admin_key(output) == "fa_abcdefghijklmnopqrstuvwxyz012345"
    with pytest.raises(CoordinatorStartError, match="no admin key"):
        parse_admin_key("Initialized\nno key here\n")


def test_admin_cli_needs_url_and_key(capsys):
    assert admin_cli.main(["devices", "list"]) == 2
    assert "FEDGE_URL" in capsys.readouterr().err


def test_admin_cli_against_a_real_coordinator(live, tmp_path, capsys, monkeypatch):
    def call(*args: str):
        capsys.readouterr()
        code = admin_cli.main(args)
        captured = capsys.readouterr()
        return code, json.loads(captured.out) if code == 0 else captured.err

    monkeypatch.setenv("FEDGE_URL", live.url)
    monkeypatch.setenv("FEDGE_CA", live.ca_file)
    monkeypatch.setenv("FEDGE_API_KEY", live.admin_key)
    body = tmp_path / "task.json"
    body.write_text(
        json.dumps(
            {
                "name": "cli",
                "model": {"architecture": "softmax", "input_dim": 4, "num_classes": 2},
            }
        )
    )
    code, task = call("tasks", "create", "--file", str(body))
    assert code == 0 and task["status"] == "draft"
    code, listed = call("tasks", "list")
    assert [t["id"] for t in listed["items"]] == [task["id"]]
    code, started = call("tasks", "start", str(task["id"]))
    assert started["status"] == "running"
    code, paused = call("tasks", "pause", str(task["id"]))
    assert paused["status"] == "paused"
    code, err = call("tasks", "start", str(task["id"]))
    assert code == 1 and "invalid_transition" in err
    code, resumed = call("tasks", "resume", str(task["id"]))
    assert resumed["status"] == "running"
    code, rounds = call("rounds", "list", str(task["id"]))
    assert code == 0 and "items" in rounds
    code, models = call("models", "list", str(task["id"]))
    assert [m["version"] for m in models["items"]] == [0]
    out = tmp_path / "model.bin"
    code, written = call("models", "download", str(task["id"]), "0", "--out", str(out))
    assert written["bytes"] == out.stat().st_size > 0

    code, token = call("tokens", "create", "--label", "x", "--max-uses", "2")
    assert token["max_uses"] == 2 and token["token"]
    code, tokens = call("tokens", "list")
    assert [t["id"] for t in tokens["items"]] == [token["id"]]
    code, revoked = call("tokens", "revoke", str(token["id"]))
    assert revoked["status"] == "revoked"

    code, key = call("keys", "create", "--role", "viewer", "--name", "ops")
    assert key["role"] == "viewer" and key["key"]
    code, viewer_err = call("--key", key["key"], "tasks", "cancel", str(task["id"]))
    assert viewer_err and "forbidden" in viewer_err
    code, revoked_key = call("keys", "revoke", str(key["id"]))
    assert revoked_key["revoked_at"]

    device_dir = live.enroll("cli-device")
    code, devices = call("devices", "list")
    (device,) = devices["items"]
    assert device["name"] == "cli-device"
    code, revoked_device = call("devices", "revoke", device["device_id"])
    assert revoked_device["status"] == "revoked"
    code, cancelled = call("tasks", "cancel", str(task["id"]))
    assert cancelled["status"] == "cancelled"
    assert device_dir.exists()
