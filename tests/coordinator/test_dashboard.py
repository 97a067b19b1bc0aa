"""The dashboard in headless Chromium: a real coordinator over HTTPS with a running task that
simulated agents train on scikit-learn's digits; login with an API key, the rendered tables
and the chart data checked against the database, /docs rendered from local files only.

Set DASHBOARD_SCREENSHOTS to a directory (docs/) to keep the screenshots."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

from fedge.coordinator.models import ModelVersion, Round, Update
from fedge.coordinator.states import RoundStatus, UpdateStatus
from fedge.edge_agent.sim.datasets import load_dataset
from fedge.edge_agent.sim.fleet import Fleet
from fedge.edge_agent.sim.partition import dirichlet_partition
from tests.coordinator.conftest import Coordinator
from tests.support.browser import chromium
from tests.support.device import make_token
from tests.support.rounds import Db, action, create_task, every_device, wait_until

DIGITS = {"architecture": "softmax", "input_dim": 64, "num_classes": 10, "hidden": [], "seed": 0}
COMPRESSION = {"topk_fraction": 0.1, "bits": 8, "chunk": 64, "error_feedback": True}
DEVICES = 3
SCREENSHOTS = "DASHBOARD_SCREENSHOTS"


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


def _stable(db: Db, task_id: int) -> Round | None:
    """The task's open round once nothing more can change without a device: the devices are
    stopped, so an open round short of its updates stays as it is."""
    rounds = db.rounds(task_id)
    if not rounds or rounds[-1].status != RoundStatus.OPEN:
        return None
    pending = db.read(
        lambda s: s.scalar(
            select(func.count())
            .select_from(Update)
            .where(Update.task_id == task_id, Update.status == UpdateStatus.ACCEPTED)
        )
    )
    return rounds[-1] if (pending or 0) < DEVICES else None


def run_task(coordinator: Coordinator, db: Db, root: Path, *, versions: int) -> int:
    """A running task that real agents trained to at least ``versions`` versions; the agents
    are stopped when this returns (the task goes on running, its open round waiting)."""
    data = load_dataset("digits", test_fraction=0.2, rng=np.random.default_rng(0))
    parts = dirichlet_partition(data.y_train[:900], DEVICES, 1.0, np.random.default_rng(1))
    fleet = Fleet(
        url=coordinator.url,
        ca_file=str(coordinator.ca_file),
        root=root,
        shards=[(data.X_train[p], data.y_train[p]) for p in parts],
        seed=5,
        poll_wait=1.0,
    )
    ids = fleet.enroll(make_token(coordinator, max_uses=DEVICES))
    with fleet:
        fleet.start()
        wait_until(lambda: all(db.device(d).last_seen_at for d in ids), timeout=30)
        task_id = create_task(
            coordinator,
            model=DIGITS,
            aggregation=every_device(DEVICES, rounds=1000),
            compression=COMPRESSION,
        )
        db.wait_task(task_id, lambda t: t.current_version >= versions, timeout=120)
    wait_until(lambda: _stable(db, task_id), timeout=30)
    return task_id


def cells(page: Any, selector: str) -> list[list[str]]:
    return [
        [c.strip() for c in row.locator("td").all_inner_texts()]
        for row in page.locator(f"{selector} tbody tr").all()
    ]


def local_only(context: Any, base: str) -> list[str]:
    """Abort every request that does not go to the coordinator; the list of those refused."""
    refused: list[str] = []

    def handle(route: Any) -> None:
        url = route.request.url
        if url.startswith(base + "/") or url.startswith("data:"):
            route.continue_()
        else:
            refused.append(url)
            route.abort()

    context.route("**/*", handle)
    return refused


def screenshot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get(SCREENSHOTS)
    if keep:
        (Path(keep) / name).write_bytes(path.read_bytes())


@pytest.mark.slow
def test_dashboard_login_tables_and_charts(
    coordinator: Coordinator, db: Db, browser: Any, tmp_path: Path
) -> None:
    task_id = run_task(coordinator, db, tmp_path / "fleet", versions=6)
    task = db.task(task_id)
    rounds = db.rounds(task_id)
    versions = db.read(
        lambda s: list(
            s.scalars(
                select(ModelVersion)
                .where(ModelVersion.task_id == task_id)
                .order_by(ModelVersion.version)
            )
        )
    )
    round_bytes = dict(
        db.read(
            lambda s: s.execute(
                select(Update.round_id, func.sum(Update.byte_size))
                .where(Update.task_id == task_id)
                .group_by(Update.round_id)
            ).all()
        )
    )

    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    refused = local_only(context, coordinator.url)
    page = context.new_page()

    # Not signed in: the dashboard sends the browser to the login form.
    page.goto(f"{coordinator.url}/dashboard")
    assert page.url == f"{coordinator.url}/dashboard/login"
    screenshot(page, tmp_path, "dashboard-login.png")

    # A wrong key: 401 and the form again, with the reason.
    page.fill("#api_key", "fk_" + secrets.token_hex(20))
    with page.expect_response(f"{coordinator.url}/dashboard/login") as wrong:
        page.click("button[type=submit]")
    assert wrong.value.status == 401
    assert page.locator(".error").inner_text() == "unknown or revoked API key"
    assert context.cookies() == []

    # The admin key: a session cookie, and the key nowhere in the URL.
    page.fill("#api_key", coordinator.admin_key)
    page.click("button[type=submit]")
    page.wait_for_url(f"{coordinator.url}/dashboard")
    page.wait_for_selector("body[data-charts-drawn=true]")
    (cookie,) = context.cookies()
    assert cookie["name"] == "fedge_session"
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/dashboard"
    assert coordinator.admin_key not in cookie["value"]
    assert "fk_" not in page.url
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script reads it

    # Tasks table.
    (row,) = [r for r in cells(page, "#task-table") if r[0] == str(task_id)]
    assert row == [str(task_id), task.name, "running", "sync", str(task.current_version),
                   str(len(rounds))]  # fmt: skip

    # Rounds: status, versions and the update bytes each received, as stored.
    shown = {int(r[0]): r for r in cells(page, f"#rounds-{task_id}")}
    assert set(shown) == {r.number for r in rounds}
    for r in rounds:
        got = shown[r.number]
        assert got[1] == str(r.status)
        assert got[3] == ("" if r.result_version is None else str(r.result_version))
        assert got[5] == str(r.num_received)
        assert int(got[8]) == int(round_bytes.get(r.id) or 0)
    closed = [r for r in rounds if r.status == RoundStatus.CLOSED]
    assert len(closed) >= 6 and all(int(shown[r.number][8]) > 0 for r in closed)

    # Devices: the three agents were seen and hold the open round's work.
    (summary,) = cells(page, "#device-summary")
    assert summary == ["3", "3", "3", "0", "0", "0"]
    assert sorted(r[2] for r in cells(page, "#device-table")) == ["working"] * 3

    # Recent events: each closed round with its version.
    events = cells(page, "#event-table")
    for r in closed:
        assert [str(task_id), str(r.number), f"version {r.result_version}"] in [
            [e[2], e[3], e[4]] for e in events if e[1] == "round.closed"
        ]

    # Chart data: accuracy and loss of every version, as the agents reported them.
    data = page.evaluate("JSON.parse(document.getElementById('chart-data').textContent)")
    (charted,) = [t for t in data["tasks"] if t["id"] == task_id]
    for metric in ("eval_accuracy", "eval_loss", "train_loss"):
        expected = [[v.version, v.metrics[metric]] for v in versions if metric in v.metrics]
        assert len(expected) >= 6, metric
        assert charted["series"][metric] == expected  # JSON keeps doubles exact
        line = page.locator(f"#task-{task_id} polyline[data-series={metric}]")
        assert line.get_attribute("data-points") == str(len(expected))
    accuracy = [value for _, value in charted["series"]["eval_accuracy"]]
    assert accuracy[-1] > 0.5  # the agents really learned the digits
    bars = page.locator(f"#task-{task_id} figure[data-kind=bytes] rect.bar")
    assert bars.count() == len(rounds)
    assert charted["bytes"] == [[r.number, int(round_bytes.get(r.id) or 0)] for r in rounds]
    screenshot(page, tmp_path, "dashboard.png")

    # Signing out ends the session.
    page.click("header button[type=submit]")
    page.wait_for_url(f"{coordinator.url}/dashboard/login")
    assert context.cookies() == []
    page.goto(f"{coordinator.url}/dashboard")
    assert page.url == f"{coordinator.url}/dashboard/login"

    # /docs: Swagger UI from the coordinator's own files, nothing from a CDN.
    page.goto(f"{coordinator.url}/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "fedge coordinator" in page.locator(".swagger-ui .info .title").inner_text()
    assert page.locator(".opblock").count() > 10
    assert refused == []
    context.close()
    action(coordinator, task_id, "cancel")


def test_login_refusals_and_sessions_over_https(coordinator: Coordinator) -> None:
    """The parts a browser hides: JSON refusals, the origin check, forged and revoked
    sessions."""
    with coordinator.client() as client:
        r = client.post("/dashboard/login", data={"api_key": "fk_nope"})
        assert r.status_code == 401
        assert r.json() == {"error": "unauthorized", "detail": "unknown or revoked API key"}
        assert "set-cookie" not in r.headers

        r = client.post(
            "/dashboard/login",
            data={"api_key": coordinator.admin_key},
            headers={"Origin": "https://elsewhere.example"},
        )
        assert r.status_code == 403 and r.json()["error"] == "cross_origin"
        assert "set-cookie" not in r.headers

        r = client.post("/dashboard/login", data={"api_key": coordinator.viewer_key})
        assert r.status_code == 303 and r.headers["location"] == "/dashboard"
        value = r.cookies["fedge_session"]
        set_cookie = r.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie
        assert "secure" in set_cookie

    def page(cookie: str) -> httpx.Response:
        with coordinator.client(cookies={"fedge_session": cookie}) as c:
            return c.get("/dashboard")

    r = page(value)
    assert r.status_code == 200
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
    assert re.search(r"Signed in as test viewer \(viewer\)", r.text)

    key_id, expires, mac = value.split(".")
    for forged in (
        f"{key_id}.{int(expires) + 3600}.{mac}",  # a longer life
        f"{int(key_id) - 1}.{expires}.{mac}",  # another key
        f"{key_id}.{expires}.{mac[:-2]}AA",
        "garbage",
    ):
        r = page(forged)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/login", forged

    # Revoking the key ends its sessions.
    with coordinator.admin() as admin:
        keys = admin.get("/api/v1/api-keys").json()["items"]
        (viewer,) = [k for k in keys if k["role"] == "viewer"]
        assert admin.post(f"/api/v1/api-keys/{viewer['id']}/revoke").status_code == 200
    r = page(value)
    assert r.status_code == 303


def test_a_malformed_login_form_is_a_bad_request(coordinator: Coordinator) -> None:
    with coordinator.client() as client:
        r = client.post(
            "/dashboard/login",
            content="&".join(f"f{i}=x" for i in range(50)),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert r.status_code == 400
    assert r.json()["error"] == "bad_request"
    assert "set-cookie" not in r.headers
