"""Content-addressed blob stores for models and updates.

A blob's name is the SHA-256 of its bytes. :class:`BlobStore` is what the coordinator uses
(put, get, exists, size, check, verify, and for retention ``delete`` and ``list_blobs``);
:class:`FileBlobStore` keeps blobs as files, the embedded default.

Files: a blob lives at ``<root>/<d[0:2]>/<d[2:4]>/<d>``. Writes are atomic and durable
(``fedge.shared.durable``): a temporary file ``.tmp-<random>`` in the target directory is written
and fsynced, renamed over the final name and the directory is fsynced. A crash leaves either no
blob or the whole blob; stray temporary files are ignored and can be swept. Blobs get mode 0600.

Every ``put`` of bytes already stored refreshes the blob's write time: a sweep of unreferenced
blobs (retention) only deletes blobs written longer ago than its grace period, so a blob that
a new row is about to reference (written, then the row committed) is never swept. The sweep
deletes through ``delete_if_older``, which checks the write time again as it deletes.
"""

from __future__ import annotations

import abc
import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedge.shared.durable import write_bytes_atomic

if TYPE_CHECKING:
    from sqlalchemy import Connection

_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
TEMP_PREFIX = ".tmp-"
BLOB_MODE = 0o600


def check_digest(digest: str) -> str:
    """``digest`` when it is a SHA-256 hex digest, else ValueError."""
    if not _DIGEST_RE.fullmatch(digest):
        raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
    return digest


@dataclass(frozen=True)
class BlobInfo:
    """One stored blob: its name, size and the time (Unix seconds) it was last written."""

    digest: str
    size: int
    written_at: float


class BlobNotFound(KeyError):
    pass


class BlobDamaged(Exception):
    """A stored blob that cannot be read back whole (a database blob whose chunks disagree
    with its row: rows deleted or changed behind the store's back); never returned as short
    or padded bytes."""

    def __init__(self, digest: str, detail: str) -> None:
        super().__init__(f"blob {digest} is damaged in the database: {detail}")
        self.digest = digest


class BlobStore(abc.ABC):
    """Content-addressed storage; every method is safe to call from several threads and
    processes at once."""

    #: The largest blob :meth:`put_in` stores inside a transaction of the coordinator's own
    #: database; 0 when the store has no rows there.
    inline_limit: int = 0

    @abc.abstractmethod
    def put(self, data: bytes) -> str:
        """Store ``data`` durably (or refresh its write time when stored); its digest."""

    def put_in(self, conn: Connection, data: bytes) -> str:
        """Store ``data`` (at most :attr:`inline_limit` bytes) as rows written by ``conn``, a
        connection of the coordinator's database in a write transaction: the blob becomes
        durable with that transaction's commit and vanishes with its rollback. Its digest."""
        raise NotImplementedError(f"{type(self).__name__} keeps no blobs in the database")

    def close(self) -> None:  # noqa: B027 (a store that holds nothing has nothing to do)
        """Release what the store holds (a database engine of its own)."""

    @abc.abstractmethod
    def get(self, digest: str) -> bytes:
        """The bytes stored under ``digest``; :class:`BlobNotFound` when there are none."""

    @abc.abstractmethod
    def exists(self, digest: str) -> bool: ...

    @abc.abstractmethod
    def size(self, digest: str) -> int:
        """The size in bytes; :class:`BlobNotFound` when there is no such blob."""

    @abc.abstractmethod
    def check(self) -> tuple[bool, str]:
        """(usable, detail) for the readiness probe."""

    @abc.abstractmethod
    def delete(self, digest: str) -> bool:
        """Remove the blob; False when there was none."""

    @abc.abstractmethod
    def list_blobs(self) -> Iterator[BlobInfo]:
        """Every stored blob, in no particular order."""

    def delete_if_older(self, digest: str, written_before: float) -> bool:
        """Remove the blob unless it was written at or after ``written_before`` (Unix
        seconds); True when it was removed.

        The sweep of unreferenced blobs calls this after its listing showed an old write time,
        so a ``put`` of the same bytes in between (a new row about to name the blob) keeps it.
        Stores should make the check and the removal one step (a database store: one
        conditional ``DELETE``); this default only removes, relying on the listing."""
        return self.delete(digest)

    def verify(self, digest: str) -> bool:
        """True when the stored bytes still hash to their name."""
        return hashlib.sha256(self.get(digest)).hexdigest() == digest


class FileBlobStore(BlobStore):
    """Blobs as files under ``root`` (module docstring)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest[2:4] / check_digest(digest)

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if target.exists():
            try:
                os.utime(target)  # written again: a sweep's grace period starts over
                return digest
            except FileNotFoundError:  # swept in between: write it again
                pass
        write_bytes_atomic(target, data, mode=BLOB_MODE, temp_prefix=TEMP_PREFIX)
        return digest

    def delete(self, digest: str) -> bool:
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def delete_if_older(self, digest: str, written_before: float) -> bool:
        """The blob is renamed aside first, then its write time is read: a ``put`` that
        refreshed it before the rename shows there and the blob is written back (durably);
        a ``put`` after the rename finds no blob and writes it again."""
        target = self.path(digest)
        aside = target.with_name(f"{TEMP_PREFIX}gc-{secrets.token_hex(8)}")
        try:
            os.rename(target, aside)
        except FileNotFoundError:
            return False
        if aside.stat().st_mtime >= written_before:  # written again meanwhile: keep it
            write_bytes_atomic(target, aside.read_bytes(), mode=BLOB_MODE, temp_prefix=TEMP_PREFIX)
            aside.unlink()
            return False
        aside.unlink()
        return True

    def list_blobs(self) -> Iterator[BlobInfo]:
        for first in sorted(self.root.iterdir()):
            if not first.is_dir() or len(first.name) != 2:
                continue
            for second in sorted(first.iterdir()):
                if not second.is_dir():
                    continue
                with os.scandir(second) as entries:  # closed when the caller stops early
                    for entry in entries:
                        if not _DIGEST_RE.fullmatch(entry.name):
                            continue  # temporary files and strangers
                        try:
                            stat = entry.stat()
                        except FileNotFoundError:
                            continue
                        yield BlobInfo(entry.name, stat.st_size, stat.st_mtime)

    def get(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

    def check(self) -> tuple[bool, str]:
        """(usable, detail): the root is a directory this process can read and write."""
        if not self.root.is_dir():
            return False, f"blob directory {self.root} does not exist"
        if not os.access(self.root, os.R_OK | os.W_OK | os.X_OK):
            return False, f"blob directory {self.root} is not readable and writable"
        return True, "ok"
