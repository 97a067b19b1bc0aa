"""Streaming weighted aggregation of compressed updates.

Updates are read from the blob store and decoded **one at a time**; each is added into a
single dense float64 accumulator (``DecodedUpdate.add_to`` touches only the carried indices,
so a sparse update costs O(nnz)) and then dropped. Peak memory is therefore one dense float64
model plus one decoded update, whatever the number of updates: aggregation can run over
thousands of clients on a small server.

The weighted mean ``sum(w_i * delta_i) / sum(w_i)`` is what the server strategies consume.
Because it is a plain weighted sum, partial sums over disjoint sets of updates can be computed
anywhere and combined (``Accumulator.merge``), which is how aggregation would be split across
machines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from fedge.coordinator.blobstore import BlobNotFound, BlobStore
from fedge.coordinator.engine.decodedcache import DecodedCache
from fedge.shared.limits import DEFAULT_LIMITS, Limits
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import DecodedUpdate, WireFormatError, decode_update


class BadStoredUpdate(ValueError):
    """A stored update cannot be read or decoded any more (``index`` into the items)."""

    def __init__(self, index: int, digest: str, detail: str) -> None:
        super().__init__(f"update blob {digest[:12]}: {detail}")
        self.index = index
        self.digest = digest
        self.detail = detail


@dataclass(frozen=True)
class WeightedBlob:
    """One update to aggregate: its blob and the weight it enters with."""

    digest: str
    weight: float


class Accumulator:
    """A dense float64 running sum ``sum(w_i * delta_i)`` and the total weight."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.sums: dict[str, np.ndarray] = {
            t.name: np.zeros(t.shape, np.float64) for t in spec.tensors
        }
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: DecodedUpdate, weight: float, *, scale: float = 1.0) -> None:
        """Add ``weight * scale * delta`` (O(nnz) for sparse updates); the total weight grows
        by ``weight`` only: ``scale`` shrinks the update itself (the norm bound's clip)."""
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"update weight must be finite and >= 0, got {weight}")
        update.add_to(self.sums, weight * scale)
        self.total_weight += weight
        self.count += 1

    def add_dense(self, delta: dict[str, np.ndarray], weight: float) -> None:
        """Add a dense delta (reference path for tests and partial sums)."""
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"update weight must be finite and >= 0, got {weight}")
        for name, acc in self.sums.items():
            acc += weight * np.asarray(delta[name], dtype=np.float64).reshape(acc.shape)
        self.total_weight += weight
        self.count += 1

    def merge(self, other: Accumulator) -> None:
        """Fold in a partial sum computed elsewhere over other updates."""
        for name, acc in self.sums.items():
            acc += other.sums[name]
        self.total_weight += other.total_weight
        self.count += other.count

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean delta, computed in place (the accumulator is spent afterwards).

        With a total weight of zero (no updates, or all weights zero) the mean is zero."""
        if self.total_weight > 0:
            for acc in self.sums.values():
                acc /= self.total_weight
        else:
            for acc in self.sums.values():
                acc.fill(0.0)
        return self.sums


def max_abs(update: DecodedUpdate) -> float:
    """The largest magnitude among the update's carried values (0.0 when it carries none);
    two reductions per tensor, no temporary array."""
    return max(
        (
            max(float(t.values.max()), -float(t.values.min()))
            for t in update.tensors
            if t.values.size
        ),
        default=0.0,
    )


def iter_decoded(
    blobs: BlobStore,
    items: Iterable[WeightedBlob],
    *,
    spec: ModelSpec,
    policy: CompressionPolicy | None,
    limits: Limits = DEFAULT_LIMITS,
    decoded: DecodedCache | None = None,
) -> Iterator[tuple[DecodedUpdate, float]]:
    """Decode stored updates lazily, one at a time (:class:`BadStoredUpdate` names a blob
    that is missing or no longer decodes). An update found in ``decoded`` (decoded when it
    was accepted, with the default limits) is taken from there instead."""
    use_cache = decoded is not None and limits is DEFAULT_LIMITS
    for index, item in enumerate(items):
        if use_cache:
            assert decoded is not None
            cached = decoded.take(item.digest, spec=spec, policy=policy)
            if cached is not None:
                yield cached, item.weight
                continue
        try:
            data = blobs.get(item.digest)
            update = decode_update(data, spec=spec, policy=policy, limits=limits)
        except BlobNotFound:
            raise BadStoredUpdate(index, item.digest, "missing from the blob store") from None
        except WireFormatError as exc:
            raise BadStoredUpdate(index, item.digest, str(exc)) from None
        del data
        yield update, item.weight


def aggregate_blobs(
    blobs: BlobStore,
    items: Iterable[WeightedBlob],
    *,
    spec: ModelSpec,
    policy: CompressionPolicy | None,
    limits: Limits = DEFAULT_LIMITS,
    decoded: DecodedCache | None = None,
) -> Accumulator:
    """Stream ``items`` from the blob store into one accumulator (memory O(model size))."""
    acc = Accumulator(spec)
    for update, weight in iter_decoded(
        blobs, items, spec=spec, policy=policy, limits=limits, decoded=decoded
    ):
        acc.add(update, weight)
        del update
    return acc
