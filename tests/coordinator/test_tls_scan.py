"""A served coordinator, scanned with sslyze, complies with Mozilla's "intermediate" TLS
configuration; a server with OpenSSL's default settings does not.

The certificate path is validated against the coordinator's private CA (what agents pin), not
public roots. sslyze runs from ``.venv-scan`` (``make test`` creates it; sslyze pins an older
``cryptography`` than fedge): tests/support/tls_scan.py. Without it the tests skip, except
under CI=true, where they fail."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fedge.coordinator.app import create_app
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths, create_ca_and_server_cert
from fedge.coordinator.tls_live import LiveTls
from tests.support import databases
from tests.support.servers import serve_in_thread

pytestmark = pytest.mark.slow  # a scan makes a few hundred handshakes

ROOT = Path(__file__).resolve().parents[2]
SCANNER = ROOT / "tests" / "support" / "tls_scan.py"
HOST = "fedge.test"


def scan_python() -> Path:
    python = Path(os.environ.get("FEDGE_TLS_SCAN_PYTHON", ROOT / ".venv-scan" / "bin" / "python"))
    if not python.is_file():
        message = f"{python} is missing: `make test` (or `make .venv-scan/.installed`) makes it"
        if databases.in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return python


def scan(port: int, ca: Path) -> dict[str, Any]:
    done = subprocess.run(
        [str(scan_python()), str(SCANNER), "127.0.0.1", str(port), HOST, str(ca)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    assert "error" not in result, result
    return result


@pytest.fixture
def tls(tmp_path: Path) -> TlsPaths:
    return create_ca_and_server_cert(tmp_path / "tls", hosts=[HOST])


@pytest.fixture
def settings(tmp_path: Path, tls: TlsPaths, sqlite_template: databases.SqliteTemplate) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=sqlite_template.fresh(tmp_path),
        tls_cert=tls.server_cert,
        tls_key=tls.server_key,
    )


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("group", ["X25519", "P-256"])
def test_the_coordinator_complies_with_mozilla_intermediate(
    settings: Settings, tls: TlsPaths, group: str
) -> None:
    live = LiveTls(tls.server_cert, tls.server_key, group=group).open()
    with serve_in_thread(
        create_app(settings), certfile=None, keyfile=None, ssl_context=live.context
    ) as url:
        result = scan(port_of(url), tls.ca_cert)
    assert result["issues"] == {}
    assert result["tls_versions"] == ["TLSv1.2", "TLSv1.3"]
    assert result["curves"] == [{"X25519": "X25519", "P-256": "secp256r1"}[group]]
    suites = [
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    ]
    if group == "X25519":
        # sslyze tries the AES-GCM suites with a client of OpenSSL 1.0.2, which has no X25519:
        # what an X25519-only server costs (docs/operations.md, "TLS").
        assert result["tls12_suites"] == suites[2:]
    else:
        assert result["tls12_suites"] == suites


def test_a_default_openssl_server_fails_the_check(settings: Settings, tls: TlsPaths) -> None:
    """What the coordinator served before its own context (uvicorn's, i.e. OpenSSL's
    defaults, and an 825-day certificate): CBC suites, X448 and P-521 are findings."""
    weak = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    long_lived = create_ca_and_server_cert(tls.ca_cert.parent.parent / "old", valid_days=825)
    weak.load_cert_chain(long_lived.server_cert, long_lived.server_key)
    with serve_in_thread(
        create_app(settings), certfile=None, keyfile=None, ssl_context=weak
    ) as url:
        result = scan(port_of(url), long_lived.ca_cert)
    issues = result["issues"]
    # (sslyze's path validation may reject the 825-day leaf too.)
    expected = {"ciphers", "tls_curves", "maximum_certificate_lifespan"}
    assert expected <= set(issues) <= expected | {"certificate_path_validation"}, issues
    assert "CBC" in issues["ciphers"]
    assert "X448" in issues["tls_curves"] and "secp521r1" in issues["tls_curves"]
