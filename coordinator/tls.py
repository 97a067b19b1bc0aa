"""A private certificate authority and server certificates, made with ``cryptography``.

``fedge coordinator init`` writes ``tls/ca.crt`` (give it to agents: they pin it),
``tls/ca.key`` (keep it offline), ``tls/server.crt`` (server certificate followed by the CA)
and ``tls/server.key``. Keys are written with mode 0600.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.shared.durable import write_bytes_atomic

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
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


def create_ca_and_server_cert(
    directory: Path,
    *,
    hosts: list[str] | tuple[str, ...] = (),
    valid_days: int = 825,
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
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(_common_name(all_hosts[0])))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(all_hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
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
