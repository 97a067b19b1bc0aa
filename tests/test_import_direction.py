"""The import rules between fedge's packages, and the edge agent's light footprint.

* Installed, the folders ``shared``, ``coordinator``, ``edge_agent`` and ``migrations`` are
  ``fedge.shared``, ``fedge.coordinator``, ... (pyproject.toml maps them). Every import of our
  code, in the packages, the tests, the benchmarks and the container scripts, uses those names,
  and so does every module path written in a string (``python -m``, entry points, patch
  targets, docstrings): with the checkout on ``sys.path`` a bare ``import shared`` would still
  work and load a second copy of every module.
* ``fedge.shared`` imports neither ``fedge.coordinator`` nor ``fedge.edge_agent``;
  ``fedge.edge_agent`` never imports ``fedge.coordinator``; ``fedge.coordinator`` never imports
  ``fedge.edge_agent`` (checked on the source with ``ast``, so a violation inside a function
  counts too).
* Nothing in ``edge_agent`` outside ``edge_agent/sim`` imports ``fedge.edge_agent.sim`` (the fleet
  simulation: demo, faults): the agent core runs on devices and knows no simulation. ``shared``
  and ``coordinator`` import no ``fedge.edge_agent`` at all, so not its simulation either.
* The modules of ``shared`` import each other without a cycle, counting imports under
  ``TYPE_CHECKING`` and inside functions (a cycle there is a tangle even when it runs).
* Files are replaced durably in one place, ``shared/durable.py``: no other module of the three
  packages calls ``os.replace``, ``os.fsync`` or ``tempfile.mkstemp``.
* ``edge_agent`` and ``shared``, every module of them, import on a plain install (numpy, httpx,
  cryptography and their own dependencies): a fresh interpreter whose import system refuses
  everything else imports them all. The coordinator's and the demo's dependencies must not even
  be attempted at import time; demo and fleet code imports them inside functions. The
  exceptions are the opt-in adapters for a user's own model (``ADAPTERS``), which exist to
  use their library: each fails on a plain install for that library alone, and no other
  module imports them (tests/edge_agent/test_imports.py).
"""

from __future__ import annotations

