"""The server's TLS settings and certificate lifecycle: which protocol versions, suites and
groups a real handshake accepts, server certificates of at most 90 days renewed from the
private CA before they expire, and a running ``fedge coordinator serve`` that picks up a
renewed certificate without a restart."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import ssl
import subprocess
import time
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from fedge.coordinator.cli import main as coordinator_cli
from fedge.coordinator.tls import (
    RENEW_BEFORE_DAYS,
    SERVER_CERT_DAYS,
    TlsPaths,
    create_ca_and_server_cert,
    read_cert,
    renew_server_cert,
    server_context,
)
from fedge.coordinator.tls_live import LiveTls
from tests.coordinator.test_tls_serve import fedge_command

HOST = "fedge.test"


def client_context(
    ca: Path, *, version: ssl.TLSVersion | None = None, ciphers: str | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if version is not None:
        context.minimum_version = version
        context.maximum_version = version
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """A complete TLS handshake between the two contexts in memory; the client's end (raises
    ``ssl.SSLError`` when they cannot agree)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_end = client.wrap_bio(c_in, c_out, server_hostname=HOST)
    server_end = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, end, out, peer_in in (
            ("client", client_end, c_out, s_in),
            ("server", server_end, s_out, c_in),
        ):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
                finally:
                    peer_in.write(out.read())
        if all(done.values()):
            return client_end
    raise AssertionError("the handshake did not finish")


def served_fingerprint(end: ssl.SSLObject | ssl.SSLSocket) -> str:
    der = end.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


@pytest.fixture
def tls(tmp_path: Path) -> TlsPaths:
    return create_ca_and_server_cert(tmp_path / "tls", hosts=[HOST])


def test_tls12_only_ecdhe_with_aead_suites(tls: TlsPaths) -> None:
    server = server_context(tls.server_cert, tls.server_key)
    tls12 = [c["name"] for c in server.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12, "no TLS 1.2 suite"
    for name in tls12:
        assert name.startswith("ECDHE-"), name
        assert "GCM" in name or "CHACHA20-POLY1305" in name, name
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.options & ssl.OP_NO_COMPRESSION
    assert server.options & ssl.OP_NO_RENEGOTIATION

    ok = handshake(server, client_context(tls.ca_cert, version=ssl.TLSVersion.TLSv1_2))
    assert ok.version() == "TLSv1.2"
    cipher = ok.cipher()
    assert cipher is not None and cipher[0] in tls12
    chacha = handshake(
        server,
        client_context(
            tls.ca_cert, version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-CHACHA20-POLY1305"
        ),
    )
    assert chacha.cipher() is not None and chacha.cipher()[0] == "ECDHE-ECDSA-CHACHA20-POLY1305"  # type: ignore[index]
    # A client that offers only CBC suites (which OpenSSL would otherwise accept) is refused.
    with pytest.raises(ssl.SSLError):
        handshake(
            server,
            client_context(
                tls.ca_cert,
                version=ssl.TLSVersion.TLSv1_2,
                ciphers="ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA",
            ),
        )


def test_tls13_and_nothing_older_than_tls12(tls: TlsPaths) -> None:
    server = server_context(tls.server_cert, tls.server_key)
    end = handshake(server, client_context(tls.ca_cert))
    assert end.version() == "TLSv1.3"
    old = client_context(tls.ca_cert)
    with warnings.catch_warnings():  # setting TLS 1.1 warns: it is what this client is for
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1_1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError, match=r"UNSUPPORTED_PROTOCOL|VERSION"):
        handshake(server, old)


@pytest.mark.parametrize("group", ["X25519", "P-256", "P-384"])
def test_one_key_exchange_group(tls: TlsPaths, group: str) -> None:
    """The server agrees only on its configured group: a TLS 1.3 client offering only another
    one (including X448 and P-521, which OpenSSL offers by default) cannot connect. (In TLS
    1.2 a client's group list also names the curves it accepts certificates on, so the
    sslyze scan checks the groups there: tests/coordinator/test_tls_scan.py.)"""
    server = server_context(tls.server_cert, tls.server_key, group=group)
    openssl_names = {"X25519": "X25519", "P-256": "prime256v1", "P-384": "secp384r1"}
    for other, name in [*openssl_names.items(), ("P-521", "secp521r1"), ("X448", "X448")]:
        client = client_context(tls.ca_cert, version=ssl.TLSVersion.TLSv1_3)
        client.set_ecdh_curve(name)
        if other == group:
            assert handshake(server, client).version() == "TLSv1.3"
        else:
            with pytest.raises(ssl.SSLError):
                handshake(server, client)
    with pytest.raises(ValueError, match="unknown TLS group"):
        server_context(tls.server_cert, tls.server_key, group="P-521")


def test_new_server_certificates_live_90_days(tls: TlsPaths) -> None:
    info = read_cert(tls.server_cert)
    assert SERVER_CERT_DAYS == 90
    lifetime = info.not_after - info.certificate.not_valid_before_utc
    assert timedelta(days=90) <= lifetime <= timedelta(days=90, minutes=5)


def _san(path: Path) -> x509.SubjectAlternativeName:
    cert = read_cert(path).certificate
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_a_certificate_close_to_expiry_is_renewed_at_start(tls: TlsPaths) -> None:
    renew_server_cert(tls, valid_days=RENEW_BEFORE_DAYS - 1)
    old, old_key, names = (
        read_cert(tls.server_cert),
        tls.server_key.read_bytes(),
        _san(tls.server_cert),
    )
    live = LiveTls(tls.server_cert, tls.server_key).open()
    new = read_cert(tls.server_cert)
    assert new.fingerprint != old.fingerprint
    assert new.days_left(datetime.now(UTC)) > SERVER_CERT_DAYS - 1
    assert tls.server_key.read_bytes() != old_key  # a new key
    assert _san(tls.server_cert) == names
    assert tls.server_key.stat().st_mode & 0o777 == 0o600
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    new.certificate.verify_directly_issued_by(ca)
    end = handshake(live.context, client_context(tls.ca_cert))
    assert served_fingerprint(end) == new.fingerprint


