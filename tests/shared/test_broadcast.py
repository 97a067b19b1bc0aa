"""Model deltas and the broadcast model (fedge.shared.broadcast, fedge.shared.wire_delta)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.shared import architectures
from fedge.shared.broadcast import make_delta, rebuild, weights_digest
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.policy import DownloadPolicy, PolicyError
from fedge.shared.wire import WireFormatError, encode_model
from fedge.shared.wire_delta import decode_chain, decode_delta, encode_chain

MODEL = {"architecture": "mlp", "input_dim": 16, "num_classes": 4, "hidden": [8]}
POLICY = DownloadPolicy(topk_fraction=0.1, bits=8, chunk=32)


def _start(seed: int = 0) -> tuple[ModelSpec, Weights]:
    w = architectures.init_weights(MODEL, np.random.default_rng(seed))
    return ModelSpec.from_weights(w), w


def _history(
    steps: int, policy: DownloadPolicy = POLICY, seed: int = 0, scale: float = 0.05
) -> tuple[ModelSpec, list[Weights], list[Weights], list[bytes]]:
    """True models, broadcast models and deltas of ``steps`` versions after version 0."""
    spec, w = _start(seed)
    rng = np.random.default_rng(seed + 1)
    trues, broadcasts, deltas = [w], [w], []
    for v in range(steps):
        w = {k: a + (scale * rng.standard_normal(a.shape)).astype(np.float32) for k, a in w.items()}
        data, b = make_delta(
            w,
            broadcasts[-1],
            policy,
            np.random.default_rng([3, v + 1]),
            spec=spec,
            task_id=3,
            from_version=v,
            to_version=v + 1,
        )
        trues.append(w)
        broadcasts.append(b)
        deltas.append(data)
    return spec, trues, broadcasts, deltas


def _same(a: Weights, b: Weights) -> bool:
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


@settings(max_examples=25, deadline=None)
@given(
    steps=st.integers(1, 8),
    seed=st.integers(0, 10_000),
    data=st.data(),
    fraction=st.sampled_from([0.01, 0.1, 0.5]),
    bits=st.sampled_from([2, 4, 8, 32]),
)
def test_any_chain_rebuilds_the_broadcast_model_bit_for_bit(
    steps: int, seed: int, data: st.DataObject, fraction: float, bits: int
) -> None:
    policy = DownloadPolicy(topk_fraction=fraction, bits=bits, chunk=16)
    spec, _, broadcasts, deltas = _history(steps, policy, seed)
    have = data.draw(st.integers(0, steps - 1))
    want = data.draw(st.integers(have + 1, steps))
    body = encode_chain(deltas[have:want])
    rebuilt = rebuild(broadcasts[have], body, spec, task_id=3, have=have, want=want)
    assert _same(rebuilt, broadcasts[want])
    # one delta at a time gives the very same bytes as the chain
    step = broadcasts[have]
    for v in range(have, want):
        step = rebuild(step, deltas[v], spec, task_id=3, have=v, want=v + 1)
    assert _same(step, rebuilt)
    assert weights_digest(rebuilt, spec) == decode_delta(deltas[want - 1]).digest


def test_the_broadcast_model_catches_up_with_a_fixed_true_model() -> None:
    """Server-side error feedback: what a delta leaves out goes down with the next ones."""
    spec, w = _start()
    target = {k: a + 0.5 for k, a in w.items()}
    b: Weights = w
    errors = []
    for v in range(40):
        _, b = make_delta(
            target,
            b,
            POLICY,
            np.random.default_rng(v),
            spec=spec,
            task_id=1,
            from_version=v,
            to_version=v + 1,
        )
        errors.append(max(float(np.abs(target[k] - b[k]).max()) for k in spec.names))
    assert errors[0] > 0.4  # one 10 % delta moves a tenth of the values
    assert errors[-1] < 0.01 * errors[0]


def test_a_delta_is_far_smaller_than_the_model() -> None:
    _spec, _, broadcasts, deltas = _history(1)
    assert len(deltas[0]) * 4 < len(encode_model(broadcasts[1]))


@pytest.mark.parametrize("cut", [10, 60, -20, -1])
def test_a_truncated_chain_is_refused(cut: int) -> None:
    spec, _, broadcasts, deltas = _history(3)
    body = encode_chain(deltas)
    with pytest.raises(WireFormatError) as err:
        rebuild(broadcasts[0], body[:cut], spec, task_id=3, have=0, want=3)
    assert err.value.code == "truncated"


def test_a_corrupted_value_is_caught_by_the_digest() -> None:
    spec, _, broadcasts, deltas = _history(2)
    body = bytearray(encode_chain(deltas))
    body[-3] ^= 0x10  # a quantization code of the last delta's last tensor
    with pytest.raises(WireFormatError) as err:
        rebuild(broadcasts[0], bytes(body), spec, task_id=3, have=0, want=2)
    assert err.value.code == "checksum_mismatch"


def test_a_delta_for_another_starting_point_is_refused() -> None:
    spec, _, broadcasts, deltas = _history(3)
    cases = [
        (encode_chain(deltas[1:]), 0, 3, 3),  # starts at 1, the device holds 0
        (encode_chain(deltas[:2]), 0, 3, 3),  # ends at 2, the device wants 3
        (encode_chain(deltas), 0, 3, 4),  # another task
    ]
    for body, have, want, task in cases:
        with pytest.raises(WireFormatError) as err:
            rebuild(broadcasts[have], body, spec, task_id=task, have=have, want=want)
        assert err.value.code == "chain_mismatch"
    with pytest.raises(WireFormatError) as err:
        decode_chain(encode_chain([deltas[0], deltas[2]]))
    assert err.value.code == "chain_mismatch"


def test_a_model_is_not_a_delta_and_trailing_bytes_are_refused() -> None:
    spec, _, broadcasts, deltas = _history(1)
    with pytest.raises(WireFormatError) as err:
        rebuild(broadcasts[0], encode_model(broadcasts[1]), spec, task_id=3, have=0, want=1)
    assert err.value.code == "wrong_kind"
    with pytest.raises(WireFormatError) as err:
        decode_delta(deltas[0] + b"\0")
    assert err.value.code == "trailing_bytes"
    with pytest.raises(WireFormatError) as err:
        decode_chain(encode_chain(deltas) + b"\0")
    assert err.value.code == "trailing_bytes"


def test_a_delta_of_another_model_is_refused_before_its_sections() -> None:
    _spec, _, _broadcasts, deltas = _history(1)
    other = ModelSpec.from_dict([{"name": "W1", "shape": [16, 9]}])
    with pytest.raises(WireFormatError) as err:
        decode_delta(deltas[0], spec=other)
    assert err.value.code == "shape_mismatch"


def test_a_huge_declared_chain_is_refused_before_reading_it() -> None:
    _spec, _, _broadcasts, deltas = _history(1)
    body = bytearray(encode_chain(deltas))
    body[8:9] = b"\xff\xff\x7f"  # count 2**21 - 1 instead of 1
    with pytest.raises(WireFormatError) as err:
        decode_chain(bytes(body))
    assert err.value.code == "limit_exceeded"


def test_download_policy_validation() -> None:
    assert DownloadPolicy().is_dense
    with pytest.raises(PolicyError, match="topk_fraction"):
        DownloadPolicy(topk_fraction=0.0)
    with pytest.raises(PolicyError, match="bits"):
        DownloadPolicy(bits=3)
    with pytest.raises(PolicyError, match="unknown download policy field"):
        DownloadPolicy.from_dict({"error_feedback": True})
    with pytest.raises(ValueError, match="dense"):
        spec, w = _start()
        make_delta(
            w,
            w,
            DownloadPolicy(),
            np.random.default_rng(0),
            spec=spec,
            task_id=1,
            from_version=0,
            to_version=1,
        )


def test_a_step_that_overflows_float32_is_refused() -> None:
    """Models at opposite ends of float32's range: their difference is not a float32, and
    make_delta says so instead of compressing infinities."""
    spec, w = _start()
    high = {k: np.full_like(a, 3e38) for k, a in w.items()}
    low = {k: np.full_like(a, -3e38) for k, a in w.items()}

    def delta(true: Weights, broadcast: Weights) -> tuple[bytes, Weights]:
        return make_delta(
            true,
            broadcast,
            POLICY,
            np.random.default_rng(0),
            spec=spec,
            task_id=1,
            from_version=4,
            to_version=5,
        )

    with pytest.raises(ValueError) as err:
        delta(high, low)
    assert str(err.value) == "the step from the broadcast model to version 5 overflows float32"
    # A step of zero at the top of the range is made: nothing overflows.
    data, rebuilt = delta(high, high)
    assert all(np.isfinite(a).all() for a in rebuilt.values()) and data
