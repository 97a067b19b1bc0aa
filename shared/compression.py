"""The compression pipeline a device runs on each model delta.

``compress`` = (optionally add the error-feedback residual) -> top-k by magnitude (per tensor
or across the whole update) -> stochastic quantization of the kept values (or plain float32)
-> (optionally) remember what was lost in the residual:

    x = delta + residual;   c = Q(topk(x));   residual <- x - decompress(c)

so the sum of everything decoded on the server plus the current residual always equals the sum
of all true deltas. ``decompress`` is what the server's decoder returns for the same update, to
the bit (``decode_update(encode_update(c)).to_dense() == decompress(c)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedge.shared.indexcoding import check_indices
from fedge.shared.modelspec import ModelSpec, TensorSpec, Weights
from fedge.shared.policy import CompressionPolicy, Scope
from fedge.shared.quantize import Quantized, dequantize, max_code, quantize
from fedge.shared.topk import top_k_indices, topk_count

__all__ = [
    "CompressedTensor",
    "CompressedUpdate",
    "ResidualMemory",
    "as_float32",
    "compress",
    "decompress",
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
