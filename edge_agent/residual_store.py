"""Residual files: the agent's error-feedback memory on disk.

A task's memory is its residual and, with momentum-corrected error feedback, the velocity and
the model version the two belong to (:class:`ResidualState`; ``fedge.shared.compression``
``compress_round`` uses and updates it). One file holds all of it, so that everything that
makes residual files durable and undoable makes the velocity and the version so too: written
with :func:`fedge.shared.durable.write_bytes_atomic` (mode 0600), after a crash the file holds
the old memory or the new one, never a mix; the outbox keeps the files of before and after an
update and restores the one of before when the update is discarded
(``fedge.edge_agent.outbox``).

A memory with neither velocity nor version is a plain residual file,
:meth:`fedge.shared.feedback.Residual.to_bytes` (magic ``FEDR``); otherwise the file is a
``FEDS`` state (both layouts are in ``docs/wire-format.md``)::

    magic "FEDS" | format version u16 = 1 | flags u16 (bit 0: velocity, bit 1: version)
    | crc32 u32 (of the whole file with this field 0) | model version u64 (0 without bit 1)
    | residual length u64 | residual (a FEDR file) | velocity (a FEDR file) when bit 0
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedge.shared.durable import write_bytes_atomic
from fedge.shared.feedback import RESIDUAL_MAGIC, Residual
from fedge.shared.limits import DEFAULT_LIMITS, Limits
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.wireerror import WireFormatError

__all__ = [
    "RESIDUAL_FILE_MODE",
    "STATE_MAGIC",
    "ResidualState",
    "load_residual",
    "residual_file_bytes",
    "residual_from_file_bytes",
    "save_residual",
]

RESIDUAL_FILE_MODE = 0o600
STATE_MAGIC = b"FEDS"
_STATE_VERSION = 1
_HEADER = struct.Struct("<4sHHIQQ")
_FLAG_VELOCITY = 1
_FLAG_VERSION = 2
_KNOWN_FLAGS = _FLAG_VELOCITY | _FLAG_VERSION
_MAX_VERSION = 2**63 - 1


class ResidualState(Residual):
    """A task's error-feedback memory: the residual (``values``), the momentum ``velocity``
    (float32 arrays of the same spec, ``None`` while momentum is not used) and ``version``, the
    base model version of the last update folded into them (``None`` before the first)."""

    def __init__(
        self,
        values: Mapping[str, np.ndarray],
        *,
        velocity: Mapping[str, np.ndarray] | None = None,
        version: int | None = None,
    ) -> None:
        super().__init__(values)
        self.velocity: Weights | None = None
        if velocity is not None:
            checked = Residual(velocity)
            if checked.spec != self.spec:
                raise ValueError("the velocity's model spec differs from the residual's")
            self.velocity = checked.values
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or version < 0
        ):
            raise ValueError(f"version must be a non-negative integer, got {version!r}")
        if version is not None and version > _MAX_VERSION:
            raise ValueError(f"version must be below 2**63, got {version}")
        self.version: int | None = version

    @classmethod
    def zeros(cls, spec: ModelSpec) -> ResidualState:
        """A fresh memory: a zero residual, no velocity, no version."""
        return cls(Residual.zeros(spec).values)

    @classmethod
    def of(cls, residual: Residual) -> ResidualState:
        """``residual`` itself when it is a state already, else a state holding its arrays."""
        if isinstance(residual, ResidualState):
            return residual
        return cls(residual.values)


def residual_file_bytes(residual: Residual) -> bytes:
    """The bytes of a residual file for ``residual`` (``FEDR``, or ``FEDS`` when it is a
    :class:`ResidualState` with a velocity or a version)."""
    velocity = getattr(residual, "velocity", None)
    version = getattr(residual, "version", None)
    if velocity is None and version is None:
        return residual.to_bytes()
    flags = 0
    parts = [residual.to_bytes()]
    if velocity is not None:
        flags |= _FLAG_VELOCITY
        parts.append(Residual(velocity).to_bytes())
    if version is not None:
        flags |= _FLAG_VERSION
    body = b"".join(parts)
    header = _HEADER.pack(STATE_MAGIC, _STATE_VERSION, flags, 0, version or 0, len(parts[0]))
    crc = zlib.crc32(body, zlib.crc32(header))
    return _HEADER.pack(STATE_MAGIC, _STATE_VERSION, flags, crc, version or 0, len(parts[0])) + body


def residual_from_file_bytes(
    data: bytes | bytearray | memoryview,
    *,
    spec: ModelSpec | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> ResidualState:
    """Parse a residual file (either layout); ``WireFormatError`` for anything wrong."""
    view = memoryview(data).cast("B")
    if bytes(view[:4]) == RESIDUAL_MAGIC[: min(4, len(view))]:
        return ResidualState(Residual.from_bytes(view, spec=spec, limits=limits).values)
    if bytes(view[:4]) != STATE_MAGIC[: min(4, len(view))]:
        raise WireFormatError("bad_magic", "not a residual file")
    if len(view) < _HEADER.size:
        raise WireFormatError("truncated", "residual state header is incomplete")
    _magic, fmt, flags, crc, version, length = _HEADER.unpack_from(view, 0)
    if fmt != _STATE_VERSION:
        raise WireFormatError("unsupported_version", f"residual state format version {fmt}")
    zeroed = _HEADER.pack(STATE_MAGIC, fmt, flags, 0, version, length)
    if zlib.crc32(view[_HEADER.size :], zlib.crc32(zeroed)) != crc:
        raise WireFormatError("checksum_mismatch", "residual state file is corrupt (CRC32)")
    if flags & ~_KNOWN_FLAGS:
        raise WireFormatError("bad_header", f"unknown residual state flags {flags:#x}")
    if not flags & _FLAG_VERSION and version != 0:
        raise WireFormatError("bad_header", "a model version without its flag")
    if version > _MAX_VERSION:
        raise WireFormatError("bad_header", f"model version {version} is above 2**63 - 1")
    body = view[_HEADER.size :]
    if length > len(body):
        raise WireFormatError("truncated", f"residual is {len(body)} of {length} bytes")
    residual = Residual.from_bytes(body[:length], spec=spec, limits=limits)
    rest = body[length:]
    velocity = None
    if flags & _FLAG_VELOCITY:
        velocity = Residual.from_bytes(rest, spec=residual.spec, limits=limits).values
    elif len(rest):
        raise WireFormatError("trailing_bytes", "bytes after the residual")
    return ResidualState(
        residual.values,
        velocity=velocity,
        version=int(version) if flags & _FLAG_VERSION else None,
    )


def save_residual(residual: Residual, path: str | os.PathLike[str]) -> None:
    """Write ``residual`` (with its velocity and version, for a :class:`ResidualState`) to
    ``path`` atomically and durably."""
    write_bytes_atomic(path, residual_file_bytes(residual), mode=RESIDUAL_FILE_MODE)


def load_residual(
    path: str | os.PathLike[str],
    *,
    spec: ModelSpec | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> ResidualState:
    """The memory stored at ``path``; ``WireFormatError`` (a ``ValueError``) when the file is
    torn, altered or of another model, ``OSError`` when it cannot be read."""
    return residual_from_file_bytes(Path(path).read_bytes(), spec=spec, limits=limits)
