"""``fedge admin``: a thin command line over :class:`fedge.edge_agent.admin_client.AdminClient`.

Connection options come from ``--url/--ca/--key`` or ``FEDGE_URL``/``FEDGE_CA``/
``FEDGE_API_KEY``. Output is a table when standard output is a terminal and JSON otherwise
(scripts keep reading JSON); ``--json`` or ``--table`` choose explicitly. List commands show
one page (``--limit``, ``--offset``) or, with ``--all``, every item, page by page. Errors are
one line, ``fedge admin: error: <code>: <detail>``, with exit status 1 (2 for usage errors);
no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from fedge.edge_agent import custom_models
from fedge.edge_agent.admin_client import AdminClient
from fedge.edge_agent.errors import AgentError
from fedge.shared.modelfiles import FORMATS, format_for_path
from fedge.shared.modelspec import ModelSpec

PROG = "fedge admin"
#: The API's largest page (``limit``); ``--all`` reads pages of this size.
MAX_PAGE = 500
#: Task statuses that never change again (``tasks watch`` ends there).
FINAL_STATUSES = frozenset({"completed", "cancelled", "failed"})

#: Columns of each list's table: (heading, field path or function of the item).
Column = tuple[str, str | Callable[[Mapping[str, Any]], Any]]
COLUMNS: dict[str, list[Column]] = {
    "tasks": [
        ("ID", "id"),
        ("NAME", "name"),
        ("STATUS", "status"),
        ("MODE", "aggregation.mode"),
        ("VERSION", "current_version"),
        ("ROUNDS", "aggregation.num_rounds"),
        ("REASON", "status_reason"),
    ],
    "rounds": [
        ("ROUND", "number"),
        ("STATUS", "status"),
        ("BASE", "base_version"),
        ("RESULT", "result_version"),
        ("RECEIVED", lambda r: f"{r.get('num_received')}/{r.get('target_updates')}"),
        ("ASSIGNED", "num_assigned"),
        ("STALE", "num_stale"),
        ("DROPPED", "num_dropped"),
        ("METRICS", lambda r: _metrics(r.get("metrics"))),
    ],
    "models": [
        ("VERSION", "version"),
        ("BYTES", "size_bytes"),
        ("UPDATES", "num_updates"),
        ("CREATED", "created_at"),
        ("METRICS", lambda r: _metrics(r.get("metrics"))),
    ],
    "declines": [
        ("ASSIGNMENT", "assignment_id"),
        ("DEVICE", "device_id"),
        ("TASK", "task_id"),
        ("ROUND", "round_number"),
        ("REASON", "reason"),
        ("DETAIL", "detail"),
        ("DECLINED", "declined_at"),
    ],
    "devices": [
        ("DEVICE", "device_id"),
        ("NAME", "name"),
        ("STATUS", "status"),
        ("LAST SEEN", "last_seen_at"),
        ("DONE", "num_completed"),
        ("DROPPED", "num_dropped"),
    ],
    "tokens": [
        ("ID", "id"),
        ("PREFIX", "prefix"),
        ("LABEL", "label"),
        ("STATUS", "status"),
        ("USES", lambda t: f"{t.get('uses')}/{t.get('max_uses')}"),
        ("EXPIRES", "expires_at"),
    ],
    "keys": [
        ("ID", "id"),
        ("PREFIX", "prefix"),
        ("NAME", "name"),
        ("ROLE", "role"),
        ("LAST USED", "last_used_at"),
        ("REVOKED", "revoked_at"),
    ],
}


class UsageError(Exception):
    """A command line that cannot work (a file to read, a --set to parse); exit status 2."""


# ------------------------------------------------------------------------------ parser


def _output_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--json``/``--table``, accepted before the group and after the action alike."""
    default: Any = None if top else argparse.SUPPRESS
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument(
        "--json",
        dest="output",
        action="store_const",
        const="json",
        default=default,
        help="print JSON (the default when output is not a terminal)",
    )
    fmt.add_argument(
        "--table",
        dest="output",
        action="store_const",
        const="table",
        default=default,
        help="print a table (the default on a terminal)",
    )


def _paging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=50, help="items per page (1-500, 50)")
    parser.add_argument("--offset", type=int, default=0, help="items to skip (0)")
    parser.add_argument("--all", action="store_true", help="every item, following the pages")
    _output_options(parser, top=False)


