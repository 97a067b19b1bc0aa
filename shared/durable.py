"""Durable atomic file writes, the one implementation both the coordinator and the agent use.

:func:`write_atomic` creates a temporary file in the target's directory, writes it, flushes
and fsyncs it, renames it over the target with ``os.replace`` and fsyncs the directory
(missing directories on the way are created, each made durable by an fsync of its parent). A
reader, or the process after a crash at any instant, sees the old file or the whole new one,
never a mix; once the call returns the new content survives a power loss.

The temporary file is named ``.<name>.tmp-<random>`` (or ``<temp_prefix><random>`` when the
caller picks a prefix, e.g. the blob store's ``.tmp-``), is created exclusively with mode 0600
and gets the requested mode before any byte is written, so a private key is never readable by
others, not even half-written. When writing fails the temporary file is removed and the target
is untouched; a crash can leave a temporary file behind, which :func:`remove_temp_files`
deletes (readers never look at such names).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "TEMP_MARKER",
    "fsync_dir",
    "make_dirs_durably",
    "remove_temp_files",
    "temp_name",
    "write_atomic",
    "write_bytes_atomic",
]

TEMP_MARKER = ".tmp-"


def temp_name(name: str) -> str:
    """The prefix of the temporary files that replace ``name`` (a random part follows)."""
    return f".{name}{TEMP_MARKER}"


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename, creation or unlink inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(directory: str | os.PathLike[str]) -> None:
    """``mkdir -p directory``, each directory it creates made durable (its parent fsynced
    after the ``mkdir``), so a file written and fsynced in it survives a power loss with the
    path that leads to it. Nothing is fsynced when the directory exists already."""
    path = Path(directory)
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for created in reversed(missing):
        # made meanwhile by another writer: fsync all the same, its fsync may not be done yet
        with contextlib.suppress(FileExistsError):
            created.mkdir()
        fsync_dir(created.parent)


def rename_durably(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Rename ``source`` (a file or a directory) to ``target`` in one step (``target`` must
    not exist, or be an empty directory) and make the rename durable."""
    os.replace(source, target)
    fsync_dir(Path(target).parent)


def write_atomic(
    path: str | os.PathLike[str],
    write: Callable[[BinaryIO], object],
    *,
    mode: int = 0o644,
    temp_prefix: str | None = None,
) -> None:
    """Replace ``path`` atomically and durably with what ``write`` writes to the file object
    it is given; the file gets exactly ``mode`` (not filtered by the umask). Missing parent
    directories are created. An exception from ``write`` (or from the file system) leaves
    ``path`` as it was and no temporary file behind."""
    target = Path(path)
    make_dirs_durably(target.parent)
    prefix = temp_name(target.name) if temp_prefix is None else temp_prefix
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=target.parent)  # O_EXCL, mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def write_bytes_atomic(
    path: str | os.PathLike[str],
    data: bytes | bytearray | memoryview,
    *,
    mode: int = 0o644,
    temp_prefix: str | None = None,
) -> None:
    """:func:`write_atomic` of ``data``."""
    write_atomic(path, lambda fh: fh.write(data), mode=mode, temp_prefix=temp_prefix)


def remove_temp_files(directory: str | os.PathLike[str], *, patterns: tuple[str, ...] = ()) -> int:
    """Delete leftovers of interrupted writes below ``directory`` (temporary files, and
    directories named the same way); how many. ``patterns`` adds glob patterns of other
    leftover names to match."""
    root = Path(directory)
    if not root.exists():
        return 0
    candidates: set[Path] = set()
    for pattern in (f".*{TEMP_MARKER}*", *patterns):
        candidates.update(root.rglob(pattern))
    removed = 0
    for path in sorted(candidates, reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed += 1
    return removed
