"""The build configuration installs the folders under the ``fedge`` namespace.

pyproject.toml lists every package and maps ``fedge.shared`` to ``shared/`` and so on; a new
subpackage must be added to the list or it is missing from the wheel. The editable install
this suite runs in resolves the namespace to this checkout, and the ``fedge`` command's entry
points name only ``fedge.*`` modules.
"""

from __future__ import annotations

import importlib.util
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("shared", "coordinator", "edge_agent", "migrations")


def setuptools_config() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def test_every_package_folder_is_listed_under_the_namespace() -> None:
    on_disk = {
        ".".join(("fedge", *init.parent.relative_to(ROOT).parts))
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert "fedge.coordinator.engine" in on_disk
    assert set(setuptools_config()["packages"]) == on_disk


def test_the_namespace_maps_to_the_folders() -> None:
    assert setuptools_config()["package-dir"] == {f"fedge.{f}": f for f in FOLDERS}
    assert not (ROOT / "fedge").exists(), "fedge is a namespace: no folder of its own"


def test_the_installed_names_resolve_to_this_checkout() -> None:
    for folder in FOLDERS:
        spec = importlib.util.find_spec(f"fedge.{folder}")
        assert spec is not None and spec.origin is not None, folder
        assert Path(spec.origin).resolve() == ROOT / folder / "__init__.py"


def test_entry_points_name_the_namespace() -> None:
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts["fedge"] == "fedge.shared.cli:main"
    commands = metadata.entry_points(group="fedge.commands")
    assert {ep.name for ep in commands} == {"coordinator", "agent", "admin", "demo", "model"}
    for ep in commands:
        assert ep.value.startswith("fedge."), ep
        assert callable(ep.load())
