"""Flower beside fedge in ``bench/flower_setting.py``: its virtualenv, the harness, its bytes.

The harness is the team's Flower app in the peer folder (default
``/work/shared/peers/flower``, option ``--flower-harness`` or ``FEDGE_FLOWER_HARNESS``):
``digitsapp/`` (ServerApp + ClientApp, the data split, the Dirichlet partition and the MLP's
init in ``digitsapp/task.py``) and ``digitsapp/bench/run.sh`` (one superlink, N supernodes,
``flwr run``; ``PROXY=1`` puts ``countproxy.py``, a counting TCP relay, in front of the
superlink). Nothing of it is copied here: ``digitsapp.task`` is imported from that folder (for
the shards, the test split and the initial weights), and run.sh or
``bench/_flower_launch.py`` (the same commands with extra run-config, e.g. 5 local epochs)
runs Flower.

Flower needs its own virtualenv; :func:`ensure_venv` creates it on first use
(``pip install`` of the versions the harness's RESULTS.md names) and reuses it afterwards.
When the harness or the virtualenv is missing and cannot be made, :class:`FlowerUnavailable`
says why, and the benchmark records Flower as not run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_HARNESS = Path(os.environ.get("FEDGE_FLOWER_HARNESS", "/work/shared/peers/flower"))
#: The versions RESULTS.md measured (flwr 1.42.0, scikit-learn 1.9.1, numpy 2.4.6).
PINNED = ("flwr==1.42.0", "scikit-learn==1.9.1", "numpy==2.4.6")
UNPINNED = ("flwr", "scikit-learn")
VERSIONS_OF = ("flwr", "numpy", "scikit-learn", "grpcio", "protobuf")


class FlowerUnavailable(RuntimeError):
    """Flower cannot run here (no harness, no virtualenv); the message says why."""


def default_venv() -> Path:
    cache = Path.home() / ".cache"
    if os.access(cache if cache.exists() else Path.home(), os.W_OK):
        return cache / "fedge-bench" / "flower-venv"
    return Path(tempfile.gettempdir()) / "fedge-bench-flower-venv"


def harness_app(harness: Path) -> Path:
    """The harness's app folder, checked for the files the benchmark uses."""
    app = harness / "digitsapp"
    needed = [
        app / "pyproject.toml",
        app / "digitsapp" / "task.py",
        app / "bench" / "run.sh",
        app / "bench" / "countproxy.py",
        app / "bench" / "procmon.py",
    ]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise FlowerUnavailable(f"the Flower harness is incomplete: missing {', '.join(missing)}")
    return app


def import_task(harness: Path) -> ModuleType:
    """``digitsapp.task`` of the harness (data split, partition, init), imported from there."""
    app = harness_app(harness)
    if str(app) not in sys.path:
        sys.path.insert(0, str(app))
    import digitsapp.task as task  # the harness folder added above

    if Path(task.__file__).resolve().parent != (app / "digitsapp").resolve():
        raise FlowerUnavailable(f"digitsapp.task was imported from {task.__file__}, not {app}")
    return task


def _venv_versions(venv: Path) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        f"names = {list(VERSIONS_OF)!r}\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise FlowerUnavailable(f"the virtualenv {venv} does not run: {done.stderr.strip()}")
    versions: dict[str, str] = json.loads(done.stdout)
    return versions


