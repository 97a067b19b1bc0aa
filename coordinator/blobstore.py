"""Content-addressed filesystem blob store for models and updates.

A blob's name is the SHA-256 of its bytes; it lives at ``<root>/<d[0:2]>/<d[2:4]>/<d>``.
Writes are atomic and durable (``fedge.shared.durable``): a temporary file ``.tmp-<random>`` in the
target directory is written and fsynced, renamed over the final name and the directory is
fsynced. A crash leaves either no blob or the whole blob; stray temporary files are ignored and
can be swept. Blobs get mode 0600.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from fedge.shared.durable import write_bytes_atomic

_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
TEMP_PREFIX = ".tmp-"
BLOB_MODE = 0o600


class BlobNotFound(KeyError):
    pass


class BlobStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if not _DIGEST_RE.fullmatch(digest):
            raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
        return self.root / digest[:2] / digest[2:4] / digest

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if target.exists():
            return digest
        write_bytes_atomic(target, data, mode=BLOB_MODE, temp_prefix=TEMP_PREFIX)
        return digest

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

    def verify(self, digest: str) -> bool:
        """True when the stored bytes still hash to their name."""
        return hashlib.sha256(self.get(digest)).hexdigest() == digest
