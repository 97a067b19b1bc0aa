"""Residual files: the agent's error-feedback residuals on disk.

A file holds :meth:`fedge.shared.feedback.Residual.to_bytes` (magic ``FEDR``, checksummed; the
format is in ``docs/wire-format.md``), written with :func:`fedge.shared.durable.write_bytes_atomic`
(mode 0600): after a crash the file holds the old residual or the new one, never a mix.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedge.shared.durable import write_bytes_atomic
from fedge.shared.feedback import Residual
from fedge.shared.limits import DEFAULT_LIMITS, Limits
from fedge.shared.modelspec import ModelSpec

__all__ = ["RESIDUAL_FILE_MODE", "load_residual", "save_residual"]

RESIDUAL_FILE_MODE = 0o600


def save_residual(residual: Residual, path: str | os.PathLike[str]) -> None:
    """Write ``residual`` to ``path`` atomically and durably."""
    write_bytes_atomic(path, residual.to_bytes(), mode=RESIDUAL_FILE_MODE)


def load_residual(
    path: str | os.PathLike[str],
    *,
    spec: ModelSpec | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Residual:
    """The residual stored at ``path``; ``WireFormatError`` (a ``ValueError``) when the file is
    torn, altered or of another model, ``OSError`` when it cannot be read."""
    return Residual.from_bytes(Path(path).read_bytes(), spec=spec, limits=limits)
