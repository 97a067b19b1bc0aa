"""The agent package runs on a device with only numpy, httpx and cryptography installed."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import edge_agent

FORBIDDEN = (
    "coordinator",
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "alembic",
    "pydantic",
    "pydantic_settings",
    "psycopg",
    "sklearn",
    "scipy",
    "matplotlib",
    "tqdm",
)


def test_importing_every_agent_module_pulls_in_no_server_or_demo_dependency():
    modules = [m.name for m in pkgutil.walk_packages(edge_agent.__path__, "edge_agent.")]
    expected = {"edge_agent.agent", "edge_agent.client", "edge_agent.cli", "edge_agent.sim.demo"}
    assert expected <= set(modules)
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(json.loads(result.stdout))
    leaked = sorted(name for name in loaded if name.split(".")[0] in FORBIDDEN)
    assert leaked == []
    assert {"numpy", "httpx", "cryptography"} <= {name.split(".")[0] for name in loaded}
