from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fedge.shared.compression import compress, decompress
from fedge.shared.feedback import Residual
from fedge.shared.modelspec import ModelSpec
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import WireFormatError

SPEC = ModelSpec.from_dict(
    [{"name": "w", "shape": [30, 20]}, {"name": "b", "shape": [20]}, {"name": "s", "shape": []}]
)
POLICY = CompressionPolicy(topk_fraction=0.05, bits=2, chunk=32)


def _deltas(steps: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(21)
    return [
        {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in SPEC.tensors}
        for _ in range(steps)
    ]


def test_bytes_round_trip_is_exact() -> None:
    residual = Residual.zeros(SPEC)
    compress(_deltas(1)[0], POLICY, np.random.default_rng(0), residual)
    back = Residual.from_bytes(residual.to_bytes(), spec=SPEC)
    assert back.spec == SPEC
    for name in SPEC.names:
        np.testing.assert_array_equal(back.values[name], residual.values[name])
        assert back.values[name].dtype == np.float32


def test_restart_from_bytes_continues_identically() -> None:
    """Serializing after step 5 and parsing into a new object gives the same updates as never
    stopping (same rng stream), i.e. a device can reboot between rounds. (The agent's residual
    files hold these bytes: tests/edge_agent/test_state.py.)"""
    deltas = _deltas(10)

    rng = np.random.default_rng(99)
    uninterrupted = Residual.zeros(SPEC)
    expected = [decompress(compress(d, POLICY, rng, uninterrupted)) for d in deltas]

    rng = np.random.default_rng(99)
    residual = Residual.zeros(SPEC)
    got = [decompress(compress(d, POLICY, rng, residual)) for d in deltas[:5]]
    data = residual.to_bytes()
    del residual
    restarted = Residual.from_bytes(data, spec=SPEC)
    got += [decompress(compress(d, POLICY, rng, restarted)) for d in deltas[5:]]

    for a, b in zip(expected, got, strict=True):
        for name in SPEC.names:
            np.testing.assert_array_equal(a[name], b[name])
    for name in SPEC.names:
        np.testing.assert_array_equal(restarted.values[name], uninterrupted.values[name])


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b + b"\x00", "trailing_bytes"),
        (lambda b: b"JUNK" + b[4:], "bad_magic"),
        (lambda b: b"", "truncated"),
        (lambda b: b[:4] + b"\x09" + b[5:], "unsupported_version"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 0x40]), "checksum_mismatch"),
        (lambda b: b[:40] + bytes([b[40] ^ 0x01]) + b[41:], "checksum_mismatch"),
    ],
)
def test_corrupt_residual_bytes_are_rejected(mutate: Callable[[bytes], bytes], code: str) -> None:
    with pytest.raises(WireFormatError) as err:
        Residual.from_bytes(mutate(Residual.zeros(SPEC).to_bytes()), spec=SPEC)
    assert err.value.code == code


def test_residual_of_another_model_is_rejected() -> None:
    data = Residual({"w": np.ones(3, np.float32)}).to_bytes()
    with pytest.raises(WireFormatError) as err:
        Residual.from_bytes(data, spec=SPEC)
    assert err.value.code == "shape_mismatch"


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="float32"):
        Residual({"w": np.ones(3)})
    with pytest.raises(ValueError, match="at least one tensor"):
        Residual({})
    assert Residual.zeros(SPEC).norm() == 0.0
    assert Residual({"w": np.array([3.0, 4.0], np.float32)}).norm() == pytest.approx(5.0)
