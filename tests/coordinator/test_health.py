def test_healthz_and_readyz_over_https(coordinator):
    with coordinator.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


def test_unknown_route_renders_the_error_body(coordinator):
    with coordinator.client() as client:
        response = client.get("/api/v1/nope")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_readyz_and_downloads_report_a_missing_model_blob(coordinator):
    import shutil

    body = {
        "name": "blobs",
        "model": {"architecture": "softmax", "input_dim": 4, "num_classes": 3, "seed": 0},
    }
    with coordinator.admin() as admin:
        task = admin.post("/api/v1/tasks", json=body)
        assert task.status_code == 201, task.text
        task_id = task.json()["id"]
        assert admin.post(f"/api/v1/tasks/{task_id}/start").status_code == 200
        assert admin.get("/readyz").status_code == 200
        shutil.rmtree(coordinator.settings.blobs)
        coordinator.settings.blobs.mkdir()
        ready = admin.get("/readyz")
        download = admin.get(f"/api/v1/tasks/{task_id}/models/latest")
    assert ready.status_code == 503
    assert ready.json()["error"] == "not_ready"
    assert "missing" in ready.json()["detail"]
    assert download.status_code == 503
    assert download.json()["error"] == "blob_missing"


def test_readyz_reports_an_unusable_blob_directory(coordinator):
    import shutil

    shutil.rmtree(coordinator.settings.blobs)
    with coordinator.client() as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert "does not exist" in response.json()["detail"]


def test_an_unreadable_json_body_is_a_bad_request(coordinator):
    with coordinator.admin() as admin:
        response = admin.post(
            "/api/v1/tasks",
            content=b"\xff\xfe{",
            headers={"Content-Type": "application/json"},
        )
    assert 400 <= response.status_code < 500
    assert response.json()["error"] in {"bad_request", "validation_error"}
