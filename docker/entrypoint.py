"""Entrypoint of the coordinator image.

``serve`` (the image's default command) prepares and starts the service:

0. wait until ``fedge coordinator init`` has run (its ``coordinator.env`` is in the data
   directory), logging what to run meanwhile, instead of exiting into a restart loop;
1. wait for the database, with a bounded number of attempts (PostgreSQL usually starts
   alongside the coordinator and needs a few seconds);
2. apply the Alembic migrations, under a PostgreSQL advisory lock so that several replicas
   starting at once migrate exactly once;
3. run ``fedge coordinator serve`` in this process (PID 1 of the container, so it receives
   SIGTERM directly and stops gracefully), with one worker process per CPU available to the
   container on PostgreSQL (:func:`default_workers`), one on SQLite.

``migrate`` does steps 1 and 2 only (whatever ``FEDGE_MIGRATE_ON_START`` says) and exits 0
once the schema is at head: the Kubernetes init container (deploy/kubernetes/).

Any other command runs as given, e.g. ``fedge coordinator init`` or
``fedge coordinator create-key`` as a one-off container.

Configured only through ``FEDGE_*`` environment variables: the coordinator's settings (read
exactly as ``fedge coordinator serve`` reads them, so both see the same database), plus

- ``FEDGE_DB_WAIT_ATTEMPTS`` (default 30) and ``FEDGE_DB_WAIT_INTERVAL_S`` (default 2):
  how long to wait for the database;
- ``FEDGE_MIGRATE_ON_START`` (default true): set false when migrations run as a separate job;
- ``FEDGE_REQUIRE_INIT`` (default true): set false when the data directory is prepared
  otherwise (your own certificates, keys made with ``create-key``);
- ``FEDGE_INIT_WAIT_INTERVAL_S`` (default 10): how often to look for the finished init;
- ``FEDGE_WORKERS``: worker processes (a coordinator setting); when unset, the CPU count
  on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from fedge.coordinator.bootstrap import ENV_FILE, load_settings
from fedge.coordinator.cli import main as coordinator_main
from fedge.coordinator.db import make_engine
from fedge.coordinator.migrate import head_revision, upgrade
from fedge.coordinator.settings import Settings

# One fixed 64-bit key for pg_advisory_lock: "the fedge schema is being migrated".
MIGRATION_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"fedge.migrations").digest()[:8], "big", signed=True
)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class StartupError(RuntimeError):
    """The container cannot start the service; the message says why."""


def env_int(name: str, default: int, *, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise StartupError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise StartupError(f"{name}={value} must be at least {minimum}")
    return value


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise StartupError(f"{name}={raw!r} is not a number") from None
    if not value >= 0:
        raise StartupError(f"{name}={raw!r} must be a non-negative number")
    return value


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise StartupError(f"{name}={raw!r} is not a boolean (true/false)")


def redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy understands: print nothing of it
        return "<unparseable database URL>"


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (driver errors run to several lines)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__


def log(message: str) -> None:
    print(f"fedge entrypoint: {message}", file=sys.stderr, flush=True)


def open_engine(url: str, *, connect_timeout_s: int = 5) -> Engine:
    """An engine whose connection attempts give up after ``connect_timeout_s`` on PostgreSQL
    (a host that drops packets would otherwise hang an attempt for minutes)."""
    if make_url(url).get_backend_name() == "postgresql":
        return make_engine(url, connect_args={"connect_timeout": connect_timeout_s})
    return make_engine(url)


def wait_for_database(
    url: str,
    *,
    attempts: int,
    interval_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Connect and run ``SELECT 1`` until it works; return the number of attempts it took.

    Raises :class:`StartupError` with the last error after ``attempts`` failures.
    """
    engine = open_engine(url)
    try:
        for attempt in range(1, attempts + 1):
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                return attempt
            except SQLAlchemyError as exc:
                reason = first_line(getattr(exc, "orig", None) or exc)
                if attempt == attempts:
                    raise StartupError(
                        f"database {redact(url)} unreachable after {attempts} attempts: {reason}"
                    ) from exc
                log(f"waiting for database {redact(url)} ({attempt}/{attempts}): {reason}")
                sleep(interval_s)
    finally:
        engine.dispose()
    raise AssertionError("unreachable")  # pragma: no cover


@contextmanager
def migration_lock(conn: Connection) -> Iterator[None]:
    """Hold the advisory lock that serialises migrations (PostgreSQL; a no-op elsewhere)."""
    if conn.dialect.name != "postgresql":
        yield
        return
    conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    conn.commit()
    try:
        yield
    finally:
        conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
        conn.commit()


def current_revision(conn: Connection) -> str | None:
    revision = MigrationContext.configure(conn).get_current_revision()
    conn.rollback()
    return revision


