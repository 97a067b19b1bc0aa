"""The ``fedge`` command: a small dispatcher over the ``fedge.commands`` entry-point group.

Subcommands live in the package that owns them (``coordinator`` -> ``fedge.coordinator.cli``,
``agent`` -> ``fedge.edge_agent.cli``, ...). On an agent-only install the coordinator's code is
present but its dependencies are not; the dispatcher then says which extra to install instead
of printing a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points

GROUP = "fedge.commands"

# Which extra a subcommand needs when its import fails for lack of a dependency.
_EXTRAS = {"coordinator": "coordinator", "demo": "demo", "admin": "", "model": "torch"}

USAGE = """usage: fedge <command> [options]

commands:
  demo          run the whole platform on loopback with a simulated fleet
  coordinator   init | migrate | serve  (the coordinator service)
  agent         enroll | run | status   (the edge agent)
  admin         tasks, rounds, models, devices, tokens, keys (a client of the admin REST API)
  model         init  (a custom PyTorch model's spec and initial weights)

`fedge <command> --help` shows a command's options."""


def _commands() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not args or args[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    ep = commands.get(name)
    if ep is None:
        print(f"fedge: unknown command {name!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        func: Callable[[list[str]], int] = ep.load()
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get(name, "")
        hint = f"pip install 'fedge[{extra}]'" if extra else "pip install 'fedge[coordinator]'"
        print(
            f"fedge {name}: this install lacks {exc.name!r}, which `fedge {name}` needs.\n"
            f"Install it with: {hint}",
            file=sys.stderr,
        )
        return 3
    return int(func(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
