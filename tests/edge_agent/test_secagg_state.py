"""The device's durable secure-aggregation state: a device restarted before any step sends
exactly what it sent before, answers one unmask request at most, and the round still sums
exactly (fedge.edge_agent.secagg_state)."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.edge_agent.secagg_state import DeviceRound
from fedge.shared.secagg import Grid, RoundConfig, SecAggError, protocol
from fedge.shared.secagg.messages import decode_advert
from fedge.shared.wireerror import WireFormatError

N = 7


def _config(gen: np.random.Generator) -> RoundConfig:
    return RoundConfig(
        task_id=2,
        round=5,
        seed=gen.bytes(32),
        cohort=N,
        degree=4,
        threshold=3,
        size=200,
        k=31,
        grid=Grid(bound=1.0, bits=12),
    )


def _round(tmp_path: Path, *, restart: bool, seed: int = 71) -> tuple[np.ndarray, np.ndarray]:
    """A whole round through DeviceRound; with ``restart`` every device is reloaded from its
    file before every step and runs the step twice (a retry after a lost answer)."""
    gen = np.random.default_rng(seed)
    cfg = _config(gen)
    keys = {u: Ed25519PrivateKey.from_private_bytes(gen.bytes(32)) for u in range(N)}
    verify = {u: k.public_key() for u, k in keys.items()}
    inputs = {u: cfg.grid.quantize(gen.normal(0, 0.3, cfg.k), gen) for u in range(N)}
    paths = {u: tmp_path / f"device-{u}" / "secagg.state" for u in range(N)}
    states = {u: DeviceRound.start(cfg, u, paths[u], gen.bytes) for u in range(N)}

    def device(u: int) -> DeviceRound:
        return DeviceRound.load(cfg, paths[u]) if restart else states[u]

    def twice(u: int, step: str, *args: object) -> bytes:
        first = getattr(device(u), step)(*args)
        if restart:
            assert getattr(device(u), step)(*args) == first  # byte-identical on retry
        return first

    adverts = {u: decode_advert(cfg, twice(u, "advertise", keys[u])) for u in range(N)}
    lists = protocol.route_adverts(cfg, adverts, verify)
    outgoing = {u: twice(u, "share", lists[u], verify, gen.bytes) for u in range(N)}
    inbox = protocol.route_shares(cfg, outgoing)
    dropped = {3}
    masked = {
        u: twice(u, "mask", inbox[u], inputs[u], verify) for u in range(N) if u not in dropped
    }
    requests = protocol.unmask_requests(cfg, set(outgoing), set(masked))
    responses = {u: twice(u, "answer", requests[u], verify) for u in masked}
    total, included = protocol.unmask(cfg, adverts, set(outgoing), masked, responses)
    expected = np.sum([inputs[u].view(np.int32).astype(np.int64) for u in included], axis=0)
    assert included == [u for u in range(N) if u not in dropped]
    return cfg.grid.decode_sum(total), expected


def test_a_round_sums_exactly_through_the_durable_state(tmp_path: Path) -> None:
    got, expected = _round(tmp_path, restart=False)
    np.testing.assert_array_equal(got, expected)


def test_restarts_before_every_step_change_nothing(tmp_path: Path) -> None:
    got, expected = _round(tmp_path / "a", restart=True)
    np.testing.assert_array_equal(got, expected)
    plain, _ = _round(tmp_path / "b", restart=False)
    np.testing.assert_array_equal(got, plain)


def _through_masking(tmp_path: Path) -> tuple[RoundConfig, dict[int, DeviceRound], dict, dict]:
    gen = np.random.default_rng(72)
    cfg = _config(gen)
    keys = {u: Ed25519PrivateKey.from_private_bytes(gen.bytes(32)) for u in range(N)}
    verify = {u: k.public_key() for u, k in keys.items()}
    states = {u: DeviceRound.start(cfg, u, tmp_path / f"{u}.state", gen.bytes) for u in range(N)}
    adverts = {u: decode_advert(cfg, s.advertise(keys[u])) for u, s in states.items()}
    lists = protocol.route_adverts(cfg, adverts, verify)
    outgoing = {u: s.share(lists[u], verify, gen.bytes) for u, s in states.items()}
    inbox = protocol.route_shares(cfg, outgoing)
    for u, s in states.items():
        s.mask(inbox[u], np.zeros(cfg.k, np.uint32), verify)
    return cfg, states, verify, lists


def test_a_second_different_unmask_request_is_refused_after_a_restart(tmp_path: Path) -> None:
    cfg, states, verify, _ = _through_masking(tmp_path)
    everyone = set(range(N))
    a, b = cfg.graph.neighbours[0][:2]
    # first: neighbour a dropped (its mask key revealed); other: b dropped, a survived (a's
    # self-mask seed revealed) -- answering both would give away both secrets of a
    first = protocol.unmask_requests(cfg, everyone, everyone - {a})[0]
    other = protocol.unmask_requests(cfg, everyone, everyone - {b})[0]
    answered = states[0].answer(first, verify)
    again = DeviceRound.load(cfg, states[0].path)
    assert again.answer(first, verify) == answered
    with pytest.raises(SecAggError) as err:
        again.answer(other, verify)
    assert err.value.code == "inconsistent_sets"


def test_a_different_advert_list_after_sharing_is_refused(tmp_path: Path) -> None:
    _, states, verify, lists = _through_masking(tmp_path)
    with pytest.raises(SecAggError) as err:
        states[1].share(lists[2], verify, np.random.default_rng(0).bytes)
    assert err.value.code == "inconsistent_sets"


def test_the_state_file_is_private_and_checked(tmp_path: Path) -> None:
    gen = np.random.default_rng(73)
    cfg = _config(gen)
    state = DeviceRound.start(cfg, 2, tmp_path / "s", gen.bytes)
    state.advertise(Ed25519PrivateKey.generate())
    assert stat.S_IMODE(state.path.stat().st_mode) == 0o600  # it holds private keys
    data = state.path.read_bytes()
    loaded = DeviceRound.load(cfg, state.path)
    assert loaded.to_bytes() == data
    cases = {
        "checksum_mismatch": data[:-1] + bytes([data[-1] ^ 1]),
        "truncated": data[:20],
        "bad_magic": b"XXXX" + data[4:],
    }
    for code, bad in cases.items():
        state.path.write_bytes(bad)
        with pytest.raises(WireFormatError) as err:
            DeviceRound.load(cfg, state.path)
        assert err.value.code == code
    state.path.write_bytes(data)
    with pytest.raises(WireFormatError) as err:
        DeviceRound.load(_config(gen), state.path)
    assert err.value.code == "bad_header"
