"""The image's HEALTHCHECK: is the coordinator in this container ready (``/readyz``: the
database reachable with its schema at head, the blob store usable)? ``--live`` asks only
whether the server answers at all (``/healthz``, for a liveness probe that must not restart a
coordinator whose database is briefly away).

Standard library only for the request (no curl in the image). It reads the same ``FEDGE_*``
settings as the server, so it follows the server's choices:

- HTTPS (the default): the certificate chain in ``FEDGE_TLS_CERT`` is verified against the
  system roots plus that file itself (which holds the private CA when the certificate came from
  ``fedge coordinator init``); the host name is not checked, because the probe connects to the
  loopback address while the certificate names the public host.
- plain HTTP when ``FEDGE_INSECURE_HTTP=true`` (behind a TLS-terminating proxy).

Exit status 0 when the probe answers 200, else 1 with the reason (the coordinator's own
``detail`` for a 503) on stderr.
"""

from __future__ import annotations

import json
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

from fedge.coordinator.settings import Settings

# Addresses that mean "every interface": probe through loopback instead.
_WILDCARD = {"", "0.0.0.0", "::", "[::]"}  # noqa: S104 (compared against, not bound)


def probe_url(settings: Settings, *, path: str = "/healthz") -> str:
    host = settings.host.strip("[]") if settings.host not in _WILDCARD else "127.0.0.1"
    scheme = "http" if settings.insecure_http else "https"
    netloc = f"[{host}]" if ":" in host else host
    return f"{scheme}://{netloc}:{settings.port}{path}"


def tls_context(cert_chain: Path) -> ssl.SSLContext:
    """Verify the chain (system roots + the served chain file), not the host name."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.load_verify_locations(cafile=str(cert_chain))
    return context


READY = "/readyz"
LIVE = "/healthz"


def check(settings: Settings, *, timeout_s: float = 4.0, path: str = READY) -> str | None:
    """None when healthy, else why not."""
    url = probe_url(settings, path=path)
    context = None
    if not settings.insecure_http:
        assert settings.tls_cert is not None  # filled in by Settings
        try:
            context = tls_context(settings.tls_cert)
        except (OSError, ssl.SSLError) as exc:
            return f"cannot load {settings.tls_cert}: {exc}"
    try:
        # The URL is built from our own settings: http(s) to this container only.
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}{_detail(exc)}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url} unreachable: {getattr(exc, 'reason', exc)}"
    return None if status == 200 else f"{url} answered {status}"


def _detail(exc: urllib.error.HTTPError) -> str:
    """``: <detail>`` of a fedge error answer, or nothing."""
    try:
        body = json.loads(exc.read(4096) or b"null")
    except (OSError, ValueError):
        return ""
    detail = body.get("detail") if isinstance(body, dict) else None
    return f": {detail}" if isinstance(detail, str) else ""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--live"]):
        print("usage: healthcheck.py [--live]", file=sys.stderr)
        return 2
    problem = check(Settings(), path=LIVE if args else READY)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
