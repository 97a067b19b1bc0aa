"""Top-k warm-up: the kept fraction for an update on a given model version.

Deep Gradient Compression (Lin et al. 2018) starts training with a dense-ish top-k and makes it
sparser exponentially over the first epochs, so the large early updates are not squeezed
through the final budget while the residuals are still empty. fedge counts model versions
instead of epochs: an update on base version ``v`` keeps

    start * (topk_fraction / start) ** (v / warmup_rounds)    for v < warmup_rounds,
    topk_fraction                                             from then on,

with ``start = max(topk_fraction, WARMUP_START_FRACTION)``, rounded to four significant
digits. The device compresses with it and the coordinator's upload check
(``fedge.shared.wire_update``) allows exactly as many values, so both call
:func:`topk_fraction_at`. The rounding keeps the two sides on the same fraction even if their
``pow`` differed in the last bit.
"""

from __future__ import annotations

from fedge.shared.policy import CompressionPolicy

__all__ = ["WARMUP_START_FRACTION", "topk_fraction_at"]

#: Kept fraction of the first warm-up version (DGC's first warm-up epoch keeps 25 %).
WARMUP_START_FRACTION = 0.25


def topk_fraction_at(policy: CompressionPolicy, base_version: int) -> float:
    """The share of values an update on model version ``base_version`` may keep."""
    if isinstance(base_version, bool) or not isinstance(base_version, int) or base_version < 0:
        raise ValueError(f"base_version must be a non-negative integer, got {base_version!r}")
    target = policy.topk_fraction
    w = policy.warmup_rounds
    start = max(target, WARMUP_START_FRACTION)
    if base_version >= w or start == target:
        return target
    f = start * (target / start) ** (base_version / w)
    return min(1.0, max(target, float(f"{f:.4g}")))
