"""The error-feedback memory on disk: residual, momentum velocity and the model version they
belong to in one residual file, kept, recovered and rolled back together with the outbox."""

from __future__ import annotations

import os
import stat
import struct
import zlib

import numpy as np
import pytest

from fedge.edge_agent.client import Work
from fedge.edge_agent.outbox import RESIDUAL_AFTER, RESIDUAL_BEFORE
from fedge.edge_agent.residual_store import (
    STATE_MAGIC,
    ResidualState,
    load_residual,
    residual_file_bytes,
    residual_from_file_bytes,
    save_residual,
)
from fedge.edge_agent.state import State
from fedge.edge_agent.uploads import discard_entry, save_update
from fedge.shared.compression import compress_round
from fedge.shared.feedback import Residual
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import decode_update, encode_update
from fedge.shared.wireerror import WireFormatError

SPEC = ModelSpec.from_dict([{"name": "W", "shape": [12, 5]}, {"name": "b", "shape": [5]}])
POLICY = CompressionPolicy(
    topk_fraction=0.05, bits=4, chunk=16, momentum=0.9, warmup_rounds=2, residual_decay=0.5
)


def arrays(seed: int) -> Weights:
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in SPEC.tensors}


def state_of(seed: int, *, velocity: bool = True, version: int | None = 3) -> ResidualState:
    return ResidualState(
        arrays(seed), velocity=arrays(seed + 100) if velocity else None, version=version
    )


def assert_same(a: ResidualState, b: ResidualState) -> None:
    assert a.version == b.version
    for name in SPEC.names:
        np.testing.assert_array_equal(a.values[name], b.values[name])
    if a.velocity is None or b.velocity is None:
        assert a.velocity is None and b.velocity is None
    else:
        for name in SPEC.names:
            np.testing.assert_array_equal(a.velocity[name], b.velocity[name])


# ------------------------------------------------------------------------------ the file


@pytest.mark.parametrize(
    ("velocity", "version"), [(True, 3), (True, None), (False, 0), (False, 2**63 - 1)]
)
def test_state_round_trips_through_its_file(tmp_path, velocity: bool, version: int | None) -> None:
    s = state_of(1, velocity=velocity, version=version)
    path = tmp_path / "task-1.res"
    save_residual(s, path)
    assert path.read_bytes()[:4] == STATE_MAGIC
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert_same(load_residual(path, spec=SPEC), s)


def test_a_state_without_velocity_or_version_is_a_plain_residual_file(tmp_path) -> None:
    plain = Residual(arrays(2))
    assert residual_file_bytes(ResidualState(plain.values)) == plain.to_bytes()
    assert residual_file_bytes(plain) == plain.to_bytes()
    path = tmp_path / "old.res"
    path.write_bytes(plain.to_bytes())  # what agents wrote before momentum existed
    loaded = load_residual(path, spec=SPEC)
    assert isinstance(loaded, ResidualState)
    assert_same(loaded, ResidualState(plain.values))


def test_every_altered_byte_is_detected() -> None:
    data = residual_file_bytes(state_of(3))
    for i in range(len(data)):
        altered = bytearray(data)
        altered[i] ^= 0x20
        with pytest.raises(WireFormatError):
            residual_from_file_bytes(bytes(altered), spec=SPEC)


def test_torn_extended_foreign_and_unknown_files_are_refused() -> None:
    data = residual_file_bytes(state_of(4))
    for cut in (3, 10, 27, 28, 40, len(data) - 1):
        with pytest.raises(WireFormatError) as err:
            residual_from_file_bytes(data[:cut], spec=SPEC)
        assert err.value.code in {"truncated", "checksum_mismatch"}, cut
    with pytest.raises(WireFormatError) as err:
        residual_from_file_bytes(data + b"\0", spec=SPEC)
    assert err.value.code == "checksum_mismatch"
    other = ModelSpec.from_dict([{"name": "W", "shape": [5, 12]}, {"name": "b", "shape": [5]}])
    with pytest.raises(WireFormatError) as err:
        residual_from_file_bytes(data, spec=other)
    assert err.value.code == "shape_mismatch"

    def resealed(fmt: int, flags: int, version: int) -> bytes:
        head = struct.Struct("<4sHHIQQ")
        _, _, _, _, _, length = head.unpack_from(data)
        body = data[head.size :]
        zero = head.pack(STATE_MAGIC, fmt, flags, 0, version, length)
        return (
            head.pack(STATE_MAGIC, fmt, flags, zlib.crc32(body, zlib.crc32(zero)), version, length)
            + body
        )

    with pytest.raises(WireFormatError) as err:
        residual_from_file_bytes(resealed(2, 3, 3), spec=SPEC)
    assert err.value.code == "unsupported_version"
    for flags, version in ((7, 3), (1, 3), (3, 2**63)):
        with pytest.raises(WireFormatError) as err:
            residual_from_file_bytes(resealed(1, flags, version), spec=SPEC)
        assert err.value.code == "bad_header", (flags, version)


