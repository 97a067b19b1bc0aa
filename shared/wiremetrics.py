"""The optional metrics block of a version 2 update: what the device measured, in its upload.

A device reports its training loss, local evaluation and training time with every update.
Sent as a separate JSON request they cost a second signed round trip and about 70 bytes, a
third of a top-1 % update of a small model; inside the update they take 11 to 32 bytes and no
extra request. The block is present when bit 0 of the prefix flags is set, and sits right
after the fixed header fields (before the tensor descriptors)::

    count u8 (1 .. 5) | count x (key u8 | value)

Keys are strictly increasing (so each appears at most once). Values are little-endian
float32, except ``num_eval_examples``, an unsigned LEB128 varint.

| key | name | value | rule |
|---:|---|---|---|
| 1 | ``train_loss`` | f32 | finite |
| 2 | ``eval_loss`` | f32 | finite |
| 3 | ``eval_accuracy`` | f32 | in [0, 1] |
| 4 | ``num_eval_examples`` | varint | < 2**62 |
| 5 | ``train_time_s`` | f32 | finite, >= 0 |

A decoder rejects anything else with ``bad_metrics`` (``truncated`` if the block runs past
the input).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping

from shared.wireerror import WireFormatError
from shared.wirelayout import Reader, encode_varint

__all__ = ["FLAG_METRICS", "METRIC_KEYS", "carried_metrics", "encode_metrics", "read_metrics"]

#: Prefix flag: a metrics block follows the fixed header (version 2 updates only).
FLAG_METRICS = 0x01
#: Key id -> metric name; the order of the ids is the order in the block.
METRIC_IDS: dict[int, str] = {
    1: "train_loss",
    2: "eval_loss",
    3: "eval_accuracy",
    4: "num_eval_examples",
    5: "train_time_s",
}
METRIC_NUMBERS = {name: key for key, name in METRIC_IDS.items()}
#: The metrics an update can carry (the same a device may report on its own).
METRIC_KEYS = frozenset(METRIC_NUMBERS)
COUNT_KEYS = frozenset({"num_eval_examples"})
MAX_COUNT = (1 << 62) - 1
_F32 = struct.Struct("<f")


def _check(name: str, value: float) -> str | None:
    """Why ``value`` is not a valid ``name`` metric, or ``None``."""
    if name in COUNT_KEYS:
        ok = float(value).is_integer() and 0 <= value <= MAX_COUNT
        return None if ok else f"{name} must be a whole number in [0, 2**62), got {value!r}"
    if not math.isfinite(value):
        return f"{name} must be finite, got {value!r}"
    if name == "eval_accuracy" and not 0.0 <= value <= 1.0:
        return f"eval_accuracy must be in [0, 1], got {value!r}"
    if name == "train_time_s" and value < 0:
        return f"train_time_s must not be negative, got {value!r}"
    return None


def carried_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The entries of ``metrics`` an update can carry: known names with valid values (a
    trainer's extra or out-of-range metrics are left out rather than failing the update)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if name in METRIC_KEYS and _check(name, number) is None:
            if name not in COUNT_KEYS:
                try:
                    _F32.pack(number)
                except OverflowError:
                    continue
            out[name] = int(number) if name in COUNT_KEYS else number
    return out


def encode_metrics(metrics: Mapping[str, float]) -> bytes:
    """The block for ``metrics`` (empty bytes for no metrics; ``ValueError`` on an unknown
    name or a value out of its range). Floats are rounded to float32."""
    unknown = sorted(set(metrics) - METRIC_KEYS)
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; an update carries {sorted(METRIC_KEYS)}")
    if not metrics:
        return b""
    parts = [bytes([len(metrics)])]
    for key, name in METRIC_IDS.items():
        if name not in metrics:
            continue
        value = metrics[name]
        problem = _check(name, float(value))
        if problem:
            raise ValueError(problem)
        if name in COUNT_KEYS:
            parts.append(bytes([key]) + encode_varint(int(value)))
            continue
        try:
            packed = _F32.pack(float(value))
        except OverflowError:
            raise ValueError(f"{name} {value!r} does not fit a float32") from None
        parts.append(bytes([key]) + packed)
    return b"".join(parts)


def read_metrics(reader: Reader) -> dict[str, float]:
    """Read and validate one block at the reader's position."""
    count = reader.u8("metrics count")
    if not 1 <= count <= len(METRIC_IDS):
        raise WireFormatError(
            "bad_metrics", f"metrics count must be in [1, {len(METRIC_IDS)}], got {count}"
        )
    out: dict[str, float] = {}
    last = 0
    for _ in range(count):
        key = reader.u8("metric key")
        if key not in METRIC_IDS:
            raise WireFormatError("bad_metrics", f"unknown metric key {key}")
        if key <= last:
            raise WireFormatError("bad_metrics", "metric keys must be strictly increasing")
        last = key
        name = METRIC_IDS[key]
        if name in COUNT_KEYS:
            value = float(reader.varint(name))
        else:
            (value,) = reader.unpack(_F32, name)
        problem = _check(name, value)
        if problem:
            raise WireFormatError("bad_metrics", problem)
        out[name] = int(value) if name in COUNT_KEYS else float(value)
    return out
