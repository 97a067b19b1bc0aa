"""A device's input to a secure-aggregation round, and the mean update from the round's sum.

On the device: the error-feedback-corrected update ``x = delta + residual`` (flattened, spec
order) is projected onto the round's shared support, clipped and quantized onto the grid; what
was not sent stays in the residual, ``residual = x - sent``, so after any number of rounds the
sum of the true deltas minus the sum of what was sent is the residual (as with top-k in
docs/wire-format.md). On the coordinator: the exact integer sum becomes the mean over the
devices whose input it contains, scattered back onto the support.
"""

from __future__ import annotations

import numpy as np

from fedge.shared.secagg.config import RoundConfig

__all__ = ["mean_update", "quantized_input"]


def quantized_input(
    cfg: RoundConfig, delta: np.ndarray, residual: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(q, new_residual)``: the uint32 grid values of ``delta + residual`` on the support
    (``k`` values) and the float32 residual to keep (``None``: no error feedback, the residual
    returned is what this round dropped)."""
    x = np.asarray(delta, dtype=np.float32).reshape(-1)
    if x.size != cfg.size:
        raise ValueError(f"the update has {x.size} values, the round's model {cfg.size}")
    if residual is not None:
        x = x + residual
    q = cfg.grid.quantize(x[cfg.support], rng)
    sent = cfg.grid.dequantize(q.view(np.int32))
    new_residual = x.copy()
    new_residual[cfg.support] -= sent
    return q, new_residual


def mean_update(cfg: RoundConfig, total: np.ndarray, count: int) -> np.ndarray:
    """The dense float32 mean update (flattened) from the round's uint32 sum of ``count``
    inputs."""
    if count < 1:
        raise ValueError("the mean of no inputs")
    out = np.zeros(cfg.size, dtype=np.float32)
    out[cfg.support] = cfg.grid.dequantize(cfg.grid.decode_sum(total)) / np.float32(count)
    return out
