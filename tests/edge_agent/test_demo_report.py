"""The demo's traffic figures: socket bytes per device and for the fleet, the dense estimate
and its ratios, the bodies apart, and the printed summary."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.edge_agent.client import Traffic
from fedge.edge_agent.sim.demo_report import (
    TLS_RECORD_OVERHEAD,
    TLS_RECORD_PLAINTEXT,
    body_traffic,
    dense_body_sizes,
    socket_traffic,
    traffic_lines,
)
from fedge.edge_agent.sim.fleet import DeviceSocket, FleetStats
from fedge.edge_agent.sim.relay import Counts
from fedge.shared import architectures
from fedge.shared.compression import compress
from fedge.shared.policy import CompressionPolicy
from fedge.shared.wire import decode_model, decode_update, encode_model, encode_update

MODEL = {"architecture": "mlp", "input_dim": 64, "num_classes": 10, "hidden": [128], "seed": 0}
TLS = 1 + TLS_RECORD_OVERHEAD / TLS_RECORD_PLAINTEXT


def test_dense_bodies_are_float32_wire_bodies_of_the_model() -> None:
    update_bytes, model_bytes = dense_body_sizes(MODEL)
    params = architectures.build_spec(MODEL).num_params
    assert params == 64 * 128 + 128 + 128 * 10 + 10
    # 4 bytes per parameter plus headers and descriptors, nothing else
    assert 4 * params < update_bytes < 4 * params + 512
    assert 4 * params < model_bytes < 4 * params + 512
    # a compressed update of the same model is far smaller
    weights = architectures.init_weights(MODEL, np.random.default_rng(3))
    small = compress(
        weights, CompressionPolicy(topk_fraction=0.02, bits=4, chunk=64), np.random.default_rng(4)
    )
    small_bytes = len(encode_update(small, task_id=1, base_version=1, num_examples=1))
    assert small_bytes * 20 < update_bytes


def test_the_dense_update_is_the_whole_model_in_float32() -> None:
    """The size the estimate uses is that of an update carrying every parameter as float32:
    one of another model's weights of the same shapes has the same size and decodes whole."""
    update_bytes, model_bytes = dense_body_sizes(MODEL)
    weights = architectures.init_weights(MODEL, np.random.default_rng(9))
    dense = compress(
        weights,
        CompressionPolicy(topk_fraction=1.0, bits=32, error_feedback=False),
        np.random.default_rng(1),
    )
    body = encode_update(dense, task_id=1, base_version=1, num_examples=1)
    assert len(body) == update_bytes
    decoded = decode_update(body)
    assert (decoded.bits, decoded.topk_fraction) == (32, 1.0)
    model = encode_model(weights)
    assert len(model) == model_bytes
    restored = decode_model(model)
    for name, array in weights.items():
        np.testing.assert_array_equal(restored[name], array)


def _socket(index: int, up: int, down: int, enroll: tuple[int, int] = (900, 2500)) -> DeviceSocket:
    return DeviceSocket(index, Counts(*enroll, 1), Counts(up, down, 2))


def test_socket_traffic_sums_devices_and_estimates_dense_from_the_bodies() -> None:
    sockets = [_socket(0, 10_000, 90_000), _socket(1, 6_000, 50_000, enroll=(800, 2400))]
    clients = [
        Traffic(upload_bytes=1_200, uploads=3, model_bytes=80_000, downloads=2, not_modified=1),
        Traffic(upload_bytes=400, uploads=1, model_bytes=40_000, downloads=1),
    ]
    t = socket_traffic(sockets, clients, dense_update_bytes=40_000, dense_model_bytes=40_000)
    assert (t["upload"], t["download"], t["total"]) == (16_000, 140_000, 156_000)
    assert t["enrollment"] == {"upload": 1_700, "download": 4_900, "total": 6_600}
    assert t["connections"] == 4 and t["devices"] == 2

    d0 = t["per_device"][0]
    assert (d0["upload"], d0["download"], d0["total"]) == (10_000, 90_000, 100_000)
    assert d0["updates"] == 3 and d0["update_body_bytes"] == 1_200 and d0["not_modified"] == 1
    # three dense updates instead of 1,200 body bytes; the model bodies were dense already
    assert d0["dense_estimate"]["upload"] == 10_000 + round((120_000 - 1_200) * TLS)
    assert d0["dense_estimate"]["download"] == 90_000
    assert d0["ratio_vs_dense"]["upload"] == pytest.approx(d0["dense_estimate"]["upload"] / 10_000)
    assert d0["ratio_vs_dense"]["download"] == pytest.approx(1.0)

    dense = t["dense_estimate"]
    assert dense["upload"] == sum(d["dense_estimate"]["upload"] for d in t["per_device"])
    assert dense["total"] == dense["upload"] + dense["download"]
    assert t["ratio_vs_dense"]["total"] == pytest.approx(dense["total"] / 156_000)
    assert 1.0 < t["ratio_vs_dense"]["total"] < t["ratio_vs_dense"]["upload"]
    assert "estimate" in dense["method"]


