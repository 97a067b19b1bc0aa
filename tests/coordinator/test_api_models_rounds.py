"""Model versions (list, binary download with ETag/304, ``latest``, f16) and rounds (read-only
views of rows the round engine writes; here inserted directly)."""

from __future__ import annotations

import numpy as np

from fedge.shared import wire
from tests.support.device import API
from tests.support.rows import add_model_version, add_round

SOFTMAX = {"architecture": "softmax", "input_dim": 6, "num_classes": 3, "seed": 2}


def _task(admin) -> dict:
    r = admin.post(f"{API}/tasks", json={"name": "m", "model": SOFTMAX})
    assert r.status_code == 201, r.text
    return r.json()


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "W": rng.standard_normal((6, 3)).astype(np.float32),
        "b": rng.standard_normal(3).astype(np.float32),
    }


def test_versions_list_and_latest(coordinator):
    rng = np.random.default_rng(0)
    with coordinator.admin() as admin:
        task = _task(admin)
        tid = task["id"]
        blobs = [wire.encode_model(_weights(rng)) for _ in range(2)]
        digests = [
            add_model_version(
                coordinator.settings,
                task_id=tid,
                version=v,
                data=blob,
                num_updates=3,
                metrics={"accuracy": 0.5 + v / 10},
            )
            for v, blob in ((1, blobs[0]), (2, blobs[1]))
        ]
        page = admin.get(f"{API}/tasks/{tid}/models").json()
        assert [v["version"] for v in page["items"]] == [0, 1, 2] and page["total"] == 3
        assert page["items"][2]["digest"] == digests[1]
        assert page["items"][2]["metrics"] == {"accuracy": 0.7}
        assert page["items"][2]["size_bytes"] == len(blobs[1])
        second = admin.get(f"{API}/tasks/{tid}/models", params={"offset": 1, "limit": 1}).json()
        assert [v["version"] for v in second["items"]] == [1]
        latest = admin.get(f"{API}/tasks/{tid}/models/latest")
        assert latest.status_code == 200
        assert latest.content == blobs[1]
        assert latest.headers["ETag"] == f'"{digests[1]}"'
        assert latest.headers["Content-Type"] == "application/octet-stream"
        assert admin.get(f"{API}/tasks/{tid}/models/1").content == blobs[0]
        for missing in ("3", "99"):
            r = admin.get(f"{API}/tasks/{tid}/models/{missing}")
            assert r.status_code == 404 and r.json()["error"] == "not_found", missing
        r = admin.get(f"{API}/tasks/{tid}/models/newest")
        assert r.status_code == 422 and r.json()["error"] == "validation_error"


def test_etag_and_if_none_match(coordinator):
    with coordinator.admin() as admin:
        tid = _task(admin)["id"]
        first = admin.get(f"{API}/tasks/{tid}/models/0")
        etag = first.headers["ETag"]
        assert etag.startswith('"') and etag.endswith('"') and len(etag) == 66
        for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
            r = admin.get(f"{API}/tasks/{tid}/models/0", headers={"If-None-Match": header})
            assert r.status_code == 304, header
            assert r.content == b"" and r.headers["ETag"] == etag
        r = admin.get(f"{API}/tasks/{tid}/models/0", headers={"If-None-Match": '"stale"'})
        assert r.status_code == 200 and r.content == first.content


def test_f16_download_is_half_precision_with_its_own_etag(coordinator):
    with coordinator.admin() as admin:
        tid = _task(admin)["id"]
        f32 = admin.get(f"{API}/tasks/{tid}/models/0")
        f16 = admin.get(f"{API}/tasks/{tid}/models/0", params={"dtype": "f16"})
        assert f16.status_code == 200
        assert f16.headers["ETag"] != f32.headers["ETag"]
        # The f32 tag does not validate the f16 representation, and vice versa.
        r = admin.get(
            f"{API}/tasks/{tid}/models/0",
            params={"dtype": "f16"},
            headers={"If-None-Match": f32.headers["ETag"]},
        )
        assert r.status_code == 200
        r = admin.get(
            f"{API}/tasks/{tid}/models/0",
            params={"dtype": "f16"},
            headers={"If-None-Match": f16.headers["ETag"]},
        )
        assert r.status_code == 304
        bad = admin.get(f"{API}/tasks/{tid}/models/0", params={"dtype": "f8"})
        assert bad.status_code == 422
    full, half = wire.decode_model(f32.content), wire.decode_model(f16.content)
    assert len(f16.content) < len(f32.content)
    for name in full:
        np.testing.assert_allclose(half[name], full[name], rtol=1e-3, atol=1e-4)


def test_f16_download_of_values_beyond_half_range_is_refused(coordinator):
    huge = {"W": np.full((6, 3), 1e6, np.float32), "b": np.zeros(3, np.float32)}
    with coordinator.admin() as admin:
        tid = _task(admin)["id"]
        add_model_version(
            coordinator.settings, task_id=tid, version=1, data=wire.encode_model(huge)
        )
        r = admin.get(f"{API}/tasks/{tid}/models/1", params={"dtype": "f16"})
        assert r.status_code == 422, r.text
        assert "float16" in r.json()["detail"]
        assert admin.get(f"{API}/tasks/{tid}/models/1").status_code == 200


def test_rounds_list_filter_and_detail(coordinator):
    with coordinator.admin() as admin:
        tid = _task(admin)["id"]
        other = _task(admin)["id"]
        add_round(
            coordinator.settings,
            task_id=tid,
            number=1,
            status="closed",
            result_version=1,
            num_assigned=13,
            num_received=10,
            num_dropped=3,
            metrics={"accuracy": 0.8},
        )
        add_round(
            coordinator.settings,
            task_id=tid,
            number=2,
            status="failed",
            status_reason="too few updates",
        )
        add_round(coordinator.settings, task_id=tid, number=3, status="open", base_version=1)
        add_round(coordinator.settings, task_id=other, number=1, status="open")
        page = admin.get(f"{API}/tasks/{tid}/rounds").json()
        assert [r["number"] for r in page["items"]] == [1, 2, 3] and page["total"] == 3
        first = page["items"][0]
        assert (first["num_assigned"], first["num_received"], first["num_dropped"]) == (13, 10, 3)
        assert first["metrics"] == {"accuracy": 0.8} and first["result_version"] == 1
        failed = admin.get(f"{API}/tasks/{tid}/rounds", params={"status": "failed"}).json()
        assert [r["number"] for r in failed["items"]] == [2]
        assert failed["items"][0]["status_reason"] == "too few updates"
        detail = admin.get(f"{API}/tasks/{tid}/rounds/3").json()
        assert detail["status"] == "open" and detail["base_version"] == 1
        assert detail["task_id"] == tid
        r = admin.get(f"{API}/tasks/{tid}/rounds/4")
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        r = admin.get(f"{API}/tasks/{other}/rounds/2")
        assert r.status_code == 404
    with coordinator.viewer() as viewer:
        assert viewer.get(f"{API}/tasks/{tid}/rounds/1").json()["number"] == 1
