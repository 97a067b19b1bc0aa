"""A private certificate authority, server certificates and the server's TLS settings.

``fedge coordinator init`` writes ``tls/ca.crt`` (give it to agents: they pin it),
``tls/ca.key`` (it signs the renewed server certificates), ``tls/server.crt`` (server
certificate followed by the CA) and ``tls/server.key``. Keys are written with mode 0600.

Server certificates live :data:`SERVER_CERT_DAYS` days; :func:`renew_server_cert` issues the
next one from the stored CA (same names, new key), which the running server picks up
(:mod:`fedge.coordinator.tls_live`). :func:`server_context` is the server's ``SSLContext``:
TLS 1.2 with ECDHE and AEAD suites only, TLS 1.3, one key-exchange group, no compression, no
renegotiation (docs/operations.md, "TLS").
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import logging
import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.shared.durable import write_bytes_atomic

log = logging.getLogger(__name__)

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
#: The lifetime of a server certificate issued from the private CA.
SERVER_CERT_DAYS = 90
#: A server certificate with fewer days than this left is renewed (or, when it is not ours to
#: renew, warned about).
RENEW_BEFORE_DAYS = 30
#: TLS 1.2 suites: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 only (Mozilla's
#: "intermediate" list without its finite-field DHE suites). TLS 1.3 has only AEAD suites,
#: and OpenSSL's default three are Mozilla's.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
#: Key-exchange groups the server may be configured with (``tls_group``), by OpenSSL name.
#: Python's ``ssl`` module sets exactly one (``SSLContext.set_ecdh_curve``).
TLS_GROUPS = {"X25519": "X25519", "P-256": "prime256v1", "P-384": "secp384r1"}
#: The longest common name X.509 allows; longer host names go in the SAN only.
MAX_COMMON_NAME = 64
#: A DNS name: dot-separated labels of letters, digits and inner hyphens (a leading ``*.`` is
#: allowed for a wildcard certificate).
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def host_problem(host: str) -> str | None:
    """Why ``host`` cannot go in a certificate (None when it can): an IP address, or a DNS
    name of at most 253 characters in labels of 1-63 letters, digits and hyphens."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if not host:
        return "it is empty"
    name = host[2:] if host.startswith("*.") else host
    name = name.removesuffix(".")
    if len(name) > 253:
        return f"it is {len(name)} characters long (a DNS name has at most 253)"
    bad = [label for label in name.split(".") if not _LABEL.match(label)]
    if bad:
        return (
            f"{bad[0]!r} is not a DNS label (1-63 letters, digits or inner hyphens) and "
            f"{host!r} is not an IP address"
        )
    return None