def _action(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, **kwargs)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Administer a fedge coordinator.")
    parser.add_argument("--url", default=os.environ.get("FEDGE_URL"), help="(FEDGE_URL)")
    parser.add_argument("--ca", default=os.environ.get("FEDGE_CA"), help="CA to pin (FEDGE_CA)")
    parser.add_argument("--key", default=os.environ.get("FEDGE_API_KEY"), help="(FEDGE_API_KEY)")
    _output_options(parser, top=True)
    groups = parser.add_subparsers(dest="group", required=True, metavar="group")

    tasks = groups.add_parser("tasks", help="federated training tasks").add_subparsers(
        dest="action", required=True
    )
    tl = _action(tasks, "list", help="tasks, newest first")
    tl.add_argument("--status")
    _paging(tl)
    tg = _action(tasks, "get")
    tg.add_argument("task_id", type=int)
    _output_options(tg, top=False)
    tp = _action(
        tasks, "privacy", help="differential privacy spent (epsilon, delta, rounds accounted)"
    )
    tp.add_argument("task_id", type=int)
    _output_options(tp, top=False)
    tc = _action(tasks, "create", help="create a draft task; prints any warnings")
    tc.add_argument(
        "--file", required=True, type=Path, help="task body (JSON, see docs/protocol.md)"
    )
    initial = tc.add_mutually_exclusive_group()
    initial.add_argument(
        "--model",
        metavar="MODULE:FUNCTION",
        help="a function returning a torch.nn.Module: the task's model spec and initial "
        "weights come from it (needs the torch extra)",
    )
    initial.add_argument(
        "--weights",
        type=Path,
        help="initial weights (.npz, .safetensors, .pt or wire format) uploaded after "
        "creating the task; the model spec comes from them when the body has no model",
    )
    tc.add_argument("--seed", type=int, default=0, help="torch seed for --model (0)")
    _output_options(tc, top=False)
    tu = _action(
        tasks,
        "update",
        help="change a task (a draft: anything; running or paused: training lr, epochs, "
        "batch_size, proximal_mu, from the next round)",
    )
    tu.add_argument("task_id", type=int)
    tu.add_argument("--file", type=Path, help="changes (JSON object, merged key by key)")
    tu.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="one change, e.g. training.lr=0.05 (VALUE is JSON, else a string; repeatable)",
    )
    _output_options(tu, top=False)
    for action in ("start", "pause", "resume", "cancel"):
        ta = _action(tasks, action)
        ta.add_argument("task_id", type=int)
        _output_options(ta, top=False)
    tw = _action(tasks, "watch", help="follow a task's status and rounds until it ends")
    tw.add_argument("task_id", type=int)
    tw.add_argument("--interval", type=float, default=2.0, help="seconds between polls (2)")
    tw.add_argument("--once", action="store_true", help="show the current state and stop")
    _output_options(tw, top=False)

    rounds = groups.add_parser("rounds", help="rounds of a task").add_subparsers(
        dest="action", required=True
    )
    rl = _action(rounds, "list")
    rl.add_argument("task_id", type=int)
    _paging(rl)
    rd = _action(rounds, "declines", help="a round's declined assignments and their reasons")
    rd.add_argument("task_id", type=int)
    rd.add_argument("number", type=int)
    _paging(rd)

    models = groups.add_parser("models", help="model versions of a task").add_subparsers(
        dest="action", required=True
    )
    ml = _action(models, "list")
    ml.add_argument("task_id", type=int)
    _paging(ml)
    md = _action(models, "download")
    md.add_argument("task_id", type=int)
    md.add_argument("version", nargs="?", default="latest")
    md.add_argument("--out", required=True, type=Path, help="file to write")
    md.add_argument(
        "--format",
        choices=FORMATS,
        help="wire (as served), npz, safetensors or torch (a state_dict; needs the torch "
        "extra); default: from the --out suffix (.npz, .safetensors, .pt/.pth), else wire",
    )
    _output_options(md, top=False)
    mu = _action(
        models,
        "upload",
        help="upload a draft task's initial weights (version 0)",
        description="Upload initial weights for a draft task: .npz, .safetensors, .pt/.pth "
        "(a state_dict; needs the torch extra) or the binary wire format "
        "(docs/wire-format.md), one tensor per tensor of the task's spec (no pickled objects).",
    )
    mu.add_argument("task_id", type=int)
    mu.add_argument("weights", type=Path, help=".npz, .safetensors, .pt or wire-format file")
    _output_options(mu, top=False)
    mi = _action(models, "upload-initial", help="the same as upload, with --file")
    mi.add_argument("task_id", type=int)
    mi.add_argument("--file", dest="weights", required=True, type=Path, help="weights file")
    _output_options(mi, top=False)

    devices = groups.add_parser("devices", help="enrolled devices").add_subparsers(
        dest="action", required=True
    )
    dl = _action(devices, "list")
    dl.add_argument("--status")
    _paging(dl)
    for action in ("get", "revoke"):
        da = _action(devices, action)
        da.add_argument("device_id")
        _output_options(da, top=False)
    dt = _action(devices, "tag", help="show or change a device's tags")
    dt.add_argument("device_id")
    dt.add_argument("--set", nargs="*", metavar="TAG", help="replace every tag by these")
    dt.add_argument("--add", nargs="+", default=[], metavar="TAG")
    dt.add_argument("--remove", nargs="+", default=[], metavar="TAG")
    _output_options(dt, top=False)
    dd = _action(devices, "declines", help="the assignments a device declined and its reasons")
    dd.add_argument("device_id")
    _paging(dd)

    tokens = groups.add_parser("tokens", help="enrollment tokens").add_subparsers(
        dest="action", required=True
    )
    tkc = _action(tokens, "create")
    tkc.add_argument("--label", default="")
    tkc.add_argument("--max-uses", type=int)
    tkc.add_argument("--expires-in", type=int, metavar="SECONDS")
    _output_options(tkc, top=False)
    _paging(_action(tokens, "list"))
    tkr = _action(tokens, "revoke")
    tkr.add_argument("token_id", type=int)
    _output_options(tkr, top=False)

    keys = groups.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    kc = _action(keys, "create")
    kc.add_argument("--role", required=True, choices=("admin", "viewer"))
    kc.add_argument("--name", default="")
    _output_options(kc, top=False)
    _paging(_action(keys, "list"))
    kr = _action(keys, "revoke")
    kr.add_argument("key_id", type=int)
    _output_options(kr, top=False)
    return parser


