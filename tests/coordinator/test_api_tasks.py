"""Tasks through the admin API: creation and validation, listing, draft edits, initial
weights, lifecycle actions.

Every test starts a real HTTPS coordinator, so tables of cases (invalid bodies, transitions)
run inside one test each, on fresh tasks, with the case named in every assertion.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import func, select

from fedge.coordinator.models import ModelVersion, Task
from fedge.shared import architectures, wire
from tests.support.device import API
from tests.support.rows import db_session

SOFTMAX = {"architecture": "softmax", "input_dim": 8, "num_classes": 3, "seed": 7}
MLP = {"architecture": "mlp", "input_dim": 8, "num_classes": 3, "hidden": [5], "seed": 1}
SPEC = {"spec": [{"name": "w", "shape": [4, 2]}, {"name": "b", "shape": [2]}]}
CUSTOM = {"trainer": "mytrainers.linear:train"}


def create(client, model=SOFTMAX, **fields):
    r = client.post(f"{API}/tasks", json={"name": "t", "model": model, **fields})
    assert r.status_code == 201, r.text
    return r.json()


def _v0_digest(coordinator, task_id):
    with db_session(coordinator.settings) as s:
        return s.scalar(
            select(ModelVersion.blob_digest).where(
                ModelVersion.task_id == task_id, ModelVersion.version == 0
            )
        )


def rows(settings, model):
    with db_session(settings) as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_create_builtin_task_with_seeded_initial_weights(coordinator):
    with coordinator.admin() as admin:
        task = create(admin, description="digits", aggregation={"num_rounds": 5})
        assert task["status"] == "draft"
        assert task["spec"] == [{"name": "W", "shape": [8, 3]}, {"name": "b", "shape": [3]}]
        assert task["num_params"] == 27
        assert task["current_version"] == 0 and task["has_initial_weights"]
        assert task["aggregation"]["num_rounds"] == 5
        assert task["aggregation"]["clients_per_round"] == 10  # default filled in
        assert task["aggregation"]["target_metric"] is None
        assert task["training"]["trainer"] == "softmax"
        assert task["compression"]["bits"] == 4
        assert admin.get(f"{API}/tasks/{task['id']}").json() == task
        blob = admin.get(f"{API}/tasks/{task['id']}/models/0").content
    weights = wire.decode_model(blob)
    expected = architectures.init_weights(SOFTMAX, np.random.default_rng(7))
    assert list(weights) == list(expected)
    for name in expected:
        np.testing.assert_allclose(weights[name], expected[name])


def test_seed_changes_the_initial_weights(coordinator):
    with coordinator.admin() as admin:
        digests = set()
        for seed in (0, 1, 0):
            task = create(admin, model={**SOFTMAX, "seed": seed})
            digests.add(admin.get(f"{API}/tasks/{task['id']}/models").json()["items"][0]["digest"])
    assert len(digests) == 2


def test_init_chooses_the_initial_weights(coordinator):
    with coordinator.admin() as admin:
        task = create(admin, model={**MLP, "init": "he_normal"})
        assert task["model"]["init"] == "he_normal"
        assert create(admin, model=MLP)["model"]["init"] == "he_glorot"
        blob = admin.get(f"{API}/tasks/{task['id']}/models/0").content
    expected = architectures.init_weights({**MLP, "init": "he_normal"}, np.random.default_rng(1))
    assert blob == wire.encode_model(expected)
    assert blob != wire.encode_model(architectures.init_weights(MLP, np.random.default_rng(1)))


def test_target_metric_round_trips_and_is_stored_for_the_engine(coordinator):
    target = {"name": "accuracy", "value": 0.9}
    with coordinator.admin() as admin:
        task = create(admin, aggregation={"target_metric": target})
    assert task["aggregation"]["target_metric"] == target
    with db_session(coordinator.settings) as s:
        row = s.get(Task, task["id"])
        assert row is not None
        stored = row.aggregation
    assert (stored["target_metric"], stored["target_value"]) == ("accuracy", 0.9)


INVALID_TASKS: list[tuple[dict[str, Any], str]] = [
    ({"aggregation": {"min_updates": 11, "clients_per_round": 10}}, "min_updates"),
    ({"aggregation": {"over_selection": 5.5}}, "over_selection"),
    ({"aggregation": {"mode": "semi"}}, "mode"),
    ({"aggregation": {"num_round": 3}}, "num_round"),
    ({"aggregation": {"staleness": {"function": "hinge", "a": 0}}}, "staleness.a"),
    ({"aggregation": {"server_momentum": 1.0}}, "server_momentum"),
    ({"aggregation": {"selection_seed": -1}}, "selection_seed"),
    ({"aggregation": {"mode": "async", "selection_seed": 1}}, "selection_seed"),
    ({"compression": {"bits": 3}}, "compression.bits"),
    ({"compression": {"topk_fraction": 0}}, "topk_fraction"),
    ({"training": {"epochs": 0}}, "epochs"),
    ({"training": {"trainer": "mlp"}}, "trainer"),
    ({"training": {"trainer": "not an entry point"}}, "trainer"),
    ({"model": {**SOFTMAX, "hidden": [4]}}, "hidden"),
    ({"model": {**SOFTMAX, "input_dim": 0}}, "input_dim"),
    ({"model": {**SOFTMAX, "init": "xavier"}}, "init"),
    ({"model": {"architecture": "cnn", "input_dim": 4, "num_classes": 2}}, "architecture"),
    ({"model": SPEC}, "trainer"),
    ({"model": {"spec": [{"name": "w", "shape": [2]}, {"name": "w", "shape": [2]}]}}, "dup"),
    (
        {"model": {"spec": [{"name": "w", "shape": [200_000_000]}]}, **{"training": CUSTOM}},
        "max_model_bytes",
    ),
    ({"name": ""}, "name"),
    ({"name": "a\x00b"}, "name"),
    ({"description": "a\x00b"}, "description"),
]


def test_invalid_task_is_refused_with_a_clear_422(coordinator):
    with coordinator.admin() as admin:
        for fields, where in INVALID_TASKS:
            r = admin.post(f"{API}/tasks", json={"name": "t", "model": SOFTMAX, **fields})
            assert r.status_code == 422, (fields, r.text)
            assert r.json()["error"] == "validation_error", fields
            assert where in r.json()["detail"], (fields, r.json()["detail"])
    assert rows(coordinator.settings, Task) == 0


MODEL_JSON = b'{"architecture": "softmax", "input_dim": 2, "num_classes": 2}'
RAW_BODIES = [
    (b'{"name": "t", "model": ', "JSON"),
    (b'{"name": "t", "model": %s, "training": {"lr": Infinity}}' % MODEL_JSON, "lr"),
    (b'{"name": "t", "model": %s, "training": {"lr": NaN}}' % MODEL_JSON, "lr"),
    (b"[]", "body"),
]


def test_malformed_json_and_non_finite_numbers_are_422(coordinator):
    with coordinator.admin() as admin:
        for raw, where in RAW_BODIES:
            r = admin.post(
                f"{API}/tasks", content=raw, headers={"Content-Type": "application/json"}
            )
            assert r.status_code == 422, (raw, r.text)
            assert r.json()["error"] == "validation_error", raw
            assert where in r.json()["detail"], (raw, r.json())
    assert rows(coordinator.settings, Task) == 0


def test_list_filters_by_status_and_paginates(coordinator):
    with coordinator.admin() as admin:
        ids = [create(admin)["id"] for _ in range(3)]
        assert admin.post(f"{API}/tasks/{ids[1]}/start").status_code == 200
        page = admin.get(f"{API}/tasks", params={"limit": 2}).json()
        assert [t["id"] for t in page["items"]] == ids[::-1][:2]
        assert (page["total"], page["limit"], page["offset"]) == (3, 2, 0)
        rest = admin.get(f"{API}/tasks", params={"limit": 2, "offset": 2}).json()
        assert [t["id"] for t in rest["items"]] == [ids[0]]
        running = admin.get(f"{API}/tasks", params={"status": "running"}).json()
        assert [t["id"] for t in running["items"]] == [ids[1]] and running["total"] == 1
        drafts = admin.get(f"{API}/tasks", params={"status": "draft"}).json()
        assert {t["id"] for t in drafts["items"]} == {ids[0], ids[2]}
        for bad in ({"status": "sleeping"}, {"limit": 0}, {"limit": 501}, {"offset": -1}):
            r = admin.get(f"{API}/tasks", params=bad)
            assert r.status_code == 422 and r.json()["error"] == "validation_error", bad


def test_unknown_task_is_404(coordinator):
    with coordinator.admin() as admin:
        for r in (
            admin.get(f"{API}/tasks/999"),
            admin.patch(f"{API}/tasks/999", json={"name": "x"}),
            admin.post(f"{API}/tasks/999/start"),
            admin.get(f"{API}/tasks/999/models"),
            admin.get(f"{API}/tasks/999/rounds"),
        ):
            assert r.status_code == 404, r.request.url
            assert r.json()["error"] == "not_found"


def test_patch_merges_into_a_draft(coordinator):
    with coordinator.admin() as admin:
        task = create(admin, aggregation={"num_rounds": 5, "clients_per_round": 4})
        r = admin.patch(
            f"{API}/tasks/{task['id']}",
            json={"name": "renamed", "aggregation": {"num_rounds": 9}, "training": {"lr": 0.5}},
        )
        assert r.status_code == 200, r.text
        new = r.json()
    assert new["name"] == "renamed"
    assert new["aggregation"]["num_rounds"] == 9
    assert new["aggregation"]["clients_per_round"] == 4  # kept
    assert new["training"]["lr"] == 0.5 and new["training"]["trainer"] == "softmax"
    assert new["model"] == task["model"] and new["current_version"] == 0


def test_patch_model_rebuilds_spec_weights_and_default_trainer(coordinator):
    with coordinator.admin() as admin:
        task = create(admin)
        old_digest = admin.get(f"{API}/tasks/{task['id']}/models/0").headers["ETag"]
        r = admin.patch(f"{API}/tasks/{task['id']}", json={"model": MLP})
        assert r.status_code == 200, r.text
        new = r.json()
        assert [t["name"] for t in new["spec"]] == ["W0", "b0", "W1", "b1"]
        assert new["training"]["trainer"] == "mlp"
        response = admin.get(f"{API}/tasks/{task['id']}/models/0")
    assert response.headers["ETag"] != old_digest
    assert list(wire.decode_model(response.content)) == ["W0", "b0", "W1", "b1"]
    assert rows(coordinator.settings, ModelVersion) == 1


def test_patch_to_a_new_spec_drops_the_initial_weights(coordinator):
    with coordinator.admin() as admin:
        task = create(admin)
        r = admin.patch(f"{API}/tasks/{task['id']}", json={"model": SPEC, "training": CUSTOM})
        assert r.status_code == 200, r.text
        assert r.json()["has_initial_weights"] is False
        assert admin.get(f"{API}/tasks/{task['id']}/models/latest").status_code == 404
    assert rows(coordinator.settings, ModelVersion) == 0


INVALID_PATCHES = [
    ({"aggregation": {"min_updates": 50}}, "min_updates (50)"),
    ({"compression": {"bits": 5}}, "compression.bits"),
    ({"training": {"batch_size": 0}}, "training.batch_size"),
    ({"model": MLP, "training": {"trainer": "softmax"}}, "trainer 'softmax'"),
    ({"aggregation": {"nonsense": 1}}, "aggregation.nonsense"),
    ({"model": {"spec": [{"name": "w", "shape": [2]}]}}, "trainer"),
]


def test_invalid_patch_changes_nothing(coordinator):
    with coordinator.admin() as admin:
        task = create(admin)
        for patch, where in INVALID_PATCHES:
            r = admin.patch(f"{API}/tasks/{task['id']}", json=patch)
            assert r.status_code == 422, (patch, r.text)
            assert r.json()["error"] == "validation_error", patch
            assert where in r.json()["detail"], (patch, r.json()["detail"])
        after = admin.get(f"{API}/tasks/{task['id']}").json()
        blob = admin.get(f"{API}/tasks/{task['id']}/models/0")
    assert after == task
    assert blob.headers["ETag"] == f'"{_v0_digest(coordinator, task["id"])}"'


def test_only_draft_tasks_can_be_changed(coordinator):
    with coordinator.admin() as admin:
        task = create(admin)
        admin.post(f"{API}/tasks/{task['id']}/start").raise_for_status()
        before = admin.get(f"{API}/tasks/{task['id']}").json()
        r = admin.patch(f"{API}/tasks/{task['id']}", json={"name": "late"})
        assert r.status_code == 409
        assert r.json()["error"] == "task_not_draft"
        blob = wire.encode_model(architectures.init_weights(SOFTMAX, np.random.default_rng(0)))
        r = admin.put(f"{API}/tasks/{task['id']}/model", content=blob)
        assert r.status_code == 409
        assert r.json()["error"] == "task_not_draft"
        after = admin.get(f"{API}/tasks/{task['id']}").json()
    assert after["name"] == before["name"] == "t"


def _spec_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "w": rng.standard_normal((4, 2)).astype(np.float32),
        "b": rng.standard_normal(2).astype(np.float32),
    }


def test_spec_task_needs_uploaded_weights_before_it_starts(coordinator):
    weights = _spec_weights(np.random.default_rng(3))
    with coordinator.admin() as admin:
        task = create(admin, model=SPEC, training=CUSTOM)
        assert task["has_initial_weights"] is False and task["current_version"] == -1
        r = admin.post(f"{API}/tasks/{task['id']}/start")
        assert r.status_code == 409 and r.json()["error"] == "invalid_transition"
        assert "initial weights" in r.json()["detail"]
        r = admin.put(
            f"{API}/tasks/{task['id']}/model",
            content=wire.encode_model(weights, dtype="f16"),
            headers={"Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 0
        stored = admin.get(f"{API}/tasks/{task['id']}/models/0")
        assert stored.headers["ETag"] == f'"{r.json()["digest"]}"'
        assert admin.post(f"{API}/tasks/{task['id']}/start").json()["status"] == "running"
    # Stored canonically as float32 (equal to the f16 upload's values).
    assert stored.content == wire.encode_model(wire.decode_model(stored.content))
    decoded = wire.decode_model(stored.content)
    for name, value in weights.items():
        np.testing.assert_allclose(decoded[name], value, rtol=1e-3, atol=1e-3)


BAD_MODELS = [
    (b"", 400, "truncated"),
    (b"not a model at all", 400, "bad_magic"),
    (
        wire.encode_model({"w": np.zeros((2, 4), np.float32), "b": np.zeros(2, np.float32)}),
        422,
        "shape_mismatch",
    ),
    (wire.encode_model({"w": np.zeros((4, 2), np.float32)}), 422, "shape_mismatch"),
    (
        wire.encode_model({"w": np.zeros((4, 2), np.float32), "b": np.zeros(2, np.float32)}) + b"x",
        400,
        "trailing_bytes",
    ),
]


def test_bad_initial_weights_are_refused(coordinator):
    with coordinator.admin() as admin:
        task = create(admin, model=SPEC, training=CUSTOM)
        for body, status, code in BAD_MODELS:
            r = admin.put(f"{API}/tasks/{task['id']}/model", content=body)
            assert r.status_code == status, (code, r.text)
            assert r.json()["error"] == code
        assert admin.get(f"{API}/tasks/{task['id']}").json()["has_initial_weights"] is False
    assert rows(coordinator.settings, ModelVersion) == 0


# (reached status, action) -> expected status or None for 409 invalid_transition
LIFECYCLE = [
    ("draft", "start", "running"),
    ("draft", "pause", None),
    ("draft", "resume", None),
    ("draft", "cancel", "cancelled"),
    ("running", "start", None),
    ("running", "pause", "paused"),
    ("running", "resume", None),
    ("running", "cancel", "cancelled"),
    ("paused", "start", None),
    ("paused", "pause", None),
    ("paused", "resume", "running"),
    ("paused", "cancel", "cancelled"),
    ("cancelled", "start", None),
    ("cancelled", "resume", None),
    ("cancelled", "cancel", None),
]
PATH_TO = {"draft": [], "running": ["start"], "paused": ["start", "pause"], "cancelled": ["cancel"]}


def test_lifecycle_transitions(coordinator):
    with coordinator.admin() as admin:
        for state, action, expected in LIFECYCLE:
            case = f"{action} from {state}"
            task = create(admin)
            for step in PATH_TO[state]:
                admin.post(f"{API}/tasks/{task['id']}/{step}").raise_for_status()
            assert admin.get(f"{API}/tasks/{task['id']}").json()["status"] == state, case
            r = admin.post(f"{API}/tasks/{task['id']}/{action}")
            after = admin.get(f"{API}/tasks/{task['id']}").json()
            if expected is None:
                assert r.status_code == 409, (case, r.text)
                assert r.json()["error"] == "invalid_transition", case
                assert after["status"] == state, case
            else:
                assert r.status_code == 200, (case, r.text)
                assert r.json()["status"] == after["status"] == expected, case
                assert (after["finished_at"] is not None) == (expected == "cancelled"), case
                assert after["started_at"] is not None or action != "start", case
