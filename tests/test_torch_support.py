"""Without PyTorch the adapter's tests skip with the reason, except under CI=true, where
the run fails (tests/support/torch_support.py)."""

from __future__ import annotations

import sys

import pytest

from tests.support.torch_support import require_torch


def test_absent_torch_skips_outside_ci_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails as if absent
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="make install-torch"):
        require_torch()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but PyTorch is not installed"):
        require_torch()
