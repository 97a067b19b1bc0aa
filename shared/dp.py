"""The two steps of the Gaussian mechanism that both sides run: L2 clipping and Gaussian noise.

The coordinator clips each decoded update and noises the average (central DP-FedAvg,
``fedge.coordinator.engine.privacy``); a device clips and noises its own delta before
compression (local DP, ``fedge.edge_agent.local_dp``). docs/privacy.md explains both.

Randomness only comes in through a ``numpy.random.Generator`` argument. :func:`secure_rng`
is the generator production code passes: seeded with 128 bits from the operating system's
CSPRNG (``secrets``), so nobody can reproduce (and subtract) the noise from a known seed.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping

import numpy as np


def secure_rng() -> np.random.Generator:
    """A generator seeded from the operating system's CSPRNG (a fresh seed every call)."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def l2_norm(arrays: Iterable[np.ndarray]) -> float:
    """The L2 norm of all the arrays' values taken together (one dot product per array,
    accumulated in float64)."""
    total = 0.0
    for a in arrays:
        flat = np.asarray(a).reshape(-1)
        if flat.size:
            f64 = flat.astype(np.float64, copy=False)
            total += float(np.dot(f64, f64))
    return math.sqrt(total)


def clip_factor(norm: float, clip_norm: float) -> float:
    """``min(1, clip_norm / norm)``: the scale that brings a vector of L2 norm ``norm`` within
    ``clip_norm`` (1.0 for a zero vector). A non-finite norm is refused (ValueError)."""
    if not math.isfinite(norm) or norm < 0:
        raise ValueError(f"the update's L2 norm is not finite: {norm}")
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    return 1.0 if norm <= clip_norm else clip_norm / norm


def add_gaussian_noise(
    arrays: Mapping[str, np.ndarray], std: float, rng: np.random.Generator
) -> None:
    """Add independent ``N(0, std**2)`` noise to every value of the (writable, floating)
    arrays in place, tensor by tensor in the mapping's order."""
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"noise std must be finite and >= 0, got {std}")
    for a in arrays.values():
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError("noise goes into floating arrays only")
        noise = rng.standard_normal(a.shape, dtype=np.float64)
        noise *= std
        a += noise.astype(a.dtype, copy=False)
