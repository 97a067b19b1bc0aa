"""The optional metrics block of an update: what the device measured, in its upload.

A device reports its training loss, local evaluation and training time with every update.
Sent as a separate JSON request they cost a second signed round trip and about 70 bytes, a
third of a top-1 % update of a small model; inside the update they take 11 to 32 bytes and no
extra request. The block is present when bit 0 of the prefix flags is set, and sits right
after the header fields (before the tensor descriptors)::

    count u8 (1 .. 6) | count x (key u8 | value)

Keys are strictly increasing (so each appears at most once). Values are little-endian
float32, except ``num_eval_examples``, an unsigned LEB128 varint.

| key | name | value | rule |
|---:|---|---|---|
| 1 | ``train_loss`` | f32 | finite |
| 2 | ``eval_loss`` | f32 | finite |
| 3 | ``eval_accuracy`` | f32 | in [0, 1] |
| 4 | ``num_eval_examples`` | varint | < 2**62 |
| 5 | ``train_time_s`` | f32 | finite, >= 0 |
| 6 | the trainer's own metrics | see below | |

Key 6 carries the named numbers a trainer reports besides these (``macro_f1``, ``mae``, ...)::

    n u8 (1 .. 32) | n x (name_len u8 (1 .. 48) | name (ASCII) | value f32)

Names match ``[A-Za-z][A-Za-z0-9_.]*`` (at most :data:`MAX_CUSTOM_NAME` bytes), are strictly
increasing (byte order, so each appears once), and are none of the names above, the
coordinator's aggregates (``train_examples``, ``eval_examples``) or ``server_...``; values are
finite float32. At most :data:`MAX_CUSTOM` per update: the whole block stays under 1,750
bytes.

A decoder rejects anything else with ``bad_metrics`` (``truncated`` if the block runs past
the input). :func:`split_metrics` is what a device uses to keep what a block can carry and
say what it leaves out (and why).
"""

from __future__ import annotations

import math
import numbers
import re
import struct
from collections.abc import Mapping

from fedge.shared.wireerror import WireFormatError
from fedge.shared.wirelayout import Reader, encode_varint

__all__ = [
    "FLAG_METRICS",
    "MAX_CUSTOM",
    "MAX_CUSTOM_NAME",
    "METRIC_KEYS",
    "carried_metrics",
    "check_custom_name",
    "check_metrics",
    "encode_metrics",
    "read_metrics",
    "split_metrics",
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
#: Key of the section that carries a trainer's own named metrics.
CUSTOM_KEY = 6
#: At most this many custom metrics per update, names of at most this many bytes.
MAX_CUSTOM = 32
MAX_CUSTOM_NAME = 48
_CUSTOM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.]*\Z")
#: Names the coordinator gives its own aggregates (and ``server_`` for its evaluation).
RESERVED_NAMES = METRIC_KEYS | {"train_examples", "eval_examples"}
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


def check_custom_name(name: object) -> str | None:
    """``None`` if ``name`` may name a custom metric, else why not."""
    if not isinstance(name, str) or not _CUSTOM_NAME.match(name):
        return f"metric name {name!r} must match [A-Za-z][A-Za-z0-9_.]*"
    if len(name) > MAX_CUSTOM_NAME:
        return f"metric name {name[:20]!r}... is longer than {MAX_CUSTOM_NAME} characters"
    if name in RESERVED_NAMES or name.startswith("server_"):
        return f"metric name {name!r} is reserved"
    return None


def _custom_value(name: str, value: object) -> tuple[float, None] | tuple[None, str]:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None, f"{name} must be a number, got {value!r}"
    number = float(value)
    if not math.isfinite(number):
        return None, f"{name} must be finite, got {value!r}"
    if abs(number) > _F32_MAX:
        return None, f"{name} {value!r} does not fit a float32"
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


def _check_all(metrics: Mapping[str, object]) -> tuple[dict[str, float], dict[str, float]]:
    """The known metrics and the custom ones, normalized; ``ValueError`` on the first problem."""
    known = check_metrics({k: v for k, v in metrics.items() if k in METRIC_KEYS})
    custom: dict[str, float] = {}
    for name in sorted(k for k in metrics if k not in METRIC_KEYS):
        problem = check_custom_name(name)
        if problem is None:
            number, problem = _custom_value(name, metrics[name])
        if problem is not None:
            raise ValueError(problem)
        assert number is not None
        custom[name] = number
    if len(custom) > MAX_CUSTOM:
        raise ValueError(f"{len(custom)} custom metrics; an update carries at most {MAX_CUSTOM}")
    return known, custom


