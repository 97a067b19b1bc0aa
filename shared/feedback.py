"""Error-feedback residual: what compression dropped, carried into the next update.

A device keeps one :class:`Residual` per task and must not lose it across restarts, so it
serializes to a small checksummed byte string (the content of a residual file)::

    magic "FEDR" | version u16 | reserved u16 (0) | crc32 u32 | payload length u64 | payload

where the payload is a dense float32 model blob (``wire.encode_model``). This module does no
file I/O: the agent stores residuals (atomically) in ``fedge.edge_agent.residual_store``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping

import numpy as np

from fedge.shared.limits import DEFAULT_LIMITS, Limits
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.wire import decode_model, encode_model
from fedge.shared.wireerror import WireFormatError

__all__ = ["RESIDUAL_MAGIC", "Residual"]

RESIDUAL_MAGIC = b"FEDR"
_VERSION = 1
_HEADER = struct.Struct("<4sHHIQ")


class Residual:
    """Per-task error-feedback memory: float32 arrays in spec order, updated by ``compress``."""

    def __init__(self, values: Mapping[str, np.ndarray]) -> None:
        checked: Weights = {}
        for name, a in values.items():
            if not isinstance(a, np.ndarray) or a.dtype != np.float32:
                raise ValueError(f"residual tensor {name!r} must be a float32 array")
            checked[name] = np.array(a, order="C", copy=None)
        self.values: Weights = checked
        self._spec = ModelSpec.from_weights(checked)

    @classmethod
    def zeros(cls, spec: ModelSpec) -> Residual:
        return cls({t.name: np.zeros(t.shape, dtype=np.float32) for t in spec.tensors})

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    def norm(self) -> float:
        """Euclidean norm over all tensors (the gap between sent and true cumulative deltas)."""
        return float(
            np.sqrt(sum(float(np.dot(a.ravel(), a.ravel())) for a in self.values.values()))
        )

    def to_bytes(self) -> bytes:
        self._spec.check(self.values)
        payload = encode_model(self.values, dtype="f32")
        header = _HEADER.pack(RESIDUAL_MAGIC, _VERSION, 0, zlib.crc32(payload), len(payload))
        return header + payload

    @classmethod
    def from_bytes(
        cls,
        data: bytes | bytearray | memoryview,
        *,
        spec: ModelSpec | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> Residual:
        """Parse and validate; ``WireFormatError`` (a ``ValueError``) for anything wrong."""
        view = memoryview(data).cast("B")
        if bytes(view[:4]) != RESIDUAL_MAGIC[: min(4, len(view))]:
            raise WireFormatError("bad_magic", "not a residual file")
        if len(view) < _HEADER.size:
            raise WireFormatError("truncated", "residual header is incomplete")
        _magic, version, reserved, crc, length = _HEADER.unpack_from(view, 0)
        if version != _VERSION:
            raise WireFormatError("unsupported_version", f"residual format version {version}")
        if reserved != 0:
            raise WireFormatError("bad_header", "reserved residual header field must be 0")
        payload = view[_HEADER.size :]
        if length > len(payload):
            raise WireFormatError("truncated", f"residual payload is {len(payload)} of {length}")
        if length < len(payload):
            raise WireFormatError("trailing_bytes", "bytes after the residual payload")
        if zlib.crc32(payload) != crc:
            raise WireFormatError("checksum_mismatch", "residual file is corrupt (CRC32)")
        return cls(decode_model(payload, spec=spec, limits=limits))
