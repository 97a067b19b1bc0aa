"""Crash-safe file writes: temp file in the same directory, fsync, ``os.replace``, fsync dir.

A reader sees either the old content or the new one, never a torn file. Temporary files are
named ``.<name>.tmp-<random>``; :func:`remove_temp_files` deletes leftovers of writes that a
crash interrupted (readers never look at such names).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

TEMP_MARKER = ".tmp-"


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARKER}{secrets.token_hex(4)}")


def write_bytes_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably; the file gets ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # O_CREAT's mode is filtered by the umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, value: Any, *, mode: int = 0o644) -> None:
    data = json.dumps(value, indent=2, sort_keys=True).encode("utf-8") + b"\n"
    write_bytes_atomic(path, data, mode=mode)


def read_json(path: Path) -> Any:
    """The JSON value stored at ``path`` (``FileNotFoundError`` when absent)."""
    return json.loads(path.read_bytes().decode("utf-8"))


def remove_temp_files(directory: Path) -> int:
    """Delete leftovers of interrupted atomic writes below ``directory``; how many.

    Matches this module's temp names and ``.<name>.<random>.tmp`` (what
    :meth:`shared.feedback.Residual.save` uses)."""
    removed = 0
    if not directory.exists():
        return 0
    candidates = {*directory.rglob(f".*{TEMP_MARKER}*"), *directory.rglob(".*.tmp")}
    for path in sorted(candidates, reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed += 1
    return removed
