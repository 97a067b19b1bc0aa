"""An agent-only install: `pip install .` into a fresh virtual environment.

The plain distribution is what goes on a device. It must give a working `fedge agent`,
install none of the coordinator's or the demo's libraries, and `fedge coordinator` must say
which extra to install instead of failing with a traceback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER_LIBS = ["fastapi", "starlette", "sqlalchemy", "alembic", "uvicorn", "psycopg", "pydantic"]
DEMO_LIBS = ["sklearn", "matplotlib", "tqdm"]
# The opt-in adapters need their library (tests/test_import_direction.py checks them apart).
ADAPTERS = ["fedge.edge_agent.torch_adapter", "fedge.edge_agent.sklearn_adapter"]


def _copy_source(target: Path) -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        src = ROOT / name.decode()
        if src.is_file():
            dst = target / name.decode()
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


@pytest.mark.slow
def test_plain_install_is_the_agent_only(tmp_path: Path) -> None:
    source = tmp_path / "src"
    _copy_source(source)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        check=True,
        capture_output=True,
    )

    installed = subprocess.run(
        [python, "-m", "pip", "list", "--format=freeze"], check=True, capture_output=True, text=True
    ).stdout.lower()
    names = {line.split("==")[0].replace("_", "-") for line in installed.splitlines()}
    assert {"numpy", "httpx", "cryptography", "fedge"} <= names
    for lib in ("fastapi", "sqlalchemy", "uvicorn", "alembic", "scikit-learn", "matplotlib"):
        assert lib not in names, f"{lib} was installed by a plain install"

    helped = subprocess.run(
        [env_dir / "bin" / "fedge", "agent", "--help"], capture_output=True, text=True
    )
    assert helped.returncode == 0, helped.stderr
    assert "enroll" in helped.stdout and "run" in helped.stdout

    probe = (
        "import sys, importlib, pkgutil, fedge.edge_agent\n"
        "for m in pkgutil.walk_packages(fedge.edge_agent.__path__, 'fedge.edge_agent.'):\n"
        f"    if m.name not in {ADAPTERS!r}:\n"
        "        importlib.import_module(m.name)\n"
        f"bad = [n for n in {SERVER_LIBS + DEMO_LIBS + ['torch']!r} if n in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    imported = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == ""

    # Everything of ours is under the fedge namespace: no top-level `shared` or `coordinator`.
    tops = (
        "import importlib.util, json\n"
        "names = ['fedge', 'shared', 'coordinator', 'edge_agent', 'migrations']\n"
        "print(json.dumps([n for n in names if importlib.util.find_spec(n)]))\n"
    )
    found = subprocess.run(
        [python, "-I", "-c", tops], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert json.loads(found.stdout) == ["fedge"]

    coordinator = subprocess.run(
        [env_dir / "bin" / "fedge", "coordinator", "serve"], capture_output=True, text=True
    )
    assert coordinator.returncode != 0
    assert "pip install 'fedge[coordinator]'" in coordinator.stderr
    assert "Traceback" not in coordinator.stderr
