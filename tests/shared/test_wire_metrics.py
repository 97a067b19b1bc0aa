"""The metrics block of an update: a device's training and evaluation metrics travel
inside its upload (``fedge.shared.wiremetrics``)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedge.shared.compression import CompressedUpdate, compress
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import (
    METRIC_KEYS,
    WireFormatError,
    decode_update,
    encode_update,
    peek_update_header,
)
from fedge.shared.wirelayout import encode_varint
from fedge.shared.wiremetrics import MAX_CUSTOM, check_custom_name, encode_metrics, split_metrics
from tests.shared.wirecraft import prefix, update_blob, update_header

IDS = {"task_id": 3, "base_version": 5, "num_examples": 40}
FULL = {
    "train_loss": 0.25,
    "eval_loss": 0.5,
    "eval_accuracy": 0.875,
    "num_eval_examples": 12,
    "train_time_s": 1.5,
}


def _update(seed: int = 0) -> CompressedUpdate:
    rng = np.random.default_rng(seed)
    delta = {"w": rng.standard_normal((8, 16)).astype(np.float32), "b": np.ones(16, np.float32)}
    policy = CompressionPolicy(topk_fraction=0.1, bits=4, chunk=16)
    return compress(delta, policy, np.random.default_rng(seed + 1), None)


def f32(x: float) -> float:
    return float(np.float32(x))


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
metric_values = {
    "train_loss": finite_f32,
    "eval_loss": finite_f32,
    "eval_accuracy": st.floats(0.0, 1.0, width=32),
    "num_eval_examples": st.integers(0, (1 << 62) - 1),
    "train_time_s": st.floats(0.0, 2.0**100, width=32),
}


@settings(max_examples=150, deadline=None)
@example({"num_eval_examples": (1 << 62) - 1})  # counts stay exact above 2**53
@example({"num_eval_examples": (1 << 53) + 1})
@given(
    st.dictionaries(st.sampled_from(sorted(METRIC_KEYS)), st.just(0)).flatmap(
        lambda keys: st.fixed_dictionaries({k: metric_values[k] for k in keys})
    )
)
def test_metrics_round_trip_next_to_the_same_tensors(metrics: dict[str, float]) -> None:
    c = _update()
    plain = decode_update(encode_update(c, **IDS))
    blob = encode_update(c, **IDS, metrics=metrics)
    got = decode_update(blob)
    assert got.metrics == {
        k: (v if k == "num_eval_examples" else f32(v)) for k, v in metrics.items()
    }
    assert peek_update_header(blob) == tuple(IDS.values())
    for a, b in zip(plain.tensors, got.tensors, strict=True):
        assert a.name == b.name
        np.testing.assert_array_equal(a.values, b.values)
    assert plain.metrics == {}


def test_the_block_costs_one_count_byte_and_a_key_byte_per_metric() -> None:
    c = _update()
    plain = len(encode_update(c, **IDS))
    assert len(encode_update(c, **IDS, metrics={"train_loss": 1.0})) == plain + 1 + 5
    full = len(encode_update(c, **IDS, metrics=FULL))
    assert full == plain + 1 + 4 * 5 + 1 + len(encode_varint(12))


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        ({"accuracy": float("nan")}, "finite"),
        ({"train-loss": 1.0}, "must match"),
        ({"server_x": 1.0}, "reserved"),
        ({f"m{i:02d}": 1.0 for i in range(33)}, "at most 32"),
        ({"train_loss": float("nan")}, "finite"),
        ({"eval_loss": float("inf")}, "finite"),
        ({"eval_accuracy": 1.5}, r"\[0, 1\]"),
        ({"train_time_s": -1.0}, "negative"),
        ({"num_eval_examples": 2.5}, "whole number"),
        ({"num_eval_examples": -1}, "whole number"),
        ({"train_loss": 1e39}, "float32"),
    ],
)
def test_the_encoder_refuses_what_the_block_cannot_carry(
    metrics: dict[str, float], match: str
) -> None:
    with pytest.raises((ValueError, OverflowError), match=match):
        encode_update(_update(), **IDS, metrics=metrics)


def _f(x: float) -> bytes:
    return struct.pack("<f", x)


@pytest.mark.parametrize(
    ("block", "code"),
    [
        (b"\x00", "bad_metrics"),  # announced but empty
        (b"\x06" + b"\x01" + _f(1.0) * 6, "bad_metrics"),  # more than there are metrics
        (b"\x01\x09" + _f(1.0), "bad_metrics"),  # unknown key
        (b"\x02\x01" + _f(1.0) + b"\x01" + _f(2.0), "bad_metrics"),  # repeated key
        (b"\x02\x02" + _f(1.0) + b"\x01" + _f(2.0), "bad_metrics"),  # keys out of order
        (b"\x01\x01" + _f(float("nan")), "bad_metrics"),
        (b"\x01\x02" + _f(float("-inf")), "bad_metrics"),
        (b"\x01\x03" + _f(1.25), "bad_metrics"),  # accuracy above 1
        (b"\x01\x05" + _f(-0.5), "bad_metrics"),  # negative training time
        (b"\x01\x04" + encode_varint(1 << 62), "bad_metrics"),  # count too large
        (b"\x01\x04\x80\x00", "bad_varint"),  # count not in shortest form
    ],
)
def test_the_decoder_rejects_a_malformed_block(block: bytes, code: str) -> None:
    blob = update_blob(head={"flags": 1}, metrics=block)
    _rejected(blob, code)


@pytest.mark.parametrize("block", [b"", b"\x01", b"\x01\x01\x00\x00", b"\x02\x01" + _f(1.0)])
def test_a_block_cut_short_is_truncated(block: bytes) -> None:
    _rejected(prefix(flags=1) + update_header(tensors=1) + block, "truncated")


def _rejected(blob: bytes, code: str) -> None:
    with pytest.raises(WireFormatError) as err:
        decode_update(blob)
    assert err.value.code == code
    with pytest.raises(WireFormatError) as err:
        peek_update_header(blob)  # the header check reads the block too
    assert err.value.code == code


def test_a_well_formed_hand_built_block_is_read() -> None:
    block = encode_metrics({"eval_accuracy": 0.5, "train_loss": 2.0})
    assert block == b"\x02\x01" + _f(2.0) + b"\x03" + _f(0.5)
    got = decode_update(update_blob(head={"flags": 1}, metrics=block))
    assert got.metrics == {"train_loss": 2.0, "eval_accuracy": 0.5}


def test_a_block_without_its_flag_is_not_a_block() -> None:
    # Without the flag the block's bytes are read as descriptors and do not fit.
    blob = update_blob(metrics=encode_metrics({"train_loss": 2.0}))
    with pytest.raises(WireFormatError):
        decode_update(blob)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_updates_with_metrics_raise_only_the_format_error(data: st.DataObject) -> None:
    blob = bytearray(encode_update(_update(), **IDS, metrics=FULL))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        decoded = decode_update(bytes(blob[:cut]))
    except WireFormatError:
        return
    assert all(k in METRIC_KEYS or check_custom_name(k) is None for k in decoded.metrics)


def test_a_trainers_own_metrics_travel_after_the_known_ones() -> None:
    metrics = {**FULL, "macro_f1": 0.8125, "mae": 3.5, "steps": 12.0}
    blob = encode_update(_update(), **IDS, metrics=metrics)
    got = decode_update(blob)
    assert got.metrics == {
        k: (v if k == "num_eval_examples" else f32(v)) for k, v in metrics.items()
    }
    # the section: key 6, a count, then (length, name, f32) in name order
    block = encode_metrics({"train_loss": 1.0, "mae": 2.0, "macro_f1": 0.5})
    assert block == (
        b"\x02\x01" + _f(1.0) + b"\x06\x02" + b"\x08macro_f1" + _f(0.5) + b"\x03mae" + _f(2.0)
    )


def test_a_device_keeps_what_a_block_can_carry_and_says_why_it_leaves_the_rest() -> None:
    many = {f"m{i:02d}": float(i) for i in range(MAX_CUSTOM + 2)}
    carried, refused = split_metrics(
        {**many, "train_loss": 1.0, "eval_accuracy": 2.0, "f1": float("nan"), "a b": 1.0}
    )
    assert carried == {"train_loss": 1.0, **{f"m{i:02d}": float(i) for i in range(MAX_CUSTOM)}}
    assert set(refused) == {"eval_accuracy", "f1", "a b", "m32", "m33"}
    assert "over the limit of 32" in refused["m33"]
    assert "finite" in refused["f1"]
    # what it keeps always encodes
    assert decode_update(encode_update(_update(), **IDS, metrics=carried)).metrics == carried


@pytest.mark.parametrize(
    ("section", "why"),
    [
        (b"\x00", "count"),  # an empty section
        (b"\x21", "count"),  # 33 entries announced
        (b"\x01\x00", "length"),  # an empty name
        (b"\x01\x31" + b"a" * 49 + _f(1.0), "length"),  # a name too long (checked first)
        (b"\x01\x03a-b" + _f(1.0), "must match"),
        (b"\x01\x0atrain_loss" + _f(1.0), "reserved"),
        (b"\x01\x03f\xff1" + _f(1.0), "ASCII"),
        (b"\x01\x02f1" + _f(float("inf")), "finite"),
        (b"\x02\x02f2" + _f(1.0) + b"\x02f1" + _f(1.0), "increasing"),
        (b"\x02\x02f1" + _f(1.0) + b"\x02f1" + _f(1.0), "increasing"),
    ],
)
def test_the_decoder_rejects_a_malformed_custom_section(section: bytes, why: str) -> None:
    blob = update_blob(head={"flags": 1}, metrics=b"\x01\x06" + section)
    with pytest.raises(WireFormatError, match=why) as err:
        decode_update(blob)
    assert err.value.code == "bad_metrics"


def test_the_largest_block_is_what_the_format_says() -> None:
    names = {f"{chr(97 + i % 26)}{i:02d}".ljust(48, "x"): 1.0 for i in range(MAX_CUSTOM)}
    block = encode_metrics({**FULL, "num_eval_examples": (1 << 62) - 1, **names})
    assert len(block) == 1 + 4 * 5 + 1 + len(encode_varint((1 << 62) - 1)) + 2 + 32 * 53 == 1729
