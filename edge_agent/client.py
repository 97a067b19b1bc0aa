"""The device's REST client of the coordinator (see docs/protocol.md, section Devices).

Every request except enrollment is signed with the device's Ed25519 key through
:mod:`fedge.shared.signing`; the signature covers the final request as sent (method, path, query,
body) and is recomputed on every retry. Connection errors, 5xx and 429 are retried with
exponential backoff and jitter (:mod:`fedge.edge_agent.transport`); other errors raise the
:mod:`fedge.edge_agent.errors` family.
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.edge_agent.errors import AgentError
from fedge.edge_agent.transport import RetryPolicy, Session
from fedge.shared import signing
from fedge.shared.targeting import MAX_DECLINE_DETAIL
from fedge.shared.wire_delta import WORK_FRAME_MEDIA_TYPE, decode_work_frame
from fedge.shared.wireerror import WireFormatError

API = "/api/v1"
MAX_WAIT_S = 60
#: The parts of a work answer the coordinator leaves out once the device holds them.
TASK_CONFIG_KEYS = ("compression", "training", "model", "spec")


@dataclass(frozen=True)
class Work:
    """One assignment as the work long-poll describes it."""

    assignment_id: int
    status: str
    task_id: int = 0
    round_id: int | None = None
    mode: str = "sync"
    base_version: int = 0
    deadline: str | None = None
    model_url: str = ""
    upload_url: str = ""
    compression: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    model: Mapping[str, Any] = field(default_factory=dict)
    spec: list[Mapping[str, Any]] = field(default_factory=list)
    #: The delta chain to the base model that came with the answer, and the version it
    #: starts at (a work frame; see ``get_work(have=...)``).
    model_delta: bytes | None = None
    model_delta_from: int | None = None
    #: The round runs secure aggregation (:mod:`fedge.edge_agent.secagg_round`).
    secure_aggregation: bool = False

    @property
    def cancelled(self) -> bool:
        return self.status == "cancelled"

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Work:
        try:
            assignment_id = int(body["assignment_id"])
            status = str(body.get("status", "assigned"))
        except (KeyError, TypeError, ValueError) as exc:
            raise AgentError("bad_response", f"work answer lacks assignment_id: {exc}") from None
        if status == "cancelled":
            return cls(assignment_id=assignment_id, status=status)
        try:
            return cls(
                assignment_id=assignment_id,
                status=status,
                task_id=int(body["task_id"]),
                round_id=None if body.get("round_id") is None else int(body["round_id"]),
                mode=str(body.get("mode", "sync")),
                base_version=int(body["base_version"]),
                deadline=body.get("deadline"),
                model_url=str(body.get("model_url", "")),
                upload_url=str(body["upload_url"]),
                compression=dict(body.get("compression") or {}),
                training=dict(body.get("training") or {}),
                model=dict(body.get("model") or {}),
                spec=list(body.get("spec") or []),
                secure_aggregation=body.get("secure_aggregation") is True,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AgentError("bad_response", f"malformed work answer: {exc!r}") from None


@dataclass
class Traffic:
    """Bytes this client moved: update bodies uploaded, model bodies downloaded."""

    upload_bytes: int = 0
    uploads: int = 0
    model_bytes: int = 0
    downloads: int = 0
    not_modified: int = 0
    #: Of ``downloads``: answers that were delta chains (their bytes are in ``model_bytes``).
    delta_downloads: int = 0
    #: Work answers that left out the task configuration this client already held.
    known_configs: int = 0
    #: Of ``delta_downloads``: chains that came inside a work answer (no download request).
    inline_deltas: int = 0
    #: Uploads that asked for the next assignment (``next=1``).
    next_asked: int = 0
    #: Assignments that came with an upload's answer (no work request).
    next_with_upload: int = 0
    #: Secure aggregation: message bytes posted and fetched (bodies only).
    secagg_sent: int = 0
    secagg_received: int = 0


#: The header of a paced coordinator's answer without work (docs/protocol.md).
RECONNECT_HEADER = "Fedge-Reconnect"
#: The longest sleep a reconnect time may ask for (a bad value cannot silence a device).
MAX_RECONNECT_S = 86400.0


def _reconnect(value: str | None) -> float | None:
    """The reconnect time of an answer: whole seconds, 0..``MAX_RECONNECT_S``; None when
    absent or malformed (then the agent polls again as it would without it)."""
    if value is None or not value.isdigit() or len(value) > 6:
        return None
    return min(float(value), MAX_RECONNECT_S)


class CoordinatorClient:
    """Signed, retrying HTTP client for the device API."""

    def __init__(
        self,
        base_url: str,
        *,
        ca_file: str | None = None,
        transport: httpx.BaseTransport | None = None,
        identity: tuple[str, Ed25519PrivateKey] | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], Any] | None = None,
        rng: random.Random | None = None,
        interrupted: Callable[[], bool] | None = None,
    ) -> None:
        self.identity = identity
        self.traffic = Traffic()
        # Task configurations by config_digest (what a work answer leaves out once known).
        self._configs: dict[str, dict[str, Any]] = {}
        self._known: str | None = None
        #: The next assignment an upload's answer carried, for the next ``get_work``.
        self._next: Work | None = None
        self._traffic_lock = threading.Lock()
        #: A paced coordinator's "come back in" (seconds) of the last work poll without
        #: ``current`` that brought no work (docs/protocol.md, "Pace steering"); else None.
        self.reconnect_s: float | None = None
        #: The last reconnect time a paced coordinator gave (kept while the device works on
        #: an assignment, whose answers carry none); None once an idle poll is answered
        #: without one (the fleet long-polls). The pause of a device that gave up its quick
        #: retries while holding work is drawn from it (fedge.edge_agent.pauses).
        self.paced_interval_s: float | None = None

        def session() -> Session:
            # One connection each: the agent's requests follow one another, so a single
            # kept-alive TLS connection carries them all, round after round.
            return Session(
                base_url,
                ca_file=ca_file,
                transport=transport,
                timeout=timeout,
                retry=retry,
                sleep=sleep,
                rng=rng,
                interrupted=interrupted,
                max_connections=1,
            )

        self._session = session()
        # The cancel watch (a long-poll held open while the agent trains) has a connection of
        # its own, so the upload after training does not open a new one next to it.
        self._watch_session = session()
        self._timeout = timeout

    @property
    def base_url(self) -> str:
        return self._session.base_url

    def close(self) -> None:
        self._session.close()
        self._watch_session.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- signing ---------------------------------------------------------------------------

    def _sign(self, request: httpx.Request) -> None:
        if self.identity is None:
            raise AgentError("not_enrolled", "this device has no identity; enroll it first")
        device_id, key = self.identity
        headers = signing.sign_request(
            key,
            device_id=device_id,
            method=request.method,
            path=request.url.path,
            query=request.url.query.decode("ascii"),
            body=request.content,
        )
        request.headers.update(headers)

    def _signed(
        self, method: str, path: str, *, watch: bool = False, **kwargs: Any
    ) -> httpx.Response:
        session = self._watch_session if watch else self._session
        return session.request(method, path, prepare=self._sign, **kwargs)

    # -- API -------------------------------------------------------------------------------

    def enroll(
        self,
        token: str,
        name: str,
        capabilities: Mapping[str, Any] | None = None,
        *,
        public_key: str,
        tags: Sequence[str] = (),
    ) -> str:
        """Register ``public_key`` (base64 of the raw Ed25519 key) with an enrollment token;
        the new device id. Enrollment is the one unsigned device request."""
        response = self._session.request(
            "POST",
            f"{API}/device/enroll",
            json_body={
                "token": token,
                "public_key": public_key,
                "name": name,
                "capabilities": dict(capabilities or {}),
                **({"tags": list(tags)} if tags else {}),
            },
        )
        body = response.json()
        try:
            return str(body["device_id"])
        except (KeyError, TypeError):
            raise AgentError("bad_response", "enrollment answer lacks device_id") from None

    def get_work(
        self, wait: float, current: int | None = None, *, have: tuple[int, int] | None = None
    ) -> Work | None:
        """Long-poll for work (or, with ``current``, for that assignment's cancellation).
        ``None`` when the wait ended without news (204).

        ``have`` is ``(task, version)`` of the broadcast model the device holds: an answer on a
        newer version of that task may then carry the delta chain to it (``Work.model_delta``).

        The next assignment an upload's answer carried (``upload_update(next_work=True)``) is
        answered first, without a request."""
        if current is None and self._next is not None:
            work, self._next = self._next, None
            return work
        wait_s = max(0, min(MAX_WAIT_S, int(wait)))
        params: dict[str, Any] = {"wait": wait_s}
        if current is not None:
            params["current"] = current
        else:
            params.update(self._held_params(have))
        # A paced device's check-in is tried once: after a failure the agent pauses a random
        # part of its pacing interval (pauses.paced_retry_s) instead of retrying at once, so
        # a fleet's check-ins held back by an outage do not all arrive as it ends. (A device
        # working on an assignment holds no reconnect time: its requests are retried.)
        paced = current is None and self.reconnect_s is not None
        response = self._signed(
            "GET",
            f"{API}/device/work",
            params=params,
            timeout=wait_s + self._timeout,
            watch=current is not None,
            attempts=1 if paced else None,
        )
        if current is None:
            self.reconnect_s = _reconnect(response.headers.get(RECONNECT_HEADER))
        if response.status_code == 204 or not response.content:
            if current is None:
                self.paced_interval_s = self.reconnect_s
            return None
        body, chain = self._json_and_chain(response)
        return self._work(body, chain)

    @property
    def holds_next(self) -> bool:
        """Whether an upload's answer carried the next assignment (:meth:`get_work` returns it)."""
        return self._next is not None

    def drop_connection(self) -> None:
        """Close the kept-alive connection of the work poll and uploads (before a long sleep)."""
        self._session.drop_connections()

    def _json_and_chain(self, response: httpx.Response) -> tuple[Any, bytes | None]:
        """An answer's JSON, and the delta chain after it when it is a work frame."""
        if not response.headers.get("content-type", "").startswith(WORK_FRAME_MEDIA_TYPE):
            return response.json(), None
        try:
            answer, chain = decode_work_frame(response.content)
            return json.loads(answer), chain
        except (WireFormatError, ValueError) as exc:
            raise AgentError("bad_response", f"malformed work frame: {exc}") from None

    def _work(self, body: Any, chain: bytes | None) -> Work:
        """A work answer (a poll's, or an upload answer's ``next``) with its delta chain."""
        work = Work.from_json(self._with_config(body))
        if chain is None:
            return work
        with self._traffic_lock:
            self.traffic.downloads += 1
            self.traffic.delta_downloads += 1
            self.traffic.inline_deltas += 1
            self.traffic.model_bytes += len(chain)
        start = body.get("model_delta_from")
        if not isinstance(start, int):
            return work
        return dataclasses.replace(work, model_delta=chain, model_delta_from=start)

    def _held_params(self, have: tuple[int, int] | None) -> dict[str, Any]:
        """``known`` and ``have`` of a request that may be answered with work."""
        params: dict[str, Any] = {}
        if self._known is not None:
            params["known"] = self._known
        if have is not None:
            params["have"] = f"{int(have[0])}.{int(have[1])}"
        return params

    def _with_config(self, body: Any) -> Any:
        """Fill in a work answer's task configuration from the one held under its digest, or
        remember the configuration it carries."""
        digest = body.get("config_digest") if isinstance(body, dict) else None
        if not isinstance(digest, str) or body.get("status") == "cancelled":
            return body
        config = {k: body[k] for k in TASK_CONFIG_KEYS if k in body}
        if len(config) == len(TASK_CONFIG_KEYS):
            with self._traffic_lock:
                self._configs = {digest: config}  # one task at a time is what devices run
                self._known = digest
            return body
        held = self._configs.get(digest)
        if held is None:
            raise AgentError("bad_response", "work answer without a task configuration")
        with self._traffic_lock:
            self.traffic.known_configs += 1
        return {**body, **held}

    def download_model(
        self,
        task_id: int,
        version: int,
        etag: str | None = None,
        *,
        have: int | None = None,
        held: str | None = None,
    ) -> tuple[bytes | None, str | None]:
        """The model's wire bytes and ETag; ``(None, etag)`` when ``etag`` still matches (304).

        With ``have`` (a version whose broadcast model the device holds) the answer may be a
        delta chain instead of the model (no ETag then; see :mod:`fedge.shared.broadcast`);
        ``held`` (a SHA-256 hex digest of the model held as ``have``) asks for the full model
        unless that is the broadcast model."""
        headers = {"If-None-Match": etag} if etag else None
        params: dict[str, Any] | None = None
        if have is not None:
            params = {"have": have} if held is None else {"have": have, "held": held[:16]}
        response = self._signed(
            "GET",
            f"{API}/device/tasks/{task_id}/models/{version}",
            headers=headers,
            params=params,
        )
        new_etag = response.headers.get("ETag", etag if have is None else None)
        with self._traffic_lock:
            if response.status_code == 304:
                self.traffic.not_modified += 1
            else:
                self.traffic.downloads += 1
                self.traffic.model_bytes += len(response.content)
                if "ETag" not in response.headers:
                    self.traffic.delta_downloads += 1
        if response.status_code == 304:
            return None, new_etag
        return response.content, new_etag

    def upload_update(
        self,
        upload_url: str,
        body: bytes,
        idempotency_key: str,
        *,
        next_work: bool = False,
        have: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        """Upload an encoded update; the coordinator's receipt (``duplicate`` tells a replay).

        With ``next_work`` the answer also carries the device's next assignment when the
        coordinator has one at once (with ``have``, as :meth:`get_work`'s, the delta chain to
        its base model): the next :meth:`get_work` returns it without a request."""
        params = {"next": 1, **self._held_params(have)} if next_work else None
        response = self._signed(
            "POST",
            upload_url,
            content=body,
            params=params,
            # the short receipt (update id, staleness, duplicate) is all the agent reads
            headers={"Idempotency-Key": idempotency_key, "Prefer": "return=minimal"},
        )
        with self._traffic_lock:
            self.traffic.uploads += 1
            self.traffic.upload_bytes += len(body)
            self.traffic.next_asked += int(next_work)
        # A paced coordinator tells a device it hands no next assignment when to check in.
        self.reconnect_s = _reconnect(response.headers.get(RECONNECT_HEADER))
        if self.reconnect_s is not None:
            self.paced_interval_s = self.reconnect_s
        receipt, chain = self._json_and_chain(response)
        if not isinstance(receipt, dict):
            raise AgentError("bad_response", "upload answer is not a JSON object")
        following = receipt.get("next")
        if next_work and isinstance(following, dict):
            self._next = self._work(following, chain)
            with self._traffic_lock:
                self.traffic.next_with_upload += 1
        return receipt

    def report_metrics(self, assignment_id: int, metrics: Mapping[str, float]) -> None:
        self._signed(
            "POST", f"{API}/device/assignments/{assignment_id}/metrics", json_body=dict(metrics)
        )

    def report_capabilities(self, report: Mapping[str, Any]) -> dict[str, Any]:
        """Tell the coordinator what this device can do (trainers, data shape, poll
        interval); the device's record as the coordinator now holds it."""
        body: dict[str, Any] = self._signed(
            "PUT", f"{API}/device/capabilities", json_body=dict(report)
        ).json()
        return body

    def decline(self, assignment_id: int, reason: str, detail: str = "") -> dict[str, Any]:
        """Decline an assignment this device cannot work on (``reason``: one of
        :data:`fedge.shared.targeting.DECLINE_REASONS`); the coordinator's record of it."""
        body: dict[str, Any] = self._signed(
            "POST",
            f"{API}/device/assignments/{assignment_id}/decline",
            json_body={"reason": reason, "detail": detail[:MAX_DECLINE_DETAIL]},
        ).json()
        return body

    # -- secure aggregation (docs/secure-aggregation.md) ------------------------------------

    def secagg_config(self, round_id: int) -> dict[str, Any]:
        """The round's public parameters, this device's index and the cohort's keys."""
        body = self._signed("GET", f"{API}/device/secagg/{round_id}/config").json()
        if not isinstance(body, dict):
            raise AgentError("bad_response", "secure-aggregation config is not a JSON object")
        return body

    def secagg_post(self, round_id: int, message: str, data: bytes) -> None:
        """Post one of the round's messages (``advert``, ``shares``, ``masked``, ``unmask``);
        the same message again is answered as a duplicate."""
        self._signed(
            "POST",
            f"{API}/device/secagg/{round_id}/{message}",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        with self._traffic_lock:
            self.traffic.secagg_sent += len(data)

    def secagg_get(self, round_id: int, what: str) -> bytes | None:
        """``adverts``, ``shares`` or ``unmask`` of the round; ``None`` while the phase that
        produces it is still open (425)."""
        try:
            response = self._signed("GET", f"{API}/device/secagg/{round_id}/{what}")
        except AgentError as exc:
            if exc.status == 425:
                return None
            raise
        with self._traffic_lock:
            self.traffic.secagg_received += len(response.content)
        return response.content

    def me(self) -> dict[str, Any]:
        body: dict[str, Any] = self._signed("GET", f"{API}/device/me").json()
        return body