def test_a_certificate_with_time_left_is_kept(tls: TlsPaths) -> None:
    renew_server_cert(tls, valid_days=RENEW_BEFORE_DAYS + 1)
    before = read_cert(tls.server_cert)
    live = LiveTls(tls.server_cert, tls.server_key).open()
    assert live.check() is False
    assert read_cert(tls.server_cert).fingerprint == before.fingerprint
    # ... until the clock says fewer than 30 days are left.
    live.clock = lambda: datetime.now(UTC) + timedelta(days=2)
    assert live.check() is True
    assert read_cert(tls.server_cert).fingerprint != before.fingerprint
    end = handshake(live.context, client_context(tls.ca_cert))
    assert (
        served_fingerprint(end) == live.loaded.fingerprint == read_cert(tls.server_cert).fingerprint
    )


def test_an_operator_certificate_is_warned_about_not_renewed(
    tls: TlsPaths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    renew_server_cert(tls, valid_days=10)
    own = tmp_path / "operator"
    own.mkdir()
    cert, key = own / "chain.pem", own / "key.pem"
    shutil.copy(tls.server_cert, cert)
    shutil.copy(tls.server_key, key)
    shutil.copy(tls.ca_cert, own / "ca.crt")  # the CA, but not its key
    before = cert.read_bytes()
    with caplog.at_level(logging.WARNING, logger="fedge.coordinator.tls_live"):
        live = LiveTls(cert, key).open()
        assert live.check() is False
    assert cert.read_bytes() == before
    warnings = [r for r in caplog.records if getattr(r, "event", "") == "tls_certificate_expiring"]
    assert len(warnings) == 2, caplog.text
    assert (
        "expires in 9." in warnings[0].getMessage() or "expires in 10." in warnings[0].getMessage()
    )


def test_a_replaced_certificate_is_loaded_and_a_mismatched_pair_is_not(
    tls: TlsPaths, caplog: pytest.LogCaptureFixture
) -> None:
    live = LiveTls(tls.server_cert, tls.server_key).open()
    assert live.loaded is not None
    first = live.loaded.fingerprint
    old_key = tls.server_key.read_bytes()
    renewed = renew_server_cert(tls)
    tls.server_key.write_bytes(old_key)  # a certificate whose key has not arrived yet
    with caplog.at_level(logging.WARNING, logger="fedge.coordinator.tls_live"):
        assert live.check() is False
    assert "keeping the current one" in caplog.text
    assert served_fingerprint(handshake(live.context, client_context(tls.ca_cert))) == first
    renewed = renew_server_cert(tls)
    assert live.check() is True
    assert served_fingerprint(handshake(live.context, client_context(tls.ca_cert))) == (
        renewed.fingerprint
    )


def test_renew_cert_refuses_a_certificate_without_its_ca_key(
    tls: TlsPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tls.ca_cert.parent.parent
    tls.ca_key.rename(data_dir / "ca.key.offline")
    before = tls.server_cert.read_bytes()
    assert coordinator_cli(["renew-cert", "--data-dir", str(data_dir)]) == 1
    assert "put ca.key back" in capsys.readouterr().err
    assert tls.server_cert.read_bytes() == before


@pytest.mark.slow
def test_serve_renews_at_start_and_loads_a_renewed_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real ``serve``: a certificate with 10 days left is renewed before the first
    connection; ``renew-cert`` while it runs is served from the next check on."""
    data_dir = tmp_path / "coord"
    tls = create_ca_and_server_cert(data_dir / "tls", hosts=[HOST])
    short = renew_server_cert(tls, valid_days=10)
    port_file = tmp_path / "port"
    log = (tmp_path / "serve.err").open("wb")
    process = subprocess.Popen(
        [
            *fedge_command(),
            *("coordinator", "serve", "--data-dir", str(data_dir)),
            *("--port", "0", "--port-file", str(port_file)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env={**os.environ, "FEDGE_TLS_CHECK_INTERVAL_S": "0.2"},
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert process.poll() is None, (tmp_path / "serve.err").read_text()
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.05)
        port = int(port_file.read_text())

        def served() -> tuple[str, str]:
            context = client_context(tls.ca_cert)
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname=HOST) as wrapped,
            ):
                return served_fingerprint(wrapped), wrapped.version() or ""

        at_start = read_cert(tls.server_cert)
        assert at_start.fingerprint != short.fingerprint
        assert at_start.days_left(datetime.now(UTC)) > SERVER_CERT_DAYS - 1
        assert served() == (at_start.fingerprint, "TLSv1.3")

        assert coordinator_cli(["renew-cert", "--data-dir", str(data_dir)]) == 0
        renewed = read_cert(tls.server_cert)
        assert renewed.fingerprint in capsys.readouterr().out
        assert renewed.fingerprint != at_start.fingerprint
        deadline = time.monotonic() + 20
        while served()[0] != renewed.fingerprint:
            assert time.monotonic() < deadline, "the renewed certificate was not served"
            time.sleep(0.1)
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
        log.close()
    text = (tmp_path / "serve.err").read_text()
    assert "renewed the TLS certificate" in text
    assert "serving the TLS certificate" in text
