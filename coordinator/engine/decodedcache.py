"""Updates decoded at upload, kept in memory for their aggregation.

An upload is decoded once to be checked (:func:`fedge.coordinator.engine.updates.
decode_checked`); its aggregation used to read the blob back and decode it again. The
coordinator process that accepted an update keeps the decoded form here, keyed by the blob's
SHA-256 digest, and the aggregation takes it out (once: an entry is removed when used). The
blob store stays the record: an update not found here (evicted, accepted by another process,
or after a restart) is read and decoded from its blob as before, and an entry is used only for
the same model spec and compression policy it was decoded against.

Bounded by bytes (``FEDGE_DECODED_CACHE_MB``, 0 disables): the oldest entries go first. A
sparse update of a 100,000-parameter model at top-1 % takes about 12 kB here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple

from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import DecodedUpdate


class _Entry(NamedTuple):
    update: DecodedUpdate
    spec: ModelSpec
    policy: CompressionPolicy
    size: int


def decoded_size(update: DecodedUpdate) -> int:
    """Bytes of the arrays an update holds."""
    return sum(
        t.values.nbytes + (0 if t.indices is None else t.indices.nbytes) for t in update.tensors
    )


class DecodedCache:
    """A byte-bounded, thread-safe map of blob digest -> decoded update (oldest out first)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        #: Aggregation look-ups answered from memory / from the blob store (diagnostics).
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def put(
        self, digest: str, update: DecodedUpdate, *, spec: ModelSpec, policy: CompressionPolicy
    ) -> None:
        size = decoded_size(update)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(digest, None)
            if old is not None:
                self._bytes -= old.size
            self._entries[digest] = _Entry(update, spec, policy, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.size

    def take(
        self, digest: str, *, spec: ModelSpec, policy: CompressionPolicy | None
    ) -> DecodedUpdate | None:
        """The update decoded from ``digest`` against this spec and policy, removed from the
        cache; ``None`` when it is not here (decode the blob then)."""
        with self._lock:
            entry = self._entries.pop(digest, None)
            if entry is not None:
                self._bytes -= entry.size
            if entry is None or entry.spec != spec or entry.policy != policy:
                self.misses += 1
                return None
            self.hits += 1
            return entry.update
