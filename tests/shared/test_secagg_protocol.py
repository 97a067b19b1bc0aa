"""Secure aggregation end to end in one process: exact sums under drop-outs, clean failure
below the threshold, masked uploads that look uniform whatever the plaintext, and tampering
caught (fedge.shared.secagg; every message goes through its encoder and decoder)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.shared.secagg import Grid, RoundConfig, SecAggError, plan_degree, protocol
from fedge.shared.secagg.inprocess import Dropouts, RoundResult, run_round
from fedge.shared.secagg.messages import decode_advert, decode_masked
from fedge.shared.wireerror import WireFormatError

K = 257
GRID = Grid(bound=0.1, bits=16)


def _config(
    gen: np.random.Generator, n: int, degree: int, threshold: int, k: int = K
) -> RoundConfig:
    return RoundConfig(
        task_id=7,
        round=int(gen.integers(1 << 20)),
        seed=gen.bytes(32),
        cohort=n,
        degree=degree,
        threshold=threshold,
        size=4 * k,
        k=k,
        grid=GRID,
    )


def _keys(gen: np.random.Generator, n: int) -> dict[int, Ed25519PrivateKey]:
    return {u: Ed25519PrivateKey.from_private_bytes(gen.bytes(32)) for u in range(n)}


def _inputs(gen: np.random.Generator, cfg: RoundConfig) -> dict[int, np.ndarray]:
    return {u: cfg.grid.quantize(gen.normal(0.0, 0.05, cfg.k), gen) for u in range(cfg.cohort)}


def _plain_sum(inputs: dict[int, np.ndarray], devices: list[int]) -> np.ndarray:
    return np.sum([inputs[u].view(np.int32).astype(np.int64) for u in devices], axis=0)


def _run(
    gen: np.random.Generator, cfg: RoundConfig, dropouts: Dropouts, **kw: object
) -> tuple[RoundResult, dict[int, np.ndarray]]:
    inputs = _inputs(gen, cfg)
    entropy: Callable[[int], bytes] = gen.bytes
    return run_round(cfg, inputs, _keys(gen, cfg.cohort), entropy, dropouts, **kw), inputs  # type: ignore[arg-type]


def _split_third(gen: np.random.Generator, n: int) -> Dropouts:
    """A third of the cohort drops: some after sharing (their masks stay in the neighbours'
    uploads), some after uploading (their input counts, they answer no unmask request)."""
    gone = gen.permutation(n)[: n // 3].tolist()
    half = len(gone) // 2
    return Dropouts(after_shares=frozenset(gone[:half]), after_upload=frozenset(gone[half:]))


@pytest.mark.parametrize(("n", "seed"), [(6, 1), (12, 2), (24, 3), (36, 4)])
def test_sum_is_exact_with_a_third_dropping_after_masking(n: int, seed: int) -> None:
    gen = np.random.default_rng(seed)
    degree, threshold = plan_degree(n, dropout=1 / 3)
    cfg = _config(gen, n, degree, threshold)
    dropouts = _split_third(gen, n)
    result, inputs = _run(gen, cfg, dropouts)
    survivors = sorted(set(range(n)) - dropouts.after_shares)
    assert result.included == survivors
    assert len(survivors) < n  # someone really dropped before uploading
    np.testing.assert_array_equal(cfg.grid.decode_sum(result.total), _plain_sum(inputs, survivors))


def test_devices_that_drop_after_advertising_are_left_out() -> None:
    gen = np.random.default_rng(5)
    cfg = _config(gen, 10, 9, 5)
    dropouts = Dropouts(after_advert=frozenset({0, 7}), after_shares=frozenset({3}))
    result, inputs = _run(gen, cfg, dropouts)
    assert result.included == [1, 2, 4, 5, 6, 8, 9]
    np.testing.assert_array_equal(
        cfg.grid.decode_sum(result.total), _plain_sum(inputs, result.included)
    )


def test_sparse_graph_unmasks_exactly_iff_every_secret_has_t_live_holders() -> None:
    """On a degree-8 graph of 30 devices with 7 random drop-outs some rounds keep enough shares
    and some do not: each outcome must match the count of live share holders, and the seeds
    cover both outcomes."""
    outcomes = []
    for seed in range(6):
        gen = np.random.default_rng([51, seed])
        cfg = _config(gen, 30, 8, 5, k=64)
        gone = gen.permutation(30)[:7].tolist()
        dropouts = Dropouts(after_shares=frozenset(gone[:4]), after_upload=frozenset(gone[4:]))
        uploaded = set(range(30)) - dropouts.after_shares
        answering = uploaded - dropouts.after_upload
        # every survivor's b and every dropped device's s_sk needs t answering neighbours,
        # and every answering device needs t - 1 uploading neighbours before it answers
        feasible = all(
            len(set(cfg.graph.neighbours[u]) & answering) >= cfg.threshold for u in range(30)
        ) and all(
            len(set(cfg.graph.neighbours[u]) & uploaded) + 1 >= cfg.threshold for u in answering
        )
        inputs = _inputs(gen, cfg)
        keys = _keys(gen, 30)
        if feasible:
            result = run_round(cfg, inputs, keys, gen.bytes, dropouts)
            np.testing.assert_array_equal(
                cfg.grid.decode_sum(result.total), _plain_sum(inputs, sorted(uploaded))
            )
        else:
            with pytest.raises(SecAggError) as err:
                run_round(cfg, inputs, keys, gen.bytes, dropouts)
            assert err.value.code == "below_threshold"
        outcomes.append(feasible)
    assert set(outcomes) == {True, False}, outcomes


def test_below_threshold_the_round_fails_cleanly() -> None:
    gen = np.random.default_rng(21)
    cfg = _config(gen, 9, 8, 5)
    # 5 of 9 upload, only 4 answer: every survivor's seed has at most 4 < t = 5 holders.
    dropouts = Dropouts(after_shares=frozenset({0, 1, 2, 3}), after_upload=frozenset({4}))
    with pytest.raises(SecAggError) as err:
        _run(gen, cfg, dropouts)
    assert err.value.code == "below_threshold"
    assert "shares arrived" in err.value.detail


def test_devices_refuse_to_unmask_when_too_few_neighbours_uploaded() -> None:
    gen = np.random.default_rng(22)
    cfg = _config(gen, 9, 8, 5)
    dropouts = Dropouts(after_shares=frozenset({0, 1, 2, 3, 4, 5}))
    with pytest.raises(SecAggError) as err:
        _run(gen, cfg, dropouts)
    assert err.value.code == "below_threshold"
    assert "too few to unmask" in err.value.detail


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1 % point of chi-square(df) (Wilson-Hilferty)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def _byte_counts(values: np.ndarray) -> np.ndarray:
    """Counts of the top and bottom byte of uint32 values: 2 x 256 bins."""
    v = values.astype(np.uint32)
    return np.stack([np.bincount(v >> 24, minlength=256), np.bincount(v & 0xFF, minlength=256)])


def _uniform_chi2(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_masked_upload_is_uniform_whatever_its_plaintext() -> None:
    gen = np.random.default_rng(31)
    k = 8192
    cfg = _config(gen, 3, 2, 2, k=k)
    s = cfg.grid.half_levels
    plaintexts = {
        "zeros": np.zeros(k, np.uint32),
        "extremes": np.where(np.arange(k) % 2 == 0, s, -s).astype(np.int64).astype(np.uint32),
    }
    keys = _keys(gen, 3)
    uploads = {}
    for name, q in plaintexts.items():
        inputs = {0: q, 1: np.zeros(k, np.uint32), 2: np.zeros(k, np.uint32)}
        captured: dict[int, bytes] = {}

        def grab(
            phase: str, device: int, msg: bytes, captured: dict[int, bytes] = captured
        ) -> bytes:
            if phase == "masked":
                captured[device] = msg
            return msg

        run_round(cfg, inputs, keys, gen.bytes, tamper=grab)
        uploads[name] = decode_masked(cfg, captured[0])[1]
    critical = _chi2_critical(255)
    for name, values in uploads.items():
        for counts in _byte_counts(values):
            assert _uniform_chi2(counts) < critical, name
    # Homogeneity of the two uploads' byte distributions (2 x 256 table, df = 255).
    for a, b in zip(_byte_counts(uploads["zeros"]), _byte_counts(uploads["extremes"]), strict=True):
        table = np.stack([a, b]).astype(np.float64)
        expected = table.sum(axis=0, keepdims=True) * table.sum(axis=1, keepdims=True) / table.sum()
        assert float(((table - expected) ** 2 / expected).sum()) < critical
    # The same statistic sees the plaintexts' structure at once (the test has power).
    for q in plaintexts.values():
        assert _uniform_chi2(_byte_counts(q)[0]) > 100 * critical


def _flip_last(msg: bytes) -> bytes:
    return msg[:-1] + bytes([msg[-1] ^ 1])


@pytest.mark.parametrize(
    ("phase", "code"),
    [("adverts", "bad_signature"), ("shares", "bad_ciphertext"), ("response", "bad_share")],
)
def test_tampering_is_detected(phase: str, code: str) -> None:
    """A flipped bit in a relayed advertisement (its signature), a sealed share bundle (its
    AES-GCM tag) or a returned share (the rebuilt secret misses its commitment)."""
    gen = np.random.default_rng(41)
    cfg = _config(gen, 6, 5, 3)

    def tamper(p: str, device: int, msg: bytes) -> bytes:
        return _flip_last(msg) if p == phase and device == 2 else msg

    with pytest.raises(SecAggError) as err:
        _run(gen, cfg, Dropouts(), tamper=tamper)
    assert err.value.code == code


def test_a_message_of_another_round_is_refused() -> None:
    gen = np.random.default_rng(42)
    cfg = _config(gen, 4, 3, 2)
    other = _config(gen, 4, 3, 2)
    secrets = protocol.new_secrets(other, 0, gen.bytes)
    msg = protocol.advertise(other, secrets, Ed25519PrivateKey.generate())

    with pytest.raises(WireFormatError) as err:
        decode_advert(cfg, msg)
    assert err.value.code == "bad_header"


def test_inconsistent_unmask_lists_are_refused_by_the_device() -> None:
    """Each device checks that its list covers exactly the neighbours it holds shares of (here
    the coordinator leaves out device 4, which shared and then dropped)."""
    gen = np.random.default_rng(43)
    cfg = _config(gen, 5, 4, 3)

    def tamper(p: str, device: int, msg: bytes) -> bytes:
        if p == "unmask" and device == 1:
            return protocol.unmask_requests(cfg, {0, 1, 2, 3}, {0, 1, 2, 3})[1]
        return msg

    with pytest.raises(SecAggError) as err:
        _run(gen, cfg, Dropouts(after_shares=frozenset({4})), tamper=tamper)
    assert err.value.code == "inconsistent_sets"
