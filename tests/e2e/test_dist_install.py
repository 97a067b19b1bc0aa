"""`make dist` and the offline install of docs/install.md: build the wheel and sdist, download
the wheel's dependencies into a wheelhouse, install from it alone (`--no-index`) into a fresh
virtual environment, and run the agent's commands there."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from tests.e2e.test_agent_install import _copy_source

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dist_builds_a_wheel_and_sdist_that_install_offline(tmp_path: Path) -> None:
    source = tmp_path / "src"
    _copy_source(source)
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    sdist, wheel = sorted((tmp_path / "dist").iterdir(), key=lambda p: p.suffix)
    assert wheel.name == "fedge-0.1.0-py3-none-any.whl", wheel
    assert sdist.name == "fedge-0.1.0.tar.gz", sdist
    names = zipfile.ZipFile(wheel).namelist()
    assert "fedge/edge_agent/agent.py" in names
    assert "fedge/migrations/versions/0001_initial_schema.py" in names
    assert not any(n.startswith(("tests/", "bench/", "shared/", "coordinator/")) for n in names)
    with tarfile.open(sdist) as tar:
        assert "fedge-0.1.0/pyproject.toml" in tar.getnames()

    wheelhouse = tmp_path / "wheelhouse"
    downloaded = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"),
            *("--dest", str(wheelhouse), "-c", str(ROOT / "constraints.txt"), str(wheel)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert downloaded.returncode == 0, downloaded.stderr[-2000:]

    env_dir = tmp_path / "device"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    installed = subprocess.run(
        [
            *(env_dir / "bin" / "python", "-m", "pip", "install", "--quiet"),
            *("--disable-pip-version-check", "--no-index", "--find-links", str(wheelhouse)),
            "fedge",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    for command in (["agent", "--help"], ["admin", "--help"]):
        ran = subprocess.run(
            [env_dir / "bin" / "fedge", *command], capture_output=True, text=True, check=False
        )
        assert ran.returncode == 0, ran.stderr
    refused = subprocess.run(
        [env_dir / "bin" / "fedge", "coordinator", "init"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 3 and "fedge[coordinator]" in refused.stderr
