"""End to end: the documented PyTorch CNN (docs/examples/digits_cnn.py, included verbatim in
docs/agent.md) federated by three agents over real HTTPS on digit images [n, 1, 8, 8], set up
and read back with the documented commands."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.support.torch_support import require_torch

torch = require_torch()

from fedge.edge_agent import admin_cli, model_cli  # noqa: E402
from fedge.edge_agent.data import split_local  # noqa: E402
from fedge.edge_agent.torch_adapter import load_into, module_weights  # noqa: E402
from fedge.shared.modelfiles import read_model_file  # noqa: E402
from fedge.shared.wire import decode_model  # noqa: E402
from tests.edge_agent.conftest import LiveCoordinator, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
ROUNDS = 4


def test_the_guide_includes_the_example_verbatim() -> None:
    guide = (ROOT / "docs" / "agent.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", guide, flags=re.DOTALL)
    assert (EXAMPLES / "digits_cnn.py").read_text() in blocks


@pytest.fixture
def digits_cnn(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("digits_cnn")


def _admin(live: LiveCoordinator, capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    argv = ["--url", live.url, "--ca", live.ca_file, "--key", live.admin_key, *args]
    assert admin_cli.main(argv) == 0, capsys.readouterr().err
    return dict(json.loads(capsys.readouterr().out))


@pytest.mark.slow
def test_a_pytorch_cnn_federated_over_https_learns_digits(
    live: LiveCoordinator, digits_cnn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    X, y = digits_cnn.data()
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:400], order[400:]
    shards = np.array_split(train, 3)
    agents = []
    for i, idx in enumerate(shards):
        data = split_local(X[idx], y[idx], eval_fraction=0.2, rng=np.random.default_rng(i))
        agents.append(live.agent(live.enroll(f"cnn-{i}", seed=i), data))
    threads = [live.start(agent, max_rounds=ROUNDS) for agent in agents]
    for agent in agents:
        device_id = agent.state.load_config().device_id
        wait_for(lambda d=device_id: live.admin.get_device(d)["last_seen_at"], what="a poll")

    # `fedge model init` writes what the task starts from
    assert model_cli.main(["init", "digits_cnn:build", "--out", str(tmp_path / "init")]) == 0
    init = json.loads((tmp_path / "init" / "model.json").read_text())
    assert [t["name"] for t in init["spec"]][:6] == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
    ]
    task_file = tmp_path / "task.json"
    task_file.write_text(
        json.dumps(
            {
                "name": "digits-cnn",
                "aggregation": {
                    "mode": "sync",
                    "num_rounds": ROUNDS,
                    "clients_per_round": 3,
                    "over_selection": 0.0,
                    "min_updates": 3,
                    "round_deadline_s": 120,
                },
                # 8-bit updates; every entry (top-k leaves BatchNorm statistics behind)
                "compression": {"topk_fraction": 1.0, "bits": 8, "error_feedback": True},
                "training": {
                    "trainer": "digits_cnn:trainer",
                    "epochs": 2,
                    "batch_size": 32,
                    "lr": 0.05,
                },
            }
        )
    )
    task = _admin(
        live, capsys, "tasks", "create", "--file", str(task_file), "--model", "digits_cnn:build"
    )
    assert task["model"] == init and task["current_version"] == 0
    _admin(live, capsys, "tasks", "start", str(task["id"]))
    wait_for(lambda: live.task(task["id"])["status"] == "completed", timeout=240, what="the task")
    live.finish(threads, timeout=60)

    rounds = live.rounds(task["id"])
    assert [r["status"] for r in rounds] == ["closed"] * ROUNDS
    assert all(r["num_received"] == 3 for r in rounds)
    # the trainer's own metric reached every round, averaged over the devices
    assert all(0.0 <= r["metrics"]["macro_f1"] <= 1.0 for r in rounds)
    assert rounds[-1]["metrics"]["macro_f1"] > rounds[0]["metrics"]["macro_f1"] - 0.1

    # download as a state_dict and load it into the module in one call
    pt = tmp_path / "model.pt"
    got = _admin(live, capsys, "models", "download", str(task["id"]), "--out", str(pt))
    assert got["format"] == "torch"
    model = load_into(digits_cnn.build(), pt)
    with torch.no_grad():
        predicted = model(torch.from_numpy(X[test])).argmax(dim=1).numpy()
    accuracy = float((predicted == y[test]).mean())
    assert accuracy > 0.8, accuracy  # chance is 0.1

    # the other formats hold the same values, bit for bit
    wire = decode_model(live.admin.download_model(task["id"], "latest"))
    assert all(module_weights(model)[n].tobytes() == w.tobytes() for n, w in wire.items())
    for fmt in ("npz", "safetensors"):
        path = tmp_path / f"model.{fmt}"
        _admin(live, capsys, "models", "download", str(task["id"]), "--out", str(path))
        stored = read_model_file(path)
        assert stored.model == init
        assert list(stored.weights) == list(wire)
        assert all(stored.weights[n].tobytes() == w.tobytes() for n, w in wire.items())
