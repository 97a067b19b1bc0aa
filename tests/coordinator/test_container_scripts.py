"""The image's entrypoint (wait for the database, migrate under a lock) and health check, run
against real databases and a real HTTPS/HTTP coordinator on loopback."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import create_engine, text

from fedge.coordinator.app import create_app
from fedge.coordinator.migrate import head_revision
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import create_ca_and_server_cert
from tests.support import databases
from tests.support.servers import serve_in_thread

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"fedge_docker_{name}", DOCKER / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


entrypoint = load("entrypoint")
healthcheck = load("healthcheck")


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- waiting for the database -----------------------------------------------------------------


def test_wait_for_database_answers_at_once_when_it_is_up(tmp_path):
    slept: list[float] = []
    used = entrypoint.wait_for_database(
        f"sqlite:///{tmp_path / 'fedge.db'}", attempts=3, interval_s=1.0, sleep=slept.append
    )
    assert used == 1
    assert slept == []


def test_wait_for_database_gives_up_after_bounded_attempts_without_leaking_the_password():
    url = f"postgresql+psycopg://fedge:s3cret-pw@127.0.0.1:{closed_port()}/fedge"
    slept: list[float] = []
    with pytest.raises(entrypoint.StartupError) as info:
        entrypoint.wait_for_database(url, attempts=3, interval_s=0.25, sleep=slept.append)
    assert slept == [0.25, 0.25]
    message = str(info.value)
    assert "unreachable after 3 attempts" in message
    assert "s3cret-pw" not in message
    assert "***" in message


@pytest.mark.parametrize(
    ("name", "value", "reader", "expected"),
    [
        ("FEDGE_DB_WAIT_ATTEMPTS", "", lambda n: entrypoint.env_int(n, 30), 30),
        ("FEDGE_DB_WAIT_ATTEMPTS", "5", lambda n: entrypoint.env_int(n, 30), 5),
        ("FEDGE_DB_WAIT_INTERVAL_S", "0.5", lambda n: entrypoint.env_float(n, 2.0), 0.5),
        ("FEDGE_MIGRATE_ON_START", "false", lambda n: entrypoint.env_bool(n, True), False),
        ("FEDGE_MIGRATE_ON_START", "Yes", lambda n: entrypoint.env_bool(n, False), True),
    ],
)
def test_entrypoint_variables(monkeypatch, name, value, reader, expected):
    monkeypatch.setenv(name, value)
    assert reader(name) == expected


@pytest.mark.parametrize(
    ("name", "value", "reader"),
    [
        ("FEDGE_DB_WAIT_ATTEMPTS", "many", lambda n: entrypoint.env_int(n, 30)),
        ("FEDGE_DB_WAIT_ATTEMPTS", "0", lambda n: entrypoint.env_int(n, 30)),
        ("FEDGE_DB_WAIT_INTERVAL_S", "-1", lambda n: entrypoint.env_float(n, 2.0)),
        ("FEDGE_DB_WAIT_INTERVAL_S", "nan", lambda n: entrypoint.env_float(n, 2.0)),
        ("FEDGE_MIGRATE_ON_START", "maybe", lambda n: entrypoint.env_bool(n, True)),
    ],
)
def test_malformed_entrypoint_variables_are_refused_by_name(monkeypatch, name, value, reader):
    monkeypatch.setenv(name, value)
    with pytest.raises(entrypoint.StartupError, match=name):
        reader(name)


def test_entrypoint_stops_with_status_1_and_a_message_when_the_database_never_answers(
    monkeypatch, capsys, tmp_path
):
    monkeypatch.setenv("FEDGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv(
        "FEDGE_DATABASE_URL", f"postgresql+psycopg://fedge@127.0.0.1:{closed_port()}/fedge"
    )
    monkeypatch.setenv("FEDGE_DB_WAIT_ATTEMPTS", "2")
    monkeypatch.setenv("FEDGE_DB_WAIT_INTERVAL_S", "0")
    monkeypatch.setenv("FEDGE_REQUIRE_INIT", "false")
    assert entrypoint.main(["serve"]) == 1
    assert "unreachable after 2 attempts" in capsys.readouterr().err


# -- worker processes -------------------------------------------------------------------------

PG = "postgresql+psycopg://fedge@db.invalid/fedge"


@pytest.mark.parametrize(
    ("url", "env", "args", "expected"),
    [
        (PG, {}, [], ["serve", "--workers", "6"]),
        (PG, {"FEDGE_WORKERS": "2"}, [], ["serve"]),  # the CLI reads FEDGE_WORKERS itself
        (PG, {}, ["--workers", "3"], ["serve", "--workers", "3"]),
        (PG, {}, ["--workers=3"], ["serve", "--workers=3"]),
        ("sqlite:////tmp/fedge.db", {}, [], ["serve", "--workers", "1"]),
    ],
)
def test_serve_gets_one_worker_per_cpu_on_postgres_unless_the_operator_chose(
    monkeypatch, tmp_path, url, env, args, expected
):
    monkeypatch.setattr(entrypoint, "available_cpus", lambda: 6)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings(data_dir=tmp_path, database_url=url)
    assert entrypoint.serve_args(settings, args) == expected


def test_workers_chosen_in_the_data_dirs_env_file_are_kept(monkeypatch, tmp_path):
    monkeypatch.setattr(entrypoint, "available_cpus", lambda: 6)
    (tmp_path / "coordinator.env").write_text(f"FEDGE_DATABASE_URL={PG}\nFEDGE_WORKERS=2\n")
    monkeypatch.setenv("FEDGE_DATA_DIR", str(tmp_path))
    settings = entrypoint.load_settings()
    assert settings.workers == 2
    assert entrypoint.serve_args(settings, []) == ["serve"]


@pytest.mark.parametrize(
    ("cpu_max", "cpus", "expected"),
    [
        (None, 8, 8),  # no cgroup v2 file: the affinity
        ("max 100000\n", 8, 8),  # no quota
        ("150000 100000\n", 8, 2),  # 1.5 CPUs: rounded up
        ("400000 100000\n", 2, 2),  # a quota above the affinity
        ("1000 100000\n", 4, 1),
        ("garbage\n", 3, 3),
    ],
)
def test_available_cpus_follows_the_container_quota(tmp_path, cpu_max, cpus, expected):
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    assert entrypoint.available_cpus(cgroup_cpu_max=path, cpus=cpus) == expected


# -- migrating --------------------------------------------------------------------------------


def revision_of(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


def test_migrate_brings_an_empty_sqlite_database_to_head_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'fedge.db'}"
    head = head_revision(url)
    assert entrypoint.migrate(url) == (None, head)
    assert entrypoint.migrate(url) == (head, head)
    assert revision_of(url) == head


def test_migrate_command_migrates_even_when_serve_would_not_and_exits(tmp_path, monkeypatch):
    """``entrypoint.py migrate`` (the Kubernetes init container) migrates under the lock and
    exits 0, although the pod's FEDGE_MIGRATE_ON_START=false is meant for ``serve``."""
    url = f"sqlite:///{tmp_path / 'fedge.db'}"
    monkeypatch.setenv("FEDGE_DATABASE_URL", url)
    monkeypatch.setenv("FEDGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FEDGE_MIGRATE_ON_START", "false")
    assert entrypoint.main(["migrate"]) == 0
    assert revision_of(url) == head_revision(url)
    assert entrypoint.main(["migrate"]) == 0  # already at head: nothing to do


