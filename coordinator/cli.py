"""``fedge coordinator init | migrate | serve | gc | create-key | renew-cert``: parse options,
call the library.

Options override ``FEDGE_*`` environment variables, which override the data directory's
``coordinator.env``, which overrides the defaults (see docs/configuration.md). The work is
done by :mod:`fedge.coordinator.bootstrap` and :mod:`fedge.coordinator.server`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from fedge.coordinator.bootstrap import (
    InitResult,
    SetupError,
    create_key,
    init_data_dir,
    load_settings,
    migrate_database,
    redact_url,
    schema_report,
)
from fedge.coordinator.models import ROLES
from fedge.coordinator.retention import GcBusy
from fedge.coordinator.retention import run_once as run_gc
from fedge.coordinator.settings import Settings

PROG = "fedge coordinator"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir", type=Path, help="coordinator state directory (FEDGE_DATA_DIR)"
    )
    common.add_argument("--database-url", help="SQLAlchemy database URL (FEDGE_DATABASE_URL)")

    parser = argparse.ArgumentParser(
        prog=PROG, description="Set up, migrate and run the fedge coordinator service."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    init = sub.add_parser(
        "init",
        parents=[common],
        help="create the data directory, TLS certificates, schema and an admin key",
        description="Create the data directory with a private CA and server certificate, "
        "migrate the database and print a bootstrap admin API key (shown once).",
    )
    init.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name or IP address the server certificate is valid for (repeatable); "
        "localhost, 127.0.0.1 and ::1 are always included",
    )
    init.add_argument(
        "--force",
        action="store_true",
        help="re-initialize an existing data directory: new CA and certificate, new admin "
        "key; the database and blobs are kept",
    )

    mig = sub.add_parser(
        "migrate",
        parents=[common],
        help="upgrade (or downgrade) the database schema",
        description="Apply Alembic migrations to the configured database.",
    )
    target = mig.add_mutually_exclusive_group()
    target.add_argument("--revision", default="head", help="upgrade to this revision (head)")
    target.add_argument("--downgrade", metavar="REV", help="downgrade to REV (e.g. base)")
    target.add_argument(
        "--status",
        action="store_true",
        help="only report the schema revision; exit status 1 when it is not at head",
    )

    srv = sub.add_parser(
        "serve",
        parents=[common],
        help="run the coordinator (HTTPS)",
        description="Serve the REST API over HTTPS with the data directory's certificate.",
    )
    srv.add_argument("--host", help="address to listen on (FEDGE_HOST, default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="port (FEDGE_PORT, default 8443; 0 = any free)")
    srv.add_argument(
        "--insecure-http",
        action="store_const",
        const=True,
        default=None,
        help="serve plain HTTP (only behind a TLS-terminating proxy; FEDGE_INSECURE_HTTP)",
    )
    srv.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes serving on the one port (FEDGE_WORKERS, default 1; more than "
        "1 needs PostgreSQL)",
    )
    srv.add_argument(
        "--port-file",
        type=Path,
        help="once listening, write the bound port to this file (atomically); removed on exit",
    )
    srv.add_argument(
        "--forwarded-allow-ips",
        help="proxies whose X-Forwarded-* headers are trusted (comma-separated, '*' for any; "
        "default: loopback or $FORWARDED_ALLOW_IPS)",
    )
    srv.add_argument(
        "--graceful-timeout",
        type=int,
        default=10,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight requests may take to finish (10)",
    )

    gc = sub.add_parser(
        "gc",
        parents=[common],
        help="prune old model versions and delete unreferenced blobs",
        description="Apply the retention policy (keep_versions) and delete the blobs no kept "
        "row names and written longer ago than the grace period (docs/operations.md, "
        '"Retention and garbage collection"). Safe while coordinators serve.',
    )
    gc.add_argument(
        "--dry-run",
        action="store_true",
        help="only report what would be pruned and deleted; change nothing",
    )
    gc.add_argument(
        "--grace-s",
        type=float,
        metavar="SECONDS",
        help="keep unreferenced blobs written within this many seconds (FEDGE_GC_GRACE_S, "
        "default 3600); never less than the longest upload or aggregation",
    )

    sub.add_parser(
        "renew-cert",
        parents=[common],
        help="issue a new server certificate from the private CA now",
        description="Issue a new server certificate (90 days, the same names, a new key) from "
        "the private CA beside it (tls/ca.crt and tls/ca.key). A running coordinator loads it "
        "at its next certificate check (FEDGE_TLS_CHECK_INTERVAL_S) without a restart. "
        "Coordinators renew on their own when fewer than 30 days are left; this is for "
        "renewing sooner (a leaked key, changed names need init --force).",
    )

    key = sub.add_parser(
        "create-key",
        parents=[common],
        help="create an API key directly in the database (bootstrap, recovery)",
        description="Create an administrator API key without going through the REST API.",
    )
    key.add_argument("--role", required=True, choices=ROLES)
    key.add_argument("--name", required=True, help="who or what the key is for")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        data_dir=args.data_dir,
        database_url=args.database_url,
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        insecure_http=getattr(args, "insecure_http", None),
        workers=getattr(args, "workers", None),
    )


def _print_init(result: InitResult, settings: Settings) -> None:
    serve_cmd = f"fedge coordinator serve --data-dir {result.data_dir}"
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"https://{host}:{settings.port}"
    print(
        f"Initialized a fedge coordinator in {result.data_dir}\n"
        f"  database     {redact_url(result.database_url)} (schema at {result.revision})\n"
        f"  blobs        {result.blob_dir}\n"
        f"  CA           {result.tls.ca_cert}  (give it to every device: agents pin it)\n"
        f"  CA key       {result.tls.ca_key}  (keep it private: it renews the certificate)\n"
        f"  certificate  {result.tls.server_cert}  (valid for {', '.join(result.hosts)})\n"
        f"  settings     {result.env_file}\n"
        "\n"
        "Bootstrap admin API key (shown only this once; store it somewhere safe now):\n"
        "\n"
        f"    {result.admin_key}\n"
        "\n"
        "Next steps:\n"
        f"  1. serve:        {serve_cmd}\n"
        f"  2. check:        curl --cacert {result.tls.ca_cert} {url}/readyz\n"
        f"  3. administer:   send 'Authorization: Bearer <key>' to {url}/api/v1/...\n"
        "                   (create enrollment tokens for devices, then tasks)\n"
        f"  4. devices:      enroll agents with a token and {result.tls.ca_cert}"
    )


def _init(args: argparse.Namespace) -> int:
    settings = _settings(args)
    result = init_data_dir(settings, hosts=args.hosts, force=args.force)
    _print_init(result, settings)
    return 0


def _migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.status:
        report = schema_report(settings)
        state = "at head" if report.after == report.head else "NOT at head"
        print(
            f"{redact_url(report.database_url)}: schema at {report.after or 'nothing'} "
            f"(head {report.head}): {state}"
        )
        return 0 if report.after == report.head else 1
    if args.downgrade is not None:
        result = migrate_database(settings, revision=args.downgrade, downgrade=True)
    else:
        result = migrate_database(settings, revision=args.revision)
    print(
        f"{redact_url(result.database_url)}: schema {result.before or 'nothing'} -> "
        f"{result.after or 'nothing'} (head {result.head})"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    # Imported here: FastAPI and uvicorn load only for the command that needs them.
    from fedge.coordinator.server import serve

    return serve(
        _settings(args),
        port_file=args.port_file,
        forwarded_allow_ips=args.forwarded_allow_ips,
        graceful_timeout_s=args.graceful_timeout,
    )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _gc(args: argparse.Namespace) -> int:
    if args.grace_s is not None and args.grace_s < 0:
        print(f"{PROG} gc: error: --grace-s must not be negative", file=sys.stderr)
        return 2
    try:
        report = run_gc(_settings(args), dry_run=args.dry_run, grace_s=args.grace_s)
    except GcBusy as exc:
        print(f"{PROG} gc: {exc}; try again later", file=sys.stderr)
        return 1
    verb = "would delete" if report.dry_run else "deleted"
    prune = "would prune" if report.dry_run else "pruned"
    print(f"{'Dry run: nothing changed. ' if report.dry_run else ''}Garbage collection:")
    print(f"  versions {prune:<13} {report.versions_pruned}")
    for task_id, versions in sorted(report.pruned.items()):
        print(f"    task {task_id}: {', '.join(str(v) for v in versions)}")
    print(f"  blobs {verb:<16} {report.blobs_deleted} ({_size(report.bytes_deleted)})")
    print(f"  blobs kept, referenced  {report.blobs_referenced} ({_size(report.bytes_referenced)})")
    print(
        f"  blobs kept, recent      {report.blobs_recent} ({_size(report.bytes_recent)}, "
        f"written within {report.grace_s:g} s)"
    )
    return 0


def _create_key(args: argparse.Namespace) -> int:
    secret = create_key(_settings(args), name=args.name, role=args.role)
    print(f"New {args.role} API key {args.name!r} (shown only this once):\n\n    {secret}")
    return 0


def _renew_cert(args: argparse.Namespace) -> int:
    from fedge.coordinator.tls import issued_by_ca, renew_server_cert, renewal_lock
    from fedge.coordinator.tls_live import paths_for

    settings = _settings(args)
    assert settings.tls_cert is not None and settings.tls_key is not None
    paths = paths_for(settings.tls_cert, settings.tls_key)
    if not issued_by_ca(paths):
        raise SetupError(
            f"{paths.server_cert} is not a certificate of the private CA {paths.ca_cert} whose "
            f"key {paths.ca_key} is beside it (an operator-provided certificate, or the CA key "
            "was moved offline): renew it where it was issued, or put ca.key back"
        )
    with renewal_lock(paths):
        renewed = renew_server_cert(paths)
    print(
        f"Renewed {paths.server_cert} (key {paths.server_key}): valid until "
        f"{renewed.not_after.isoformat()}, SHA-256 {renewed.fingerprint}.\n"
        f"A running coordinator serves it after its next certificate check (every "
        f"{settings.tls_check_interval_s:g} s); devices need nothing new (same CA)."
    )
    return 0


_HANDLERS = {
    "init": _init,
    "migrate": _migrate,
    "serve": _serve,
    "gc": _gc,
    "create-key": _create_key,
    "renew-cert": _renew_cert,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedge coordinator``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        return _HANDLERS[args.command](args)
    except SetupError as exc:  # includes the server's ServeError
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file or directory the command needed (the message names it)
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in str(exc) else ""
        print(f"{PROG} {args.command}: error: {exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except ValidationError as exc:
        problems = "; ".join(
            f"FEDGE_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        print(f"{PROG} {args.command}: invalid setting: {problems}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
