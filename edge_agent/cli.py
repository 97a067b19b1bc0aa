"""``fedge agent enroll | run | status``: parse options, call the library.

The work is done by :mod:`fedge.edge_agent.device` (enrollment), :mod:`fedge.edge_agent.agent`
(the loop) and :mod:`fedge.edge_agent.state` (status). SIGINT/SIGTERM stop ``run`` cleanly: a
waiting agent stops at once, a training agent at the next minibatch; everything it saved stays
valid.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import numpy as np

from fedge.edge_agent.agent import Agent, FatalAgentError
from fedge.edge_agent.data import DataError, load_arrays, split_local
from fedge.edge_agent.device import enroll_device, open_client
from fedge.edge_agent.errors import AgentError
from fedge.edge_agent.state import State, StateError
from fedge.edge_agent.trainers import load_trainer_factory

PROG = "fedge agent"
log = logging.getLogger("fedge.edge_agent")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run a fedge edge agent: train on local data, upload updates."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    enroll = sub.add_parser("enroll", help="register this device with a coordinator")
    enroll.add_argument("--url", required=True, help="coordinator URL, e.g. https://host:8443")
    enroll.add_argument("--token", required=True, help="enrollment token from the administrator")
    enroll.add_argument("--ca", help="the coordinator's CA certificate (PEM) to pin")
    enroll.add_argument("--state-dir", required=True, help="where this device keeps its state")
    enroll.add_argument("--name", help="a name for this device (default: host name)")
    enroll.add_argument(
        "--tag",
        action="append",
        default=[],
        help="a label tasks can require, e.g. site:berlin (repeatable)",
    )

    run = sub.add_parser("run", help="work on assignments until stopped")
    run.add_argument("--state-dir", required=True)
    run.add_argument(
        "--data", required=True, help="local data: an .npz file (X, y) or module:function"
    )
    run.add_argument(
        "--trainer", help="trainer factory module:factory (default: what the task names)"
    )
    run.add_argument(
        "--flatten",
        action="store_true",
        help="reshape N-D features [n, ...] to [n, d] (what the built-in trainers need)",
    )
    run.add_argument("--once", action="store_true", help="handle one assignment, then exit")
    run.add_argument("--max-rounds", type=int, help="exit after this many assignments")
    run.add_argument("--poll-wait", type=float, default=30.0, help="long-poll wait in seconds (30)")
    run.add_argument(
        "--eval-fraction",
        type=float,
        default=0.2,
        help="share of local data held out for evaluation metrics (0.2)",
    )

    status = sub.add_parser("status", help="show the local state (and, with --remote, more)")
    status.add_argument("--state-dir", required=True)
    status.add_argument(
        "--remote", action="store_true", help="also ask the coordinator for this device"
    )
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)


def _enroll(args: argparse.Namespace) -> int:
    config = enroll_device(
        args.state_dir,
        url=args.url,
        token=args.token,
        ca_file=args.ca,
        name=args.name,
        tags=args.tag,
    )
    print(f"enrolled device {config.device_id} ({config.name}) at {config.url}")
    print(f"state saved in {args.state_dir}")
    return 0


@contextmanager
def _stop_on_signals(stop: Callable[[], None], idle: Callable[[], bool]) -> Iterator[None]:
    """SIGINT/SIGTERM call ``stop``; while the agent is only waiting, or on a second signal,
    they also interrupt the wait (safe: every file the agent writes is written atomically)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop()
        if idle() or len(received) > 1:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _run(args: argparse.Namespace) -> int:
    with State(args.state_dir, recover=False).exclusive():
        return _run_locked(args)


def _run_locked(args: argparse.Namespace) -> int:
    state = State(args.state_dir)
    config = state.load_config()
    X, y = load_arrays(args.data, flatten=args.flatten)
    data = split_local(
        X, y, eval_fraction=args.eval_fraction, rng=np.random.default_rng(config.seed)
    )
    factory = load_trainer_factory(args.trainer) if args.trainer else None
    stop = threading.Event()
    client = open_client(state, sleep=stop.wait, interrupted=stop.is_set)
    agent = Agent(
        state=state,
        client=client,
        data=data,
        trainer_factory=factory,
        trainers=[args.trainer] if args.trainer else None,
        seed=config.seed,
        poll_wait=args.poll_wait,
        stop_event=stop,
    )
    log.info(
        "device %s: %d local examples (%d held out for evaluation)",
        config.device_id,
        data.num_train,
        data.X_eval.shape[0],
    )
    try:
        with _stop_on_signals(agent.stop, lambda: agent.idle):
            stats = agent.run(max_rounds=args.max_rounds, once=args.once)
    except KeyboardInterrupt:
        log.info("stopped")
        return 0
    finally:
        client.close()
    log.info(
        "done: %d uploaded, %d stale, %d cancelled, %d failed",
        stats.uploaded,
        stats.stale_refused,
        stats.cancelled,
        stats.failed,
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    state = State(args.state_dir, recover=False)
    summary: dict[str, Any] = state.summary()
    if args.remote:
        with open_client(state) as client:
            summary["remote"] = client.me()
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


_HANDLERS = {"enroll": _enroll, "run": _run, "status": _status}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedge agent``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    _configure_logging(args)
    try:
        return _HANDLERS[args.command](args)
    except FatalAgentError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 3
    except (AgentError, StateError, DataError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
