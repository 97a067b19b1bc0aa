"""Every bandit suppression in the packages names the check it silences and says why:
``# nosec B603  # our interpreter, fixed arguments`` (``make lint`` runs bandit)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "coordinator", "edge_agent", "migrations")
#: ``# nosec`` with one or more test ids, then ``# `` and a reason of at least ten characters.
SUPPRESSION = re.compile(r"#\s*nosec\b(?P<rest>.*)$")
WELL_FORMED = re.compile(r"^ (B\d{3})(, B\d{3})*  # \S.{9,}$")


def problems(path: Path, text: str) -> list[str]:
    """The suppressions in ``text`` that lack a test id or a reason."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        match = SUPPRESSION.search(line)
        if match and not WELL_FORMED.match(match.group("rest")):
            found.append(f"{path}:{number}: {line.strip()}")
    return found


def test_every_nosec_names_its_check_and_a_reason() -> None:
    sources = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(sources) > 50
    bad = [problem for path in sources for problem in problems(path, path.read_text())]
    assert bad == [], "write '# nosec BXXX  # reason':\n" + "\n".join(bad)
    suppressions = sum(path.read_text().count("# nosec ") for path in sources)
    assert suppressions > 0  # the check above saw the suppressions that exist


def test_the_check_rejects_suppressions_without_id_or_reason() -> None:
    good = "import subprocess  # nosec B404  # fixed argument lists, never a shell\n"
    assert problems(Path("x.py"), good) == []
    for bad in (
        "import subprocess  # nosec\n",
        "import subprocess  # nosec B404\n",
        "import subprocess  # nosec B404  # ok\n",
        "import subprocess  # nosec: fixed argument lists, never a shell\n",
        "x = 1  # nosec B105 a password, they say\n",
    ):
        assert problems(Path("x.py"), bad) != [], bad
