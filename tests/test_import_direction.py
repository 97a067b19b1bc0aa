"""The import rules between fedge's packages, and the edge agent's light footprint.

* ``shared`` imports neither ``coordinator`` nor ``edge_agent``; ``edge_agent`` never imports
  ``coordinator``; ``coordinator`` never imports ``edge_agent`` (checked on the source with
  ``ast``, so a violation inside a function counts too).
* Nothing in ``edge_agent`` outside ``edge_agent/sim`` imports ``edge_agent.sim`` (the fleet
  simulation: demo, faults): the agent core runs on devices and knows no simulation. ``shared``
  and ``coordinator`` import no ``edge_agent`` at all, so not its simulation either.
* The modules of ``shared`` import each other without a cycle, counting imports under
  ``TYPE_CHECKING`` and inside functions (a cycle there is a tangle even when it runs).
* Files are replaced durably in one place, ``shared/durable.py``: no other module of the three
  packages calls ``os.replace``, ``os.fsync`` or ``tempfile.mkstemp``.
* ``edge_agent`` and ``shared``, every module of them, import on a plain install (numpy, httpx,
  cryptography and their own dependencies): a fresh interpreter whose import system refuses
  everything else imports them all. The coordinator's and the demo's dependencies must not even
  be attempted at import time; demo and fleet code imports them inside functions.
"""

from __future__ import annotations

import ast
import graphlib
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "shared": {"coordinator", "edge_agent"},
    "edge_agent": {"coordinator"},
    "coordinator": {"edge_agent"},
}
# Must never be attempted at import time by shared or edge_agent, even inside try/except.
HEAVY = [
    "fastapi",
    "starlette",
    "sqlalchemy",
    "alembic",
    "uvicorn",
    "pydantic_settings",
    "psycopg",
    "sklearn",
    "matplotlib",
    "tqdm",
]


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imported_modules(source: str, *, module: str, is_package: bool = False) -> set[str]:
    """Every module named by an import statement or by ``importlib.import_module("...")`` /
    ``__import__("...")`` with a literal name, anywhere in ``source``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(_absolute(node, module, is_package))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            value = getattr(node.args[0], "value", None)
            if name in {"import_module", "__import__"} and isinstance(value, str):
                found.add(value)
    return found


def violations(package: str) -> list[str]:
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT)
        is_package = path.name == "__init__.py"
        parts = rel.with_suffix("").parts
        module = ".".join(parts[:-1] if is_package else parts)
        source = path.read_text(encoding="utf-8")
        for name in sorted(imported_modules(source, module=module, is_package=is_package)):
            if name.partition(".")[0] in FORBIDDEN[package]:
                problems.append(f"{rel} imports {name}")
    return problems


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_in_the_allowed_direction(package: str) -> None:
    assert (ROOT / package / "__init__.py").is_file()
    assert violations(package) == []


@pytest.mark.parametrize(
    "source",
    [
        "import coordinator",
        "import coordinator.models as m",
        "from coordinator.db import utcnow",
        "def f():\n    from coordinator import app\n",
        "import importlib\nimportlib.import_module('coordinator.cli')",
    ],
)
def test_the_checker_sees_every_form_of_import(source: str) -> None:
    names = imported_modules(source, module="edge_agent.x.y")
    assert any(n.partition(".")[0] == "coordinator" for n in names), names


def test_relative_imports_resolve_inside_the_package() -> None:
    assert imported_modules("from . import signing", module="shared.cli") == {"shared"}
    assert imported_modules("from .wire import x", module="shared", is_package=True) == {
        "shared.wire"
    }


SIM = "edge_agent.sim"


def imported_names(source: str, *, module: str, is_package: bool = False) -> set[str]:
    """:func:`imported_modules` plus ``package.name`` for every ``from package import name``
    (``name`` may be a submodule: ``from edge_agent import sim``)."""
    found = imported_modules(source, module=module, is_package=is_package)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            found.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
    return found


def sim_violations(root: Path) -> list[str]:
    """Modules of the agent core (``edge_agent`` outside ``edge_agent/sim``) that import the
    simulation."""
    problems = []
    for path in sorted((root / "edge_agent").rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[:2] == ("edge_agent", "sim"):
            continue
        is_package = path.name == "__init__.py"
        parts = rel.with_suffix("").parts
        module = ".".join(parts[:-1] if is_package else parts)
        source = path.read_text(encoding="utf-8")
        for name in sorted(imported_names(source, module=module, is_package=is_package)):
            if name == SIM or name.startswith(SIM + "."):
                problems.append(f"{rel} imports {name}")
    return problems


def test_the_agent_core_never_imports_the_simulation() -> None:
    assert (ROOT / "edge_agent" / "sim" / "__init__.py").is_file()
    assert sim_violations(ROOT) == []


@pytest.mark.parametrize(
    "source",
    [
        "from edge_agent.sim.faults import FaultHooks",
        "import edge_agent.sim",
        "from edge_agent import sim",
        "from .sim import fleet",
        "from . import sim",
        "def f():\n    import edge_agent.sim.demo\n",
        "import importlib\nimportlib.import_module('edge_agent.sim.fleet')",
    ],
)
def test_the_simulation_rule_catches_an_import_from_the_core(tmp_path: Path, source: str) -> None:
    package = tmp_path / "edge_agent"
    (package / "sim").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sim" / "__init__.py").write_text("from edge_agent.agent import Agent\n")
    (package / "sim" / "fleet.py").write_text("from edge_agent.sim.faults import FaultHooks\n")
    (package / "agent.py").write_text("from edge_agent.hooks import AgentHooks\n")
    (package / "simulated.py").write_text("import edge_agent.simulated_io\n")
    assert sim_violations(tmp_path) == []
    (package / "agent.py").write_text(source + "\n")
    found = sim_violations(tmp_path)
    assert found, source
    assert all(v.startswith("edge_agent/agent.py imports edge_agent.sim") for v in found), found


def module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """For each module of ``package``, the modules of ``package`` it imports (any import
    statement anywhere in it; ``from pkg import mod`` imports ``pkg.mod``)."""
    sources: dict[str, tuple[str, bool]] = {}
    for path in sorted((root / package).rglob("*.py")):
        is_package = path.name == "__init__.py"
        parts = path.relative_to(root).with_suffix("").parts
        sources[".".join(parts[:-1] if is_package else parts)] = (
            path.read_text(encoding="utf-8"),
            is_package,
        )
    graph: dict[str, set[str]] = {}
    for module, (source, is_package) in sources.items():
        names = imported_modules(source, module=module, is_package=is_package)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom):
                base = _absolute(node, module, is_package)
                names.update(f"{base}.{alias.name}" for alias in node.names)
        graph[module] = {name for name in names if name in sources and name != module}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (its first module repeated at the end), or ``[]``."""
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return []


