"""Back up and restore a coordinator's state the way docs/deploy.md and docs/operations.md
tell operators to: the blob store with ``tar``, PostgreSQL with ``pg_dump --format=custom`` /
``pg_restore``, SQLite with the online backup API (what ``sqlite3 fedge.db ".backup …"``
does).

Usage::

    require_tools("pg_dump", "pg_restore")          # skip, or fail under CI=true
    archive_blobs(settings.blobs, backup / "fedge-blobs.tar.gz")
    dump_database(settings.database_url, backup / "fedge.dump")
    ...
    restore_database(backup / "fedge.dump", fresh_url)
    extract_blobs(backup / "fedge-blobs.tar.gz", fresh_blob_dir)
    assert corrupt_blobs(fresh_blob_dir) == []
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.support import databases

#: How long one backup tool may run before the test gives up on it.
TOOL_TIMEOUT_S = 60.0


def require_tools(*names: str) -> None:
    """Skip the calling test when a command is not on PATH (fail instead under CI=true)."""
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    message = f"{', '.join(missing)} not on PATH; the PostgreSQL backup drill needs them"
    if databases.in_ci():
        pytest.fail(f"CI=true but {message}")
    pytest.skip(message)


def _run(command: list[str], *, env: dict[str, str] | None = None) -> None:
    """Run a backup tool; its stderr goes into the failure message."""
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{command[0]} exited with {result.returncode}:\n{result.stderr}{result.stdout}"
        )


def archive_blobs(blob_dir: Path, archive: Path) -> None:
    """``tar -C <blobs> -czf <archive> .`` (docs/deploy.md, step 1)."""
    _run(["tar", "-C", str(blob_dir), "-czf", str(archive), "."])


def extract_blobs(archive: Path, blob_dir: Path) -> None:
    """``tar -xzf`` into an empty (or new) blob directory."""
    blob_dir.mkdir(parents=True, exist_ok=True)
    if any(blob_dir.iterdir()):
        raise AssertionError(f"restore target {blob_dir} is not empty")
    _run(["tar", "-C", str(blob_dir), "-xzf", str(archive)])


def corrupt_blobs(blob_dir: Path) -> list[str]:
    """Every stored blob whose bytes do not hash to its file name (temporary files of
    interrupted writes, ``.tmp-*``, are not blobs and are skipped)."""
    bad = []
    for path in sorted(blob_dir.rglob("*")):
        if not path.is_file() or path.name.startswith(".tmp-"):
            continue
        if hashlib.sha256(path.read_bytes()).hexdigest() != path.name:
            bad.append(str(path.relative_to(blob_dir)))
    return bad


def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """A libpq connection URI for a SQLAlchemy PostgreSQL URL (password via PGPASSWORD, so it
    never shows in a process list) and the environment to run the tool in."""
    parsed = make_url(url)
    env = dict(os.environ)
    if parsed.password:
        env["PGPASSWORD"] = str(parsed.password)
    uri = parsed.set(drivername="postgresql", password=None).render_as_string()
    return uri, env


def _sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not database:
        raise ValueError(f"not a SQLite file URL: {url}")
    return Path(database)


def dump_database(url: str, target: Path) -> None:
    """PostgreSQL: ``pg_dump --format=custom``. SQLite: the online backup API into a new
    file, which is consistent even while a coordinator writes to the database."""
    if make_url(url).get_backend_name() == "postgresql":
        uri, env = _libpq(url)
        _run(["pg_dump", "--format=custom", f"--file={target}", f"--dbname={uri}"], env=env)
        return
    source = _sqlite_path(url)
    if not source.is_file():
        raise AssertionError(f"no SQLite database at {source}")
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def restore_database(dump: Path, url: str) -> None:
    """PostgreSQL: ``pg_restore --clean --if-exists --no-owner`` into the database named by
    ``url``, as docs/deploy.md has it (pg_restore carries on past errors but then exits
    non-zero, which fails here). SQLite: the backup file becomes the
    database file at ``url``'s path, which must not exist yet."""
    if make_url(url).get_backend_name() == "postgresql":
        uri, env = _libpq(url)
        _run(
            [
                "pg_restore",
                "--clean",
                "--if-exists",
                "--no-owner",
                f"--dbname={uri}",
                str(dump),
            ],
            env=env,
        )
        return
    target = _sqlite_path(url)
    if target.exists():
        raise AssertionError(f"restore target {target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(dump, target)