@dataclass(frozen=True)
class TlsPaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> TlsPaths:
        return cls(
            directory / "ca.crt",
            directory / "ca.key",
            directory / "server.crt",
            directory / "server.key",
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedge"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _common_name(host: str) -> str:
    """The certificate's common name: the first host when X.509 allows it (clients check the
    SAN, which holds every host)."""
    return host if 0 < len(host) <= MAX_COMMON_NAME else "fedge coordinator"


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write(path: Path, data: bytes, *, private: bool) -> None:
    write_bytes_atomic(path, data, mode=0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


#: The group used where this Python's ``ssl`` cannot select the configured one.
FALLBACK_GROUP = "P-256"


def set_group(context: ssl.SSLContext, group: str) -> str:
    """Select ``group`` for ECDHE on ``context``; the group selected.

    Python 3.11's ``set_ecdh_curve`` selects X25519 only where it is built to select groups
    rather than EC curves (python.org and pyenv builds are; Debian bookworm's python3.11, the
    Docker image's base, is not: ``UNKNOWN_GROUP``). There the server takes P-256, the group
    every TLS client offers, and says so once in its log."""
    try:
        context.set_ecdh_curve(TLS_GROUPS[group])
        return group
    except ssl.SSLError:
        if group == FALLBACK_GROUP:
            raise
    log.warning(
        "this Python's ssl module cannot select the TLS group %s; serving with %s instead "
        "(FEDGE_TLS_GROUP)",
        group,
        FALLBACK_GROUP,
    )
    context.set_ecdh_curve(TLS_GROUPS[FALLBACK_GROUP])
    return FALLBACK_GROUP


def server_context(cert: Path, key: Path, *, group: str = "X25519") -> ssl.SSLContext:
    """The server's ``SSLContext`` with ``cert`` (chain, PEM) and ``key`` loaded.

    TLS 1.2 and 1.3 only; TLS 1.2 with :data:`TLS12_CIPHERS` only; ECDHE over ``group`` (a key
    of :data:`TLS_GROUPS`); no TLS compression, no renegotiation, no client certificates."""
    if group not in TLS_GROUPS:
        raise ValueError(f"unknown TLS group {group!r}; choose one of {', '.join(TLS_GROUPS)}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    set_group(context, group)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # The client picks among the (all strong) suites: a device without AES instructions
    # prefers ChaCha20-Poly1305 (Mozilla: "cipher preference: client chooses").
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(cert, key)
    return context


@dataclass(frozen=True)
class CertInfo:
    """What the server needs to know about a certificate file."""

    fingerprint: str  # SHA-256 of the leaf, hex
    not_after: datetime
    certificate: x509.Certificate

    def days_left(self, now: datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400


def read_cert(path: Path) -> CertInfo:
    """The first (leaf) certificate of a PEM file."""
    leaf = x509.load_pem_x509_certificate(path.read_bytes())
    return CertInfo(
        hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
        leaf.not_valid_after_utc,
        leaf,
    )


def issued_by_ca(paths: TlsPaths) -> bool:
    """Whether ``paths.server_cert`` was signed by ``paths.ca_cert`` and the CA's key is there
    to sign its successor: only then is the certificate ours to renew."""
    if not (paths.ca_cert.is_file() and paths.ca_key.is_file() and paths.server_cert.is_file()):
        return False
    try:
        ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        read_cert(paths.server_cert).certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@contextmanager
def renewal_lock(paths: TlsPaths) -> Iterator[None]:
    """An exclusive lock on the TLS directory, so two processes never both renew (and a
    reader never loads one process's certificate with the other's key)."""
    lock = paths.server_cert.parent / ".renew.lock"
    try:
        handle = lock.open("a")
    except OSError:  # a read-only folder (mounted certificates): nothing renews there
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def renew_server_cert(
    paths: TlsPaths, *, valid_days: int = SERVER_CERT_DAYS, now: datetime | None = None
) -> CertInfo:
    """Issue a new server certificate from the stored CA: the old one's subject and names, a
    new key, ``valid_days`` of validity. The key is written before the certificate, each
    atomically; call under :func:`renewal_lock`."""
    now = now or datetime.now(UTC)
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{paths.ca_key} is not an EC private key")
    ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    old = read_cert(paths.server_cert).certificate
    san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    server_key = ec.generate_private_key(ec.SECP256R1())
    cert = _server_cert(ca_key, ca_cert.subject, server_key, old.subject, san, now, valid_days)
    pem = serialization.Encoding.PEM
    _write(paths.server_key, _pem_key(server_key), private=True)
    _write(paths.server_cert, cert.public_bytes(pem) + ca_cert.public_bytes(pem), private=False)
    return read_cert(paths.server_cert)


def _server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    server_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    san: x509.SubjectAlternativeName,
    now: datetime,
    valid_days: int,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(san, critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )


def create_ca_and_server_cert(
    directory: Path,
    *,
    hosts: list[str] | tuple[str, ...] = (),
    valid_days: int = SERVER_CERT_DAYS,
    overwrite: bool = False,
) -> TlsPaths:
    """Create a CA and a server certificate valid for ``hosts`` plus loopback names."""
    paths = TlsPaths.in_dir(directory)
    if paths.ca_cert.exists() and not overwrite:
        raise FileExistsError(f"{paths.ca_cert} exists; refusing to replace the CA")
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("fedge private CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    all_hosts = [*hosts, *DEFAULT_HOSTS]
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _server_cert(
        ca_key,
        ca_name,
        server_key,
        _name(_common_name(all_hosts[0])),
        _san(all_hosts),
        now,
        valid_days,
    )
    pem = serialization.Encoding.PEM
    _write(paths.ca_key, _pem_key(ca_key), private=True)
    _write(paths.ca_cert, ca_cert.public_bytes(pem), private=False)
    _write(paths.server_key, _pem_key(server_key), private=True)
    _write(
        paths.server_cert,
        server_cert.public_bytes(pem) + ca_cert.public_bytes(pem),
        private=False,
    )
    return paths