def test_shared_modules_import_each_other_without_a_cycle() -> None:
    graph = module_graph(ROOT, "shared")
    assert {"shared.compression", "shared.feedback", "shared.wire"} <= set(graph)
    assert import_cycle(graph) == []


def test_the_cycle_check_sees_type_checking_and_function_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.b\n"
    )
    (pkg / "b.py").write_text("def f():\n    from pkg import c\n")
    (pkg / "c.py").write_text("from .a import x\n")
    (pkg / "d.py").write_text("from pkg import a\n")
    cycle = import_cycle(module_graph(tmp_path, "pkg"))
    assert sorted(set(cycle)) == ["pkg.a", "pkg.b", "pkg.c"]
    (pkg / "c.py").write_text("")
    assert import_cycle(module_graph(tmp_path, "pkg")) == []


DURABLE_WRITE_CALLS = {("os", "replace"), ("os", "fsync"), ("tempfile", "mkstemp")}


def durable_write_calls(source: str) -> list[str]:
    """``os.replace``/``os.fsync``/``tempfile.mkstemp`` calls in ``source``, as written."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = getattr(node.func.value, "id", None)
            if (owner, node.func.attr) in DURABLE_WRITE_CALLS:
                found.append(f"{owner}.{node.func.attr}")
    return found


def test_files_are_replaced_durably_only_in_shared_durable() -> None:
    helper = ROOT / "shared" / "durable.py"
    assert durable_write_calls(helper.read_text(encoding="utf-8"))
    elsewhere = {
        str(path.relative_to(ROOT)): calls
        for package in sorted(FORBIDDEN)
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != helper and (calls := durable_write_calls(path.read_text(encoding="utf-8")))
    }
    assert elsewhere == {}, "use shared.durable.write_atomic / write_bytes_atomic"


def plain_install_modules() -> list[str]:
    """Top-level modules provided by fedge's base dependencies (no extras), transitively."""
    seen: set[str] = set()
    todo = ["fedge"]
    while todo:
        for spec in metadata.requires(todo.pop()) or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = canonicalize_name(req.name)
            if name not in seen:
                seen.add(name)
                todo.append(name)
    assert {"numpy", "httpx", "cryptography"} <= seen
    provided = metadata.packages_distributions()
    return sorted(
        module
        for module, dists in provided.items()
        if any(canonicalize_name(d) in seen for d in dists)
    )