def split_metrics(metrics: Mapping[str, object]) -> tuple[dict[str, float], dict[str, str]]:
    """What an update can carry of ``metrics``, and what it cannot with the reason.

    Invalid values (NaN, out of range, not a number) and invalid or reserved names are left
    out; beyond :data:`MAX_CUSTOM` custom metrics the first ones in name order are kept. The
    caller says what was left out (the agent logs a warning)."""
    carried: dict[str, float] = {}
    refused: dict[str, str] = {}
    custom = 0
    for name in sorted(metrics, key=str):
        value = metrics[name]
        if name in METRIC_KEYS:
            number, problem = _normalize(name, value)
        else:
            problem = check_custom_name(name)
            number = None
            if problem is None:
                number, problem = _custom_value(name, value)
            if problem is None and custom >= MAX_CUSTOM:
                problem = f"over the limit of {MAX_CUSTOM} custom metrics per update"
            if problem is None:
                custom += 1
        if problem is not None or number is None:
            refused[str(name)] = str(problem)
        else:
            carried[name] = number
    return carried, refused


def carried_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The entries of ``metrics`` an update can carry (:func:`split_metrics` without the
    reasons)."""
    return split_metrics(metrics)[0]


def encode_metrics(metrics: Mapping[str, float]) -> bytes:
    """The block for ``metrics`` (empty bytes for no metrics; ``ValueError`` on an invalid
    name, a value out of its range or too many custom metrics). Floats are rounded to
    float32."""
    known, custom = _check_all(metrics)
    if not known and not custom:
        return b""
    parts = [bytes([len(known) + (1 if custom else 0)])]
    for key, name in METRIC_IDS.items():
        if name not in known:
            continue
        number = known[name]
        if name in COUNT_KEYS:
            parts.append(bytes([key]) + encode_varint(int(number)))
        else:
            parts.append(bytes([key]) + _F32.pack(number))
    if custom:
        parts.append(bytes([CUSTOM_KEY, len(custom)]))
        for name, number in custom.items():  # sorted by _check_all
            raw = name.encode("ascii")
            parts.append(bytes([len(raw)]) + raw + _F32.pack(number))
    return b"".join(parts)


def _read_custom(reader: Reader, out: dict[str, float]) -> None:
    count = reader.u8("custom metrics count")
    if not 1 <= count <= MAX_CUSTOM:
        raise WireFormatError(
            "bad_metrics", f"custom metrics count must be in [1, {MAX_CUSTOM}], got {count}"
        )
    last = b""
    for _ in range(count):
        size = reader.u8("metric name length")
        if not 1 <= size <= MAX_CUSTOM_NAME:
            raise WireFormatError(
                "bad_metrics", f"metric name length must be in [1, {MAX_CUSTOM_NAME}], got {size}"
            )
        raw = bytes(reader.take(size, "metric name"))
        if raw <= last:
            raise WireFormatError("bad_metrics", "custom metric names must be strictly increasing")
        last = raw
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError:
            raise WireFormatError("bad_metrics", "a metric name is not ASCII") from None
        problem = check_custom_name(name)
        number: float | None = None
        if problem is None:
            number, problem = _custom_value(name, reader.unpack(_F32, name)[0])
        if number is None:
            raise WireFormatError("bad_metrics", str(problem))
        out[name] = number


def read_metrics(reader: Reader) -> dict[str, float]:
    """Read and validate one block at the reader's position."""
    count = reader.u8("metrics count")
    if not 1 <= count <= len(METRIC_IDS) + 1:
        raise WireFormatError(
            "bad_metrics", f"metrics count must be in [1, {len(METRIC_IDS) + 1}], got {count}"
        )
    out: dict[str, float] = {}
    last = 0
    for _ in range(count):
        key = reader.u8("metric key")
        if key not in METRIC_IDS and key != CUSTOM_KEY:
            raise WireFormatError("bad_metrics", f"unknown metric key {key}")
        if key <= last:
            raise WireFormatError("bad_metrics", "metric keys must be strictly increasing")
        last = key
        if key == CUSTOM_KEY:
            _read_custom(reader, out)
            continue
        name = METRIC_IDS[key]
        raw: object = reader.varint(name) if name in COUNT_KEYS else reader.unpack(_F32, name)[0]
        number, problem = _normalize(name, raw)
        if number is None:
            raise WireFormatError("bad_metrics", str(problem))
        out[name] = number
    return out
