"""Server-rendered HTML of the dashboard (every value escaped; no inline script: the chart
data travels as a JSON data block that ``/static/dashboard/chart.js`` reads)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape
from typing import Any

from fedge.coordinator.dashboard.data import Overview, TaskView

#: Headers of every dashboard page: scripts and styles from the coordinator only, never
#: framed, never cached, no referrer to other sites (a form post keeps its Origin).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _e(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return escape(value.strftime("%Y-%m-%d %H:%M:%S"))
    return escape(str(value))


def _page(title: str, body: str, *, refresh_s: int | None = None) -> str:
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{refresh}<title>{escape(title)}</title>"
        '<link rel="stylesheet" href="/static/dashboard/dashboard.css">'
        '<script src="/static/dashboard/chart.js" defer></script>'
        f"</head><body>{body}</body></html>"
    )


def _table(table_id: str, head: Sequence[str], rows: Iterable[Sequence[Any]], **attrs: str) -> str:
    extra = "".join(f' {k.rstrip("_").replace("_", "-")}="{escape(v)}"' for k, v in attrs.items())
    ths = "".join(f"<th>{escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return (
        f'<table id="{table_id}"{extra}><thead><tr>{ths}</tr></thead><tbody>{trs}</tbody></table>'
    )


def login_page(error: str | None = None) -> str:
    message = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    body = (
        '<main class="login"><h1>fedge coordinator</h1>'
        "<p>Sign in with an API key (admin or viewer). The key is sent once; the browser keeps "
        "only a signed session cookie.</p>"
        f"{message}"
        '<form method="post" action="/dashboard/login" autocomplete="off">'
        '<label for="api_key">API key</label>'
        '<input id="api_key" name="api_key" type="password" required autofocus>'
        '<button type="submit">Sign in</button></form></main>'
    )
    return _page("fedge dashboard: sign in", body)


def chart_data(overview: Overview) -> dict[str, Any]:
    """What the charts draw (the page carries it as JSON)."""
    return {
        "tasks": [
            {
                "id": t.id,
                "name": t.name,
                "series": {name: [list(p) for p in points] for name, points in t.series.items()},
                "bytes": [[r["number"], r["bytes"]] for r in reversed(t.rounds)],
            }
            for t in overview.tasks
        ]
    }


def _task_section(t: TaskView) -> str:
    charts = "".join(
        f'<figure class="chart" data-task="{t.id}" data-kind="{kind}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
        for kind, caption in (
            ("accuracy", "Accuracy by model version"),
            ("loss", "Loss by model version"),
            ("bytes", "Update bytes received per round"),
        )
    )
    rounds = _table(
        f"rounds-{t.id}",
        ("Round", "Status", "Base", "Version", "Assigned", "Received", "Dropped", "Stale",
         "Bytes", "Opened", "Closed", "Reason"),
        (
            (r["number"], r["status"], r["base_version"], r["result_version"], r["assigned"],
             r["received"], r["dropped"], r["stale"], r["bytes"], r["opened_at"],
             r["closed_at"], r["reason"])
            for r in t.rounds
        ),
        class_="rounds",
        data_task=str(t.id),
    )  # fmt: skip
    return (
        f'<section class="task" id="task-{t.id}"><h2>Task {t.id}: {escape(t.name)} '
        f'<span class="status {escape(t.status)}">{escape(t.status)}</span></h2>'
        f'<div class="charts">{charts}</div>{rounds}</section>'
    )


def dashboard_page(overview: Overview, *, who: str, role: str, refresh_s: int = 30) -> str:
    d = overview.devices
    summary = _table(
        "device-summary",
        ("Enrolled", "Online", "Working", "Idle", "Failing", "Revoked"),
        [(d["enrolled"], d["online"], d["working"], d["idle"], d["failing"], d["revoked"])],
    )
    devices = _table(
        "device-table",
        ("Device", "Name", "State", "Last seen", "Completed", "Dropped"),
        (
            (r["id"], r["name"], r["state"], r["last_seen_at"], r["completed"], r["dropped"])
            for r in overview.device_rows
        ),
    )
    tasks = _table(
        "task-table",
        ("Task", "Name", "Status", "Mode", "Version", "Rounds"),
        (
            (t.id, t.name, t.status, t.mode, t.current_version, len(t.rounds))
            for t in overview.tasks
        ),
    )
    events = _table(
        "event-table",
        ("Time", "Event", "Task", "Round", "Detail"),
        ((e["at"], e["event"], e["task"], e["round"], e["detail"]) for e in overview.events),
    )
    # JSON inside <script>: "<" escaped so no value can close the element.
    data = json.dumps(chart_data(overview), separators=(",", ":")).replace("<", "\\u003c")
    body = (
        '<header><h1>fedge coordinator</h1><div class="who">'
        f"Signed in as {escape(who)} ({escape(role)}) · {_e(overview.now)} UTC"
        '<form method="post" action="/dashboard/logout"><button type="submit">Sign out</button>'
        "</form></div></header><main>"
        f'<section id="devices"><h2>Devices</h2>{summary}{devices}</section>'
        f'<section id="tasks"><h2>Tasks</h2>{tasks}</section>'
        + "".join(_task_section(t) for t in overview.tasks)
        + f'<section id="events"><h2>Recent events</h2>{events}</section></main>'
        f'<script type="application/json" id="chart-data">{data}</script>'
    )
    return _page("fedge dashboard", body, refresh_s=refresh_s)