import ast
import graphlib
import importlib
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# The installed namespace, and the folders that are its packages (folder -> module name).
NAMESPACE = "fedge"
FOLDERS = ("shared", "coordinator", "edge_agent", "migrations")
# Folders whose Python files must name our modules the installed way.
CHECKED = (*FOLDERS, "tests", "bench", "docker")
FORBIDDEN = {
    "shared": {"fedge.coordinator", "fedge.edge_agent"},
    "edge_agent": {"fedge.coordinator"},
    "coordinator": {"fedge.edge_agent"},
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


def module_name(rel: Path) -> tuple[str, bool]:
    """The module a file is (``shared/wire.py`` -> ``fedge.shared.wire``: the package folders are
    installed under the namespace; other folders keep their own names), and whether it is a
    package."""
    is_package = rel.name == "__init__.py"
    parts = rel.with_suffix("").parts
    parts = parts[:-1] if is_package else parts
    if parts[0] in FOLDERS:
        parts = (NAMESPACE, *parts)
    return ".".join(parts), is_package


def within(name: str, prefixes: set[str] | str) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or inside one of them."""
    prefixes = {prefixes} if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(package: str) -> list[str]:
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT)
        module, is_package = module_name(rel)
        source = path.read_text(encoding="utf-8")
        for name in sorted(imported_modules(source, module=module, is_package=is_package)):
            if within(name, FORBIDDEN[package]):
                problems.append(f"{rel} imports {name}")
    return problems


def bare_imports(source: str, *, module: str, is_package: bool = False) -> list[str]:
    """Imports in ``source`` of a package folder by its bare name (``shared.wire`` instead of
    ``fedge.shared.wire``), counting ``from shared import wire``."""
    names = imported_modules(source, module=module, is_package=is_package)
    return sorted(name for name in names if name.partition(".")[0] in FOLDERS)


def _submodules(folder: str) -> set[str]:
    """The first-level modules and subpackages of a package folder (``wire``, ``sim``, ...)."""
    found = set()
    for path in (ROOT / folder).rglob("*.py"):
        parts = path.relative_to(ROOT / folder).with_suffix("").parts
        if parts[0] != "__init__":
            found.add(parts[0])
    return found


_BARE_PATH = re.compile(
    "|".join(
        [
            *(
                rf"(?<![\w./-]){folder}\.(?:{'|'.join(sorted(_submodules(folder)))})\b"
                for folder in FOLDERS
            ),
            # Code in a string: ``python -c "import edge_agent"``.
            rf"(?<![\w.])(?:import|from) (?:{'|'.join(FOLDERS)})\b(?![\w./-])",
        ]
    )
)


def bare_paths(source: str) -> list[str]:
    """Module paths in the string literals of ``source`` (docstrings included) that use a bare
    folder name: ``"shared.cli"``, ``"coordinator.engine.x.y"``, ``edge_agent.data:LocalData``,
    ``"import edge_agent"``. ``coordinator.env`` (a file name) is no module, so it does not
    count."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.extend(m.group(0) for m in _BARE_PATH.finditer(node.value))
    return sorted(found)


def python_files() -> list[Path]:
    return [path for folder in CHECKED for path in sorted((ROOT / folder).rglob("*.py"))]


def test_every_import_of_our_code_uses_the_fedge_namespace() -> None:
    files = python_files()
    assert ROOT / "shared" / "cli.py" in files and ROOT / "tests" / "conftest.py" in files
    problems = {}
    for path in files:
        rel = path.relative_to(ROOT)
        module, is_package = module_name(rel)
        source = path.read_text(encoding="utf-8")
        if found := bare_imports(source, module=module, is_package=is_package):
            problems[str(rel)] = found
    assert problems == {}, "import fedge.shared..., fedge.coordinator..., not the bare names"


def test_module_paths_in_strings_use_the_fedge_namespace() -> None:
    problems = {}
    for path in python_files():
        if path == Path(__file__).resolve():
            continue  # its samples name bare paths on purpose
        if found := bare_paths(path.read_text(encoding="utf-8")):
            problems[str(path.relative_to(ROOT))] = found
    assert problems == {}


def test_no_module_is_loaded_under_a_bare_name() -> None:
    """Every test module has been imported by now (collection): none of them, nor anything they
    import, loaded a second copy of our code under the folder names."""
    importlib.import_module("fedge.shared.wire")
    assert sorted(m for m in sys.modules if m.partition(".")[0] in FOLDERS) == []


@pytest.mark.parametrize(
    ("source", "module", "expected"),
    [
        ("import shared.wire", "tests.x", ["shared.wire"]),
        ("from coordinator.db import utcnow", "bench.x", ["coordinator.db"]),
        ("from edge_agent import sim", "tests.x", ["edge_agent"]),
        ("import migrations", "fedge.coordinator.migrate", ["migrations"]),
        ("def f():\n    import shared\n", "tests.x", ["shared"]),
        (
            "import importlib\nimportlib.import_module('coordinator.cli')",
            "tests.x",
            ["coordinator.cli"],
        ),
        ("from fedge.shared.wire import x\nimport fedge.coordinator", "tests.x", []),
        ("from . import wire", "fedge.shared.cli", []),
        ("from .support import x", "tests.e2e", []),
    ],
)
def test_the_namespace_check_sees_bare_imports(
    source: str, module: str, expected: list[str]
) -> None:
    assert bare_imports(source, module=module) == expected


def test_the_string_check_sees_bare_module_paths() -> None:
    source = (
        'X = ["-m", "shared.cli"]\n'
        'Y = "edge_agent.data:LocalData"\n'
        'def f():\n    """See :mod:`coordinator.engine.rounds`."""\n'
        'Z = ["fedge.shared.cli", "coordinator.env", "coordinator.log", "a.shared.wire"]\n'
        'P = "import sys, edge_agent\\nfrom shared import wire"\n'
        'Q = "from fedge.shared import wire; import fedge.edge_agent; from coordinator/"\n'
    )
    assert bare_paths(source) == [
        "coordinator.engine",
        "edge_agent.data",
        "from shared",
        "shared.cli",
    ]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_in_the_allowed_direction(package: str) -> None:
    assert (ROOT / package / "__init__.py").is_file()
    assert violations(package) == []


@pytest.mark.parametrize(
    "source",
    [
        "import fedge.coordinator",
        "import fedge.coordinator.models as m",
        "from fedge.coordinator.db import utcnow",
        "def f():\n    from fedge.coordinator import app\n",
        "from fedge import coordinator",
        "import importlib\nimportlib.import_module('fedge.coordinator.cli')",
        "from ...coordinator import db",
    ],
)
def test_the_checker_sees_every_form_of_import(source: str) -> None:
    names = imported_names(source, module="fedge.edge_agent.x.y")
    assert any(within(n, "fedge.coordinator") for n in names), names


def test_a_rule_matches_whole_module_names() -> None:
    assert within("fedge.coordinator", {"fedge.coordinator"})
    assert within("fedge.coordinator.db", "fedge.coordinator")
    assert not within("fedge.coordinatorx", "fedge.coordinator")
    assert not within("fedge", "fedge.coordinator")


def test_relative_imports_resolve_inside_the_package() -> None:
    assert imported_modules("from . import signing", module="fedge.shared.cli") == {"fedge.shared"}
    assert imported_modules("from .wire import x", module="fedge.shared", is_package=True) == {
        "fedge.shared.wire"
    }
    assert module_name(Path("shared/cli.py")) == ("fedge.shared.cli", False)
    assert module_name(Path("edge_agent/sim/__init__.py")) == ("fedge.edge_agent.sim", True)
    assert module_name(Path("tests/e2e/test_x.py")) == ("tests.e2e.test_x", False)


SIM = "fedge.edge_agent.sim"


def imported_names(source: str, *, module: str, is_package: bool = False) -> set[str]:
    """:func:`imported_modules` plus ``package.name`` for every ``from package import name``
    (``name`` may be a submodule: ``from fedge.edge_agent import sim``)."""
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
        module, is_package = module_name(rel)
        source = path.read_text(encoding="utf-8")
        for name in sorted(imported_names(source, module=module, is_package=is_package)):
            if within(name, SIM):
                problems.append(f"{rel} imports {name}")
    return problems


def test_the_agent_core_never_imports_the_simulation() -> None:
    assert (ROOT / "edge_agent" / "sim" / "__init__.py").is_file()
    assert sim_violations(ROOT) == []


@pytest.mark.parametrize(
    "source",
    [
        "from fedge.edge_agent.sim.faults import FaultHooks",
        "import fedge.edge_agent.sim",
        "from fedge.edge_agent import sim",
        "from .sim import fleet",
        "from . import sim",
        "def f():\n    import fedge.edge_agent.sim.demo\n",
        "import importlib\nimportlib.import_module('fedge.edge_agent.sim.fleet')",
    ],
)
def test_the_simulation_rule_catches_an_import_from_the_core(tmp_path: Path, source: str) -> None:
    package = tmp_path / "edge_agent"
    (package / "sim").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sim" / "__init__.py").write_text("from fedge.edge_agent.agent import Agent\n")
    (package / "sim" / "fleet.py").write_text("from fedge.edge_agent.sim.faults import Hooks\n")
    (package / "agent.py").write_text("from fedge.edge_agent.hooks import AgentHooks\n")
    (package / "simulated.py").write_text("import fedge.edge_agent.simulated_io\n")
    assert sim_violations(tmp_path) == []
    (package / "agent.py").write_text(source + "\n")
    found = sim_violations(tmp_path)
    assert found, source
    assert all(v.startswith("edge_agent/agent.py imports fedge.edge_agent.sim") for v in found), (
        found
    )


def module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """For each module of ``package``, the modules of ``package`` it imports (any import
    statement anywhere in it; ``from pkg import mod`` imports ``pkg.mod``)."""
    sources: dict[str, tuple[str, bool]] = {}
    for path in sorted((root / package).rglob("*.py")):
        module, is_package = module_name(path.relative_to(root))
        sources[module] = (path.read_text(encoding="utf-8"), is_package)
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
    assert {"fedge.shared.compression", "fedge.shared.feedback", "fedge.shared.wire"} <= set(graph)
    assert graph["fedge.shared.feedback"]
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
    assert elsewhere == {}, "use fedge.shared.durable.write_atomic / write_bytes_atomic"


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
tops = {root.partition(".")[0] for root in roots}
allowed = set(json.loads(sys.argv[2])) | tops
attempts = []


class PlainInstall(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top in heavy or (top not in allowed and top not in sys.stdlib_module_names):
            attempts.append(fullname)
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


preloaded = sorted(m for m in sys.modules if m.partition(".")[0] in heavy | tops)
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


#: Adapter module -> the one library it needs (an extra, or scikit-learn).
ADAPTERS = {
    "fedge.edge_agent.torch_adapter": "torch",
    "fedge.edge_agent.sklearn_adapter": "sklearn",
}


def test_agent_and_shared_import_on_a_plain_install() -> None:
    report = probe(["fedge.shared", "fedge.edge_agent"], cwd=ROOT)
    assert report["preloaded"] == []
    results = report["results"]
    assert "fedge.edge_agent" in results and "fedge.shared.signing" in results
    adapters = {name: results.pop(name)["error"] for name in ADAPTERS}
    assert adapters == {
        name: f"ModuleNotFoundError: No module named '{lib}'" for name, lib in ADAPTERS.items()
    }
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
