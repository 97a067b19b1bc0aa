"""``fedge admin``: a thin command line over :class:`fedge.edge_agent.admin_client.AdminClient`.

Connection options come from ``--url/--ca/--key`` or ``FEDGE_URL``/``FEDGE_CA``/
``FEDGE_API_KEY``. Answers are printed as JSON; errors as ``error: <code>: <detail>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from fedge.edge_agent.admin_client import AdminClient
from fedge.edge_agent.errors import AgentError

PROG = "fedge admin"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Administer a fedge coordinator.")
    parser.add_argument("--url", default=os.environ.get("FEDGE_URL"), help="(FEDGE_URL)")
    parser.add_argument("--ca", default=os.environ.get("FEDGE_CA"), help="CA to pin (FEDGE_CA)")
    parser.add_argument("--key", default=os.environ.get("FEDGE_API_KEY"), help="(FEDGE_API_KEY)")
    groups = parser.add_subparsers(dest="group", required=True, metavar="group")

    tasks = groups.add_parser("tasks", help="federated training tasks").add_subparsers(
        dest="action", required=True
    )
    tl = tasks.add_parser("list")
    tl.add_argument("--status")
    tasks.add_parser("get").add_argument("task_id", type=int)
    tasks.add_parser("create").add_argument(
        "--file", required=True, type=Path, help="task body (JSON, see docs/protocol.md)"
    )
    for action in ("start", "pause", "resume", "cancel"):
        tasks.add_parser(action).add_argument("task_id", type=int)

    rounds = groups.add_parser("rounds", help="rounds of a task").add_subparsers(
        dest="action", required=True
    )
    rounds.add_parser("list").add_argument("task_id", type=int)
    rd = rounds.add_parser("declines", help="a round's declined assignments and their reasons")
    rd.add_argument("task_id", type=int)
    rd.add_argument("number", type=int)

    models = groups.add_parser("models", help="model versions of a task").add_subparsers(
        dest="action", required=True
    )
    models.add_parser("list").add_argument("task_id", type=int)
    md = models.add_parser("download")
    md.add_argument("task_id", type=int)
    md.add_argument("version", nargs="?", default="latest")
    md.add_argument("--out", required=True, type=Path, help="file to write (wire format)")

    devices = groups.add_parser("devices", help="enrolled devices").add_subparsers(
        dest="action", required=True
    )
    devices.add_parser("list").add_argument("--status")
    devices.add_parser("get").add_argument("device_id")
    devices.add_parser("revoke").add_argument("device_id")
    dt = devices.add_parser("tag", help="show or change a device's tags")
    dt.add_argument("device_id")
    dt.add_argument("--set", nargs="*", metavar="TAG", help="replace every tag by these")
    dt.add_argument("--add", nargs="+", default=[], metavar="TAG")
    dt.add_argument("--remove", nargs="+", default=[], metavar="TAG")
    devices.add_parser(
        "declines", help="the assignments a device declined and its reasons"
    ).add_argument("device_id")

    tokens = groups.add_parser("tokens", help="enrollment tokens").add_subparsers(
        dest="action", required=True
    )
    tc = tokens.add_parser("create")
    tc.add_argument("--label", default="")
    tc.add_argument("--max-uses", type=int)
    tc.add_argument("--expires-in", type=int, metavar="SECONDS")
    tokens.add_parser("list")
    tokens.add_parser("revoke").add_argument("token_id", type=int)

    keys = groups.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    kc = keys.add_parser("create")
    kc.add_argument("--role", required=True, choices=("admin", "viewer"))
    kc.add_argument("--name", default="")
    keys.add_parser("list")
    keys.add_parser("revoke").add_argument("key_id", type=int)
    return parser


def dispatch(client: AdminClient, args: argparse.Namespace) -> Any:
    """Call the client method for a parsed command; its answer."""
    group, action = args.group, args.action
    if group == "tasks":
        if action == "list":
            return client.list_tasks(status=args.status)
        if action == "get":
            return client.get_task(args.task_id)
        if action == "create":
            return client.create_task(json.loads(args.file.read_text()))
        return client.task_action(args.task_id, action)
    if group == "rounds":
        if action == "declines":
            return client.list_round_declines(args.task_id, args.number)
        return client.list_rounds(args.task_id)
    if group == "models":
        if action == "list":
            return client.list_models(args.task_id)
        data = client.download_model(args.task_id, args.version)
        args.out.write_bytes(data)
        return {"written": str(args.out), "bytes": len(data)}
    if group == "devices":
        if action == "list":
            return client.list_devices(status=args.status)
        if action == "get":
            return client.get_device(args.device_id)
        if action == "tag":
            return _tag(client, args)
        if action == "declines":
            return client.list_device_declines(args.device_id)
        return client.revoke_device(args.device_id)
    if group == "tokens":
        if action == "create":
            return client.create_enrollment_token(
                label=args.label, max_uses=args.max_uses, expires_in_s=args.expires_in
            )
        if action == "list":
            return client.list_enrollment_tokens()
        return client.revoke_enrollment_token(args.token_id)
    if action == "create":
        return client.create_api_key(role=args.role, name=args.name)
    if action == "list":
        return client.list_api_keys()
    return client.revoke_api_key(args.key_id)


def _tag(client: AdminClient, args: argparse.Namespace) -> Any:
    """``devices tag``: the device's tags after ``--set``, then ``--add`` and ``--remove``
    (without any of them: its tags as they are)."""
    if args.set is None and not args.add and not args.remove:
        return {"device_id": args.device_id, "tags": client.get_device(args.device_id)["tags"]}
    tags = set(args.set) if args.set is not None else set(client.get_device(args.device_id)["tags"])
    tags = (tags | set(args.add)) - set(args.remove)
    return client.set_device_tags(args.device_id, sorted(tags))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedge admin``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if not args.url or not args.key:
        print(f"{PROG}: give --url and --key (or FEDGE_URL and FEDGE_API_KEY)", file=sys.stderr)
        return 2
    try:
        with AdminClient(args.url, args.key, ca_file=args.ca) as client:
            result = dispatch(client, args)
    except AgentError as exc:
        print(f"{PROG}: error: {exc.code}: {exc.detail}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
