"""Headless Chromium for browser tests: Debian's ``chromium`` driven by Playwright for Python
(never ``playwright install``: the browser is the system's). Without a browser the tests skip,
except under CI=true, where they fail (.ci/run installs the package)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.support.databases import in_ci

#: Where Debian's package puts it; TEST_CHROMIUM names another.
CHROMIUM_ENV = "TEST_CHROMIUM"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = os.environ.get(CHROMIUM_ENV) or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        message = f"no Chromium at {path} (apt-get install chromium, or set {CHROMIUM_ENV})"
        if in_ci():
            pytest.fail(f"CI=true but {message}: the browser tests must run")
        pytest.skip(message)
    return path


@contextmanager
def chromium() -> Iterator[Any]:
    """A launched headless browser (``playwright.sync_api.Browser``)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - playwright is a dev dependency
        if in_ci():
            pytest.fail(f"playwright is not importable: {exc}")
        pytest.skip(f"playwright is not importable: {exc}")
    path = chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()