# ------------------------------------------------------------------------------ inputs


def read_json_file(path: Path, what: str) -> Any:
    """A JSON file's value; :class:`UsageError` naming the file when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {what} file {path}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} file {path} is not JSON: {exc}") from None


def parse_sets(sets: Sequence[str]) -> dict[str, Any]:
    """``a.b=VALUE`` pairs as a nested object (VALUE read as JSON, else as a string)."""
    changes: dict[str, Any] = {}
    for item in sets:
        path, sep, raw = item.partition("=")
        if not sep or not path or any(not part for part in path.split(".")):
            raise UsageError(f"--set {item!r}: expected FIELD=VALUE, e.g. training.lr=0.05")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = changes
        *parents, leaf = path.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"--set {item!r}: {part} was given a value already")
            node = child
        node[leaf] = value
    return changes


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def initial_weights(client: AdminClient, task_id: int, path: Path) -> bytes:
    """The wire bytes to upload as a task's version 0: a weights file in any format
    :func:`fedge.edge_agent.custom_models.read_weights` reads, checked against the task's
    spec and encoded in its tensor order."""
    if not path.exists():
        raise UsageError(f"weights file {path} does not exist")
    try:
        weights = custom_models.read_weights(path)
    except OSError as exc:
        raise UsageError(f"cannot read weights file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"weights file {path} is not usable: {exc}") from None
    spec = ModelSpec.from_dict(client.get_task(task_id)["spec"])
    missing = [n for n in spec.names if n not in weights]
    extra = sorted(set(weights) - set(spec.names))
    if missing or extra:
        parts = [f"missing {', '.join(missing)}" if missing else "", ""]
        parts[1] = f"unknown {', '.join(extra)}" if extra else ""
        raise UsageError(
            f"weights file {path} does not match task {task_id}'s spec: "
            + "; ".join(p for p in parts if p)
        )
    try:
        return custom_models.upload_body(weights, spec)
    except ValueError as exc:
        raise UsageError(f"weights file {path}: {exc}") from None


# ------------------------------------------------------------------------------ commands


def list_page(fetch: Callable[..., Any], args: argparse.Namespace, **filters: Any) -> Any:
    """One page (``--limit``/``--offset``) or, with ``--all``, every item in one answer of the
    same shape (``total`` from the last page read)."""
    if not args.all:
        if not 1 <= args.limit <= MAX_PAGE:
            raise UsageError(f"--limit must be between 1 and {MAX_PAGE}")
        if args.offset < 0:
            raise UsageError("--offset must not be negative")
        return fetch(limit=args.limit, offset=args.offset, **filters)
    items: list[Any] = []
    total = 0
    while True:
        page = fetch(limit=MAX_PAGE, offset=len(items), **filters)
        items.extend(page["items"])
        total = page["total"]
        if not page["items"] or len(items) >= total:
            break
    return {"items": items, "total": total, "limit": len(items), "offset": 0}


def dispatch(client: AdminClient, args: argparse.Namespace) -> Any:
    """Call the client method for a parsed command; its answer."""
    group, action = args.group, args.action
    if group == "tasks":
        if action == "list":
            return list_page(client.list_tasks, args, status=args.status)
        if action == "get":
            return client.get_task(args.task_id)
        if action == "privacy":
            return client.get_task(args.task_id).get("privacy")
        if action == "create":
            return _create_task(client, args)
        if action == "update":
            changes: dict[str, Any] = {}
            if args.file is not None:
                changes = read_json_file(args.file, "changes")
                if not isinstance(changes, dict):
                    raise UsageError(f"changes file {args.file} must hold a JSON object")
            changes = _merge(changes, parse_sets(args.sets))
            if not changes:
                raise UsageError("give the changes with --file or --set FIELD=VALUE")
            return client.update_task(args.task_id, changes)
        return client.task_action(args.task_id, action)
    if group == "rounds":
        if action == "declines":
            return list_page(
                lambda **kw: client.list_round_declines(args.task_id, args.number, **kw), args
            )
        return list_page(lambda **kw: client.list_rounds(args.task_id, **kw), args)
    if group == "models":
        if action == "list":
            return list_page(lambda **kw: client.list_models(args.task_id, **kw), args)
        if action in ("upload", "upload-initial"):
            body = initial_weights(client, args.task_id, args.weights)
            return client.upload_initial_model(args.task_id, body)
        fmt = args.format or format_for_path(args.out)
        data = client.download_model(args.task_id, args.version)
        model = client.get_task(args.task_id)["model"] if fmt != "wire" else {}
        try:
            size = custom_models.export_model(data, args.out, fmt=fmt, model=model)
        except OSError as exc:
            raise UsageError(f"cannot write {args.out}: {exc.strerror or exc}") from None
        return {"written": str(args.out), "format": fmt, "bytes": size}
    if group == "devices":
        if action == "list":
            return list_page(client.list_devices, args, status=args.status)
        if action == "get":
            return client.get_device(args.device_id)
        if action == "tag":
            return _tag(client, args)
        if action == "declines":
            return list_page(lambda **kw: client.list_device_declines(args.device_id, **kw), args)
        return client.revoke_device(args.device_id)
    if group == "tokens":
        if action == "create":
            return client.create_enrollment_token(
                label=args.label, max_uses=args.max_uses, expires_in_s=args.expires_in
            )
        if action == "list":
            return list_page(client.list_enrollment_tokens, args)
        return client.revoke_enrollment_token(args.token_id)
    if action == "create":
        return client.create_api_key(role=args.role, name=args.name)
    if action == "list":
        return list_page(client.list_api_keys, args)
    return client.revoke_api_key(args.key_id)


def _tag(client: AdminClient, args: argparse.Namespace) -> Any:
    """``devices tag``: the device's tags after ``--set``, then ``--add`` and ``--remove``
    (without any of them: its tags as they are)."""
    if args.set is None and not args.add and not args.remove:
        return {"device_id": args.device_id, "tags": client.get_device(args.device_id)["tags"]}
    tags = set(args.set) if args.set is not None else set(client.get_device(args.device_id)["tags"])
    tags = (tags | set(args.add)) - set(args.remove)
    return client.set_device_tags(args.device_id, sorted(tags))


# ------------------------------------------------------------------------------ output


def _metrics(metrics: Any) -> str:
    if not isinstance(metrics, Mapping) or not metrics:
        return ""
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, int | float) else f"{k}={v}"
        for k, v in sorted(metrics.items())
    )


def _field(item: Mapping[str, Any], column: str | Callable[[Mapping[str, Any]], Any]) -> str:
    if callable(column):
        value = column(item)
    else:
        value = item
        for part in column.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def table(headings: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    body = [list(headings), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in body) for i in range(len(headings))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in body
    )


def render_table(group: str, result: Any) -> str:
    """A list answer as one row per item, anything else as FIELD VALUE lines."""
    if isinstance(result, Mapping) and isinstance(result.get("items"), list):
        columns = COLUMNS[group]
        items = result["items"]
        text = table([h for h, _ in columns], ([_field(i, c) for _, c in columns] for i in items))
        shown = f"{result.get('offset', 0) + 1}-{result.get('offset', 0) + len(items)}"
        footer = f"{len(items)} of {result.get('total', len(items))}"
        if items and len(items) < result.get("total", 0):
            footer += f" (items {shown}; --offset/--limit for others, --all for every one)"
        return f"{text}\n{footer}"
    if isinstance(result, Mapping):
        rows = [(str(k), _field(result, str(k))) for k in result if k != "warnings"]
        text = table(["FIELD", "VALUE"], rows)
        return text + "".join(f"\nwarning: {w}" for w in result.get("warnings") or [])
    return json.dumps(result, indent=2, sort_keys=True)


def choose_output(requested: str | None, stream: TextIO) -> str:
    if requested is not None:
        return requested
    return "table" if stream.isatty() else "json"


def print_warnings(result: Any) -> None:
    """A task's warnings, on standard error, whatever the output format."""
    if isinstance(result, Mapping):
        for warning in result.get("warnings") or []:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)


