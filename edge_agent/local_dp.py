"""Local differential privacy on the device (docs/privacy.md, "Local DP").

When a task's ``training.local_dp`` is set, the device clips its delta to L2 norm
``clip_norm`` and adds independent Gaussian noise of std ``noise_multiplier * clip_norm`` to
every value **before** compression and error feedback, so what leaves the device (and what the
residual remembers) is already noised. The coordinator cannot verify that this happened.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedge.shared.dp import add_gaussian_noise, clip_factor, l2_norm, secure_rng
from fedge.shared.modelspec import Weights


def settings_of(training: Mapping[str, Any]) -> tuple[float, float] | None:
    """``(clip_norm, noise_multiplier)`` from a task's training config, or None without local
    DP (ValueError for settings that are not two positive finite numbers)."""
    local = training.get("local_dp")
    if local is None:
        return None
    if not isinstance(local, Mapping):
        raise ValueError("training.local_dp must be an object")
    try:
        clip, z = float(local["clip_norm"]), float(local["noise_multiplier"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("training.local_dp needs numbers clip_norm and noise_multiplier") from None
    if not (math.isfinite(clip) and clip > 0 and math.isfinite(z) and z > 0):
        raise ValueError(f"training.local_dp out of range: clip_norm {clip}, noise {z}")
    return clip, z


def privatize(
    delta: Weights,
    *,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> Weights:
    """A clipped and noised copy of ``delta`` (float32 tensors). ``rng`` defaults to a
    CSPRNG-seeded generator: a seed the coordinator could guess would let it subtract the
    noise."""
    factor = clip_factor(l2_norm(delta.values()), clip_norm)
    out = {name: np.asarray(d, dtype=np.float64) * factor for name, d in delta.items()}
    add_gaussian_noise(out, noise_multiplier * clip_norm, secure_rng() if rng is None else rng)
    return {name: a.astype(np.float32) for name, a in out.items()}
