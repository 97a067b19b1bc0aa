"""Durable agent state: JSON files, key mode, residual files, outbox and residual across
"crashes" (the atomic write itself: tests/shared/test_durable.py)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from fedge.edge_agent import fsutil
from fedge.edge_agent.outbox import (
    RESIDUAL_AFTER,
    RESIDUAL_BEFORE,
    OutboxEntry,
    PendingUpdateExists,
    new_idempotency_key,
)
from fedge.edge_agent.residual_store import load_residual, save_residual
from fedge.edge_agent.state import AgentConfig, State, StateError
from fedge.shared.feedback import Residual
from fedge.shared.modelspec import ModelSpec
from fedge.shared.wireerror import WireFormatError

SPEC = ModelSpec.from_dict([{"name": "W", "shape": [3, 2]}, {"name": "b", "shape": [2]}])


def residual(value: float) -> Residual:
    return Residual({t.name: np.full(t.shape, value, np.float32) for t in SPEC.tensors})


def entry(assignment_id=7, task_id=1, *, has_residual=True) -> OutboxEntry:
    return OutboxEntry(
        assignment_id=assignment_id,
        task_id=task_id,
        base_version=2,
        upload_url=f"/api/v1/device/assignments/{assignment_id}/update",
        idempotency_key=new_idempotency_key(),
        num_examples=40,
        created_at=1000.0 + assignment_id,
        has_residual=has_residual,
    )


def test_json_files_are_replaced_atomically(tmp_path):
    path = tmp_path / "a" / "file.json"
    fsutil.write_json_atomic(path, {"v": 1})
    fsutil.write_json_atomic(path, {"v": 2}, mode=0o600)
    assert fsutil.read_json(path) == {"v": 2}
    assert path.read_text() == '{\n  "v": 2\n}\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["file.json"]


# Residual({"W": arange(6).reshape(3, 2) / 4, "b": [-1.5, 2]}): its payload is a model blob
# in the one wire format version (docs/wire-format.md).
RESIDUAL_FILE = bytes.fromhex(
    "4645445201000000bfb7e24734000000000000004645444702000200020157020302000162010200000000000000"
    "803e0000003f0000403f0000803f0000a03f0000c0bf00000040"
)
# The same residual with the payload in the fixed-width layout of before the one version.
PRE_RELEASE_RESIDUAL_FILE = bytes.fromhex(
    "4645445201000000a7a208426e00000000000000464544470100020002000000010057020300000002000000"
    "000000060000000000000000000000180000000000000001006201020000000000000200000000000000000000"
    "000800000000000000000000000000803e0000003f0000403f0000803f0000a03f0000c0bf00000040"
)


def test_residual_files_keep_their_format(tmp_path):
    expected = Residual(
        {
            "W": np.arange(6, dtype=np.float32).reshape(3, 2) / np.float32(4),
            "b": np.array([-1.5, 2.0], np.float32),
        }
    )
    old = tmp_path / "old.res"
    old.write_bytes(RESIDUAL_FILE)
    loaded = load_residual(old, spec=SPEC)
    for name in SPEC.names:
        np.testing.assert_array_equal(loaded.values[name], expected.values[name])
    new = tmp_path / "new.res"
    save_residual(expected, new)
    assert new.read_bytes() == RESIDUAL_FILE
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.res", "old.res"]


def test_a_residual_file_of_the_pre_release_layout_is_replaced_by_zeros(tmp_path):
    state = State(tmp_path)
    path = state.residual_path(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PRE_RELEASE_RESIDUAL_FILE)
    with pytest.raises(WireFormatError) as err:
        load_residual(path, spec=SPEC)
    assert err.value.code == "unsupported_version"
    assert state.load_residual(1, SPEC).norm() == 0


def test_failed_residual_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.res"
    save_residual(residual(1.0), path)
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_residual(residual(7.0), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.res"]  # no temp file left behind


def test_corrupt_residual_file_is_rejected_and_replaced_by_zeros(tmp_path):
    state = State(tmp_path)
    state.save_residual(1, residual(0.25))
    path = state.residual_path(1)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(WireFormatError) as err:
        load_residual(path, spec=SPEC)
    assert err.value.code == "truncated"
    assert state.load_residual(1, SPEC).norm() == 0


def test_identity_key_is_private_and_stable(tmp_path):
    state = State(tmp_path / "s")
    key = state.load_or_create_key()
    assert stat.S_IMODE(state.key_path.stat().st_mode) == 0o600
    again = State(tmp_path / "s").load_or_create_key()
    assert again.public_key().public_bytes_raw() == key.public_key().public_bytes_raw()


def test_loose_key_permissions_are_tightened(tmp_path):
    state = State(tmp_path)
    state.load_or_create_key()
    os.chmod(state.key_path, 0o644)
    state.load_key()
    assert stat.S_IMODE(state.key_path.stat().st_mode) == 0o600


def test_config_round_trip_and_missing_config(tmp_path):
    state = State(tmp_path)
    with pytest.raises(StateError, match="enroll"):
        state.load_config()
    config = AgentConfig(device_id="d1", url="https://c", name="n", seed=5, ca_file=None)
    state.save_config(config)
    assert State(tmp_path).load_config() == config
    (tmp_path / "agent.json").write_text("{not json")
    with pytest.raises(StateError, match="unreadable"):
        state.load_config()


def test_ca_is_copied_and_checked(tmp_path):
    state = State(tmp_path / "s")
    pem = tmp_path / "ca.crt"
    pem.write_text("-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n")
    name = state.save_ca(pem)
    assert (state.directory / name).read_bytes() == pem.read_bytes()
    bad = tmp_path / "bad.crt"
    bad.write_text("hello")
    with pytest.raises(StateError, match="not a PEM certificate"):
        state.save_ca(bad)


def test_residual_survives_restart(tmp_path):
    state = State(tmp_path)
    assert state.load_residual(1, SPEC).norm() == 0
    state.save_residual(1, residual(0.25))
    loaded = State(tmp_path).load_residual(1, SPEC)
    np.testing.assert_allclose(loaded.values["W"], 0.25)


def test_residual_of_another_shape_is_ignored(tmp_path):
    state = State(tmp_path)
    state.save_residual(1, residual(0.25))
    other = ModelSpec.from_dict([{"name": "W", "shape": [4]}])
    assert state.load_residual(1, other).norm() == 0


def test_outbox_entry_survives_a_crash(tmp_path):
    state = State(tmp_path)
    e = entry()
    state.outbox.add(
        e, b"update-bytes", residual_before=residual(0.0), residual_after=residual(1.0)
    )
    # "crash": a new State object over the same directory
    reopened = State(tmp_path)
    (found,) = reopened.outbox.entries()
    assert found == e
    assert reopened.outbox.body(found) == b"update-bytes"


def test_recovery_makes_the_pending_residual_current(tmp_path):
    """Crash after the outbox entry was committed but before the residual was saved."""
    state = State(tmp_path)
    state.save_residual(1, residual(0.5))
    state.outbox.add(entry(), b"u", residual_before=residual(0.5), residual_after=residual(2.0))
    reopened = State(tmp_path)
    np.testing.assert_allclose(reopened.load_residual(1, SPEC).values["b"], 2.0)


def test_discard_path_restores_the_previous_residual(tmp_path):
    state = State(tmp_path)
    e = entry()
    state.outbox.add(e, b"u", residual_before=residual(0.5), residual_after=residual(2.0))
    state.save_residual(1, residual(2.0))
    state.restore_residual(1, state.outbox.residual_file(e, RESIDUAL_BEFORE))
    state.outbox.remove(e)
    reopened = State(tmp_path)
    assert reopened.outbox.entries() == []
    np.testing.assert_allclose(reopened.load_residual(1, SPEC).values["W"], 0.5)
    assert stat.S_IMODE(state.residual_path(1).stat().st_mode) == 0o600


def test_one_pending_entry_per_task(tmp_path):
    state = State(tmp_path)
    state.outbox.add(entry(7, task_id=1, has_residual=False), b"a")
    with pytest.raises(PendingUpdateExists):
        state.outbox.add(entry(8, task_id=1, has_residual=False), b"b")
    state.outbox.add(entry(9, task_id=2, has_residual=False), b"c")
    assert [e.assignment_id for e in state.outbox.entries()] == [7, 9]
    assert state.outbox.residual_file(state.outbox.entries()[0], RESIDUAL_AFTER) is None


def test_partial_writes_are_ignored_and_cleaned(tmp_path):
    state = State(tmp_path)
    state.save_config(AgentConfig(device_id="d", url="u", name="n", seed=1))
    # an interrupted atomic write of agent.json, an interrupted outbox entry, an interrupted
    # residual save and a half-removed entry
    (tmp_path / ".agent.json.tmp-0000").write_text('{"device_id": "tor')
    partial = tmp_path / "outbox" / ".7.tmp-abcd"
    partial.mkdir()
    (partial / "update.bin").write_bytes(b"half")
    (tmp_path / "residuals").mkdir()
    (tmp_path / "residuals" / ".task-1.res.xyz.tmp").write_bytes(b"FEDR")
    trash = tmp_path / "outbox" / ".8.trash-123"
    trash.mkdir()
    no_meta = tmp_path / "outbox" / "9"
    no_meta.mkdir()
    reopened = State(tmp_path)
    assert reopened.load_config().device_id == "d"
    assert reopened.outbox.entries() == []
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name or ".trash" in p.name]
    assert leftovers == []
    assert not no_meta.exists()


def test_corrupt_metadata_entry_is_skipped(tmp_path):
    state = State(tmp_path)
    state.outbox.add(entry(7, has_residual=False), b"a")
    (tmp_path / "outbox" / "7" / "meta.json").write_text("{")
    assert State(tmp_path).outbox.entries() == []


def test_model_cache_keeps_recent_versions(tmp_path):
    state = State(tmp_path)
    for version in range(4):
        state.cache_model(1, version, f"model{version}".encode(), f'"etag{version}"')
    assert state.cached_model(1, 3) == (b"model3", '"etag3"')
    assert state.cached_model(1, 2) == (b"model2", '"etag2"')
    assert state.cached_model(1, 0) is None
    state.drop_cached_model(1, 3)
    assert state.cached_model(1, 3) is None


def test_summary(tmp_path):
    state = State(tmp_path)
    state.save_config(AgentConfig(device_id="d", url="u", name="n", seed=1))
    state.outbox.add(entry(7, has_residual=False), b"a")
    state.save_residual(3, residual(1.0))
    state.cache_model(3, 2, b"m", None)
    summary = State(tmp_path).summary()
    assert summary["device_id"] == "d"
    assert summary["outbox"] == [{"assignment_id": 7, "task_id": 1, "base_version": 2}]
    assert summary["residual_tasks"] == [3]
    assert summary["cached_models"] == ["task-3/v2"]


def test_one_agent_per_state_dir(tmp_path):
    holder = State(tmp_path).exclusive()
    holder.__enter__()
    try:
        with pytest.raises(StateError, match="another agent is running"):
            State(tmp_path).exclusive().__enter__()
    finally:
        holder.__exit__(None, None, None)
    with State(tmp_path).exclusive():
        pass


def test_readers_leave_a_running_agents_temp_files_alone(tmp_path):
    State(tmp_path)
    in_flight = tmp_path / ".agent.json.tmp-1234"
    in_flight.write_text("{")
    State(tmp_path, recover=False).summary()
    assert in_flight.exists()
