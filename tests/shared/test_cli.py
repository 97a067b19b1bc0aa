"""The ``fedge`` dispatcher: usage, unknown commands, dispatch through the entry-point group,
and the message an agent-only install prints for a command whose dependencies are missing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from fedge.shared import cli


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def fake_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, EntryPoint]]:
    """Entry points backed by modules written for the test: one that works and records its
    arguments, and ones whose import fails like an install without the coordinator extra."""
    package = tmp_path / "fedge_fake_commands"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "works.py").write_text(
        textwrap.dedent(
            """
            calls = []

            def main(argv):
                calls.append(list(argv))
                return 7
            """
        )
    )
    (package / "needs_fastapi.py").write_text("import fedge_absent_web_framework\n")
    (package / "needs_sqlalchemy.py").write_text(
        "import json\nfrom fedge_absent_orm.engine import create_engine\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    commands = {
        name: EntryPoint(name=name, group=cli.GROUP, value=value)
        for name, value in {
            "works": "fedge_fake_commands.works:main",
            "coordinator": "fedge_fake_commands.needs_fastapi:main",
            "demo": "fedge_fake_commands.needs_sqlalchemy:main",
        }.items()
    }
    monkeypatch.setattr(cli, "_commands", lambda: commands)
    yield commands
    for name in [m for m in sys.modules if m.partition(".")[0] == "fedge_fake_commands"]:
        del sys.modules[name]


def test_without_arguments_prints_usage_and_fails(capsys) -> None:
    code, out, _ = run(capsys)
    assert code == 2
    assert out.startswith("usage: fedge <command>")


@pytest.mark.parametrize("flag", ["-h", "--help", "help"])
def test_help(capsys, flag: str) -> None:
    code, out, _ = run(capsys, flag)
    assert code == 0
    for command in ("demo", "coordinator", "agent", "admin"):
        assert f"\n  {command} " in out


def test_unknown_command(capsys) -> None:
    code, out, err = run(capsys, "frobnicate", "--now")
    assert code == 2
    assert out == ""
    assert "unknown command 'frobnicate'" in err
    assert "usage: fedge" in err


def test_dispatch_passes_the_remaining_arguments(capsys, fake_commands) -> None:
    code, _, _ = run(capsys, "works", "init", "--data-dir", "x")
    assert code == 7
    works = sys.modules["fedge_fake_commands.works"]
    assert works.calls == [["init", "--data-dir", "x"]]


@pytest.mark.parametrize(
    ("command", "missing", "extra"),
    [
        ("coordinator", "fedge_absent_web_framework", "coordinator"),
        ("demo", "fedge_absent_orm", "demo"),
    ],
)
def test_missing_dependency_says_what_to_install(
    capsys, fake_commands, command: str, missing: str, extra: str
) -> None:
    code, out, err = run(capsys, command, "serve")
    assert code == 3
    assert out == ""
    assert f"lacks {missing!r}" in err
    assert f"pip install 'fedge[{extra}]'" in err
    assert "Traceback" not in err


def test_installed_entry_points() -> None:
    commands = cli._commands()
    assert commands["coordinator"].value == "fedge.coordinator.cli:main"
    assert commands["agent"].value == "fedge.edge_agent.cli:main"


def test_console_script_dispatches_to_the_coordinator() -> None:
    """The installed ``fedge`` script reaches ``fedge.coordinator.cli`` through the entry point."""
    script = Path(sys.executable).with_name("fedge")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "fedge.shared.cli"]
    result = subprocess.run(
        [*command, "coordinator", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage: fedge coordinator" in result.stdout
    for sub in ("init", "migrate", "serve", "create-key"):
        assert sub in result.stdout
