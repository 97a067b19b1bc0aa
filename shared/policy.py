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

__all__ = ["ALLOWED_BITS", "DENSE", "CompressionPolicy", "PolicyError", "Scope"]

Scope = Literal["tensor", "global"]

#: Value bit widths: 1/2/4/8 are stochastic quantization, 32 is plain float32.
ALLOWED_BITS = (1, 2, 4, 8, 32)


class PolicyError(ValueError):
    """An invalid compression policy; the message names the offending field."""


@dataclass(frozen=True, kw_only=True)
class CompressionPolicy:
    """Top-k sparsification, then stochastic quantization, optionally with error feedback.

    ``topk_fraction`` is the share of values kept (by magnitude); 1.0 keeps all of them.
    ``scope`` picks the top-k per tensor or across the whole update. ``bits`` is the width of
    each kept value (32 = float32, otherwise unbiased stochastic quantization with one float32
    scale per ``chunk`` values). ``error_feedback`` tells the device to carry what compression
    dropped into its next update.
    """

    topk_fraction: float = 0.01
    bits: int = 4
    chunk: int = 256
    error_feedback: bool = True
    scope: Scope = "tensor"

    def __post_init__(self) -> None:
        f = self.topk_fraction
        if isinstance(f, bool) or not isinstance(f, int | float):
            raise PolicyError(f"topk_fraction must be a number, got {f!r}")
        if not math.isfinite(f) or not 0.0 < f <= 1.0:
            raise PolicyError(f"topk_fraction must be in (0, 1], got {f!r}")
        object.__setattr__(self, "topk_fraction", float(f))
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise PolicyError(f"bits must be an integer, got {self.bits!r}")
        if self.bits not in ALLOWED_BITS:
            raise PolicyError(f"bits must be one of {ALLOWED_BITS}, got {self.bits}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int):
            raise PolicyError(f"chunk must be an integer, got {self.chunk!r}")
        if not 1 <= self.chunk <= MAX_CHUNK:
            raise PolicyError(f"chunk must be between 1 and {MAX_CHUNK}, got {self.chunk}")
        if not isinstance(self.error_feedback, bool):
            raise PolicyError(f"error_feedback must be true or false, got {self.error_feedback!r}")
        if self.scope not in ("tensor", "global"):
            raise PolicyError(f"scope must be 'tensor' or 'global', got {self.scope!r}")

    @property
    def is_dense(self) -> bool:
        """True when nothing is dropped or quantized (the update is plain float32)."""
        return self.topk_fraction == 1.0 and self.bits == 32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionPolicy:
        """Build from a mapping; unknown keys and invalid values raise :class:`PolicyError`."""
        if not isinstance(data, Mapping):
            raise PolicyError(f"compression policy must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise PolicyError(f"unknown compression policy field(s): {', '.join(unknown)}")
        return cls(**{str(k): v for k, v in data.items()})


#: No sparsification, no quantization, no error feedback: plain float32 deltas.
DENSE = CompressionPolicy(topk_fraction=1.0, bits=32, error_feedback=False)
