"""Run the Flower harness's commands with extra run-config values (e.g. ``local-epochs=5``).

The team's harness (``digitsapp/bench/run.sh`` in the Flower peer folder) passes no
``local-epochs``, so the app's default (1) applies. This launcher runs the same sequence of
commands as run.sh, with the same ports, environment and files, and appends ``--extra``
(``key=value`` items) to ``flwr run --run-config``:

1. ``procmon.py`` (the harness's) samples memory and CPU of every process;
2. ``flower-superlink --insecure`` on 127.0.0.1:8000, then 4 s;
3. with ``--proxy``, the harness's ``countproxy.py`` on 8001 in front of 8000, then 1 s;
4. N ``flower-supernode --insecure`` (ports 9094+i, ``partition-id=i num-partitions=N``);
5. wait until every supernode log shows ``SuperNode ID`` (at most 120 s), then 5 s;
6. ``flwr run APP loopback --stream --run-config "num-server-rounds=R num-clients=N
   results-path=... data-dir=... EXTRA"``;
7. SIGTERM to everything started (SIGKILL after 30 s), then the superexec helpers.

Unlike run.sh there is no 20 s idle tail after ``flwr run`` (``bench/flower_setting.py``
counts bytes between the first and the last round's timestamps, so the tail is not used).
Outputs land in ``HOMES/out/TAG/`` under run.sh's names (results.json, proxy.log,
procmon.json, wall.txt, node*.log, superlink.log, flwr_run.log).

    python bench/_flower_launch.py --venv V --homes H --app APP --data D --clients 10 \
        --rounds 10 --tag t --proxy --extra local-epochs=5
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

LINK_PORT = 8000
PROXY_PORT = 8001
NODE_PORT0 = 9094


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", type=Path, required=True)
    p.add_argument("--homes", type=Path, required=True)
    p.add_argument("--app", type=Path, required=True)
    p.add_argument("--data", default="")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--tag", default="run")
    p.add_argument("--proxy", action="store_true")
    p.add_argument("--extra", nargs="*", default=[], help="run-config items key=value")
    return p.parse_args(argv)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    bench = a.app / "bench"
    outd = a.homes / "out" / a.tag
    outd.mkdir(parents=True, exist_ok=True)
    (a.homes / "cli").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(a.homes / "link", ignore_errors=True)
    for old in a.homes.glob("n[0-9]*"):
        shutil.rmtree(old, ignore_errors=True)
    (a.homes / "cli" / "config.toml").write_text(
        '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{LINK_PORT}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "PATH": f"{a.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    python = str(a.venv / "bin" / "python")
    procs: list[subprocess.Popen[bytes]] = []
    files = []

    def start(cmd: list[str], log: str | None, home: Path | None) -> subprocess.Popen[bytes]:
        e = dict(env)
        if home is not None:
            e["FLWR_HOME"] = str(home)
        out = open(outd / log, "wb") if log else None  # noqa: SIM115 - closed at the end
        if out is not None:
            files.append(out)
        return subprocess.Popen(cmd, env=e, stdout=out, stderr=subprocess.STDOUT if out else None)

    monitor = start(
        [python, str(bench / "procmon.py"), str(outd / "procmon.json"), "0.1"], None, None
    )
    try:
        procs.append(
            start(
                ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation"],
                "superlink.log",
                a.homes / "link",
            )
        )
        time.sleep(4)
        address = f"127.0.0.1:{LINK_PORT}"
        if a.proxy:
            procs.append(
                start(
                    [
                        python,
                        str(bench / "countproxy.py"),
                        str(PROXY_PORT),
                        str(LINK_PORT),
                        str(outd / "proxy.log"),
                    ],
                    None,
                    None,
                )
            )
            address = f"127.0.0.1:{PROXY_PORT}"
            time.sleep(1)
        for i in range(a.clients):
            procs.append(
                start(
                    [
                        "flower-supernode",
                        "--insecure",
                        "--superlink",
                        address,
                        "--port",
                        str(NODE_PORT0 + i),
                        "--node-config",
                        f"partition-id={i} num-partitions={a.clients}",
                    ],
                    f"node{i}.log",
                    a.homes / f"n{i}",
                )
            )
        (outd / "pids.txt").write_text(
            f"superlink {procs[0].pid}; all: {' '.join(str(p.pid) for p in procs)}; "
            f"monitor {monitor.pid}\n"
        )
        registered, waited = 0, 0
        for second in range(1, 121):
            waited = second
            registered = sum(
                1
                for i in range(a.clients)
                if "SuperNode ID" in (outd / f"node{i}.log").read_text(errors="replace")
            )
            if registered >= a.clients:
                break
            time.sleep(1)
        line = f"registered: {registered}/{a.clients} after {waited}s"
        (outd / "register.txt").write_text(line + "\n")
        print(line, flush=True)
        time.sleep(5)
        config = " ".join(
            [
                f"num-server-rounds={a.rounds}",
                f"num-clients={a.clients}",
                f'results-path="{outd / "results.json"}"',
                f'data-dir="{a.data}"',
                *a.extra,
            ]
        )
        t0 = time.time()
        with open(outd / "flwr_run.log", "wb") as log:
            subprocess.run(
                ["flwr", "run", str(a.app), "loopback", "--stream", "--run-config", config],
                env={**env, "FLWR_HOME": str(a.homes / "cli")},
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        t1 = time.time()
        (outd / "wall.txt").write_text(f"flwr_run_wall_s {round(t1 - t0, 3)}\n")
        (outd / "run_window.txt").write_text(f"{t0:.3f} {t1:.3f}\n")
        print(f"flwr_run_wall_s {round(t1 - t0, 3)}", flush=True)
        time.sleep(2)
    finally:
        helpers = [k for p in procs for k in _children(p.pid)]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"SIGKILL {p.pid}", flush=True)
                p.kill()
                p.wait(5)
        deadline = time.monotonic() + 15
        while any(_alive(h) for h in helpers) and time.monotonic() < deadline:
            time.sleep(0.2)
        for h in helpers:
            if _alive(h):
                print(f"TERM helper {h}", flush=True)
                os.kill(h, signal.SIGTERM)
        monitor.send_signal(signal.SIGTERM)
        monitor.wait(10)
        for f in files:
            f.close()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
