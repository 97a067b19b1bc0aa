"""Traffic accounting of ``bench/fleet_traffic.py``: request ledger, fleet with counting
transports, and a sampler of the counting relay.

* :class:`RequestLedger` / :class:`CountingTransport`: every device's HTTP client sends through a
  :class:`CountingTransport` wrapped around the ``httpx.HTTPTransport`` the client built for
  itself (pinned CA, pool and keep-alive settings unchanged). It classifies each request
  (work poll, cancel watch, model download, upload, ...) and counts, per kind, the requests,
  the answers by status code and the HTTP/1.1 bytes each way: request line, header lines and
  body as sent; status line, header lines and body bytes as received (raw, before any content
  decoding; chunked-transfer framing is not counted). TLS records and handshakes are not
  visible here: the relay sees them, and the difference of the two is reported as such.
* :class:`TrafficFleet`: :class:`fedge.edge_agent.sim.fleet.Fleet` whose devices' clients count
  through those transports (the fleet simulation has no hook for it, so ``start`` is repeated
  here, wrapping the transport each client built for itself).
* :class:`Sampler`: a thread that records the relay's cumulative counts and the ledger every
  ``interval_s`` with a wall-clock timestamp, so the bytes at any moment of the run (e.g. the
  creation of a model version, timestamped by the coordinator) are read from a sample instead
  of being interpolated from totals.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from fedge.edge_agent.agent import Agent
from fedge.edge_agent.client import CoordinatorClient
from fedge.edge_agent.device import open_client
from fedge.edge_agent.sim.faults import FaultHooks
from fedge.edge_agent.sim.fleet import Fleet
from fedge.edge_agent.sim.relay import CountingRelay, Counts
from fedge.edge_agent.state import State
from fedge.edge_agent.transport import Session
from fedge.shared.wire_delta import WORK_FRAME_MEDIA_TYPE

_MODEL = re.compile(r"/device/tasks/\d+/models/\d+$")
_UPLOAD = re.compile(r"/device/assignments/\d+/update$")
_METRICS = re.compile(r"/device/assignments/\d+/metrics$")
_NUMBER = re.compile(r"\d+")


def request_kind(method: str, path: str, query: str) -> str:
    """A request's kind: the known device requests by name, anything else as its method and
    path with numbers replaced (so a new endpoint shows up in the table by itself)."""
    if path.endswith("/device/work"):
        return "cancel_watch" if re.search(r"(^|&)current=", query) else "work_poll"
    if method == "GET" and _MODEL.search(path):
        return "model_download"
    if method == "POST" and _UPLOAD.search(path):
        return "upload"
    if method == "POST" and _METRICS.search(path):
        return "metrics_report"
    if path.endswith("/device/enroll"):
        return "enroll"
    return f"{method} {_NUMBER.sub('{n}', path)}"


@dataclass
class KindCounts:
    requests: int = 0
    up: int = 0  # HTTP bytes sent: request line, headers, body
    down: int = 0  # HTTP bytes received: status line, headers, body
    up_headers: int = 0
    down_headers: int = 0
    new_connections: int = 0  # requests that went out on a connection opened for them
    closed_by_server: int = 0  # answers with "Connection: close"
    statuses: dict[str, int] = field(default_factory=dict)

    def copy(self) -> KindCounts:
        return KindCounts(
            self.requests,
            self.up,
            self.down,
            self.up_headers,
            self.down_headers,
            self.new_connections,
            self.closed_by_server,
            dict(self.statuses),
        )

    def minus(self, other: KindCounts) -> KindCounts:
        statuses = {
            k: v - other.statuses.get(k, 0)
            for k, v in self.statuses.items()
            if v - other.statuses.get(k, 0)
        }
        return KindCounts(
            self.requests - other.requests,
            self.up - other.up,
            self.down - other.down,
            self.up_headers - other.up_headers,
            self.down_headers - other.down_headers,
            self.new_connections - other.new_connections,
            self.closed_by_server - other.closed_by_server,
            statuses,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "http_up": self.up,
            "http_down": self.down,
            "http_up_headers": self.up_headers,
            "http_down_headers": self.down_headers,
            "http_up_body": self.up - self.up_headers,
            "http_down_body": self.down - self.down_headers,
            "new_connections": self.new_connections,
            "closed_by_server": self.closed_by_server,
            "statuses": dict(sorted(self.statuses.items())),
        }


Snapshot = dict[str, KindCounts]


def diff(later: Snapshot, earlier: Snapshot) -> Snapshot:
    out = {}
    for kind, counts in later.items():
        d = counts.minus(earlier.get(kind, KindCounts()))
        if d.requests or d.up or d.down:
            out[kind] = d
    return out


class RequestLedger:
    """Per-kind request counts and HTTP bytes, shared by every device's transport."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kinds: dict[str, KindCounts] = {}
        # Every connection seen, kept alive so that its id is never reused.
        self._connections: dict[int, object] = {}
        self._window_start = -math.inf

    def start_window(self) -> None:
        """From now on, count a new connection only when the request that opened it is sent
        after this call (a long-poll sent before it and answered after it opened its
        connection before)."""
        with self._lock:
            self._window_start = time.monotonic()

    def _entry(self, kind: str) -> KindCounts:
        entry = self._kinds.get(kind)
        if entry is None:
            entry = self._kinds[kind] = KindCounts()
        return entry

    def sent(self, kind: str, *, up_head: int, up_body: int) -> None:
        with self._lock:
            entry = self._entry(kind)
            entry.requests += 1
            entry.up += up_head + up_body
            entry.up_headers += up_head

    def answered(
        self,
        kind: str,
        *,
        status: str,
        down_head: int,
        connection: object | None,
        close: bool,
        sent_at: float,
    ) -> None:
        """The head of an answer (the body is counted as it is read). The first answer on a
        connection is that of the request that opened it (HTTP/1.1 answers in order)."""
        with self._lock:
            entry = self._entry(kind)
            entry.down += down_head
            entry.down_headers += down_head
            entry.statuses[status] = entry.statuses.get(status, 0) + 1
            entry.closed_by_server += int(close)
            if connection is not None and id(connection) not in self._connections:
                self._connections[id(connection)] = connection
                if sent_at >= self._window_start:
                    entry.new_connections += 1

    def rebook(self, old: str, new: str, *, up_head: int, up_body: int) -> None:
        """Move one sent request from kind ``old`` to ``new`` (known once answered)."""
        with self._lock:
            for kind, sign in ((old, -1), (new, 1)):
                entry = self._entry(kind)
                entry.requests += sign
                entry.up += sign * (up_head + up_body)
                entry.up_headers += sign * up_head

    def received(self, kind: str, nbytes: int) -> None:
        with self._lock:
            self._entry(kind).down += nbytes

    def snapshot(self) -> Snapshot:
        with self._lock:
            return {k: v.copy() for k, v in self._kinds.items()}