# ------------------------------------------------------------------------------ watch


def watch_view(task: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]) -> str:
    """The live view of ``tasks watch``: the task's state and its latest rounds."""
    head = (
        f"task {task['id']} {task['name']!r}: {task['status']}, version "
        f"{task['current_version']}, {task['aggregation']['mode']} "
        f"({task['aggregation']['num_rounds']} rounds)"
    )
    if task.get("status_reason"):
        head += f"\n  reason: {task['status_reason']}"
    if task.get("pending_training"):
        head += f"\n  next round trains with: {json.dumps(task['pending_training'])}"
    columns = COLUMNS["rounds"]
    body = table([h for h, _ in columns], ([_field(r, c) for _, c in columns] for r in rounds))
    return f"{head}\n{body}"


def watch(
    client: AdminClient,
    task_id: int,
    *,
    output: str,
    stream: TextIO,
    interval_s: float = 2.0,
    once: bool = False,
    wait: Callable[[float], bool] | None = None,
    live: bool = False,
) -> dict[str, Any]:
    """Poll the task and its newest rounds until it reaches a final status (or once),
    printing each state that differs from the last. ``wait(seconds)`` returns True to stop
    early (an interrupt). Returns the last task answer."""
    stop = wait if wait is not None else threading.Event().wait
    last = None
    while True:
        task = client.get_task(task_id)
        total = client.list_rounds(task_id, limit=1)["total"]
        latest = client.list_rounds(task_id, limit=10, offset=max(0, total - 10))["items"]
        state = json.dumps([task, latest], sort_keys=True)
        if state != last:
            last = state
            if output == "json":
                print(json.dumps({"task": task, "rounds": latest}, sort_keys=True), file=stream)
            else:
                prefix = "\x1b[H\x1b[2J" if live else ""
                stamp = time.strftime("%H:%M:%S")
                print(f"{prefix}[{stamp}] {watch_view(task, latest)}", file=stream)
            stream.flush()
        if once or task["status"] in FINAL_STATUSES:
            return dict(task)
        if stop(interval_s):
            return dict(task)


