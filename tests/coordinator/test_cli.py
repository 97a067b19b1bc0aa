"""``fedge coordinator init | migrate | create-key | serve`` run in-process through
``fedge.coordinator.cli.main`` (the subprocess and TLS path is in test_tls_serve.py)."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from sqlalchemy import func, select

from fedge.coordinator import migrate
from fedge.coordinator.bootstrap import ENV_FILE
from fedge.coordinator.cli import main
from fedge.coordinator.db import make_engine, make_sessionmaker, session_scope
from fedge.coordinator.models import ApiKey
from fedge.coordinator.secrets import find_api_key
from fedge.coordinator.tls import TlsPaths

KEY_LINE = re.compile(r"^\s+(fk_[A-Za-z0-9_-]{43})$", re.MULTILINE)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def printed_key(out: str) -> str:
    keys = KEY_LINE.findall(out)
    assert len(keys) == 1, out
    return keys[0]


def key_role(url: str, secret: str) -> str | None:
    engine = make_engine(url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            key = find_api_key(session, secret)
            return None if key is None else key.role
    finally:
        engine.dispose()


def key_count(url: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(ApiKey)) or 0)
    finally:
        engine.dispose()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def san_names(cert_file: Path) -> set[str]:
    cert = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    }


def test_init_creates_a_working_data_dir(capsys, tmp_path: Path) -> None:
    data_dir = tmp_path / "coord"
    code, out, err = run(
        capsys, "init", "--data-dir", str(data_dir), "--host", "fedge.test", "--host", "10.1.2.3"
    )
    assert code == 0, err
    tls = TlsPaths.in_dir(data_dir / "tls")
    for path in (tls.ca_cert, tls.ca_key, tls.server_cert, tls.server_key):
        assert path.is_file()
    assert mode(tls.ca_key) == mode(tls.server_key) == 0o600
    assert mode(data_dir / ENV_FILE) == 0o600
    assert (data_dir / "blobs").is_dir()

    # The certificate chain: server certificate issued by the CA, for the requested names.
    server, ca_in_chain = x509.load_pem_x509_certificates(tls.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca_in_chain == ca
    assert san_names(tls.server_cert) >= {"fedge.test", "10.1.2.3", "localhost", "127.0.0.1"}

    url = f"sqlite:///{(data_dir / 'fedge.db').resolve()}"
    engine = make_engine(url)
    try:
        assert migrate.schema_status(engine) == (True, "ready")
    finally:
        engine.dispose()
    secret = printed_key(out)
    assert key_role(url, secret) == "admin"
    assert key_count(url) == 1
    assert str(tls.ca_cert) in out
    assert f"fedge coordinator serve --data-dir {data_dir}" in out
    assert out.count(secret) == 1


def test_init_refuses_an_initialized_dir_and_changes_nothing(capsys, tmp_path: Path) -> None:
    data_dir = tmp_path / "coord"
    assert run(capsys, "init", "--data-dir", str(data_dir))[0] == 0
    ca_before = (data_dir / "tls" / "ca.crt").read_bytes()
    env_before = (data_dir / ENV_FILE).read_bytes()
    url = f"sqlite:///{(data_dir / 'fedge.db').resolve()}"

    code, out, err = run(capsys, "init", "--data-dir", str(data_dir))
    assert code == 1
    assert "already holds a coordinator" in err
    assert "--force" in err
    assert "fk_" not in out
    assert (data_dir / "tls" / "ca.crt").read_bytes() == ca_before
    assert (data_dir / ENV_FILE).read_bytes() == env_before
    assert key_count(url) == 1


def test_init_force_replaces_the_ca_and_keeps_the_database(capsys, tmp_path: Path) -> None:
    data_dir = tmp_path / "coord"
    _, first_out, _ = run(capsys, "init", "--data-dir", str(data_dir))
    first_key = printed_key(first_out)
    ca_before = (data_dir / "tls" / "ca.crt").read_bytes()

    code, out, err = run(capsys, "init", "--data-dir", str(data_dir), "--force")
    assert code == 0, err
    second_key = printed_key(out)
    url = f"sqlite:///{(data_dir / 'fedge.db').resolve()}"
    assert (data_dir / "tls" / "ca.crt").read_bytes() != ca_before
    assert second_key != first_key
    assert key_role(url, first_key) == key_role(url, second_key) == "admin"


def test_init_with_an_external_database_records_it(
    capsys, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FEDGE_DATABASE_URL (e.g. PostgreSQL) is used and written to coordinator.env, so later
    commands given only --data-dir find the same database."""
    data_dir = tmp_path / "coord"
    monkeypatch.setenv("FEDGE_DATABASE_URL", db_url)
    code, out, err = run(capsys, "init", "--data-dir", str(data_dir))
    assert code == 0, err
    assert key_role(db_url, printed_key(out)) == "admin"
    assert not (data_dir / "fedge.db").exists()
    assert f"FEDGE_DATABASE_URL={db_url}" in (data_dir / ENV_FILE).read_text().splitlines()

    monkeypatch.delenv("FEDGE_DATABASE_URL")
    code, out, err = run(
        capsys, "create-key", "--data-dir", str(data_dir), "--role", "viewer", "--name", "dashboard"
    )
    assert code == 0, err
    assert key_role(db_url, printed_key(out)) == "viewer"


