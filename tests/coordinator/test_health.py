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