def test_velocity_and_version_are_checked() -> None:
    with pytest.raises(ValueError, match="velocity"):
        ResidualState(arrays(5), velocity={"W": np.zeros((12, 5), np.float32)})
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match="version"):
            ResidualState(arrays(5), version=bad)  # type: ignore[arg-type]


def test_an_unusable_state_file_gives_a_fresh_memory(tmp_path) -> None:
    state = State(tmp_path)
    state.save_residual(1, state_of(6))
    path = state.residual_path(1)
    path.write_bytes(path.read_bytes()[:-2])
    memory = ResidualState.of(state.load_residual(1, SPEC))
    assert memory.norm() == 0 and memory.velocity is None and memory.version is None


def test_failed_save_keeps_the_old_state(tmp_path, monkeypatch) -> None:
    path = tmp_path / "r.res"
    save_residual(state_of(7), path)
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_residual(state_of(8, version=9), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.res"]


# ------------------------------------------------------------- with the agent's update step


def work(assignment_id: int, base_version: int) -> Work:
    return Work(
        assignment_id=assignment_id,
        status="assigned",
        task_id=1,
        base_version=base_version,
        upload_url=f"/api/v1/device/assignments/{assignment_id}/update",
    )


def update(state: State, assignment_id: int, base_version: int, seed: int, policy=POLICY):
    base = arrays(1000 + seed)
    local = {k: v + 0.1 * arrays(seed)[k] for k, v in base.items()}
    return save_update(
        state,
        work(assignment_id, base_version),
        spec=SPEC,
        policy=policy,
        base=base,
        local=local,
        num_examples=10,
        metrics={},
        seed=seed,
    )


def current(state: State) -> ResidualState:
    return ResidualState.of(State(state.directory).load_residual(1, SPEC))


def test_the_update_step_keeps_velocity_and_version_with_the_residual(tmp_path) -> None:
    state = State(tmp_path)
    e = update(state, 11, base_version=0, seed=1)
    memory = current(state)
    assert memory.version == 0 and memory.velocity is not None
    assert memory.norm() > 0 and float(np.abs(memory.velocity["W"]).sum()) > 0
    body = decode_update(state.outbox.body(e), spec=SPEC, policy=POLICY)
    assert body.base_version == 0 and body.topk_fraction == 0.25  # warm-up, first version
    before = state.outbox.residual_file(e, RESIDUAL_BEFORE)
    after = state.outbox.residual_file(e, RESIDUAL_AFTER)
    assert before is not None and after is not None
    assert_same(load_residual(after, spec=SPEC), memory)
    assert_same(load_residual(before, spec=SPEC), ResidualState.zeros(SPEC))


def test_a_discarded_update_rolls_back_velocity_and_version_too(tmp_path) -> None:
    state = State(tmp_path)
    state.outbox.remove(update(state, 11, base_version=0, seed=1))  # uploaded
    kept = current(state)
    e = update(state, 12, base_version=4, seed=2)  # 3 versions missed: decayed, then advanced
    advanced = current(state)
    assert advanced.version == 4
    discard_entry(state, e)  # e.g. 409 stale_update
    assert state.outbox.entries() == []
    assert_same(current(state), kept)


def test_recovery_makes_the_pending_velocity_and_version_current(tmp_path) -> None:
    """Crash after the outbox entry was committed and before the new memory was saved."""
    state = State(tmp_path)
    state.outbox.remove(update(state, 11, base_version=0, seed=1))
    old = state.residual_path(1).read_bytes()
    e = update(state, 12, base_version=1, seed=2)
    new = current(state)
    state.residual_path(1).write_bytes(old)  # as if the process died before saving it
    reopened = State(tmp_path)
    assert reopened.outbox.entries() == [e]
    assert_same(current(reopened), new)


def test_the_update_step_is_the_shared_compress_round(tmp_path) -> None:
    """Same memory, same seeding: the agent's bytes are what compress_round gives."""
    state = State(tmp_path)
    state.outbox.remove(update(state, 11, base_version=0, seed=1))
    memory = current(state)
    e = update(state, 12, base_version=3, seed=2)
    base = arrays(1002)
    delta = {k: (v + 0.1 * arrays(2)[k]) - v for k, v in base.items()}
    c = compress_round(delta, POLICY, np.random.default_rng([2, 12, 1]), memory, base_version=3)
    want = encode_update(c, task_id=1, base_version=3, num_examples=10, metrics={})
    assert state.outbox.body(e) == want
    assert_same(current(state), memory)