def test_failed_init_leaves_no_data_dir(capsys, tmp_path: Path) -> None:
    data_dir = tmp_path / "coord"
    unreachable = f"sqlite:///{tmp_path / 'missing' / 'fedge.db'}"
    code, out, err = run(capsys, "init", "--data-dir", str(data_dir), "--database-url", unreachable)
    assert code == 1
    assert "does not exist" in err
    assert "fk_" not in out
    assert not data_dir.exists()


@pytest.mark.parametrize(
    ("host", "named"),
    [("", "it is empty"), ("a" * 70 + ".example.com", "is not a DNS label"), ("bad_name", "")],
)
@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "existing-empty-dir"])
def test_init_with_an_unusable_host_says_so_in_one_line_and_leaves_nothing(
    capsys, tmp_path: Path, host: str, named: str, existing: bool
) -> None:
    data_dir = tmp_path / "coord"
    if existing:
        data_dir.mkdir()
    code, out, err = run(capsys, "init", "--data-dir", str(data_dir), "--host", host)
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--host {host!r} cannot go in the server certificate" in err
    assert named in err
    assert "fk_" not in out
    assert sorted(tmp_path.iterdir()) == ([data_dir] if existing else [])
    if existing:
        assert list(data_dir.iterdir()) == []


def test_init_accepts_a_host_name_longer_than_a_common_name_may_be(capsys, tmp_path) -> None:
    host = "a" * 60 + ".devices.example.com"  # 80 characters: SAN only, not the CN
    code, _, err = run(capsys, "init", "--data-dir", str(tmp_path / "coord"), "--host", host)
    assert code == 0, err
    assert host in san_names(TlsPaths.in_dir(tmp_path / "coord" / "tls").server_cert)


def test_init_fails_late_and_still_leaves_nothing(capsys, tmp_path: Path, monkeypatch) -> None:
    """A failure after the schema, certificates and env file were written (creating the key)
    removes the staging directory: neither the data directory nor a staging copy remains."""
    from fedge.coordinator import bootstrap

    def broken(*_args: object, **_kwargs: object) -> str:
        raise bootstrap.SetupError("the key store is broken")

    monkeypatch.setattr(bootstrap, "create_key", broken)
    for existing in (False, True):
        data_dir = tmp_path / f"coord-{existing}"
        if existing:
            data_dir.mkdir()
        code, _, err = run(capsys, "init", "--data-dir", str(data_dir))
        assert (code, "the key store is broken" in err) == (1, True)
        assert data_dir.exists() == existing
        assert not existing or list(data_dir.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coord-True"]


def test_init_into_an_existing_directory_keeps_a_mounted_blob_dir(capsys, tmp_path, monkeypatch):
    """The Docker layout: the data directory and its blobs/ exist already (volume mounts)."""
    data_dir = tmp_path / "var"
    (data_dir / "blobs").mkdir(parents=True)
    marker = data_dir / "blobs" / "keep"
    marker.write_text("x")
    monkeypatch.setenv("FEDGE_BLOB_DIR", str(data_dir / "blobs"))
    code, _, err = run(capsys, "init", "--data-dir", str(data_dir))
    assert code == 0, err
    assert marker.read_text() == "x"
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "blobs",
        "coordinator.env",
        "fedge.db",
        "tls",
    ]


