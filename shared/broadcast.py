"""The broadcast model: what the coordinator sends devices when downloads are compressed.

The coordinator keeps two models per version: the true model ``w`` (what aggregation
produces, what administrators download and evaluate) and the *broadcast* model ``b`` (what
devices hold). With a dense download policy the two are the same. Otherwise version ``v+1``
goes down as a compressed delta

    d = C(w[v+1] - b[v]),        b[v+1] = b[v] + d

where ``C`` is top-k plus stochastic quantization (:class:`fedge.shared.policy.DownloadPolicy`).
What ``C`` leaves out is ``w - b`` and is part of the next difference: server-side error
feedback with the broadcast model as the preserved central model, as in EF21-P and MCM
(Philippenko and Dieuleveut's "preserved central model"), so no separate residual has to be
stored. Every device applies the same bytes with the same float32 arithmetic
(:func:`apply_delta`, also what the coordinator uses), so every device rebuilds ``b`` bit for
bit; the delta carries the SHA-256 of the rebuilt weights (:func:`weights_digest`) and a device
checks it before it trusts the result.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from fedge.shared.compression import as_float32, compress
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.policy import DownloadPolicy
from fedge.shared.wire_delta import (
    DecodedDelta,
    decode_chain,
    decode_delta,
    encode_delta,
    with_digest,
)
from fedge.shared.wireerror import WireFormatError
from fedge.shared.wirelayout import KIND_CHAIN, KIND_DELTA, PREFIX

__all__ = ["apply_delta", "blob_kind", "make_delta", "rebuild", "weights_digest"]


def weights_digest(weights: Mapping[str, np.ndarray], spec: ModelSpec) -> bytes:
    """SHA-256 over the tensors in ``spec`` order, each as little-endian float32 bytes."""
    h = hashlib.sha256()
    for t in spec.tensors:
        h.update(np.ascontiguousarray(weights[t.name], dtype="<f4").tobytes())
    return h.digest()


def apply_delta(base: Mapping[str, np.ndarray], delta: DecodedDelta, spec: ModelSpec) -> Weights:
    """``base`` plus the delta, in float32 (a new mapping; ``base`` is not changed)."""
    names = {t.name for t in delta.tensors}
    if names != set(spec.names):
        raise WireFormatError("shape_mismatch", "the delta's tensors differ from the model's")
    out: Weights = {}
    for t in delta.tensors:
        flat = np.array(base[t.name], dtype=np.float32, copy=True).reshape(-1)
        values = np.asarray(t.values, dtype=np.float32)
        if t.indices is None:
            flat += values
        else:
            flat[t.indices] += values
        out[t.name] = flat.reshape(t.shape)
    return {name: out[name] for name in spec.names}


def make_delta(
    true: Mapping[str, np.ndarray],
    broadcast: Mapping[str, np.ndarray],
    policy: DownloadPolicy,
    rng: np.random.Generator,
    *,
    spec: ModelSpec,
    task_id: int,
    from_version: int,
    to_version: int,
) -> tuple[bytes, Weights]:
    """The encoded delta from ``broadcast`` towards ``true`` and the broadcast model it
    rebuilds (computed by decoding the encoded bytes, exactly as a device does)."""
    if policy.is_dense:
        raise ValueError("a dense download policy sends full models, not deltas")
    with np.errstate(over="ignore", invalid="ignore"):  # checked just below
        diff = {
            t.name: as_float32(t.name, true[t.name]) - as_float32(t.name, broadcast[t.name])
            for t in spec.tensors
        }
    if not all(np.isfinite(a).all() for a in diff.values()):
        raise ValueError(
            f"the step from the broadcast model to version {to_version} overflows float32"
        )
    compressed = compress(diff, policy.codec(), rng)
    data = encode_delta(
        compressed, task_id=task_id, from_version=from_version, to_version=to_version
    )
    rebuilt = apply_delta(broadcast, decode_delta(data, spec=spec), spec)
    if not all(np.isfinite(a).all() for a in rebuilt.values()):
        raise ValueError(f"the broadcast model of version {to_version} is not finite")
    return with_digest(data, weights_digest(rebuilt, spec)), rebuilt


def blob_kind(data: bytes) -> int | None:
    """The wire kind of an encoded blob (its prefix), or ``None`` when it is too short."""
    if len(data) < PREFIX.size:
        return None
    return int(data[6])


def rebuild(
    base: Mapping[str, np.ndarray],
    data: bytes,
    spec: ModelSpec,
    *,
    task_id: int,
    have: int,
    want: int,
) -> Weights:
    """Apply a delta or a chain (``data``) to ``base`` (the broadcast model of ``have``) and
    return the broadcast model of ``want``; ``WireFormatError`` when the body is malformed,
    does not lead from ``have`` to ``want`` of ``task_id`` (``chain_mismatch``), or a rebuilt
    model differs from the digest its delta announced (``checksum_mismatch``)."""
    kind = blob_kind(data)
    if kind == KIND_CHAIN:
        deltas = decode_chain(data, spec=spec)
    elif kind == KIND_DELTA:
        deltas = [decode_delta(data, spec=spec)]
    else:
        raise WireFormatError("wrong_kind", "expected a model delta or a delta chain")
    first, last = deltas[0], deltas[-1]
    if first.task_id != task_id or first.from_version != have or last.to_version != want:
        raise WireFormatError(
            "chain_mismatch",
            f"the deltas lead from version {first.from_version} to {last.to_version} of task "
            f"{first.task_id}, wanted {have} -> {want} of task {task_id}",
        )
    weights: Mapping[str, np.ndarray] = base
    for delta in deltas:
        weights = apply_delta(weights, delta, spec)
        if weights_digest(weights, spec) != delta.digest:
            raise WireFormatError(
                "checksum_mismatch",
                f"the model rebuilt for version {delta.to_version} does not match its digest",
            )
    return dict(weights)
