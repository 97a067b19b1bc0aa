"""One HTTP session to the coordinator: pinned CA, timeouts, retries with backoff and jitter.

Both the device client (:mod:`fedge.edge_agent.client`) and the administrator's client
(:mod:`fedge.edge_agent.admin_client`) send through :class:`Session`. A request is retried on
connection errors and timeouts, on 5xx answers and on 429 (waiting at least ``Retry-After``);
any other 4xx is raised at once as an :class:`~fedge.edge_agent.errors.ApiError`. Every attempt
rebuilds the request and runs the ``prepare`` hook again, so a signed request gets a fresh
nonce and timestamp per attempt (the coordinator refuses replayed nonces).
"""

from __future__ import annotations

import functools
import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import httpx

from fedge.edge_agent.errors import (
    ApiError,
    CaFileError,
    RateLimited,
    TlsUntrusted,
    Unreachable,
    error_from_response,
)

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Seconds an idle connection is kept for the next request (below the coordinator's default
#: ``FEDGE_KEEPALIVE_S`` of 75, so the client closes first and never sends into a connection
#: the server is closing).
KEEPALIVE_S = 60.0
DROPPED_DEFAULT_HEADERS = ("accept", "accept-encoding", "connection", "user-agent")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry. ``attempts`` counts the first try."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 300.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0 or self.max_retry_after < 0:
            raise ValueError("RetryPolicy delays must not be negative")

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Delay before retry number ``retry`` (0-based): exponential, capped, with jitter
        in [50%, 100%] of the capped value so that many devices do not retry in step."""
        ceiling = min(self.max_delay, self.base_delay * (2.0**retry))
        return ceiling * (0.5 + 0.5 * rng.random())


def verify_setting(ca_file: str | None) -> ssl.SSLContext | bool:
    """TLS verification: an SSL context trusting only ``ca_file`` (the coordinator's private
    CA, pinned), or the system trust store when no CA is given."""
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=ca_file)
    except FileNotFoundError:
        raise CaFileError(
            "ca_file_missing",
            f"CA file {ca_file} does not exist; give the coordinator's tls/ca.crt "
            "(--ca or FEDGE_CA)",
        ) from None
    except IsADirectoryError:
        raise CaFileError(
            "ca_file_unusable", f"CA file {ca_file} is a directory; give the ca.crt file in it"
        ) from None
    except (ssl.SSLError, ValueError):
        raise CaFileError(
            "ca_file_not_pem",
            f"CA file {ca_file} holds no PEM certificate; give the coordinator's tls/ca.crt "
            "(it begins with -----BEGIN CERTIFICATE-----)",
        ) from None
    except OSError as exc:
        raise CaFileError(
            "ca_file_unusable", f"cannot read CA file {ca_file}: {exc.strerror or exc}"
        ) from None


def _tls_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error behind a transport error, if that is what it is."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


class Session:
    """A thread-safe wrapper of one :class:`httpx.Client` that retries."""

    def __init__(
        self,
        base_url: str,
        *,
        ca_file: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], Any] | None = None,
        rng: random.Random | None = None,
        headers: Mapping[str, str] | None = None,
        interrupted: Callable[[], bool] | None = None,
        keepalive_s: float = KEEPALIVE_S,
        max_connections: int | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._sleep = sleep if sleep is not None else _sleep
        self._rng = rng or random.Random()  # nosec B311  # retry jitter, not a secret
        self._interrupted = interrupted
        self._own_transport = transport is None
        self._make_client = functools.partial(
            self._new_client,
            ca_file=ca_file,
            transport=transport,
            timeout=timeout,
            headers=headers,
            keepalive_s=keepalive_s,
            max_connections=max_connections,
        )
        self._client = self._make_client()

    def _new_client(
        self,
        *,
        ca_file: str | None,
        transport: httpx.BaseTransport | None,
        timeout: float,
        headers: Mapping[str, str] | None,
        keepalive_s: float,
        max_connections: int | None,
    ) -> httpx.Client:
        client = httpx.Client(
            base_url=self.base_url,
            verify=verify_setting(ca_file) if transport is None else True,
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            headers=dict(headers or {}),
            follow_redirects=False,
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=keepalive_s,
            ),
        )
        # httpx's default headers (Accept, Accept-Encoding, Connection, User-Agent) say
        # nothing the coordinator uses: about 90 bytes per request on a metered link.
        for name in DROPPED_DEFAULT_HEADERS:
            if name not in {k.lower() for k in (headers or {})}:
                client.headers.pop(name, None)
        return client

    def close(self) -> None:
        self._client.close()

    def drop_connections(self) -> None:
        """Close the kept-alive connections now (before a sleep longer than the
        coordinator's keep-alive: neither side holds a socket meanwhile); the next request
        opens a new one. (A transport given by the caller is the caller's: kept.)"""
        if not self._own_transport:
            return
        old = self._client
        self._client = self._make_client()
        old.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        content: bytes | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        prepare: Callable[[httpx.Request], None] | None = None,
        attempts: int | None = None,
    ) -> httpx.Response:
        """Send with retries; return a response with status < 400 (304 included).
        ``attempts``: this request's tries instead of the policy's."""
        policy = self.retry
        if attempts is not None:
            policy = replace(policy, attempts=max(1, attempts))
        last_error: Exception | None = None
        for attempt in range(policy.attempts):
            request = self._client.build_request(
                method,
                path,
                params=params,
                content=content,
                json=json_body,
                headers=headers,
                timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
            )
            if prepare is not None:
                prepare(request)
            wait = policy.backoff(attempt, self._rng)
            try:
                response = self._client.send(request)
            except httpx.TransportError as exc:
                failure = _tls_failure(exc)
                if failure is not None:
                    raise TlsUntrusted(
                        "tls_untrusted",
                        f"the certificate of {self.base_url} did not verify "
                        f"({failure.verify_message or failure.reason}); check that the CA "
                        "file (--ca, FEDGE_CA) is the coordinator's tls/ca.crt and that the "
                        "URL's host name is one the certificate was made for",
                    ) from exc
                last_error = Unreachable(
                    "unreachable",
                    f"cannot reach {self.base_url} ({method} {request.url.path}): "
                    f"{type(exc).__name__}: {exc}",
                )
                last_error.__cause__ = exc
            else:
                if response.status_code < 400:
                    return response
                error = error_from_response(response)
                if response.status_code not in RETRY_STATUSES:
                    raise error
                last_error = error
                if isinstance(error, RateLimited) and error.retry_after is not None:
                    wait = max(wait, min(error.retry_after, policy.max_retry_after))
            if attempt + 1 >= policy.attempts or self._is_interrupted():
                break
            log.debug("retrying %s %s in %.2f s after: %s", method, path, wait, last_error)
            self._sleep(wait)
            if self._is_interrupted():
                break
        assert last_error is not None
        if isinstance(last_error, ApiError | Unreachable):
            raise last_error
        raise Unreachable("unreachable", str(last_error))  # pragma: no cover

    def _is_interrupted(self) -> bool:
        return self._interrupted is not None and self._interrupted()