# ------------------------------------------------------------------------------ main


def _fail(message: str, status: int = 1) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def _create_task(client: AdminClient, args: argparse.Namespace) -> Any:
    """Create a task; with ``--model`` or ``--weights`` also upload its initial weights."""
    body = read_json_file(args.file, "task")
    weights = None
    if args.model:
        body["model"], weights = custom_models.init_model(args.model, seed=args.seed)
    elif args.weights:
        weights = custom_models.read_weights(args.weights)
        if "model" not in body:
            body["model"] = {"spec": ModelSpec.from_weights(weights).to_dict()}
    task = client.create_task(body)
    if weights is None:
        return task
    spec = ModelSpec.from_dict(task["spec"])
    client.upload_initial_model(task["id"], custom_models.upload_body(weights, spec))
    return client.get_task(task["id"])


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
    output = choose_output(args.output, sys.stdout)
    try:
        with AdminClient(args.url, args.key, ca_file=args.ca) as client:
            if args.group == "tasks" and args.action == "watch":
                if args.interval <= 0:
                    raise UsageError("--interval must be positive")
                watch(
                    client,
                    args.task_id,
                    output=output,
                    stream=sys.stdout,
                    interval_s=args.interval,
                    once=args.once,
                    live=output == "table" and sys.stdout.isatty(),
                )
                return 0
            result = dispatch(client, args)
    except UsageError as exc:
        return _fail(str(exc), 2)
    except AgentError as exc:
        return _fail(f"{exc.code}: {exc.detail}")
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    print_warnings(result)
    if output == "json":
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(render_table("declines" if args.action == "declines" else args.group, result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
