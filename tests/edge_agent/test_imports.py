"""The agent package runs on a device with only numpy, httpx and cryptography installed."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import fedge.edge_agent

FORBIDDEN = (
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
    "torch",
)
# Opt-in adapters for a user's own model: imported by name when a task's trainer points at
# them, each needing its library (the torch extra, scikit-learn). Nothing else imports them.
ADAPTERS = {"fedge.edge_agent.torch_adapter", "fedge.edge_agent.sklearn_adapter"}


def test_importing_every_agent_module_pulls_in_no_server_or_demo_dependency():
    modules = [
        m.name
        for m in pkgutil.walk_packages(fedge.edge_agent.__path__, "fedge.edge_agent.")
        if m.name not in ADAPTERS
    ]
    expected = {
        "fedge.edge_agent.agent",
        "fedge.edge_agent.client",
        "fedge.edge_agent.cli",
        "fedge.edge_agent.sim.demo",
    }
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
    assert not loaded & ADAPTERS
    # Not the coordinator, and nothing of ours outside the fedge namespace.
    bare = {"shared", "coordinator", "edge_agent", "migrations"}
    assert sorted(n for n in loaded if n.split(".")[0] in bare) == []
    assert sorted(n for n in loaded if n.split(".")[:2] == ["fedge", "coordinator"]) == []
    assert {"numpy", "httpx", "cryptography"} <= {name.split(".")[0] for name in loaded}
