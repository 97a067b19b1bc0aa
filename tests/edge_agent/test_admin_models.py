"""`fedge admin` for custom models against a real coordinator: initial weights from a file
(no curl), downloads as wire, npz and safetensors, and what happens without PyTorch."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from fedge.edge_agent import admin_cli, model_cli
from fedge.shared import architectures
from fedge.shared.modelfiles import read_model_file, write_model_file
from fedge.shared.wire import decode_model, encode_model
from tests.edge_agent.conftest import SOFTMAX, LiveCoordinator


def _run(live: LiveCoordinator, capsys, *args: str) -> tuple[int, dict | str]:
    capsys.readouterr()
    argv = ["--url", live.url, "--ca", live.ca_file, "--key", live.admin_key, *args]
    status = admin_cli.main(argv)
    out, err = capsys.readouterr()
    return status, (json.loads(out) if status == 0 else err)


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "conv": rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
        "head": rng.standard_normal(5).astype(np.float32),
    }


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".bin"])
def test_a_custom_model_starts_from_a_weights_file(live, tmp_path, capsys, suffix) -> None:
    weights = _weights(np.random.default_rng(0))
    path = tmp_path / f"init{suffix}"
    if suffix == ".bin":
        path.write_bytes(encode_model(weights))
    else:
        write_model_file(path, weights, fmt=suffix[1:])
    body = tmp_path / "task.json"
    body.write_text(json.dumps({"name": "custom", "training": {"trainer": "mypkg.m:trainer"}}))
    status, task = _run(
        live, capsys, "tasks", "create", "--file", str(body), "--weights", str(path)
    )
    assert status == 0, task
    assert task["model"] == {
        "spec": [{"name": "conv", "shape": [2, 1, 3, 3]}, {"name": "head", "shape": [5]}]
    }
    assert task["current_version"] == 0
    v0 = decode_model(live.admin.download_model(task["id"], 0))
    assert all(v0[n].tobytes() == w.tobytes() for n, w in weights.items())


def test_models_upload_checks_the_file_against_the_task(live, tmp_path, capsys) -> None:
    weights = _weights(np.random.default_rng(1))
    spec = [{"name": n, "shape": list(w.shape)} for n, w in weights.items()]
    task = live.create_task(model={"spec": spec}, training={"trainer": "m:t"}, start=False)
    wrong = tmp_path / "wrong.npz"
    write_model_file(wrong, {**weights, "head": np.zeros(4, np.float32)}, fmt="npz")
    status, err = _run(live, capsys, "models", "upload", str(task["id"]), str(wrong))
    assert status == 2 and "head" in err and "shape" in err  # a file that does not fit: usage
    assert live.task(task["id"])["current_version"] == -1
    # the file's tensor order does not matter: the task's spec orders them
    right = tmp_path / "right.safetensors"
    write_model_file(right, dict(reversed(list(weights.items()))), fmt="safetensors")
    status, _ = _run(live, capsys, "models", "upload", str(task["id"]), str(right))
    assert status == 0 and live.task(task["id"])["current_version"] == 0


def test_downloads_in_every_format_hold_the_same_values(live, tmp_path, capsys) -> None:
    task = live.create_task(start=False)
    wire = live.admin.download_model(task["id"], 0)
    want = decode_model(wire)
    for name, fmt in (("m.bin", "wire"), ("m.npz", "npz"), ("m.safetensors", "safetensors")):
        out = tmp_path / name
        status, got = _run(
            live, capsys, "models", "download", str(task["id"]), "0", "--out", str(out)
        )
        assert status == 0 and got["format"] == fmt
    assert (tmp_path / "m.bin").read_bytes() == wire
    for name in ("m.npz", "m.safetensors"):
        stored = read_model_file(tmp_path / name)
        assert stored.model == live.task(task["id"])["model"]
        assert all(stored.weights[n].tobytes() == w.tobytes() for n, w in want.items())
        # a built-in model is usable at once
        clf = architectures.load(tmp_path / name)
        X = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
        expected = architectures.forward(SOFTMAX, want, X).argmax(axis=1)
        np.testing.assert_array_equal(clf.predict(X), expected)
    # --format wins over the suffix
    out = tmp_path / "model.data"
    status, got = _run(
        live,
        capsys,
        "models",
        "download",
        str(task["id"]),
        "0",
        "--out",
        str(out),
        "--format",
        "safetensors",
    )
    assert status == 0 and read_model_file(out).weights.keys() == want.keys()


def test_without_pytorch_the_commands_say_how_to_get_it(
    live, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails as if absent
    monkeypatch.delitem(sys.modules, "fedge.edge_agent.torch_adapter", raising=False)
    task = live.create_task(start=False)
    status, err = _run(
        live, capsys, "models", "download", str(task["id"]), "0", "--out", str(tmp_path / "m.pt")
    )
    assert status == 1 and "pip install 'fedge[torch]'" in err
    assert not (tmp_path / "m.pt").exists()
    assert model_cli.main(["init", "mypkg:build", "--out", str(tmp_path / "init")]) == 1
    assert "pip install 'fedge[torch]'" in capsys.readouterr().err