def test_migrate_command_fails_with_a_clear_status_without_a_database(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGE_DATABASE_URL", f"postgresql+psycopg://u@127.0.0.1:{closed_port()}/x")
    monkeypatch.setenv("FEDGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FEDGE_DB_WAIT_ATTEMPTS", "1")
    assert entrypoint.main(["migrate"]) == 1


@pytest.fixture
def empty_postgres() -> databases.PostgresDatabase:
    admin_url = databases.postgres_admin_url()
    if admin_url is None:
        if databases.in_ci():
            pytest.fail(f"CI=true but {databases.ENV} is not set")
        pytest.skip(f"{databases.ENV} is not set")
    db = databases.PostgresDatabase(admin_url)
    db.create()
    yield db
    db.drop()


@pytest.mark.postgres
def test_replicas_starting_together_migrate_postgres_exactly_once(empty_postgres):
    """Without the advisory lock, concurrent upgrades race on CREATE TABLE and one fails."""
    url = empty_postgres.url
    head = head_revision(url)
    barrier = threading.Barrier(3)
    results: list[tuple[str | None, str | None]] = []
    errors: list[BaseException] = []

    def replica() -> None:
        try:
            barrier.wait(timeout=30)
            results.append(entrypoint.migrate(url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=replica, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a migration hung"
    assert errors == []
    assert sorted(results, key=lambda r: r[0] or "") == [(None, head), (head, head), (head, head)]
    assert revision_of(url) == head


# -- health check -----------------------------------------------------------------------------


@pytest.fixture
def app_settings(tmp_path, sqlite_template) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=sqlite_template.fresh(tmp_path))


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_healthcheck_passes_over_https_verifying_the_private_ca(app_settings, tmp_path):
    tls = create_ca_and_server_cert(tmp_path / "tls")
    app = create_app(app_settings)
    with serve_in_thread(app, certfile=tls.server_cert, keyfile=tls.server_key) as url:
        probe = Settings(port=port_of(url), tls_cert=tls.server_cert, tls_key=tls.server_key)
        assert healthcheck.check(probe) is None

        # A chain from another CA does not verify the server's certificate.
        other = create_ca_and_server_cert(tmp_path / "other")
        problem = healthcheck.check(probe.model_copy(update={"tls_cert": other.server_cert}))
        assert problem is not None and "CERTIFICATE_VERIFY_FAILED" in problem


def test_healthcheck_passes_over_plain_http_when_insecure_http_is_set(app_settings, tmp_path):
    tls = create_ca_and_server_cert(tmp_path / "tls")
    app = create_app(app_settings)
    with serve_in_thread(app, certfile=None, keyfile=None) as url:
        assert healthcheck.check(Settings(port=port_of(url), insecure_http=True)) is None
        # Without FEDGE_INSECURE_HTTP the probe speaks TLS, which a plain HTTP server fails.
        problem = healthcheck.check(Settings(port=port_of(url), tls_cert=tls.server_cert))
        assert problem is not None and "unreachable" in problem


def test_healthcheck_reports_a_missing_certificate_file(tmp_path):
    problem = healthcheck.check(Settings(port=closed_port(), tls_cert=tmp_path / "none.crt"))
    assert problem is not None and "cannot load" in problem


def test_healthcheck_fails_when_nothing_listens():
    problem = healthcheck.check(Settings(port=closed_port(), insecure_http=True), timeout_s=2)
    assert problem is not None and "unreachable" in problem


@pytest.mark.parametrize(
    ("host", "insecure", "expected"),
    [
        ("0.0.0.0", False, "https://127.0.0.1:8443/healthz"),
        ("::", True, "http://127.0.0.1:8443/healthz"),
        ("127.0.0.1", True, "http://127.0.0.1:8443/healthz"),
        ("::1", False, "https://[::1]:8443/healthz"),
        ("10.1.2.3", False, "https://10.1.2.3:8443/healthz"),
    ],
)
def test_healthcheck_probes_the_address_the_server_listens_on(host, insecure, expected):
    assert healthcheck.probe_url(Settings(host=host, port=8443, insecure_http=insecure)) == expected


def test_healthcheck_is_readiness_failing_before_migration_and_passing_after(tmp_path):
    """Readiness (the image's HEALTHCHECK) needs the schema at head; liveness (--live) only
    needs the server to answer."""
    url = f"sqlite:///{tmp_path / 'fedge.db'}"
    settings = Settings(data_dir=tmp_path / "data", database_url=url)
    with serve_in_thread(create_app(settings), certfile=None, keyfile=None) as served:
        probe = Settings(port=port_of(served), insecure_http=True)
        problem = healthcheck.check(probe)
        assert problem is not None and "/readyz answered 503" in problem
        assert "schema" in problem and head_revision(url) in problem
        assert healthcheck.check(probe, path=healthcheck.LIVE) is None
        entrypoint.migrate(url)
        assert healthcheck.check(probe) is None


def test_healthcheck_command_line(monkeypatch, capsys):
    monkeypatch.setenv("FEDGE_PORT", str(closed_port()))
    monkeypatch.setenv("FEDGE_INSECURE_HTTP", "true")
    assert healthcheck.main([]) == 1
    assert "/readyz unreachable" in capsys.readouterr().err
    assert healthcheck.main(["--live"]) == 1
    assert "/healthz unreachable" in capsys.readouterr().err
    assert healthcheck.main(["--ready-ish"]) == 2


# -- waiting for init -------------------------------------------------------------------------


def test_serve_before_init_waits_with_a_clear_message_until_init_has_run(tmp_path, capsys):
    settings = Settings(data_dir=tmp_path / "data")
    looks: list[float] = []

    def sleep(seconds: float) -> None:  # the third look finds the finished init
        looks.append(seconds)
        if len(looks) == 2:
            settings.data_dir.mkdir()
            (settings.data_dir / "coordinator.env").write_text("FEDGE_DATA_DIR=x\n")

    assert not entrypoint.initialized(settings)
    assert entrypoint.wait_for_init(settings, interval_s=7.0, sleep=sleep) == 3
    assert looks == [7.0, 7.0]
    (message,) = capsys.readouterr().err.strip().splitlines()
    assert "waiting for `fedge coordinator init`" in message
    assert str(settings.data_dir / "coordinator.env") in message
    assert entrypoint.INIT_COMMAND in message
    assert entrypoint.initialized(settings)


def test_the_entrypoint_waits_for_init_unless_told_not_to(tmp_path, monkeypatch):
    """``serve`` in a container without init waits (no exit, so no restart loop); with
    FEDGE_REQUIRE_INIT=false it goes straight on to the database."""
    monkeypatch.setenv("FEDGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FEDGE_DATABASE_URL", f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    monkeypatch.setenv("FEDGE_DB_WAIT_ATTEMPTS", "1")
    waited: list[float] = []

    class Stop(Exception):
        pass

    def fake_wait(settings: Settings, *, interval_s: float) -> int:
        waited.append(interval_s)
        raise Stop

    monkeypatch.setattr(entrypoint, "wait_for_init", fake_wait)
    monkeypatch.setenv("FEDGE_INIT_WAIT_INTERVAL_S", "3")
    with pytest.raises(Stop):
        entrypoint.main(["serve"])
    assert waited == [3.0]
    monkeypatch.setenv("FEDGE_REQUIRE_INIT", "false")
    assert entrypoint.main(["serve"]) == 1  # on to the (unreachable) database
    assert waited == [3.0]


# -- secrets from files -----------------------------------------------------------------------


def test_the_database_url_or_password_can_come_from_a_file(tmp_path, monkeypatch):
    url_file = tmp_path / "db_url"
    url_file.write_text(f"sqlite:///{tmp_path / 'fedge.db'}\n")
    monkeypatch.setenv("FEDGE_DATABASE_URL_FILE", str(url_file))
    assert entrypoint.load_settings().database_url == f"sqlite:///{tmp_path / 'fedge.db'}"

    monkeypatch.delenv("FEDGE_DATABASE_URL_FILE")
    password = tmp_path / "db_password"
    password.write_text("p@ss:w/rd%\n")
    monkeypatch.setenv("FEDGE_DATABASE_URL", "postgresql+psycopg://fedge@postgres:5432/fedge")
    monkeypatch.setenv("FEDGE_DATABASE_PASSWORD_FILE", str(password))
    settings = entrypoint.load_settings()
    assert settings.database_url == (
        "postgresql+psycopg://fedge:p%40ss%3Aw%2Frd%25@postgres:5432/fedge"
    )
    assert entrypoint.redact(settings.database_url) == (
        "postgresql+psycopg://fedge:***@postgres:5432/fedge"
    )


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"FEDGE_DATABASE_URL_FILE": "{tmp}/none"}, "FEDGE_DATABASE_URL_FILE: {tmp}/none does"),
        ({"FEDGE_DATABASE_URL_FILE": "{tmp}/empty"}, "{tmp}/empty is empty"),
        (
            {"FEDGE_DATABASE_URL_FILE": "{tmp}/url", "FEDGE_DATABASE_URL": "sqlite:///x.db"},
            "not both",
        ),
        (
            {"FEDGE_DATABASE_PASSWORD_FILE": "{tmp}/url"},
            "FEDGE_DATABASE_PASSWORD_FILE needs FEDGE_DATABASE_URL",
        ),
        (
            {
                "FEDGE_DATABASE_PASSWORD_FILE": "{tmp}/url",
                "FEDGE_DATABASE_URL": "postgresql+psycopg://u:inline@h/db",
            },
            "holds a password",
        ),
    ],
)
def test_unusable_secret_files_are_refused_by_name(tmp_path, monkeypatch, capsys, env, says):
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "url").write_text("sqlite:///x.db\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    assert entrypoint.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert says.format(tmp=tmp_path) in err and "Traceback" not in err


@pytest.mark.postgres
def test_init_with_a_password_file_writes_no_password_into_the_data_dir(
    empty_postgres, tmp_path, monkeypatch
):
    """PostgreSQL here trusts local connections, so any password connects: what matters is
    where the password ends up."""
    from fedge.coordinator.cli import main as coordinator_main

    secret = "s3cret-Password-for-the-test"
    password = tmp_path / "db_password"
    password.write_text(secret + "\n")
    data_dir = tmp_path / "data"
    monkeypatch.setenv("FEDGE_DATABASE_URL", empty_postgres.url)
    monkeypatch.setenv("FEDGE_DATABASE_PASSWORD_FILE", str(password))
    assert coordinator_main(["init", "--data-dir", str(data_dir)]) == 0
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    env_file = (data_dir / "coordinator.env").read_text()
    assert f"FEDGE_DATABASE_PASSWORD_FILE={password}" in env_file

    # Later commands, with nothing in the environment, find the password through the file.
    monkeypatch.delenv("FEDGE_DATABASE_URL")
    monkeypatch.delenv("FEDGE_DATABASE_PASSWORD_FILE")
    settings = entrypoint.load_settings(data_dir=data_dir)
    assert secret in settings.database_url
    assert entrypoint.migrate(settings.database_url)[1] == head_revision(settings.database_url)