PROBE = r"""
import importlib, importlib.abc, json, pkgutil, sys

heavy = set(json.loads(sys.argv[1]))
roots = json.loads(sys.argv[3])
allowed = set(json.loads(sys.argv[2])) | set(roots)
attempts = []


class PlainInstall(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top in heavy or (top not in allowed and top not in sys.stdlib_module_names):
            attempts.append(fullname)
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


preloaded = sorted(m for m in sys.modules if m.partition(".")[0] in heavy | set(roots))
sys.meta_path.insert(0, PlainInstall())
results = {}


def visit(name):
    before = len(attempts)
    try:
        module = importlib.import_module(name)
        error = None
    except BaseException as exc:
        module, error = None, f"{type(exc).__name__}: {exc}"
    results[name] = {"error": error, "attempted": attempts[before:]}
    if module is not None and hasattr(module, "__path__"):
        for info in pkgutil.iter_modules(module.__path__, name + "."):
            visit(info.name)


for root in roots:
    visit(root)
print(json.dumps({"preloaded": preloaded, "results": results}))
"""


def probe(roots: list[str], *, cwd: Path) -> dict:
    """Import ``roots`` and all their submodules in a fresh interpreter that only has the
    plain install's modules; report per module."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *map(json.dumps, (HEAVY, plain_install_modules(), roots))],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def heavy_attempts(result: dict) -> list[str]:
    return [a for a in result["attempted"] if a.partition(".")[0] in HEAVY]


def test_agent_and_shared_import_on_a_plain_install() -> None:
    report = probe(["shared", "edge_agent"], cwd=ROOT)
    assert report["preloaded"] == []
    results = report["results"]
    assert "edge_agent" in results and "shared.signing" in results
    failures = {name: r["error"] for name, r in results.items() if r["error"]}
    attempts = {name: heavy_attempts(r) for name, r in results.items()}
    assert failures == {}, f"modules that do not import on a plain install: {failures}"
    assert {k: v for k, v in attempts.items() if v} == {}, (
        "modules that try the coordinator's or the demo's dependencies at import time "
        "(import them inside the functions that need them)"
    )


def test_the_probe_catches_a_heavy_import(tmp_path: Path) -> None:
    """The probe can fail: it reports heavy imports (even guarded ones) and modules that need
    anything beyond the plain install, and leaves imports inside functions alone."""
    sample = tmp_path / "fedge_probe_sample"
    sample.mkdir()
    (sample / "__init__.py").write_text("import numpy\nimport httpx\n")
    (sample / "guarded.py").write_text("try:\n    import tqdm\nexcept ImportError:\n    pass\n")
    (sample / "eager.py").write_text("import json\nimport sqlalchemy\n")
    (sample / "lazy.py").write_text("def plot():\n    import matplotlib\n")
    (sample / "other.py").write_text("import some_unlisted_dependency\n")
    report = probe(["fedge_probe_sample"], cwd=tmp_path)["results"]
    results = {name: (r["error"], heavy_attempts(r)) for name, r in report.items()}
    assert results["fedge_probe_sample"] == (None, [])
    assert results["fedge_probe_sample.lazy"] == (None, [])
    assert results["fedge_probe_sample.guarded"] == (None, ["tqdm"])
    assert results["fedge_probe_sample.eager"][0].startswith("ModuleNotFoundError")
    assert results["fedge_probe_sample.eager"][1] == ["sqlalchemy"]
    assert results["fedge_probe_sample.other"][0].startswith("ModuleNotFoundError")
