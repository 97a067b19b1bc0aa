"""Custom models for administrators: initial weights from a module or a file, and downloaded
versions written as ``npz``, ``safetensors`` or a PyTorch ``state_dict``.

What ``fedge model init`` and ``fedge admin tasks create --model/--weights``, ``models
upload`` and ``models download --format`` call. The PyTorch parts load
:mod:`fedge.edge_agent.torch_adapter` only when asked for, so everything else works without
the ``torch`` extra.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from fedge.edge_agent.data import DataError
from fedge.shared.modelfiles import format_for_path, read_model_file, write_model_file
from fedge.shared.modelspec import ModelSpec, Weights
from fedge.shared.wire import decode_model, encode_model

__all__ = ["export_model", "init_files", "init_model", "read_weights", "torch_adapter"]

TORCH_HINT = "install the torch extra: pip install 'fedge[torch]'"


def torch_adapter() -> ModuleType:
    """:mod:`fedge.edge_agent.torch_adapter`, or :class:`DataError` saying how to get torch."""
    try:
        return importlib.import_module("fedge.edge_agent.torch_adapter")
    except ModuleNotFoundError as exc:
        if exc.name == "torch" or (exc.name or "").startswith("torch."):
            raise DataError(f"PyTorch is not installed; {TORCH_HINT}") from None
        raise


def read_weights(path: str | Path) -> Weights:
    """Tensors of a weights file: ``.pt``/``.pth`` (a state_dict, needs torch), ``.npz``,
    ``.safetensors`` or the wire format."""
    if format_for_path(path) == "torch":
        weights: Weights = torch_adapter().read_state_dict(path)
        return weights
    return read_model_file(path).weights


def init_model(entry_point: str, *, seed: int = 0) -> tuple[dict[str, Any], Weights]:
    """The ``model`` object (``{"spec": [...]}``) and seeded initial weights of the PyTorch
    module an entry point ``module:function`` builds."""
    model, weights = torch_adapter().init_model(entry_point, seed=seed)
    return dict(model), dict(weights)


def init_files(entry_point: str, out: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """Write ``model.json`` (the task's ``model`` object) and ``weights.safetensors`` for a
    module into ``out``; what was written."""
    model, weights = init_model(entry_point, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.json").write_text(json.dumps(model, indent=2) + "\n")
    size = write_model_file(out / "weights.safetensors", weights, fmt="safetensors", model=model)
    return {
        "model": str(out / "model.json"),
        "weights": str(out / "weights.safetensors"),
        "tensors": len(weights),
        "parameters": ModelSpec.from_weights(weights).num_params,
        "bytes": size,
    }


def upload_body(weights: Weights, spec: ModelSpec | None = None) -> bytes:
    """The wire-format body of ``PUT /tasks/{id}/model`` (ordered as ``spec`` when given)."""
    if spec is not None:
        missing = [n for n in spec.names if n not in weights]
        if missing:
            raise ValueError(f"the weights lack tensors of the task: {missing[:5]}")
        weights = {n: weights[n] for n in spec.names}
        spec.check(weights)
    return encode_model(weights)


def export_model(data: bytes, path: str | Path, *, fmt: str, model: dict[str, Any]) -> int:
    """Write a downloaded model version (wire bytes) as ``fmt``; the bytes written."""
    path = Path(path)
    if fmt == "wire":
        path.write_bytes(data)
        return len(data)
    weights = decode_model(data)
    if fmt == "torch":
        size: int = torch_adapter().save_state_dict(path, weights)
        return size
    return write_model_file(path, weights, fmt=fmt, model=model)
