"""PyTorch for the adapter's tests: skipped with the reason when the ``torch`` extra is not
installed, but under ``CI=true`` its absence fails the run (``make test`` installs it there),
as the PostgreSQL leg does (tests/conftest.py)."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

from tests.support import databases


def require_torch() -> ModuleType:
    """The ``torch`` module, or a skip (a failure in CI) saying why it is missing."""
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        reason = f"PyTorch is not installed ({exc}); `make install-torch` adds the torch extra"
        if databases.in_ci():
            pytest.fail(f"CI=true but {reason}: the PyTorch tests must run")
        pytest.skip(reason, allow_module_level=True)
