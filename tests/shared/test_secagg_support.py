"""The shared support from the published aggregates (``aggregate_score``,
``aggregate_support``): the same set from the same public inputs on every side, exactly ``k``
sorted distinct indices, the random share respected, random-k in the first round, and the
protocol's exact sum on such a support."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.shared.secagg import (
    Grid,
    RoundConfig,
    SecAggError,
    aggregate_score,
    aggregate_support,
    mean_update,
    plan_degree,
    quantized_input,
    shared_support,
)
from fedge.shared.secagg.inprocess import Dropouts, run_round

SIZE = 4000


def _versions(gen: np.random.Generator, count: int, size: int = SIZE) -> list[np.ndarray]:
    """Consecutive model versions whose steps are sparse, as a sparse aggregate's are."""
    out = [gen.normal(0, 0.1, size).astype(np.float32)]
    for _ in range(count - 1):
        step = np.zeros(size, np.float32)
        where = gen.choice(size, size // 10, replace=False)
        step[where] = gen.normal(0, 0.01, where.size)
        out.append(out[-1] + step)
    return out


def _config(seed: bytes, k: int, support: np.ndarray | None, n: int = 12) -> RoundConfig:
    degree, threshold = plan_degree(n, dropout=1 / 3)
    return RoundConfig(
        task_id=3,
        round=9,
        seed=seed,
        cohort=n,
        degree=degree,
        threshold=threshold,
        size=SIZE,
        k=k,
        grid=Grid(bound=0.1, bits=16),
        fixed_support=support,
    )


def test_device_and_coordinator_derive_the_same_support_and_round() -> None:
    gen = np.random.default_rng(1)
    seed = gen.bytes(32)
    held = _versions(gen, 6)
    # the coordinator's copies; a device rebuilds them from the little-endian bytes it
    # downloaded, one tensor at a time, and keeps them as another array layout
    wire = [v.astype("<f4").tobytes() for v in held]
    device = [
        np.concatenate([np.frombuffer(b[:4000], "<f4"), np.frombuffer(b[4000:], "<f4")])
        for b in wire
    ]
    for decay, window in [(0.0, 1), (0.5, 4)]:
        ours = aggregate_support(seed, SIZE, 400, aggregate_score(held[-window - 1 :], decay))
        theirs = aggregate_support(seed, SIZE, 400, aggregate_score(device[-window - 1 :], decay))
        np.testing.assert_array_equal(ours, theirs)
        assert _config(seed, 400, ours).digest == _config(seed, 400, theirs).digest
    # a device holding a different model derives another set, and another round digest: its
    # messages are refused instead of masking onto coordinates nobody else writes
    other = [v.copy() for v in device]
    outside = np.setdiff1d(np.arange(SIZE), ours)[0]
    other[-1][outside] += 1.0
    changed = aggregate_support(seed, SIZE, 400, aggregate_score(other[-5:], 0.5))
    assert outside in changed and outside not in ours
    assert _config(seed, 400, changed).digest != _config(seed, 400, ours).digest


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_exactly_k_sorted_distinct_indices_with_the_random_share(share: float) -> None:
    gen = np.random.default_rng(2)
    seed = gen.bytes(32)
    score = gen.random(SIZE).astype(np.float32) + np.float32(0.01)  # all positive, distinct
    for k in (1, 7, 400, SIZE - 1, SIZE):
        support = aggregate_support(seed, SIZE, k, score, share)
        assert support.dtype == np.int64 and support.shape == (k,)
        assert np.all(np.diff(support) > 0) and support[0] >= 0 and support[-1] < SIZE
    k = 400
    support = aggregate_support(seed, SIZE, k, score, share)
    top = k - round(share * k)
    ranked = np.argsort(-score, kind="stable")
    assert np.isin(ranked[:top], support).all()  # the k - r largest scores are all in
    rest = np.setdiff1d(support, ranked[:top])
    assert rest.size == k - top
    # the other r follow the round seed's random order, not the score: about r * 10 % of them
    # would be among the next-largest scores by chance; a top-k support would have them all
    assert np.isin(rest, ranked[top : top + k]).sum() < 0.25 * rest.size + 5
    again = aggregate_support(gen.bytes(32), SIZE, k, score, share)
    assert np.array_equal(np.isin(ranked[:top], again), np.ones(top, bool))
    if share > 0:
        assert not np.array_equal(again, support)  # the random share depends on the seed
    else:
        np.testing.assert_array_equal(again, np.sort(ranked[:k]))


def test_first_round_and_zero_scores_fall_back_to_random_k() -> None:
    gen = np.random.default_rng(3)
    seed = gen.bytes(32)
    first = _versions(gen, 1)
    assert aggregate_score(first) is None
    for share in (0.0, 0.5):
        np.testing.assert_array_equal(
            aggregate_support(seed, SIZE, 400, None, share), shared_support(seed, SIZE, 400)
        )
    score = np.zeros(SIZE, np.float32)
    np.testing.assert_array_equal(
        aggregate_support(seed, SIZE, 400, score, 0.0), shared_support(seed, SIZE, 400)
    )
    score[[5, 17, 3000]] = [1.0, 2.0, 3.0]  # fewer positive scores than the top share wants
    support = aggregate_support(seed, SIZE, 400, score, 0.0)
    assert support.size == 400 and np.isin([5, 17, 3000], support).all()


def test_score_is_the_decayed_sum_of_the_aggregates_magnitudes() -> None:
    v = [np.array(x, np.float32) for x in ([0, 0, 0], [1, -2, 0], [1, 0, 0.5], [0, 0, 0.5])]
    np.testing.assert_array_equal(aggregate_score(v[-2:]), [1, 0, 0])
    np.testing.assert_array_equal(aggregate_score(v), [1, 0, 0])  # decay 0: the last only
    # 0.5^2 * |v1 - v0| + 0.5 * |v2 - v1| + |v3 - v2|
    np.testing.assert_array_equal(aggregate_score(v, 0.5), [1.25, 1.5, 0.25])
    with pytest.raises(ValueError, match="decay"):
        aggregate_score(v, 1.0)
    with pytest.raises(ValueError, match="finite"):
        aggregate_score([v[0], np.array([np.inf, 0, 0], np.float32)])
    with pytest.raises(ValueError, match="random_share"):
        aggregate_support(bytes(32), 3, 1, v[0], 1.5)
    with pytest.raises(ValueError, match="float32 vector"):
        aggregate_support(bytes(32), 4, 1, v[0], 0.5)
    with pytest.raises(ValueError, match="not finite"):
        aggregate_support(bytes(32), 3, 1, np.array([0, np.nan, 1], np.float32), 0.5)


def test_round_config_refuses_a_malformed_support() -> None:
    seed = bytes(32)
    good = np.arange(0, 800, 2, dtype=np.int64)
    assert np.array_equal(_config(seed, 400, good).support, good)
    for bad in (good[::-1].copy(), good.astype(np.int32), good[:-1], good + SIZE - 700):
        with pytest.raises(SecAggError, match="sorted distinct"):
            _config(seed, 400, bad)
    dup = good.copy()
    dup[1] = dup[0]
    with pytest.raises(SecAggError, match="sorted distinct"):
        _config(seed, 400, dup)


def test_exact_sum_on_the_aggregate_support_with_a_third_dropping() -> None:
    gen = np.random.default_rng(4)
    n, k = 12, 400
    seed = gen.bytes(32)
    support = aggregate_support(seed, SIZE, k, aggregate_score(_versions(gen, 3)), 0.5)
    cfg = _config(seed, k, support, n)
    assert not np.array_equal(cfg.support, shared_support(seed, SIZE, k))
    deltas = {u: gen.normal(0, 0.02, SIZE).astype(np.float32) for u in range(n)}
    inputs = {u: quantized_input(cfg, deltas[u], None, gen)[0] for u in range(n)}
    keys = {u: Ed25519PrivateKey.from_private_bytes(gen.bytes(32)) for u in range(n)}
    gone = gen.permutation(n)[: n // 3].tolist()
    dropouts = Dropouts(after_shares=frozenset(gone[:2]), after_upload=frozenset(gone[2:]))
    result = run_round(cfg, inputs, keys, gen.bytes, dropouts)
    survivors = sorted(set(range(n)) - dropouts.after_shares)
    assert result.included == survivors
    plain = np.sum([inputs[u].view(np.int32).astype(np.int64) for u in survivors], axis=0)
    np.testing.assert_array_equal(cfg.grid.decode_sum(result.total), plain)
    mean = mean_update(cfg, result.total, len(survivors))
    off = np.setdiff1d(np.arange(SIZE), support)
    assert np.all(mean[off] == 0)
    expected = np.mean([deltas[u][support] for u in survivors], axis=0)
    assert np.abs(mean[support] - expected).max() < 2 * cfg.grid.step
