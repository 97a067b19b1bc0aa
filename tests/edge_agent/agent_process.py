"""Run one agent in a child process and kill it (SIGKILL) at a chosen instant.

Used by the integration tests to crash a real process between "update saved to the outbox"
and "update uploaded": ``python -m tests.edge_agent.agent_process --state-dir D --data F``.
"""

from __future__ import annotations

import argparse
import os
import signal

import numpy as np

from fedge.edge_agent.agent import Agent
from fedge.edge_agent.data import load_arrays, split_local
from fedge.edge_agent.device import open_client
from fedge.edge_agent.state import State


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--data", required=True)
    args = parser.parse_args()
    state = State(args.state_dir)
    config = state.load_config()
    X, y = load_arrays(args.data)
    data = split_local(X, y, eval_fraction=0.2, rng=np.random.default_rng(0))

    def die(entry: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    agent = Agent(
        state=state,
        client=open_client(state),
        data=data,
        seed=config.seed,
        poll_wait=1.0,
        before_upload=die,
    )
    agent.run(once=True)


if __name__ == "__main__":
    main()