def test_smaller_model_bodies_show_in_the_download_ratio() -> None:
    """Model deltas (smaller model bodies) raise the download ratio by what they saved."""
    sockets = [_socket(0, 5_000, 30_000)]
    clients = [Traffic(upload_bytes=500, uploads=1, model_bytes=8_000, downloads=2)]
    t = socket_traffic(sockets, clients, dense_update_bytes=40_000, dense_model_bytes=40_000)
    assert t["dense_estimate"]["download"] == 30_000 + round(72_000 * TLS)
    assert t["ratio_vs_dense"]["download"] == pytest.approx((30_000 + round(72_000 * TLS)) / 30_000)


def test_socket_traffic_needs_one_body_count_per_device() -> None:
    with pytest.raises(ValueError, match="one socket count"):
        socket_traffic([_socket(0, 1, 1)], [], dense_update_bytes=1, dense_model_bytes=1)


def test_a_device_without_traffic_has_no_ratio() -> None:
    t = socket_traffic([_socket(0, 0, 0)], [Traffic()], dense_update_bytes=10, dense_model_bytes=10)
    assert t["ratio_vs_dense"] == {"upload": None, "download": None, "total": None}
    assert "-" in "\n".join(traffic_lines({"socket": t, "bodies": _bodies()}))


def _bodies() -> dict[str, object]:
    stats = FleetStats(
        upload_bytes=1_600,
        uploads=4,
        model_bytes=120_000,
        downloads=3,
        uploads_by_base_version={0: (2, 900), 1: (2, 700)},
    )
    return body_traffic(stats, 1_000, [0, 1, 2], 1, dense_model_bytes=40_000)


def test_body_traffic_counts_bodies_against_float32() -> None:
    b = _bodies()
    assert b["dense_upload_bytes"] == 4 * 4 * 1_000
    assert b["compression_ratio"] == pytest.approx(16_000 / 1_600)
    assert b["dense_model_bytes"] == 3 * 40_000
    assert b["cumulative"] == [
        {"version": 0, "upload_bytes": 0, "dense_bytes": 0},
        {"version": 1, "upload_bytes": 900, "dense_bytes": 8_000},
        {"version": 2, "upload_bytes": 1_600, "dense_bytes": 16_000},
    ]


def test_printed_traffic_shows_socket_and_bodies_apart() -> None:
    sockets = [_socket(0, 10_000, 90_000), _socket(1, 6_000, 50_000)]
    clients = [
        Traffic(upload_bytes=1_200, uploads=3, model_bytes=80_000, downloads=2),
        Traffic(upload_bytes=400, uploads=1, model_bytes=40_000, downloads=1),
    ]
    t = socket_traffic(sockets, clients, dense_update_bytes=40_000, dense_model_bytes=40_000)
    text = "\n".join(traffic_lines({"socket": t, "bodies": _bodies()}))
    up = t["ratio_vs_dense"]["upload"]
    assert "    upload     16.0 kB" in text
    assert f"{up:.1f}x" in text
    assert "download    140.0 kB" in text and "total    156.0 kB" in text
    assert "estimate" in text
    # one row per device, then the bodies on their own line
    assert "     0        3       2    10.0 kB    90.0 kB   100.0 kB" in text
    assert "bodies alone: 4 update bodies 1.6 kB" in text
