"""``fedge model``: the files a task's custom model starts from.

``fedge model init mypkg.model:build --out DIR`` builds the PyTorch module (torch seeded with
``--seed``) and writes ``DIR/model.json``, the task's ``model`` object (``{"spec": [...]}``,
the module's floating ``state_dict`` entries), and ``DIR/weights.safetensors``, its initial
weights. Upload them with ``fedge admin tasks create --weights DIR/weights.safetensors`` or
``fedge admin models upload TASK DIR/weights.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedge.edge_agent.custom_models import init_files

PROG = "fedge model"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Prepare a custom model's files.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    init = sub.add_parser("init", help="model spec and initial weights of a PyTorch module")
    init.add_argument("build", metavar="MODULE:FUNCTION", help="returns a torch.nn.Module")
    init.add_argument("--out", required=True, type=Path, help="directory to write into")
    init.add_argument("--seed", type=int, default=0, help="torch seed for the weights (0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedge model``; returns the exit status."""
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        written = init_files(args.build, args.out, seed=args.seed)
    except (OSError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(written, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