def ensure_venv(venv: Path, *, log: Any = print) -> dict[str, Any]:
    """A virtualenv with flwr and scikit-learn at ``venv`` (made on first use); its versions."""
    ready = (venv / "bin" / "flwr").exists() and (venv / "bin" / "flower-superlink").exists()
    created = False
    pins: Sequence[str] = PINNED
    if not ready:
        log(f"creating Flower's virtualenv in {venv} (pip install {' '.join(PINNED)})")
        venv.parent.mkdir(parents=True, exist_ok=True)
        base = getattr(sys, "_base_executable", sys.executable)
        made = subprocess.run(
            [base, "-m", "venv", str(venv)], capture_output=True, text=True, check=False
        )
        if made.returncode != 0:
            raise FlowerUnavailable(f"python -m venv {venv} failed: {made.stderr.strip()}")
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        done = subprocess.run([*pip, *PINNED], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log("the pinned versions did not install; trying the newest flwr and scikit-learn")
            pins = UNPINNED
            done = subprocess.run([*pip, *UNPINNED], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise FlowerUnavailable(f"pip install flwr scikit-learn into {venv} failed:\n{tail}")
        created = True
    versions = _venv_versions(venv)
    if "flwr" not in versions:
        raise FlowerUnavailable(f"no flwr in the virtualenv {venv}")
    return {
        "path": str(venv),
        "created_in_this_run": created,
        "requested": list(pins) if created else None,
        "versions": versions,
        "matches_results_md": all(
            versions.get(p.split("==")[0]) == p.split("==")[1] for p in PINNED
        ),
    }


def prepare_data(venv: Path, app: Path, data_dir: Path) -> None:
    """The harness's ``prepare_data``, run in Flower's virtualenv: ``digits_split.npz``."""
    done = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sys; from digitsapp.task import prepare_data; prepare_data(sys.argv[1])",
            str(data_dir),
        ],
        cwd=app,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise FlowerUnavailable(f"prepare_data failed: {done.stderr.strip()}")


def run_flower(
    *,
    venv: Path,
    app: Path,
    homes: Path,
    data_dir: Path,
    clients: int,
    rounds: int,
    epochs: int,
    tag: str,
    timeout_s: float,
) -> dict[str, Any]:
    """One Flower run with the counting relay; its results, parsed (see :func:`summarize`).

    With 1 local epoch (the app's default) this is the harness's run.sh itself (``PROXY=1``);
    otherwise ``bench/_flower_launch.py`` runs the same commands with ``local-epochs``."""
    if epochs == 1:
        cmd = ["bash", str(app / "bench" / "run.sh")]
        how = "run.sh (PROXY=1)"
        env = {
            **os.environ,
            "VENV": str(venv),
            "HOMES": str(homes),
            "APP": str(app),
            "DATA": str(data_dir),
            "N": str(clients),
            "R": str(rounds),
            "PROXY": "1",
            "TAG": tag,
        }
    else:
        cmd = [
            sys.executable,
            str(BENCH_DIR / "_flower_launch.py"),
            "--venv",
            str(venv),
            "--homes",
            str(homes),
            "--app",
            str(app),
            "--data",
            str(data_dir),
            "--clients",
            str(clients),
            "--rounds",
            str(rounds),
            "--tag",
            tag,
            "--proxy",
            "--extra",
            f"local-epochs={epochs}",
        ]
        how = f"bench/_flower_launch.py (run.sh's commands + local-epochs={epochs}, proxy)"
        env = dict(os.environ)
    outd = homes / "out" / tag
    outd.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(outd / "launcher.log", "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        set_autogroup_nice(proc.pid)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired as exc:
            _abort(proc)
            raise FlowerUnavailable(
                f"the Flower run {tag} took longer than {timeout_s:.0f} s (stopped); "
                f"see {outd}/node*.log"
            ) from exc
        finally:
            _sweep(proc.pid)
    results = outd / "results.json"
    if not results.exists():
        tail = "\n".join((outd / "launcher.log").read_text(errors="replace").splitlines()[-10:])
        flwr_log = outd / "flwr_run.log"
        if flwr_log.exists():
            tail += "\n" + "\n".join(flwr_log.read_text(errors="replace").splitlines()[-10:])
        raise FlowerUnavailable(f"the Flower run {tag} wrote no results.json:\n{tail}")
    out = summarize(
        json.loads(results.read_text()), read_proxy_log(outd / "proxy.log"), clients=clients
    )
    out.update(
        {
            "tag": tag,
            "how": how,
            "epochs": epochs,
            "output_dir": str(outd),
            "launcher_wall_s": time.time() - started,
            "flwr_run_wall_s": _read_wall(outd / "wall.txt"),
            "registration": (outd / "register.txt").read_text().strip()
            if (outd / "register.txt").exists()
            else None,
        }
    )
    return out


def set_autogroup_nice(pid: int) -> int | None:
    """Give ``pid``'s session the niceness of this process (Linux autogroup scheduling).

    With ``kernel.sched_autogroup_enabled`` the CPU is shared between sessions first, so a
    process's own niceness only counts inside its session; a launcher in a session of its
    own gets this process's niceness for its whole session. The niceness set, or ``None``
    where there is no autogroup (or it may not be changed)."""
    nice = os.nice(0)
    path = Path(f"/proc/{pid}/autogroup")
    try:
        path.write_text(f"{nice}\n")
    except OSError:
        return None
    return nice


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(x) for x in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def _abort(proc: subprocess.Popen[bytes]) -> None:
    """Stop a launcher that overran: end its ``flwr run`` so that the launcher stops what it
    started itself; if it is still there after 90 s, SIGTERM then SIGKILL its session (every
    process in it was started by this benchmark)."""
    for pid in _descendants(proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"flwr") for part in cmdline[:2]) and b"run" in cmdline:
            os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(90)
        return
    except subprocess.TimeoutExpired:
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(30)
            return
        except subprocess.TimeoutExpired:
            continue


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _sweep(pgid: int) -> None:
    """End what is left of a finished launcher's process group: ``flwr-clientapp`` processes
    whose supernode or superexec ended before them (they outlive their parents). The group
    was made for the launcher (``start_new_session``), so it holds only processes this run
    started; they are signalled one by one, by process id."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        members = _group_members(pgid)
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)


def _read_wall(path: Path) -> float | None:
    try:
        return float(path.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def read_proxy_log(path: Path) -> list[tuple[float, int, int]]:
    """countproxy.py's samples: (time, cumulative bytes up, cumulative bytes down)."""
    samples = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            samples.append((float(parts[0]), int(parts[1]), int(parts[2])))
    if not samples:
        raise FlowerUnavailable(f"the counting relay's log {path} is empty")
    return samples


def _at_or_before(samples: Sequence[tuple[float, int, int]], t: float) -> tuple[int, int]:
    best = samples[0]
    for s in samples:
        if s[0] <= t:
            best = s
        else:
            break
    return best[1], best[2]


def _at_or_after(samples: Sequence[tuple[float, int, int]], t: float) -> tuple[int, int]:
    for s in samples:
        if s[0] >= t:
            return s[1], s[2]
    return samples[-1][1], samples[-1][2]


IDLE_WINDOW_S = 15.0


def idle_rate(
    samples: Sequence[tuple[float, int, int]], t0: float, *, clients: int
) -> float | None:
    """Bytes per client per second (both directions) while every supernode is registered and
    idle: the relay's samples in the ``IDLE_WINDOW_S`` before round 0 (after the harness's 5 s
    settle, while ``flwr run`` builds and submits the app; the app itself goes to the
    superlink's control API, not through the relay). ``None`` without enough samples."""
    inside = [s for s in samples if t0 - IDLE_WINDOW_S <= s[0] <= t0]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] < IDLE_WINDOW_S / 2:
        return None
    first, last = inside[0], inside[-1]
    return (last[1] - first[1] + last[2] - first[2]) / (last[0] - first[0]) / clients


