"""``fedge agent run`` that also writes the client's body counters to a JSON file at exit.

    python bench/_flower_agent.py TRAFFIC.json agent-run-arguments...

Runs the product's agent command line unchanged (``fedge.edge_agent.cli.main``); the only
addition is that the :class:`~fedge.edge_agent.client.CoordinatorClient` it opens is kept, so
that its ``traffic`` (update bodies uploaded, model bodies downloaded, 304 answers) can be
written out when the agent stops. ``bench/flower_setting.py`` reads these files beside the
socket bytes its counting relay measured.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedge.edge_agent import cli


def main(argv: list[str]) -> int:
    out, rest = Path(argv[0]), argv[1:]
    clients: list[Any] = []
    real_open = cli.open_client

    def recording_open(*args: Any, **kwargs: Any) -> Any:
        client = real_open(*args, **kwargs)
        clients.append(client)
        return client

    cli.open_client = recording_open
    try:
        return cli.main(rest)
    finally:
        totals: dict[str, int] = {}
        for client in clients:
            for key, value in asdict(client.traffic).items():
                totals[key] = totals.get(key, 0) + int(value)
        out.write_text(json.dumps(totals) + "\n")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
