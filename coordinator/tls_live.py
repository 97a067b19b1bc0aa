"""The serving process's TLS: one ``SSLContext`` kept current with the certificate files.

uvicorn gets :attr:`LiveTls.context` (its ``ssl_context_factory``) and wraps every new
connection with it. :meth:`LiveTls.check` runs when the server starts and every
``tls_check_interval_s`` after, on the event loop (the thread that creates the connections'
TLS objects, so loading a certificate never races a handshake):

- a certificate issued by the private CA beside it (``ca.crt`` and ``ca.key`` in the same
  folder) with fewer than :data:`~fedge.coordinator.tls.RENEW_BEFORE_DAYS` days left is
  renewed from that CA (:func:`~fedge.coordinator.tls.renew_server_cert`), under a lock
  shared by every process serving from the folder;
- any other certificate (an operator's) that close to expiry is logged as a warning on each
  check: renewing it is the operator's job;
- a certificate file that changed (renewed here, by another worker, by ``fedge coordinator
  renew-cert`` or by the operator) is loaded into the live context: connections from then on
  get it, connections already open keep theirs. A pair that does not load (a certificate
  written without its key yet) is logged and retried at the next check; the old pair stays.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from pathlib import Path

from fedge.coordinator.tls import (
    RENEW_BEFORE_DAYS,
    CertInfo,
    TlsPaths,
    issued_by_ca,
    read_cert,
    renew_server_cert,
    renewal_lock,
    server_context,
)

log = logging.getLogger(__name__)


def paths_for(cert: Path, key: Path) -> TlsPaths:
    """The certificate and key, with the CA files looked for in the certificate's folder."""
    return TlsPaths(cert.parent / "ca.crt", cert.parent / "ca.key", cert, key)


class LiveTls:
    """The server's ``SSLContext`` and the certificate it holds (see the module doc)."""

    def __init__(
        self,
        cert: Path,
        key: Path,
        *,
        group: str = "X25519",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.paths = paths_for(cert, key)
        self.group = group
        self.clock = clock
        self._context: ssl.SSLContext | None = None
        self.loaded: CertInfo | None = None

    def open(self) -> LiveTls:
        """Renew the certificate when due, then make the context with it (raises
        ``ssl.SSLError``, ``OSError`` or ``ValueError`` when the pair does not load)."""
        self._renew_if_due()
        with self._lock():
            self._context = server_context(
                self.paths.server_cert, self.paths.server_key, group=self.group
            )
            self.loaded = read_cert(self.paths.server_cert)
        return self

    @property
    def context(self) -> ssl.SSLContext:
        if self._context is None:
            raise RuntimeError("LiveTls.open() was not called")
        return self._context

    def _renewable(self) -> bool:
        return issued_by_ca(self.paths)

    def _lock(self) -> AbstractContextManager[None]:
        return renewal_lock(self.paths) if self._renewable() else nullcontext()

    def _renew_if_due(self) -> None:
        now = self.clock()
        try:
            current = read_cert(self.paths.server_cert)
        except (OSError, ValueError) as exc:
            log.warning("cannot read the TLS certificate %s: %s", self.paths.server_cert, exc)
            return
        left = current.days_left(now)
        if left >= RENEW_BEFORE_DAYS:
            return
        if not self._renewable():
            log.warning(
                "the TLS certificate %s expires in %.1f days (%s) and is not issued by a "
                "private CA whose key is beside it: replace it (same paths; it is loaded "
                "without a restart)",
                self.paths.server_cert,
                left,
                current.not_after.isoformat(),
                extra={"event": "tls_certificate_expiring", "days_left": round(left, 1)},
            )
            return
        try:
            with renewal_lock(self.paths):
                # Another process may have renewed it while this one waited for the lock.
                if read_cert(self.paths.server_cert).days_left(now) >= RENEW_BEFORE_DAYS:
                    return
                renewed = renew_server_cert(self.paths)
        except (OSError, ValueError) as exc:
            log.warning(
                "cannot renew the TLS certificate %s (%.1f days left): %s",
                self.paths.server_cert,
                left,
                exc,
                extra={"event": "tls_renewal_failed", "days_left": round(left, 1)},
            )
            return
        log.info(
            "renewed the TLS certificate %s from the private CA; valid until %s",
            self.paths.server_cert,
            renewed.not_after.isoformat(),
            extra={"event": "tls_certificate_renewed"},
        )

    def check(self) -> bool:
        """Renew when due, then load the files if they changed; True when a new certificate
        was loaded."""
        self._renew_if_due()
        try:
            with self._lock():
                current = read_cert(self.paths.server_cert)
                if self.loaded is not None and current.fingerprint == self.loaded.fingerprint:
                    return False
                chain = self.paths.server_cert.read_bytes()
                key = self.paths.server_key.read_bytes()
            self._load(chain, key)
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.warning(
                "cannot load the TLS certificate %s with key %s (keeping the current one): %s",
                self.paths.server_cert,
                self.paths.server_key,
                exc,
                extra={"event": "tls_reload_failed"},
            )
            return False
        self.loaded = current
        log.info(
            "serving the TLS certificate %s (valid until %s)",
            self.paths.server_cert,
            current.not_after.isoformat(),
            extra={"event": "tls_certificate_loaded"},
        )
        return True

    def _load(self, chain: bytes, key: bytes) -> None:
        """Load the pair into the live context, only once it is known to load: a failed
        ``load_cert_chain`` leaves a context with the new certificate and the old key, which
        completes no handshake. ``ssl`` loads from files only, so the bytes read (under the
        lock) go to a private temporary folder, removed at once."""
        with tempfile.TemporaryDirectory(prefix="fedge-tls-") as scratch:
            cert_file, key_file = Path(scratch) / "chain.pem", Path(scratch) / "key.pem"
            cert_file.write_bytes(chain)
            key_file.touch(mode=0o600)
            key_file.write_bytes(key)
            server_context(cert_file, key_file, group=self.group)  # raises if it does not load
            self.context.load_cert_chain(cert_file, key_file)

    async def watch(self, interval_s: float) -> None:
        """:meth:`check` every ``interval_s`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.check()
            except Exception:  # a surprise must not end the checks (or the server)
                log.exception("TLS certificate check failed", extra={"event": "tls_check_failed"})
