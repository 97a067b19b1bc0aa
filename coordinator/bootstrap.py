"""Setting up and maintaining a coordinator's data directory (``fedge coordinator init`` etc.).

A data directory holds everything one coordinator needs on disk::

    <data_dir>/
        coordinator.env   the settings init chose (FEDGE_* lines; read by later commands)
        fedge.db          the SQLite database (unless FEDGE_DATABASE_URL names another one)
        blobs/            the content-addressed blob store
        tls/ca.crt        the private CA: copy it to every device, agents pin it
        tls/ca.key        the CA's key (0600): renews the server certificate (90 days)
        tls/server.crt    server certificate followed by the CA
        tls/server.key    server key (0600)

Settings are resolved in this order, first wins: command-line options, ``FEDGE_*`` environment
variables, ``<data_dir>/coordinator.env``, built-in defaults.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from fedge.coordinator import migrate
from fedge.coordinator.db import make_engine, make_sessionmaker, session_scope
from fedge.coordinator.secrets import create_api_key
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import (
    DEFAULT_HOSTS,
    TlsPaths,
    create_ca_and_server_cert,
    host_problem,
)
from fedge.shared.durable import rename_durably, write_bytes_atomic

ENV_FILE = "coordinator.env"
BOOTSTRAP_KEY_NAME = "bootstrap admin"
# Files whose presence means a directory already holds a coordinator.
_MARKERS = (ENV_FILE, "fedge.db", "tls/ca.crt", "tls/server.crt")


class SetupError(Exception):
    """A problem the operator must fix (data directory, database, certificates); the message
    says what to do."""


@dataclass(frozen=True)
class InitResult:
    """What ``init_data_dir`` created. ``admin_key`` is the only copy of the secret."""

    data_dir: Path
    database_url: str
    blob_dir: Path
    tls: TlsPaths
    hosts: tuple[str, ...]
    env_file: Path
    admin_key: str
    revision: str | None


@dataclass(frozen=True)
class MigrationResult:
    database_url: str
    before: str | None
    after: str | None
    head: str | None


def load_settings(**overrides: Any) -> Settings:
    """Settings from options (``None`` means "not given"), the environment and the data
    directory's ``coordinator.env``, in that order of precedence."""
    given = {name: value for name, value in overrides.items() if value is not None}
    settings = Settings(**given)
    env_file = settings.data_dir / ENV_FILE
    if env_file.is_file():
        layered = {**_database_named_above(given), **given}
        settings = Settings(_env_file=env_file, **layered)  # type: ignore[call-arg]
    return settings


def _database_named_above(given: dict[str, Any]) -> dict[str, Any]:
    """When options or the environment name the database one way (a URL, or a URL file),
    the env file must not add the other way: the higher layer names the database alone."""
    by_url = "database_url" in given or "FEDGE_DATABASE_URL" in os.environ
    by_file = "database_url_file" in given or "FEDGE_DATABASE_URL_FILE" in os.environ
    if by_url and not by_file:
        return {"database_url_file": None}
    if by_file and not by_url:
        return {"database_url": ""}
    return {}


def default_database_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'fedge.db').resolve()}"


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for printing)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy understands: show nothing secret
        return "<unparseable database URL>"


def existing_markers(data_dir: Path) -> list[Path]:
    return [data_dir / marker for marker in _MARKERS if (data_dir / marker).exists()]


def init_data_dir(
    settings: Settings, *, hosts: list[str] | tuple[str, ...] = (), force: bool = False
) -> InitResult:
    """Create the data directory, TLS material, blob store and schema, and a bootstrap admin
    API key.

    Refuses a directory that already holds a coordinator unless ``force``; with ``force`` the
    CA and server certificate are replaced (agents must get the new ``ca.crt``) and another
    admin key is issued, while the database and blobs are kept.

    A first init is atomic: the inputs are checked before anything is written, everything is
    built in a temporary directory next to (or, for an existing directory such as a volume's
    mount point, inside) the data directory and renamed into place at the end, so a failed
    init leaves nothing behind.
    """
    data_dir = settings.data_dir.resolve()
    found = existing_markers(data_dir)
    if found and not force:
        raise SetupError(
            f"{data_dir} already holds a coordinator (found {found[0].name}); "
            "use --force to replace its certificates and issue a new admin key "
            "(the database and blobs are kept)"
        )
    if data_dir.exists() and not data_dir.is_dir():
        raise SetupError(f"{data_dir} exists and is not a directory")
    all_hosts = tuple(dict.fromkeys([*hosts, *settings.public_hostnames, *DEFAULT_HOSTS]))
    for host in all_hosts:
        problem = host_problem(host)
        if problem is not None:
            origin = "--host" if host in hosts else "FEDGE_PUBLIC_HOSTNAMES"
            raise SetupError(
                f"{origin} {host!r} cannot go in the server certificate: {problem}; give the "
                "DNS name or IP address devices use to reach the coordinator"
            )
    if found:  # --force on an initialized directory: replace the certificates in place
        result = migrate_database(settings)
        tls = create_ca_and_server_cert(data_dir / "tls", hosts=all_hosts, overwrite=True)
        if not settings.blobs_in_database:
            settings.blobs.mkdir(parents=True, exist_ok=True)
        env_file = write_env_file(settings, data_dir=data_dir)
        admin_key = create_key(settings, name=BOOTSTRAP_KEY_NAME, role="admin")
    else:
        result, tls, env_file, admin_key = _init_staged(settings, data_dir, all_hosts)
    return InitResult(
        data_dir=data_dir,
        database_url=settings.database_url,
        blob_dir=settings.blobs.resolve(),
        tls=tls,
        hosts=all_hosts,
        env_file=env_file,
        admin_key=admin_key,
        revision=result.after,
    )