def summarize(
    results: dict[str, Any], samples: Sequence[tuple[float, int, int]], *, clients: int
) -> dict[str, Any]:
    """Per-round bytes, accuracy and round times of one Flower run.

    Bytes are the relay's cumulative counts between round 0's timestamp (the initial
    evaluation when the strategy starts) and each round's (the evaluation after its
    aggregation), both in results.json. The relay logs every 0.5 s; the window is rounded
    inwards (the first sample at or after round 0, the last at or before round r), so Flower's
    figure is never larger than what crossed the socket in the window: registration before
    the run and run.sh's idle tail after it are excluded."""
    log = sorted(results["rounds"], key=lambda r: int(r["round"]))
    t0 = float(log[0]["t"])
    up0, down0 = _at_or_after(samples, t0)
    curve = []
    for r in log:
        if int(r["round"]) == 0:
            up, down = up0, down0
        else:
            up, down = _at_or_before(samples, float(r["t"]))
        curve.append(
            {
                "round": int(r["round"]),
                "t_s": float(r["t"]) - t0,
                "accuracy": float(r["acc"]),
                "loss": float(r["loss"]),
                "up_bytes_per_client": (up - up0) / clients,
                "down_bytes_per_client": (down - down0) / clients,
            }
        )
    rounds = len(log) - 1
    last = curve[-1]
    final = last["accuracy"]
    reach = next(p for p in curve if p["accuracy"] >= final)
    dts = [float(r["dt"]) for r in log[1:]]
    idle = idle_rate(samples, t0, clients=clients)
    to_final = reach["up_bytes_per_client"] + reach["down_bytes_per_client"]
    return {
        "idle_bytes_per_client_per_s": idle,
        "bytes_per_client_to_final_accuracy_net_of_idle": None
        if idle is None
        else max(0.0, to_final - idle * reach["t_s"]),
        "rounds": rounds,
        "final_accuracy": final,
        "curve": curve,
        "seconds_per_round": (float(log[-1]["t"]) - t0) / rounds,
        "round_seconds": dts,
        "up_bytes_per_client_per_round": last["up_bytes_per_client"] / rounds,
        "down_bytes_per_client_per_round": last["down_bytes_per_client"] / rounds,
        "total_bytes_per_client": last["up_bytes_per_client"] + last["down_bytes_per_client"],
        "rounds_to_final_accuracy": reach["round"],
        "bytes_per_client_to_final_accuracy": to_final,
        "whole_log_bytes_per_client": {
            "up": samples[-1][1] / clients,
            "down": samples[-1][2] / clients,
            "note": "everything the relay saw: registration, the run and any idle tail",
        },
        "window": "relay counts from round 0's timestamp to round r's (results.json), "
        "rounded inwards",
    }