def test_migrate_up_status_and_down(capsys, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fedge.db'}"
    head = migrate.head_revision()

    code, out, _ = run(capsys, "migrate", "--database-url", url, "--status")
    assert (code, f"schema at nothing (head {head}): NOT at head" in out) == (1, True)

    code, out, err = run(capsys, "migrate", "--database-url", url)
    assert code == 0, err
    assert f"schema nothing -> {head}" in out

    code, out, _ = run(capsys, "migrate", "--database-url", url, "--status")
    assert (code, "at head" in out) == (0, True)

    code, out, err = run(capsys, "migrate", "--database-url", url, "--downgrade", "base")
    assert code == 0, err
    assert f"schema {head} -> nothing" in out
    assert run(capsys, "migrate", "--database-url", url, "--status")[0] == 1


def test_migrate_needs_an_existing_data_dir(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "migrate", "--data-dir", str(tmp_path / "nowhere"))
    assert code == 1
    assert "fedge coordinator init" in err
    assert not (tmp_path / "nowhere").exists()


def test_create_key(capsys, db_url: str) -> None:
    code, out, err = run(
        capsys, "create-key", "--database-url", db_url, "--role", "viewer", "--name", "ops"
    )
    assert code == 0, err
    assert key_role(db_url, printed_key(out)) == "viewer"


def test_create_key_rejects_an_unknown_role(capsys, db_url: str) -> None:
    code, _, err = run(
        capsys, "create-key", "--database-url", db_url, "--role", "root", "--name", "x"
    )
    assert code == 2
    assert "invalid choice" in err
    assert key_count(db_url) == 0


def test_create_key_refuses_an_unmigrated_database(capsys, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fedge.db'}"
    code, out, err = run(
        capsys, "create-key", "--database-url", url, "--role", "admin", "--name", "x"
    )
    assert code == 1
    assert "fedge coordinator migrate" in err
    assert "fk_" not in out


def test_serve_refuses_to_run_without_a_certificate(capsys, tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    code, out, err = run(
        capsys, "serve", "--data-dir", str(tmp_path), "--port", "0", "--port-file", str(port_file)
    )
    assert code == 1
    assert "no TLS certificate" in err
    assert "--insecure-http" in err
    assert "fedge coordinator init" in err
    assert "listening" not in out
    assert not port_file.exists()


def test_serve_refuses_an_unusable_certificate(capsys, tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "server.crt").write_text("not a certificate")
    (tmp_path / "tls" / "server.key").write_text("not a key")
    code, _, err = run(capsys, "serve", "--data-dir", str(tmp_path), "--port", "0")
    assert code == 1
    assert "cannot load TLS certificate" in err


def test_invalid_setting_is_reported_by_name(
    capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDGE_PORT", "https")
    code, _, err = run(capsys, "serve", "--data-dir", str(tmp_path))
    assert code == 2
    assert "invalid setting: FEDGE_PORT" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [(["--help"], 0), (["serve", "--help"], 0), ([], 2), (["frobnicate"], 2)],
)
def test_usage(capsys, argv: list[str], expected: int) -> None:
    code, out, err = run(capsys, *argv)
    assert code == expected
    assert "fedge coordinator" in out + err
