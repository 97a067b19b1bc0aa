"""Compression policy: how a device must compress the updates of one task.

The coordinator stores a policy per task and hands it to devices; devices compress with it;
the coordinator's decoder checks uploads against it (see ``wire.decode_update(policy=...)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from fedge.shared.limits import MAX_CHUNK

__all__ = [
    "ALLOWED_BITS",
    "DENSE",
    "DENSE_DOWNLOAD",
    "CompressionPolicy",
    "DownloadPolicy",
    "PolicyError",
    "Scope",
]

Scope = Literal["tensor", "global"]

#: Value bit widths: 1/2/4/8 are stochastic quantization, 32 is plain float32.
ALLOWED_BITS = (1, 2, 4, 8, 32)


class PolicyError(ValueError):
    """An invalid compression policy; the message names the offending field."""


def _check_codec(topk_fraction: object, bits: object, chunk: object, scope: object) -> float:
    """Validate the codec fields shared by both directions; ``topk_fraction`` as a float."""
    f = topk_fraction
    if isinstance(f, bool) or not isinstance(f, int | float):
        raise PolicyError(f"topk_fraction must be a number, got {f!r}")
    if not math.isfinite(f) or not 0.0 < f <= 1.0:
        raise PolicyError(f"topk_fraction must be in (0, 1], got {f!r}")
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise PolicyError(f"bits must be an integer, got {bits!r}")
    if bits not in ALLOWED_BITS:
        raise PolicyError(f"bits must be one of {ALLOWED_BITS}, got {bits}")
    if isinstance(chunk, bool) or not isinstance(chunk, int):
        raise PolicyError(f"chunk must be an integer, got {chunk!r}")
    if not 1 <= chunk <= MAX_CHUNK:
        raise PolicyError(f"chunk must be between 1 and {MAX_CHUNK}, got {chunk}")
    if scope not in ("tensor", "global"):
        raise PolicyError(f"scope must be 'tensor' or 'global', got {scope!r}")
    return float(f)


def _from_mapping(cls: Any, data: object, what: str) -> Any:
    if not isinstance(data, Mapping):
        raise PolicyError(f"{what} must be an object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise PolicyError(f"unknown {what} field(s): {', '.join(unknown)}")
    return cls(**{str(k): v for k, v in data.items()})


@dataclass(frozen=True, kw_only=True)
class DownloadPolicy:
    """How the coordinator compresses what it broadcasts (coordinator -> device).

    Dense (``topk_fraction`` 1.0, ``bits`` 32, the default) sends every device the full
    float32 model. Otherwise each new model version goes down as a compressed delta from the
    previous *broadcast* model: top-k of ``topk_fraction`` of the values (per tensor or over
    the whole model, ``scope``), quantized to ``bits`` with one scale per ``chunk`` values.
    What a delta leaves out stays in the difference between the true model and the broadcast
    one and goes down with the next delta (server-side error feedback); every device rebuilds
    exactly the same broadcast model (docs/wire-format.md, "Model deltas").
    """

    topk_fraction: float = 1.0
    bits: int = 32
    chunk: int = 256
    scope: Scope = "tensor"

    def __post_init__(self) -> None:
        fraction = _check_codec(self.topk_fraction, self.bits, self.chunk, self.scope)
        object.__setattr__(self, "topk_fraction", fraction)

    @property
    def is_dense(self) -> bool:
        return self.topk_fraction == 1.0 and self.bits == 32

    def codec(self) -> CompressionPolicy:
        """The same codec as an (error-feedback free) upload policy, for the compressor."""
        return CompressionPolicy(
            topk_fraction=self.topk_fraction,
            bits=self.bits,
            chunk=self.chunk,
            scope=self.scope,
            error_feedback=False,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DownloadPolicy:
        result: DownloadPolicy = _from_mapping(cls, data, "download policy")
        return result


#: Full float32 models for every download.
DENSE_DOWNLOAD = DownloadPolicy()
#: Upper bound of ``warmup_rounds`` (model versions).
MAX_WARMUP_ROUNDS = 100_000


@dataclass(frozen=True, kw_only=True)
class CompressionPolicy:
    """Top-k sparsification, then stochastic quantization, optionally with error feedback.

    ``topk_fraction`` is the share of values kept (by magnitude); 1.0 keeps all of them.
    ``scope`` picks the top-k per tensor or across the whole update. ``bits`` is the width of
    each kept value (32 = float32, otherwise unbiased stochastic quantization with one float32
    scale per ``chunk`` values). ``error_feedback`` tells the device to carry what compression
    dropped into its next update. ``download`` is the other direction: how the coordinator
    compresses the models it sends (:class:`DownloadPolicy`).

    With error feedback, ``momentum`` (in [0, 1)) is Deep Gradient Compression's momentum
    correction: the device keeps a velocity ``u <- momentum * u + delta`` and feeds ``u``, not
    the delta, into its residual, zeroing ``u`` where values were sent; 0 is plain error
    feedback. ``warmup_rounds`` lets the kept fraction decay from a start value to
    ``topk_fraction`` over the first model versions (``fedge.shared.warmup``). ``residual_decay``
    (in (0, 1]) scales the residual and the velocity by ``residual_decay ** missed`` before they
    are used, ``missed`` being the model versions since the device last folded an update into
    them; 1 keeps them whole.
    """

    topk_fraction: float = 0.01
    bits: int = 4
    chunk: int = 256
    error_feedback: bool = True
    scope: Scope = "tensor"
    download: DownloadPolicy = DENSE_DOWNLOAD
    momentum: float = 0.0
    warmup_rounds: int = 0
    residual_decay: float = 1.0

    def __post_init__(self) -> None:
        fraction = _check_codec(self.topk_fraction, self.bits, self.chunk, self.scope)
        object.__setattr__(self, "topk_fraction", fraction)
        if not isinstance(self.error_feedback, bool):
            raise PolicyError(f"error_feedback must be true or false, got {self.error_feedback!r}")
        if isinstance(self.download, Mapping):
            object.__setattr__(self, "download", DownloadPolicy.from_dict(self.download))
        elif not isinstance(self.download, DownloadPolicy):
            raise PolicyError(f"download must be an object, got {type(self.download).__name__}")
        self._check_feedback_fields()

    def _check_feedback_fields(self) -> None:
        m = self.momentum
        if isinstance(m, bool) or not isinstance(m, int | float):
            raise PolicyError(f"momentum must be a number, got {m!r}")
        if not math.isfinite(m) or not 0.0 <= m < 1.0:
            raise PolicyError(f"momentum must be in [0, 1), got {m!r}")
        object.__setattr__(self, "momentum", float(m))
        w = self.warmup_rounds
        if isinstance(w, bool) or not isinstance(w, int):
            raise PolicyError(f"warmup_rounds must be an integer, got {w!r}")
        if not 0 <= w <= MAX_WARMUP_ROUNDS:
            raise PolicyError(f"warmup_rounds must be between 0 and {MAX_WARMUP_ROUNDS}, got {w}")
        d = self.residual_decay
        if isinstance(d, bool) or not isinstance(d, int | float):
            raise PolicyError(f"residual_decay must be a number, got {d!r}")
        if not math.isfinite(d) or not 0.0 < d <= 1.0:
            raise PolicyError(f"residual_decay must be in (0, 1], got {d!r}")
        object.__setattr__(self, "residual_decay", float(d))
        if not self.error_feedback:
            if self.momentum != 0.0:
                raise PolicyError("momentum needs error_feedback (the velocity feeds the residual)")
            if self.residual_decay != 1.0:
                raise PolicyError("residual_decay needs error_feedback (it decays the residual)")

    @property
    def is_dense(self) -> bool:
        """True when nothing is dropped or quantized (the update is plain float32)."""
        return self.topk_fraction == 1.0 and self.bits == 32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionPolicy:
        """Build from a mapping; unknown keys and invalid values raise :class:`PolicyError`."""
        result: CompressionPolicy = _from_mapping(cls, data, "compression policy")
        return result


#: No sparsification, no quantization, no error feedback: plain float32 deltas.
DENSE = CompressionPolicy(topk_fraction=1.0, bits=32, error_feedback=False)
