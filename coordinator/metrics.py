"""Prometheus metrics (``GET /metrics``, prometheus-client).

One :class:`Metrics` per app, in a registry of its own (never the library's global default):

- ``fedge_http_requests_total{route,method,status}``: every answer, by route *template*
  (``/api/v1/tasks/{task_id}``; ``unmatched`` for paths no route serves), refusals by the
  body-limit and overload middleware included;
- ``fedge_uploads_total{result,reason}``: update uploads, ``result`` ``accepted``,
  ``duplicate`` (a repeated Idempotency-Key) or ``refused`` with ``reason`` the error code of
  the answer (``stale_update``, ``payload_too_large``, ``invalid_signature``, ...);
- ``fedge_device_received_bytes_total{route}`` / ``fedge_device_sent_bytes_total{route}``:
  request and response body bytes of the device routes (``/api/v1/device/...``) as the
  coordinator's application sees them (after TLS and HTTP framing, before compression, which
  the coordinator does not apply);
- ``fedge_rounds_total{outcome}``: rounds ended, ``closed`` (a version committed) or ``failed``;
- ``fedge_model_versions_total``: versions committed;
- ``fedge_aggregation_seconds``: histogram of the time to compute one aggregation (reading and
  decoding the updates, the server step, storing the model);
- ``fedge_long_poll_waiters``, ``fedge_scheduler_steps_running``,
  ``fedge_scheduler_tasks_waiting``: gauges of the coordinator processes (work long-polls
  waiting, task steps in flight, tasks due but waiting for a free scheduler worker);
- ``fedge_devices{state}`` and ``fedge_tasks{status}``: read from the database at each
  scrape, so they describe the whole deployment whichever process answers (``state``:
  ``seen`` within ``device_seen_window_s``, ``active`` and ``revoked`` enrollments).

Several worker processes (``serve --workers N``) use prometheus-client's multiprocess mode:
the supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before it starts the
workers (a temporary one, unless the environment names one), each worker writes its counters
and gauges there, and whichever worker answers a scrape sums the files of all of them
(gauges as ``livesum``: the files of a worker that exited are removed). The database-derived
gauges are computed by the answering worker alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.routing import Mount, compile_path

from fedge.coordinator.db import utcnow
from fedge.coordinator.events import Event
from fedge.coordinator.models import Device, Task
from fedge.coordinator.paths import DEVICE_PREFIX
from fedge.coordinator.settings import Settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The route that counts as an upload.
UPLOAD_ROUTE = f"{DEVICE_PREFIX}/assignments/{{assignment_id}}/update"
#: Bytes of an error answer kept to read its error code.
_ERROR_BODY_LIMIT = 4096
AGGREGATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def multiprocess() -> bool:
    """True when prometheus-client keeps values in ``PROMETHEUS_MULTIPROC_DIR``."""
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """The metrics of one coordinator app (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fedge_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.uploads = Counter(
            "fedge_uploads",
            "Update uploads by result (accepted, duplicate, refused) and refusal reason "
            "(the error code of the answer).",
            ["result", "reason"],
            registry=r,
        )
        self.received_bytes = Counter(
            "fedge_device_received_bytes",
            "Request body bytes received on the device routes.",
            ["route"],
            registry=r,
        )
        self.sent_bytes = Counter(
            "fedge_device_sent_bytes",
            "Response body bytes sent on the device routes.",
            ["route"],
            registry=r,
        )
        self.rounds = Counter(
            "fedge_rounds", "Rounds ended, by outcome (closed, failed).", ["outcome"], registry=r
        )
        self.versions = Counter(
            "fedge_model_versions", "Model versions committed by aggregation.", registry=r
        )
        self.aggregation_seconds = Histogram(
            "fedge_aggregation_seconds",
            "Time to compute one aggregation (read and decode updates, step, store the model).",
            buckets=AGGREGATION_BUCKETS,
            registry=r,
        )
        self.long_poll_waiters = Gauge(
            "fedge_long_poll_waiters",
            "Work long-polls waiting.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.steps_running = Gauge(
            "fedge_scheduler_steps_running",
            "Task steps (round transitions, aggregations) in flight.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.tasks_waiting = Gauge(
            "fedge_scheduler_tasks_waiting",
            "Tasks due for a step but waiting for a free scheduler worker.",
            registry=r,
            multiprocess_mode="livesum",
        )
        for outcome in ("closed", "failed"):
            self.rounds.labels(outcome=outcome)
        self.uploads.labels(result="accepted", reason="")

    def on_event(self, event: Event) -> None:
        """Event hook (:func:`fedge.coordinator.events.install`)."""
        if event.name == "round.closed":
            self.rounds.labels(outcome="closed").inc()
        elif event.name == "round.failed":
            self.rounds.labels(outcome="failed").inc()
        elif event.name == "version.committed":
            self.versions.inc()
        elif event.name == "aggregation.computed":
            self.aggregation_seconds.observe(float(event.fields.get("seconds", 0.0)))

    def exposition(self, session: Session, settings: Settings) -> bytes:
        """The text exposition format of every metric (blocking: reads the database in
        ``session``)."""
        sources: list[Collector] = [DatabaseCollector(session, settings)]
        if multiprocess():
            merged = CollectorRegistry()
            MultiProcessCollector(merged)
            sources.append(merged)
        else:
            sources.append(self.registry)
        return generate_latest(_Chain(sources))


class _Chain(Collector):
    def __init__(self, parts: Sequence[Collector]) -> None:
        self.parts = parts

    def collect(self) -> Iterable[Metric]:
        for part in self.parts:
            yield from part.collect()


class DatabaseCollector(Collector):
    """Gauges read from the database at scrape time (the same from every process)."""

    def __init__(self, session: Session, settings: Settings) -> None:
        self.session = session
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        window = timedelta(seconds=self.settings.device_seen_window_s)
        session = self.session
        seen = session.scalar(
            select(func.count())
            .select_from(Device)
            .where(Device.status == "active", Device.last_seen_at >= utcnow() - window)
        )
        by_status = session.execute(
            select(Device.status, func.count()).group_by(Device.status)
        ).all()
        tasks = session.execute(select(Task.status, func.count()).group_by(Task.status)).all()
        devices = GaugeMetricFamily(
            "fedge_devices",
            "Enrolled devices: seen within device_seen_window_s, active, revoked.",
            labels=["state"],
        )
        devices.add_metric(["seen"], float(seen or 0))
        counts = {str(status): n for status, n in by_status}
        for state in ("active", "revoked"):
            devices.add_metric([state], float(counts.get(state, 0)))
        yield devices
        family = GaugeMetricFamily("fedge_tasks", "Tasks by status.", labels=["status"])
        for status, n in tasks:
            family.add_metric([str(status)], float(n))
        yield family


class RouteTable:
    """Route templates of an app, matched against request paths. Built (once) from the
    OpenAPI paths and the app's top-level routes and mounts, so the label is the full template
    (``/api/v1/tasks/{task_id}``) however the routers are nested, and a request refused
    before routing (body limit, overload) still gets the route it was meant for."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._table: list[tuple[re.Pattern[str], str]] | None = None

    def _build(self) -> list[tuple[re.Pattern[str], str]]:
        templates = set(self.app.openapi().get("paths", {}))
        for route in self.app.routes:
            path = getattr(route, "path", None)
            if isinstance(route, Mount):
                templates.add(route.path + "/{path:path}")
            elif isinstance(path, str) and path:
                templates.add(path)
        # Literal segments win over parameters (``/tasks/import`` before ``/tasks/{id}``).
        ordered = sorted(templates, key=lambda t: (t.count("{"), -len(t), t))
        return [(compile_path(t)[0], t.replace(":path}", "}")) for t in ordered]

    def template(self, path: str) -> str:
        if self._table is None:
            self._table = self._build()
        for regex, template in self._table:
            if regex.match(path):
                return template
        return "unmatched"


def error_code(body: bytes) -> str:
    """The ``error`` field of a JSON error answer (``unknown`` when there is none)."""
    try:
        value = json.loads(body)
    except ValueError:
        return "unknown"
    code = value.get("error") if isinstance(value, dict) else None
    return code if isinstance(code, str) and code.isidentifier() else "unknown"


class MetricsMiddleware:
    """Counts every answer; body bytes and upload results on the device routes. Added last,
    so it sees the refusals of the other middleware too. Refused uploads are logged as
    ``upload.refused`` events with their error code, with or without metrics (``metrics``
    ``None``: the log line only)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics | None, routes: RouteTable) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        device_route = scope["path"].startswith(DEVICE_PREFIX + "/")
        status = 0
        received = sent = 0
        error_body = bytearray()

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
                # Counted before the answer leaves: a client that got it sees it counted.
                self._count_request(scope, status)
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                sent += len(body)
                if status >= 400 and len(error_body) < _ERROR_BODY_LIMIT:
                    error_body.extend(body[: _ERROR_BODY_LIMIT - len(error_body)])
            await send(message)

        try:
            await self.app(scope, counting_receive if device_route else receive, counting_send)
        except BaseException:
            if status == 0:  # the server's error middleware answers 500 outside this one
                status = 500
                self._count_request(scope, status)
            raise
        finally:
            if status and device_route:
                self._count_device(scope, status, received, sent, bytes(error_body))

    def _count_request(self, scope: Scope, status: int) -> None:
        if self.metrics is None:
            return
        route = self.routes.template(scope["path"])
        scope["fedge.route"] = route
        self.metrics.requests.labels(route=route, method=scope["method"], status=str(status)).inc()

    def _count_device(
        self, scope: Scope, status: int, received: int, sent: int, error_body: bytes
    ) -> None:
        m = self.metrics
        route = scope.get("fedge.route") or self.routes.template(scope["path"])
        if m is not None:
            m.received_bytes.labels(route=route).inc(received)
            m.sent_bytes.labels(route=route).inc(sent)
        if route != UPLOAD_ROUTE:
            return
        if status in (200, 201):
            if m is not None:
                result = "accepted" if status == 201 else "duplicate"
                m.uploads.labels(result=result, reason="").inc()
        else:
            code = error_code(error_body) if status >= 400 else f"http_{status}"
            if m is not None:
                m.uploads.labels(result="refused", reason=code).inc()
            detail = ""
            try:
                parsed = json.loads(error_body)
                detail = str(parsed.get("detail", "")) if isinstance(parsed, dict) else ""
            except ValueError:
                pass
            log.warning(
                "upload.refused: %s",
                detail or code,
                extra={
                    "event": "upload.refused",
                    "device": scope.get("fedge.device"),
                    "assignment": _assignment_id(scope),
                    "status": status,
                    "error": code,
                    "reason": detail,
                },
            )


def _assignment_id(scope: Scope) -> int | None:
    """The assignment id of an upload's path, when it is a number."""
    value = str((scope.get("path_params") or {}).get("assignment_id", ""))
    return int(value) if value.isdigit() and len(value) < 12 else None


def prepare_multiprocess_dir() -> Path | None:
    """Before starting worker processes: make sure ``PROMETHEUS_MULTIPROC_DIR`` names an empty
    directory (a new temporary one unless the environment names one, which is emptied of
    earlier runs' files). Returns the directory to remove at the end, if it was created."""
    named = os.environ.get(MULTIPROC_ENV)
    if named:
        directory = Path(named)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
        return None
    created = Path(tempfile.mkdtemp(prefix="fedge-metrics-"))
    os.environ[MULTIPROC_ENV] = str(created)
    return created


def worker_exited(pid: int) -> None:
    """Drop the live gauges of a worker process that exited (its counters stay counted)."""
    if multiprocess():
        mark_process_dead(pid)


def remove_multiprocess_dir(created: Path | None) -> None:
    if created is not None:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(created, ignore_errors=True)