def _init_staged(
    settings: Settings, data_dir: Path, hosts: tuple[str, ...]
) -> tuple[MigrationResult, TlsPaths, Path, str]:
    """A first init built in a staging directory, then renamed into ``data_dir``."""
    existed = data_dir.exists()
    try:
        parent = data_dir if existed else data_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".fedge-init-", dir=parent))
    except OSError as exc:
        raise SetupError(f"cannot create the data directory {data_dir}: {exc}") from exc
    default_db = settings.database_url == default_database_url(data_dir)
    default_blobs = not settings.blobs_in_database and settings.blobs.resolve() == (
        data_dir / "blobs"
    )
    blobs_exist = settings.blobs.exists()
    staged = settings.model_copy(
        update={
            "database_url": default_database_url(stage) if default_db else settings.database_url,
            "blob_dir": stage / "blobs" if default_blobs and not blobs_exist else settings.blobs,
        }
    )
    made_blobs = False
    try:
        stage.chmod(0o700)
        result = migrate_database(staged)
        create_ca_and_server_cert(stage / "tls", hosts=hosts)
        if not settings.blobs_in_database and not staged.blobs.exists():
            staged.blobs.mkdir(parents=True)
            made_blobs = staged.blobs.resolve() != (stage / "blobs").resolve()
        write_env_file(settings, data_dir=data_dir, directory=stage)
        admin_key = create_key(staged, name=BOOTSTRAP_KEY_NAME, role="admin")
        if existed:  # a mount point cannot be replaced: move the entries into it
            order = sorted(stage.iterdir(), key=lambda p: p.name == ENV_FILE)
            for entry in order:
                rename_durably(entry, data_dir / entry.name)
            stage.rmdir()
        else:
            rename_durably(stage, data_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if made_blobs:
            shutil.rmtree(staged.blobs, ignore_errors=True)
        raise
    return result, TlsPaths.in_dir(data_dir / "tls"), data_dir / ENV_FILE, admin_key


def write_env_file(settings: Settings, *, data_dir: Path, directory: Path | None = None) -> Path:
    """Write ``coordinator.env``: the settings that differ from what the data directory implies,
    so that later commands (and ``docker --env-file``) find the same database."""
    lines = [
        f"# Written by `fedge coordinator init` on {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC.",
        "# Read by `fedge coordinator serve|migrate|create-key --data-dir ...`;",
        "# variables set in the environment take precedence over this file.",
        f"FEDGE_DATA_DIR={data_dir}",
    ]
    # A password read from a file stays in that file: the env file names the file instead.
    if settings.database_url_file is not None:
        lines.append(f"FEDGE_DATABASE_URL_FILE={settings.database_url_file.resolve()}")
    elif settings.database_password_file is not None:
        bare = make_url(settings.database_url)._replace(password=None)
        lines.append(f"FEDGE_DATABASE_URL={bare.render_as_string(hide_password=False)}")
        lines.append(f"FEDGE_DATABASE_PASSWORD_FILE={settings.database_password_file.resolve()}")
    elif settings.database_url != default_database_url(data_dir):
        lines.append(f"FEDGE_DATABASE_URL={settings.database_url}")
    if settings.blob_url is not None:
        lines.append(f"FEDGE_BLOB_URL={settings.blob_url}")
    elif settings.blobs.resolve() != (data_dir / "blobs"):
        lines.append(f"FEDGE_BLOB_DIR={settings.blobs.resolve()}")
    path = (directory or data_dir) / ENV_FILE
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"), mode=0o600)
    return path


def _check_sqlite_dir(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return
    if parsed.database == ":memory:":
        return
    parent = Path(parsed.database).parent
    if not parent.is_dir():
        raise SetupError(
            f"the directory of the SQLite database {parsed.database} does not exist; "
            "run `fedge coordinator init --data-dir ...` first or set FEDGE_DATABASE_URL"
        )


def current_revision(url: str) -> str | None:
    """The database's Alembic revision (None for an empty database)."""
    _check_sqlite_dir(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise SetupError(f"cannot reach the database {redact_url(url)}: {exc}") from exc
    finally:
        engine.dispose()


def migrate_database(
    settings: Settings, *, revision: str = "head", downgrade: bool = False
) -> MigrationResult:
    """Upgrade (or downgrade) the configured database to ``revision``."""
    url = settings.database_url
    before = current_revision(url)
    try:
        if downgrade:
            migrate.downgrade(url, revision)
        else:
            migrate.upgrade(url, revision)
    except SQLAlchemyError as exc:
        raise SetupError(f"migration of {redact_url(url)} failed: {exc}") from exc
    return MigrationResult(
        database_url=url,
        before=before,
        after=current_revision(url),
        head=migrate.head_revision(url),
    )


def schema_report(settings: Settings) -> MigrationResult:
    """Where the database's schema stands, without changing it."""
    url = settings.database_url
    now = current_revision(url)
    return MigrationResult(database_url=url, before=now, after=now, head=migrate.head_revision(url))


def create_key(settings: Settings, *, name: str, role: str) -> str:
    """Create an API key directly in the database (bootstrap and recovery); returns the secret,
    which is shown once and stored only as a hash."""
    status = schema_report(settings)
    if status.after != status.head:
        raise SetupError(
            f"the database schema is at {status.after or 'nothing'}, expected {status.head}; "
            "run `fedge coordinator migrate` first"
        )
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            _, secret = create_api_key(session, name=name, role=role)
    finally:
        engine.dispose()
    return secret
