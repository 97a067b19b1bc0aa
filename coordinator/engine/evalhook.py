"""Optional server-side evaluation of each new model version.

``settings.eval_hook = "package.module:function"`` names a callable
``function(model_config: dict, weights: dict[str, np.ndarray]) -> dict[str, float]`` (for
example, accuracy on a held-out set the operator keeps on the server). It runs after each
aggregation, before the new version commits; its result is stored in ``ModelVersion.metrics``
and, prefixed with ``server_``, in ``Round.metrics``. A hook that raises or returns something
other than finite numbers is logged and ignored: evaluation never blocks training.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EvalHook = Callable[[dict[str, Any], dict[str, np.ndarray]], Mapping[str, Any]]


class EvalHookError(ValueError):
    """The configured hook cannot be loaded."""


def load_hook(spec: str | None) -> EvalHook | None:
    """Import ``module:function``; ``None`` when no hook is configured."""
    if not spec:
        return None
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise EvalHookError(f"eval_hook must look like 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EvalHookError(f"eval_hook module {module_name!r} cannot be imported: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise EvalHookError(f"eval_hook: {module_name!r} has no attribute {attr!r}")
    if not callable(target):
        raise EvalHookError(f"eval_hook {spec!r} is not callable")
    hook: EvalHook = target
    return hook


def run_hook(
    hook: EvalHook | None, model_config: dict[str, Any], weights: dict[str, np.ndarray]
) -> dict[str, float]:
    """The hook's finite numeric metrics, or ``{}`` when there is no hook or it fails."""
    if hook is None:
        return {}
    try:
        result = hook(dict(model_config), weights)
    except Exception:
        log.exception("server-side evaluation hook failed; continuing without its metrics")
        return {}
    if not isinstance(result, Mapping):
        log.warning("eval hook returned %s, not a mapping; ignored", type(result).__name__)
        return {}
    metrics: dict[str, float] = {}
    for key, value in result.items():
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            continue
        number = float(value)
        if math.isfinite(number):
            metrics[str(key)] = number
    return metrics
