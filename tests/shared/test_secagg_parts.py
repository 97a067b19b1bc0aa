"""The pieces of secure aggregation: keystream, shared support, integer grid, Shamir sharing,
neighbour graph, round parameters."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.shared.modelspec import ModelSpec
from fedge.shared.secagg import Graph, Grid, RoundConfig, SecAggError, plan_degree, shamir
from fedge.shared.secagg.prg import keystream_u32
from fedge.shared.secagg.support import flatten, project, shared_support, unflatten
from fedge.shared.secagg.update import mean_update, quantized_input


def test_keystream_is_aes_256_ctr() -> None:
    """Known answer: AES-256 of the zero block under the zero key (FIPS-197 style vector), so
    every platform expands a seed to the same words."""
    words = keystream_u32(bytes(32), 4)
    assert words.astype("<u4").tobytes().hex() == "dc95c078a2408989ad48a21492842087"
    assert np.array_equal(keystream_u32(bytes(32), 2), words[:2])


def test_support_is_shared_sorted_distinct_and_seed_dependent() -> None:
    gen = np.random.default_rng(1)
    seed = gen.bytes(32)
    a = shared_support(seed, 10_000, 500)
    assert np.array_equal(a, shared_support(seed, 10_000, 500))
    assert a.dtype == np.int64 and a.size == 500 and np.all(np.diff(a) > 0)
    assert a[0] >= 0 and a[-1] < 10_000
    b = shared_support(gen.bytes(32), 10_000, 500)
    assert np.intersect1d(a, b).size < 100  # about 25 expected for independent sets
    assert np.array_equal(shared_support(seed, 7, 7), np.arange(7))


def test_support_covers_coordinates_uniformly() -> None:
    gen = np.random.default_rng(2)
    hits = np.zeros(100, np.int64)
    for _ in range(400):
        hits[shared_support(gen.bytes(32), 100, 10)] += 1
    # each coordinate is chosen with probability 1/10: 40 of 400 expected, sd about 6
    assert hits.sum() == 4000
    assert hits.min() > 15 and hits.max() < 65


def test_flatten_project_round_trip() -> None:
    gen = np.random.default_rng(3)
    weights = {
        "w": gen.standard_normal((3, 4)).astype(np.float32),
        "b": np.arange(4, dtype=np.float32),
    }
    spec = ModelSpec.from_weights(weights)
    flat = flatten(weights, spec)
    assert flat.shape == (16,)
    back = unflatten(flat, spec)
    for name, value in weights.items():
        np.testing.assert_array_equal(back[name], value)
    np.testing.assert_array_equal(project(flat, np.array([0, 12, 15])), flat[[0, 12, 15]])


def test_grid_clips_to_the_bound_and_rounds_without_bias() -> None:
    grid = Grid(bound=1.0, bits=8)  # s = 127
    gen = np.random.default_rng(4)
    values = np.array([-5.0, -1.0, -0.3, 0.0, 0.0041, 0.5, 1.0, 7.0])
    draws = grid.quantize(np.tile(values, 4000), gen).view(np.int32).reshape(4000, -1)
    assert draws.min() >= -127 and draws.max() <= 127
    assert np.all(draws[:, 0] == -127) and np.all(draws[:, -1] == 127)  # clipped
    assert np.all(draws[:, 3] == 0)
    mean = grid.dequantize(draws.mean(axis=0))
    expected = np.clip(values, -1, 1)
    # per-value error has variance <= step^2 / 4: the mean of 4000 is within 5 sd
    tol = 5 * grid.step / 2 / np.sqrt(4000)
    assert np.all(np.abs(mean - expected) < tol)
    assert grid.clipped_fraction(values) == 2 / 8


def test_grid_sum_decodes_negative_totals_exactly() -> None:
    grid = Grid(bound=1.0, bits=16)
    parts = [np.array([-32767, 5, 32767], np.int64) for _ in range(3)]
    total = np.sum([p.astype(np.uint32) for p in parts], axis=0, dtype=np.uint32)
    np.testing.assert_array_equal(grid.decode_sum(total), [-98301, 15, 98301])


def test_grid_refuses_cohorts_that_could_overflow() -> None:
    grid = Grid(bound=1.0, bits=16)  # s = 32767: 65538 * 32767 >= 2**31
    assert grid.max_cohort() == 65538
    grid.check_capacity(65538)
    with pytest.raises(SecAggError) as err:
        grid.check_capacity(65539)
    assert err.value.code == "overflow"
    with pytest.raises(SecAggError):
        Grid(bound=1.0, bits=32)
    with pytest.raises(SecAggError):
        Grid(bound=float("inf"), bits=8)


def test_round_config_refuses_overflow_and_weak_thresholds() -> None:
    base = dict(task_id=1, round=1, seed=bytes(32), size=100, k=10)
    with pytest.raises(SecAggError) as err:
        RoundConfig(**base, cohort=300, degree=299, threshold=150, grid=Grid(bound=1.0, bits=24))  # type: ignore[arg-type]
    assert err.value.code == "overflow"
    for degree in (9, 20, 0):  # even and below n - 1, or n - 1
        with pytest.raises(SecAggError) as err:
            RoundConfig(
                **base, cohort=20, degree=degree, threshold=degree, grid=Grid(bound=1.0, bits=8)
            )  # type: ignore[arg-type]
        assert err.value.code == "bad_config"
    for threshold in (5, 11):  # t must be in (degree/2, degree]
        with pytest.raises(SecAggError) as err:
            RoundConfig(
                **base, cohort=20, degree=10, threshold=threshold, grid=Grid(bound=1.0, bits=8)
            )  # type: ignore[arg-type]
        assert err.value.code == "bad_config"


@pytest.mark.parametrize("threshold", [1, 3, 7])
def test_any_t_shares_rebuild_the_secret_and_fewer_do_not(threshold: int) -> None:
    gen = np.random.default_rng(5)
    secret = gen.bytes(32)
    shares = shamir.split(secret, list(range(1, 8)), threshold, gen.bytes)
    for _ in range(5):
        xs = gen.choice(np.arange(1, 8), size=threshold, replace=False).tolist()
        assert shamir.reconstruct({x: shares[x] for x in xs}, threshold, what="s") == secret
    if threshold > 1:
        with pytest.raises(SecAggError) as err:
            shamir.reconstruct({x: shares[x] for x in range(1, threshold)}, threshold, what="s")
        assert err.value.code == "below_threshold"


def test_shares_below_the_threshold_say_nothing_about_the_secret() -> None:
    """One share of a t = 2 sharing is uniform on the field whatever the secret: for the zero
    secret and the largest 32-byte one, share / p averages 1/2 (sd 0.009 over 1000 draws;
    a share that leaked the secret, which is below 2**256 << p, would average about 0)."""
    gen = np.random.default_rng(6)
    for secret in (bytes(32), b"\xff" * 32):
        values = [
            int.from_bytes(shamir.split(secret, [1, 2], 2, gen.bytes)[1], "big") / shamir.PRIME
            for _ in range(1000)
        ]
        assert abs(float(np.mean(values)) - 0.5) < 0.045
        assert abs(float(np.mean(np.array(values) < 0.5)) - 0.5) < 0.08


def test_graph_is_regular_symmetric_and_derived_from_the_seed() -> None:
    gen = np.random.default_rng(7)
    seed = gen.bytes(32)
    g = Graph.harary(seed, 50, 10)
    assert g == Graph.harary(seed, 50, 10)
    assert g != Graph.harary(gen.bytes(32), 50, 10)
    for u, row in enumerate(g.neighbours):
        assert len(set(row)) == 10 and u not in row
        assert all(u in g.neighbours[v] for v in row)
    complete = Graph.harary(seed, 6, 5)
    assert complete.neighbours[0] == (1, 2, 3, 4, 5)
    with pytest.raises(SecAggError):
        Graph.harary(seed, 50, 9)


def test_planned_degree_grows_with_dropout_and_slowly_with_the_cohort() -> None:
    assert plan_degree(100, dropout=1 / 3) == (99, 50)  # small cohorts: complete graph
    d_small, t_small = plan_degree(10_000, dropout=0.05)
    d_large, _ = plan_degree(100_000, dropout=0.05)
    assert t_small == d_small // 2 + 1
    assert d_small < 100 and d_small <= d_large <= d_small + 10
    assert plan_degree(10_000, dropout=0.2)[0] > d_small


def test_error_feedback_keeps_what_the_support_did_not_carry() -> None:
    gen = np.random.default_rng(8)
    cfg = RoundConfig(
        task_id=1,
        round=1,
        seed=gen.bytes(32),
        cohort=2,
        degree=1,
        threshold=1,
        size=500,
        k=50,
        grid=Grid(bound=0.5, bits=12),
    )
    residual = None
    sent_total = np.zeros(500)
    true_total = np.zeros(500)
    for _ in range(5):
        delta = gen.normal(0, 0.1, 500).astype(np.float32)
        q, residual = quantized_input(cfg, delta, residual, gen)
        sent_total += mean_update(cfg, q, 1)
        true_total += delta
    assert residual is not None
    np.testing.assert_allclose(true_total - sent_total, residual, atol=1e-5)
    off = np.setdiff1d(np.arange(500), cfg.support)
    assert np.all(residual[off] != 0) and np.all(np.abs(residual[cfg.support]) <= cfg.grid.step)


def test_mean_update_divides_the_exact_sum() -> None:
    gen = np.random.default_rng(9)
    cfg = RoundConfig(
        task_id=1,
        round=1,
        seed=gen.bytes(32),
        cohort=3,
        degree=2,
        threshold=2,
        size=40,
        k=8,
        grid=Grid(bound=1.0, bits=8),
    )
    ints = [gen.integers(-127, 128, 8) for _ in range(3)]
    total = np.sum([i.astype(np.uint32) for i in ints], axis=0, dtype=np.uint32)
    mean = mean_update(cfg, total, 3)
    np.testing.assert_allclose(mean[cfg.support], np.sum(ints, axis=0) / 127 / 3, rtol=1e-6)
    assert np.count_nonzero(np.delete(mean, cfg.support)) == 0
