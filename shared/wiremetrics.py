"""The optional metrics block of an update: what the device measured, in its upload.

A device reports its training loss, local evaluation and training time with every update.
Sent as a separate JSON request they cost a second signed round trip and about 70 bytes, a
third of a top-1 % update of a small model; inside the update they take 11 to 32 bytes and no
extra request. The block is present when bit 0 of the prefix flags is set, and sits right
after the header fields (before the tensor descriptors)::

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
import numbers
import struct
from collections.abc import Mapping

from fedge.shared.wireerror import WireFormatError
from fedge.shared.wirelayout import Reader, encode_varint

__all__ = [
    "FLAG_METRICS",
    "METRIC_KEYS",
    "carried_metrics",
    "check_metrics",
    "encode_metrics",
    "read_metrics",
]

#: Prefix flag: a metrics block follows the update header (updates only).
FLAG_METRICS = 0x01
#: Key id -> metric name; the order of the ids is the order in the block.
METRIC_IDS: dict[int, str] = {
    1: "train_loss",
    2: "eval_loss",
    3: "eval_accuracy",
    4: "num_eval_examples",
    5: "train_time_s",
}
#: The metrics an update can carry (the same a device may report on its own).
METRIC_KEYS = frozenset(METRIC_IDS.values())
COUNT_KEYS = frozenset({"num_eval_examples"})
MAX_COUNT = (1 << 62) - 1
_F32 = struct.Struct("<f")
_F32_MAX = 3.4028234663852886e38


def _normalize(name: str, value: object) -> tuple[float, None] | tuple[None, str]:
    """``(value, None)`` with a count as an exact ``int`` and any other metric as a
    ``float``, or ``(None, why)`` when ``value`` is not a valid ``name`` metric."""
    if name in COUNT_KEYS:
        if isinstance(value, numbers.Integral):
            count = int(value)
        elif isinstance(value, numbers.Real) and float(value).is_integer():
            count = int(float(value))
        else:
            count = -1
        if 0 <= count <= MAX_COUNT:
            return count, None
        return None, f"{name} must be a whole number in [0, 2**62), got {value!r}"
    if not isinstance(value, numbers.Real):
        return None, f"{name} must be a number, got {value!r}"
    number = float(value)
    if not math.isfinite(number):
        return None, f"{name} must be finite, got {value!r}"
    if abs(number) > _F32_MAX:
        return None, f"{name} {value!r} does not fit a float32"
    if name == "eval_accuracy" and not 0.0 <= number <= 1.0:
        return None, f"eval_accuracy must be in [0, 1], got {value!r}"
    if name == "train_time_s" and number < 0:
        return None, f"train_time_s must not be negative, got {value!r}"
    return number, None


def check_metrics(metrics: Mapping[str, object]) -> dict[str, float]:
    """``metrics`` with every value normalized (counts as exact ints); ``ValueError`` naming
    the first unknown name or invalid value. The rules of the table above, for any carrier
    of device metrics (the update's block, a JSON report)."""
    unknown = sorted(set(metrics) - METRIC_KEYS)
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; a device reports {sorted(METRIC_KEYS)}")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        number, problem = _normalize(name, value)
        if number is None:
            raise ValueError(problem)
        out[name] = number
    return out


def carried_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The entries of ``metrics`` an update can carry: known names with valid values (a
    trainer's extra or out-of-range metrics are left out rather than failing the update)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if name in METRIC_KEYS:
            number, problem = _normalize(name, value)
            if problem is None and number is not None:
                out[name] = number
    return out


def encode_metrics(metrics: Mapping[str, float]) -> bytes:
    """The block for ``metrics`` (empty bytes for no metrics; ``ValueError`` on an unknown
    name or a value out of its range). Floats are rounded to float32."""
    checked = check_metrics(metrics)
    if not checked:
        return b""
    parts = [bytes([len(checked)])]
    for key, name in METRIC_IDS.items():
        if name not in checked:
            continue
        number = checked[name]
        if name in COUNT_KEYS:
            parts.append(bytes([key]) + encode_varint(int(number)))
        else:
            parts.append(bytes([key]) + _F32.pack(number))
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
        raw: object = reader.varint(name) if name in COUNT_KEYS else reader.unpack(_F32, name)[0]
        number, problem = _normalize(name, raw)
        if number is None:
            raise WireFormatError("bad_metrics", str(problem))
        out[name] = number
    return out