def _header_bytes(raw: list[tuple[bytes, bytes]]) -> int:
    """``name: value\\r\\n`` per header plus the blank line."""
    return sum(len(k) + len(v) + 4 for k, v in raw) + 2


class _CountingStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, ledger: RequestLedger, kind: str) -> None:
        self._inner = inner
        self._ledger = ledger
        self._kind = kind

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._ledger.received(self._kind, len(chunk))
            yield chunk

    def close(self) -> None:
        self._inner.close()


class CountingTransport(httpx.BaseTransport):
    """Counts what passes through ``inner`` in ``ledger`` (see the module docstring). A request
    is booked when it is sent, its answer when the head arrives; a model download answered
    with a delta chain (200 without an ETag) is moved to ``model_delta_chain`` then, and a work
    poll answered with a work frame (assignment and delta chain in one body) to ``work_frame``."""

    def __init__(self, inner: httpx.BaseTransport, ledger: RequestLedger) -> None:
        self.inner = inner
        self._ledger = ledger

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        query = url.query.decode("ascii", "replace")
        kind = request_kind(request.method, url.path, query)
        up_head = len(request.method) + 1 + len(url.raw_path) + len(" HTTP/1.1\r\n")
        up_head += _header_bytes(request.headers.raw)
        up_body = len(request.read())
        sent_at = time.monotonic()
        self._ledger.sent(kind, up_head=up_head, up_body=up_body)
        try:
            response = self.inner.handle_request(request)
        except httpx.TransportError as exc:
            self._ledger.answered(
                kind,
                status=type(exc).__name__,
                down_head=0,
                connection=None,
                close=False,
                sent_at=sent_at,
            )
            raise
        ok = response.status_code == 200
        if kind == "model_download" and ok and "etag" not in response.headers:
            self._ledger.rebook(kind, "model_delta_chain", up_head=up_head, up_body=up_body)
            kind = "model_delta_chain"
        frame = response.headers.get("content-type", "").startswith(WORK_FRAME_MEDIA_TYPE)
        if kind == "work_poll" and ok and frame:
            self._ledger.rebook(kind, "work_frame", up_head=up_head, up_body=up_body)
            kind = "work_frame"
        reason = response.extensions.get("reason_phrase", b"")
        status_line = len(f"HTTP/1.1 {response.status_code} ") + len(reason) + 2
        self._ledger.answered(
            kind,
            status=str(response.status_code),
            down_head=status_line + _header_bytes(response.headers.raw),
            connection=response.extensions.get("network_stream"),
            close=response.headers.get("connection", "").lower() == "close",
            sent_at=sent_at,
        )
        assert isinstance(response.stream, httpx.SyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_CountingStream(response.stream, self._ledger, kind),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self.inner.close()


def count_client(client: CoordinatorClient, ledger: RequestLedger) -> httpx.BaseTransport:
    """Put a :class:`CountingTransport` around every transport ``client`` built for itself (one
    per :class:`~fedge.edge_agent.transport.Session` it holds: requests, cancel watch); their
    TLS, pool and keep-alive settings stay the product's. Returns the first one.

    The agent's client takes a transport only in place of its own, so the benchmark reaches
    for the ones inside (each ``Session._client`` is an ``httpx.Client``)."""
    wrapped = []
    for value in vars(client).values():
        if not isinstance(value, Session):
            continue
        http = value._client
        inner = http._transport
        if not isinstance(inner, httpx.HTTPTransport):
            raise TypeError(f"unexpected transport {type(inner).__name__}")
        http._transport = CountingTransport(inner, ledger)
        wrapped.append(inner)
    if not wrapped:
        raise TypeError("the client holds no Session")
    return wrapped[0]


def transport_settings(inner: httpx.BaseTransport) -> dict[str, Any]:
    """Pool settings of an agent's transport, for the record (httpcore's attributes)."""
    pool = getattr(inner, "_pool", None)
    return {
        name: getattr(pool, f"_{name}", None)
        for name in (
            "max_connections",
            "max_keepalive_connections",
            "keepalive_expiry",
            "http1",
            "http2",
        )
    }


class TrafficFleet(Fleet):
    """A :class:`Fleet` whose devices send through counting transports."""

    def __init__(self, *args: Any, ledger: RequestLedger, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ledger = ledger
        self.transport_settings: dict[str, Any] = {}

    def start(self) -> None:
        # Fleet.start with a transport per device (the fleet offers no transport hook).
        for device in self.devices:
            state = State(device.state_dir)
            device.client = open_client(
                state, retry=self.retry, sleep=self._stop.wait, interrupted=self._stop.is_set
            )
            self.transport_settings = transport_settings(count_client(device.client, self.ledger))
            device.agent = Agent(
                state=state,
                client=device.client,
                data=device.data,
                trainer_factory=self.trainer_factory,
                seed=device.seed,
                hooks=FaultHooks(device.faults),
                poll_wait=self.poll_wait,
                error_pause_s=min(1.0, self.poll_wait),
                stop_event=self._stop,
            )
            device.thread = threading.Thread(
                target=self._run, args=(device,), name=f"sim-{device.index:03d}", daemon=True
            )
            device.thread.start()

    def signal_stop(self) -> None:
        """Tell every agent to stop without waiting (then close the relay, then :meth:`stop`),
        so that the agents do not retry the polls the relay cuts."""
        self._stop.set()
        for device in self.devices:
            if device.agent is not None:
                device.agent.stop()


@dataclass(frozen=True)
class Sample:
    t: float  # time.time() just after the relay was read
    relay: Counts
    ledger: Snapshot


class Sampler:
    """Records ``(time, relay counts, ledger)`` every ``interval_s`` in a daemon thread."""

    def __init__(self, relay: CountingRelay, ledger: RequestLedger, interval_s: float) -> None:
        self.relay = relay
        self.ledger = ledger
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic-sampler", daemon=True)

    def sample(self) -> Sample:
        counts = self.relay.counts()
        snap = self.ledger.snapshot()
        s = Sample(time.time(), counts, snap)
        self.samples.append(s)
        return s

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> Sample:
        self._stop.set()
        self._thread.join()
        return self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def at_or_after(self, t: float) -> tuple[Sample, Sample | None]:
        """The first sample taken at or after ``t`` and the last one before it (the bytes of a
        moment are attributed to the first; the gap to the second bounds the error)."""
        before = None
        for s in self.samples:
            if s.t >= t:
                return s, before
            before = s
        return self.samples[-1], before