def migrate(url: str) -> tuple[str | None, str | None]:
    """Upgrade the database to the head revision; return (revision before, revision after)."""
    engine = open_engine(url)
    try:
        with engine.connect() as conn, migration_lock(conn):
            before = current_revision(conn)
            if before != head_revision(url):
                upgrade(url)
            after = current_revision(conn)
    finally:
        engine.dispose()
    return before, after


def available_cpus(
    *, cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max"), cpus: int | None = None
) -> int:
    """CPUs this process may use: its CPU affinity, lowered to the container's CPU quota
    (cgroup v2 ``cpu.max``, rounded up) when one is set."""
    count = cpus if cpus is not None else len(os.sched_getaffinity(0))
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            count = min(count, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity stands
    return max(1, count)


def default_workers(settings: Settings, cpus: int) -> int:
    """Worker processes when ``FEDGE_WORKERS`` is unset: one per CPU on PostgreSQL, one on
    SQLite (which supports a single process; see docs/deploy.md)."""
    if make_url(settings.database_url).get_backend_name() == "sqlite":
        return 1
    return cpus


def serve_args(settings: Settings, args: Sequence[str]) -> list[str]:
    """``serve`` and its options, with ``--workers`` from the CPU count unless the operator
    chose (``FEDGE_WORKERS`` in the environment or ``coordinator.env``, or ``--workers``)."""
    chosen = "workers" in settings.model_fields_set or any(
        a == "--workers" or a.startswith("--workers=") for a in args
    )
    if chosen:
        return ["serve", *args]
    return ["serve", "--workers", str(default_workers(settings, available_cpus())), *args]


INIT_COMMAND = "docker compose -f docker/compose.yaml run --rm coordinator fedge coordinator init"


def initialized(settings: Settings) -> bool:
    """``fedge coordinator init`` finished here: it writes ``coordinator.env`` last."""
    return (settings.data_dir / ENV_FILE).is_file()


def wait_for_init(
    settings: Settings,
    *,
    interval_s: float,
    sleep: Callable[[float], None] = time.sleep,
    announce_every: int = 6,
) -> int:
    """Wait (without limit) until the data directory holds a finished init; return the
    number of looks it took. Logs what to run now and then, so ``docker compose logs`` says
    what is missing instead of showing a restart loop."""
    looks = 1
    while not initialized(settings):
        if looks % announce_every == 1:
            log(
                f"waiting for `fedge coordinator init`: {settings.data_dir / ENV_FILE} does "
                f"not exist yet. Run it once: {INIT_COMMAND} (docs/deploy.md)"
            )
        sleep(interval_s)
        looks += 1
    return looks


def prestart(settings: Settings, *, always_migrate: bool = False) -> None:
    """Wait for the database and migrate it (unless FEDGE_MIGRATE_ON_START=false and not
    ``always_migrate``)."""
    url = settings.database_url
    attempts = env_int("FEDGE_DB_WAIT_ATTEMPTS", 30)
    interval_s = env_float("FEDGE_DB_WAIT_INTERVAL_S", 2.0)
    used = wait_for_database(url, attempts=attempts, interval_s=interval_s)
    log(f"database {redact(url)} answered (attempt {used})")
    if not always_migrate and not env_bool("FEDGE_MIGRATE_ON_START", True):
        log("FEDGE_MIGRATE_ON_START=false: not migrating")
        return
    before, after = migrate(url)
    if before == after:
        log(f"schema already at {after}")
    else:
        log(f"migrated schema from {before or 'nothing'} to {after}")


def migrate_only() -> int:
    """``migrate``: wait for the database, migrate it under the advisory lock, exit (an init
    container or a Job; docs/deploy-kubernetes.md)."""
    try:
        prestart(load_settings(), always_migrate=True)
    except ValueError as exc:  # pydantic's ValidationError: a FEDGE_* variable is malformed
        log(f"invalid configuration: {exc}")
        return 2
    except StartupError as exc:
        log(str(exc))
        return 1
    return 0


def main(argv: Sequence[str]) -> int:
    """Run ``serve`` (prepare, then serve), ``migrate`` (prepare only) or exec any other
    command as given."""
    args = list(argv)
    if args == ["migrate"]:
        return migrate_only()
    if args and args[0] != "serve":
        os.execvp(args[0], args)  # noqa: S606 (the container's command, given by the operator)
    try:
        settings = load_settings()
        if env_bool("FEDGE_REQUIRE_INIT", True) and not initialized(settings):
            wait_for_init(settings, interval_s=env_float("FEDGE_INIT_WAIT_INTERVAL_S", 10.0))
            log("init has run; starting")
            settings = load_settings()  # now with the data directory's coordinator.env
        prestart(settings)
    except ValueError as exc:  # pydantic's ValidationError: a FEDGE_* variable is malformed
        log(f"invalid configuration: {exc}")
        return 2
    except StartupError as exc:
        log(str(exc))
        return 1
    return coordinator_main(serve_args(settings, args[1:]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
