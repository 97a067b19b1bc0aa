"""The agent's small files: JSON documents written with :mod:`fedge.shared.durable`, and the sweep
of leftovers of interrupted writes in a state directory.

Atomic writes themselves live in :mod:`fedge.shared.durable` (temporary files named
``.<name>.tmp-<random>``). :func:`remove_temp_files` also deletes ``.<name>.<random>.tmp``,
the temporary names residual files had before (a state directory written by an older agent may
still hold one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedge.shared import durable
from fedge.shared.durable import write_bytes_atomic

LEGACY_TEMP_PATTERN = ".*.tmp"


def write_json_atomic(path: Path, value: Any, *, mode: int = 0o644) -> None:
    data = json.dumps(value, indent=2, sort_keys=True).encode("utf-8") + b"\n"
    write_bytes_atomic(path, data, mode=mode)


def read_json(path: Path) -> Any:
    """The JSON value stored at ``path`` (``FileNotFoundError`` when absent)."""
    return json.loads(path.read_bytes().decode("utf-8"))


def remove_temp_files(directory: Path) -> int:
    """Delete leftovers of interrupted atomic writes below ``directory``; how many."""
    return durable.remove_temp_files(directory, patterns=(LEGACY_TEMP_PATTERN,))
