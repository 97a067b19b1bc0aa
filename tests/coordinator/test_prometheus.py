"""``GET /metrics`` scraped during a real round: a coordinator over HTTPS, signed devices
uploading real updates, the counters read back in Prometheus's text format."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedge.coordinator.app import create_app
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths
from tests.coordinator.conftest import Coordinator, make_key
from tests.support.process import coordinator_process
from tests.support.rounds import (
    Db,
    create_task,
    every_device,
    fleet_of,
    make_update,
    random_delta,
    spec_of,
    wait_until,
)
from tests.support.servers import serve_in_thread

UPLOAD = "/api/v1/device/assignments/{assignment_id}/update"
WORK = "/api/v1/device/work"


def scrape(coordinator: Coordinator) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of ``/metrics``, by (name, labels)."""
    with coordinator.viewer() as client:
        r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_refuse_without_an_api_key(coordinator: Coordinator) -> None:
    with coordinator.client() as anonymous:
        r = anonymous.get("/metrics")
        assert r.status_code == 401
        assert r.json()["error"] == "unauthorized"
        assert "fedge_" not in r.text
    with coordinator.client("fk_" + secrets.token_hex(16)) as wrong:
        r = wrong.get("/metrics")
        assert r.status_code == 401
        assert r.json()["error"] == "unauthorized"
    # Each refusal above is itself counted.
    samples = scrape(coordinator)
    assert (
        value(samples, "fedge_http_requests_total", route="/metrics", method="GET", status="401")
        == 2
    )


def test_counters_follow_a_round(coordinator: Coordinator, db: Db) -> None:
    rng = np.random.default_rng(7)
    before = scrape(coordinator)
    assert value(before, "fedge_rounds_total", outcome="closed") == 0
    assert value(before, "fedge_uploads_total", result="accepted", reason="") == 0
    with fleet_of(coordinator, 2) as fleet:
        assert value(scrape(coordinator), "fedge_devices", state="seen") == 2
        task_id = create_task(coordinator, aggregation=every_device(2, rounds=2))
        sent = 0
        works = []
        for device in fleet:
            work = device.work(wait=5)
            assert work is not None
            body = make_update(
                work, delta=random_delta(spec_of(work), rng), num_examples=10, rng=rng
            )
            r = device.upload(work, body)
            assert r.status_code == 201, r.text
            sent += len(body)
            works.append((device, work, body))
        # A second upload for the same assignment is refused (409 already_uploaded).
        device, work, body = works[0]
        refused = device.upload(work, body, key="another-key")
        assert refused.status_code == 409
        assert refused.json()["error"] == "already_uploaded"

        db.wait_round(task_id, 1, closed=True)
        after = wait_until(
            lambda: (
                (s := scrape(coordinator))
                and value(s, "fedge_rounds_total", outcome="closed") == 1
                and s
            )
        )
    assert value(after, "fedge_uploads_total", result="accepted", reason="") == 2
    assert value(after, "fedge_uploads_total", result="refused", reason="already_uploaded") == 1
    assert value(after, "fedge_rounds_total", outcome="failed") == 0
    assert value(after, "fedge_model_versions_total") == 1
    assert value(after, "fedge_aggregation_seconds_count") == 1
    assert value(after, "fedge_aggregation_seconds_sum") > 0
    # Request bodies of the upload route: the two accepted bodies and the refused one.
    assert value(after, "fedge_device_received_bytes_total", route=UPLOAD) == sent + len(body)
    # The work answers (assignments as JSON) went out on the work route.
    work_sent = value(after, "fedge_device_sent_bytes_total", route=WORK)
    assert work_sent > 0
    assert value(after, "fedge_http_requests_total", route=UPLOAD, method="POST", status="201") == 2
    assert value(after, "fedge_http_requests_total", route=UPLOAD, method="POST", status="409") == 1
    assert value(after, "fedge_tasks", status="running") == 1
    assert value(after, "fedge_long_poll_waiters") == 0
    # Round 2 opened on version 1 for the same two devices.
    assert db.round(task_id, 2) is not None


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_metrics_can_be_disabled(
    tmp_path: Path, tls_paths: TlsPaths, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Off: /metrics is 404, and refused uploads are still logged."""
    caplog.set_level(logging.WARNING, logger="fedge.coordinator")
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        tls_cert=tls_paths.server_cert,
        tls_key=tls_paths.server_key,
        metrics_enabled=False,
    )
    key = make_key(settings, "admin")
    with serve_in_thread(
        create_app(settings), certfile=settings.tls_cert, keyfile=settings.tls_key
    ) as url:
        c = Coordinator(url, settings, create_app(settings), tls_paths.ca_cert, key, key)
        with c.admin() as admin:
            r = admin.get("/metrics")
        with fleet_of(c, 1) as (device,):
            refused = device.upload({"upload_url": "/api/v1/device/assignments/999/update"}, b"x")
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"
    assert refused.status_code == 404
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "upload.refused"]
    assert record.__dict__["device"] == device.device_id
    assert record.__dict__["error"] == "not_found" and record.__dict__["assignment"] == 999


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_several_workers_count_into_one_exposition(
    settings: Settings, tls_paths: TlsPaths, tmp_path: Path
) -> None:
    """``serve --workers 2``: whichever worker answers the scrape reports the requests of
    both (prometheus-client's multiprocess mode, in the directory the environment names)."""
    shared = tmp_path / "prometheus"
    (shared / "stale.db").parent.mkdir()
    (shared / "stale.db").write_bytes(b"left over from an earlier run")
    with coordinator_process(
        settings,
        tmp_path / "sup",
        ca_file=tls_paths.ca_cert,
        args=["--workers", "2"],
        env={"PROMETHEUS_MULTIPROC_DIR": str(shared)},
    ) as proc:
        viewer = make_key(settings, "viewer")
        probes = 30
        for _ in range(probes):  # a new connection each: the kernel spreads them
            with proc.client() as client:
                assert client.get("/healthz").status_code == 200
        assert not (shared / "stale.db").exists()
        # Files of both workers (one per process and metric type).
        pids = {p.stem.rsplit("_", 1)[1] for p in shared.glob("counter_*.db")}
        assert len(pids) == 2
        for _ in range(6):
            with proc.client(viewer) as client:
                r = client.get("/metrics")
            assert r.status_code == 200, r.text
            samples = {
                (s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(r.text)
                for s in family.samples
            }
            healthz = ("/healthz", "GET", "200")
            key = (
                "fedge_http_requests_total",
                frozenset(zip(("route", "method", "status"), healthz, strict=True)),
            )
            assert samples[key] == probes
