"""The compression pipeline a device runs on each model delta.

``compress`` = (optionally add the error-feedback residual) -> top-k by magnitude (per tensor
or across the whole update) -> stochastic quantization of the kept values (or plain float32)
-> (optionally) remember what was lost in the residual:

    x = delta + residual;   c = Q(topk(x));   residual <- x - decompress(c)

so the sum of everything decoded on the server plus the current residual always equals the sum
of all true deltas. ``decompress`` is what the server's decoder returns for the same update, to
the bit (``decode_update(encode_update(c)).to_dense() == decompress(c)``).

``compress_round`` is what a device runs for one update: the policy's top-k fraction for the
update's base version (``fedge.shared.warmup``), and around ``compress`` the rest of the
device's error-feedback memory (a :class:`FeedbackMemory`): the residual and velocity decayed
by the model versions the device missed, and Deep Gradient Compression's momentum correction
(Lin et al. 2018) adapted to federated deltas::

    r, u <- decay**missed * r, decay**missed * u
    u <- momentum * u + delta;   x = r + u;   c = Q(topk(x));   r <- x - decompress(c)
    u <- 0 where c carries a value (momentum factor masking)

With ``momentum = 0`` (no velocity) and nothing missed this is exactly ``compress``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedge.shared.indexcoding import check_indices
from fedge.shared.modelspec import ModelSpec, TensorSpec, Weights
from fedge.shared.policy import CompressionPolicy, Scope
from fedge.shared.quantize import Quantized, dequantize, max_code, quantize
from fedge.shared.topk import top_k_indices, topk_count
from fedge.shared.warmup import topk_fraction_at

__all__ = [
    "CompressedTensor",
    "CompressedUpdate",
    "FeedbackMemory",
    "ResidualMemory",
    "as_float32",
    "compress",
    "compress_round",
    "decompress",
    "missed_versions",
]


class ResidualMemory(Protocol):
    """What :func:`compress` needs of an error-feedback residual
    (:class:`fedge.shared.feedback.Residual` is one): its model spec and its float32 arrays by
    tensor name, which ``compress`` replaces.
    A protocol rather than an import, so that this module does not depend on
    ``fedge.shared.feedback`` (which depends on ``fedge.shared.wire``, which depends on this
    module)."""

    values: Weights

    @property
    def spec(self) -> ModelSpec: ...


class FeedbackMemory(ResidualMemory, Protocol):
    """A device's whole error-feedback memory for one task, as :func:`compress_round` uses it
    (``fedge.edge_agent.residual_store.ResidualState`` is one): the residual, the momentum
    velocity (float32 arrays by tensor name, ``None`` while there is none) and ``version``, the
    base version of the last update folded into them (``None`` before the first)."""

    velocity: Weights | None
    version: int | None


@dataclass
class _Scratch:
    """The residual as ``compress`` sees it inside :func:`compress_round`, so that the caller's
    memory changes only once the update is made."""

    values: Weights
    spec: ModelSpec


@dataclass(frozen=True, eq=False)
class CompressedTensor:
    """One tensor of a compressed update.

    ``indices`` are sorted unique flat int64 indices, or ``None`` when every value is present.
    Exactly one of ``values`` (float32, when ``bits == 32``) and ``quantized`` is set.
    """

    name: str
    shape: tuple[int, ...]
    indices: np.ndarray | None
    values: np.ndarray | None = None
    quantized: Quantized | None = None

    @property
    def size(self) -> int:
        return TensorSpec(self.name, self.shape).size

    @property
    def nnz(self) -> int:
        """Number of values carried (the tensor size when dense)."""
        return self.size if self.indices is None else int(self.indices.size)

    def decoded_values(self) -> np.ndarray:
        """The float32 values the receiver will see, in index order."""
        if self.quantized is not None:
            return dequantize(self.quantized)
        assert self.values is not None
        return self.values

    def validate(self, *, bits: int, chunk: int) -> None:
        """``ValueError`` unless the parts are consistent with each other and with the codec."""
        what = f"tensor {self.name!r}"
        if self.indices is not None:
            check_indices(self.indices, self.size, what=what)
        n = self.nnz
        if bits == 32:
            v = self.values
            if v is None or self.quantized is not None or v.dtype != np.float32 or v.ndim != 1:
                raise ValueError(f"{what}: a 32-bit update carries 1-D float32 values")
            if v.size != n:
                raise ValueError(f"{what}: {v.size} values for {n} positions")
            if not np.isfinite(v).all():
                raise ValueError(f"{what}: values must be finite")
            return
        q = self.quantized
        if q is None or self.values is not None:
            raise ValueError(f"{what}: a {bits}-bit update carries quantized values")
        if q.bits != bits or q.chunk != chunk:
            raise ValueError(f"{what}: quantized with {q.bits} bits/chunk {q.chunk}")
        if q.codes.dtype != np.uint8 or q.codes.shape != (n,):
            raise ValueError(f"{what}: needs {n} uint8 codes")
        if n and int(q.codes.max()) > max_code(bits):
            raise ValueError(f"{what}: code above {max_code(bits)}")
        if q.scales.dtype != np.float32 or q.scales.shape != (-(-n // chunk),):
            raise ValueError(f"{what}: needs {-(-n // chunk)} float32 scales")
        if not np.isfinite(q.scales).all() or (q.scales < 0).any():
            raise ValueError(f"{what}: scales must be finite and non-negative")


@dataclass(frozen=True, eq=False)
class CompressedUpdate:
    """A compressed model delta with the codec parameters it was made with."""

    bits: int
    chunk: int
    topk_fraction: float
    scope: Scope
    tensors: tuple[CompressedTensor, ...]

    @property
    def nnz(self) -> int:
        return sum(t.nnz for t in self.tensors)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(tuple(TensorSpec(t.name, t.shape) for t in self.tensors))


def as_float32(name: str, array: object, *, check_finite: bool = True) -> np.ndarray:
    """A C-contiguous float32 view/copy of a finite real floating array, else ``ValueError``."""
    if isinstance(array, np.generic):
        array = np.asarray(array)
    if not isinstance(array, np.ndarray):
        raise ValueError(f"tensor {name!r}: expected a numpy array, got {type(array).__name__}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"tensor {name!r}: expected a floating dtype, got {array.dtype}")
    with np.errstate(over="ignore"):
        out = np.array(array, dtype=np.float32, order="C", copy=None)
    if check_finite and not np.isfinite(out).all():
        raise ValueError(f"tensor {name!r}: contains NaN or infinite values (as float32)")
    return out


def _select(flats: list[np.ndarray], policy: CompressionPolicy) -> list[np.ndarray | None]:
    """Per tensor: sorted kept indices, or ``None`` when the whole tensor is kept."""
    f = policy.topk_fraction
    if f >= 1.0:
        return [None] * len(flats)
    if policy.scope == "tensor":
        chosen: list[np.ndarray | None] = []
        for x in flats:
            k = topk_count(x.size, f)
            chosen.append(None if k >= x.size else top_k_indices(np.abs(x), k))
        return chosen
    sizes = [x.size for x in flats]
    total = sum(sizes)
    k = topk_count(total, f)
    if k >= total:
        return [None] * len(flats)
    magnitude = np.empty(total, dtype=np.float32)
    offsets = np.cumsum([0, *sizes])
    for x, lo, hi in zip(flats, offsets[:-1], offsets[1:], strict=True):
        np.abs(x, out=magnitude[lo:hi])
    idx = top_k_indices(magnitude, k)
    cuts = np.searchsorted(idx, offsets)
    out: list[np.ndarray | None] = []
    for i, size in enumerate(sizes):
        part = idx[cuts[i] : cuts[i + 1]] - offsets[i]
        out.append(None if part.size == size else part)
    return out


def compress(
    delta: Mapping[str, np.ndarray],
    policy: CompressionPolicy,
    rng: np.random.Generator,
    residual: ResidualMemory | None = None,
) -> CompressedUpdate:
    """Compress a model delta under ``policy``; randomness only from ``rng``.

    With ``residual`` (which requires ``policy.error_feedback``) the residual is added first
    and afterwards holds what this update did not carry; it is updated in place. Without it the
    compression is one-shot. ``ValueError`` for NaN/Inf, non-float dtypes, or a residual whose
    spec differs from the delta's; the residual is untouched when an error is raised.
    """
    if not isinstance(delta, Mapping) or not delta:
        raise ValueError("delta must be a non-empty mapping of tensor name -> array")
    if residual is not None and not policy.error_feedback:
        raise ValueError("a residual was given but the policy disables error feedback")
    # With a residual (always finite) one check of delta + residual covers the delta too.
    arrays = {name: as_float32(name, a, check_finite=residual is None) for name, a in delta.items()}
    spec = ModelSpec.from_weights(arrays)
    flats: list[np.ndarray] = []
    if residual is not None:
        if residual.spec != spec:
            raise ValueError("the residual's model spec differs from the delta's")
        with np.errstate(over="ignore", invalid="ignore"):
            flats = [(arrays[t.name] + residual.values[t.name]).reshape(-1) for t in spec.tensors]
        for t, x in zip(spec.tensors, flats, strict=True):
            if not np.isfinite(x).all():
                as_float32(t.name, arrays[t.name])  # names NaN/Inf in the delta itself
                raise ValueError(f"tensor {t.name!r}: delta + residual overflows float32")
    else:
        flats = [arrays[t.name].reshape(-1) for t in spec.tensors]

    tensors: list[CompressedTensor] = []
    for t, x, idx in zip(spec.tensors, flats, _select(flats, policy), strict=True):
        kept = x if idx is None else x[idx]
        if policy.bits == 32:
            # x[idx] is already a copy; a dense x is the caller's array or becomes the residual.
            values = kept.copy() if idx is None else kept
            ct = CompressedTensor(t.name, t.shape, idx, values=values)
        else:
            q = quantize(kept, bits=policy.bits, chunk=policy.chunk, rng=rng)
            ct = CompressedTensor(t.name, t.shape, idx, quantized=q)
        tensors.append(ct)

    if residual is not None:
        for ct, x in zip(tensors, flats, strict=True):
            # x is a fresh array (delta + residual): turn it into x - decoded in place.
            if ct.indices is None:
                x -= ct.decoded_values()
            else:
                x[ct.indices] -= ct.decoded_values()
            residual.values[ct.name] = x.reshape(ct.shape)
    return CompressedUpdate(
        bits=policy.bits,
        chunk=policy.chunk,
        topk_fraction=policy.topk_fraction,
        scope=policy.scope,
        tensors=tuple(tensors),
    )


def decompress(c: CompressedUpdate) -> Weights:
    """Dense float32 tensors of an update (zeros where nothing was sent)."""
    out: Weights = {}
    for t in c.tensors:
        values = t.decoded_values()
        if t.indices is None:
            dense = values.astype(np.float32, copy=True)
        else:
            dense = np.zeros(t.size, dtype=np.float32)
            dense[t.indices] = values
        out[t.name] = dense.reshape(t.shape)
    return out


def missed_versions(memory_version: int | None, base_version: int) -> int:
    """Model versions made since the memory was last updated, not counting the one it was
    updated on: 0 for a device that took part in every version (or has no memory yet)."""
    if memory_version is None:
        return 0
    return max(0, base_version - memory_version - 1)


def compress_round(
    delta: Mapping[str, np.ndarray],
    policy: CompressionPolicy,
    rng: np.random.Generator,
    memory: FeedbackMemory | None,
    *,
    base_version: int,
) -> CompressedUpdate:
    """Compress a device's update on model version ``base_version`` (see the module docstring).

    ``memory`` is required when the policy has error feedback and is updated in place (residual,
    velocity, ``version = base_version``) only when the update is made: after a ``ValueError``
    it is as it was. Without ``memory`` the compression is one-shot (no momentum allowed).
    """
    fraction = topk_fraction_at(policy, base_version)
    step = policy
    if fraction != policy.topk_fraction:
        step = dataclasses.replace(policy, topk_fraction=fraction)
    if memory is None:
        if policy.momentum:
            raise ValueError("momentum needs the device's error-feedback memory")
        return compress(delta, step, rng)
    if not policy.error_feedback:
        raise ValueError("an error-feedback memory was given but the policy disables it")
    spec = memory.spec
    velocity = memory.velocity
    if velocity is not None and ModelSpec.from_weights(velocity) != spec:
        raise ValueError("the velocity's model spec differs from the residual's")
    missed = missed_versions(memory.version, base_version)
    factor = np.float32(policy.residual_decay**missed) if missed else np.float32(1.0)
    values = dict(memory.values)
    if factor != 1.0:
        values = {name: a * factor for name, a in values.items()}
    scratch = _Scratch(values, spec)
    new_velocity: Weights | None = None
    x: Mapping[str, np.ndarray] = delta
    if policy.momentum:
        m = np.float32(policy.momentum) * factor
        arrays = {name: as_float32(name, a) for name, a in delta.items()}
        if ModelSpec.from_weights(arrays) != spec:
            raise ValueError("the residual's model spec differs from the delta's")
        if velocity is None:
            new_velocity = {t.name: arrays[t.name].copy() for t in spec.tensors}
        else:
            new_velocity = {t.name: m * velocity[t.name] + arrays[t.name] for t in spec.tensors}
        x = new_velocity
    c = compress(x, step, rng, scratch)
    if new_velocity is not None:
        for ct in c.tensors:
            u = new_velocity[ct.name]
            if ct.indices is None:
                u[...] = 0.0
            else:
                u.reshape(-1)[ct.indices] = 0.0
    memory.values = scratch.values
    memory.velocity = new_velocity
    memory.version = base_version
    return c
