"""The rendered ``dev`` overlay run for real (``make k8s-test``, after ``make docker-test`` built
the image): two coordinator pods on one PostgreSQL, a fleet of agents training a task through
a Service in front of them, one pod killed and the other restarted mid-run, and every accepted
update applied exactly once.

There is no cluster here, so the test plays the parts of the kubelet, the endpoints controller
and kube-proxy itself, from the rendered objects (docs/deploy-kubernetes.md, "How the
manifests are tested", lists what differs from a cluster):

- each pod of the coordinator Deployment becomes podman containers built from its rendered pod
  spec: the ``migrate`` init container run to completion, then the ``coordinator`` container,
  with the spec's image, args, env (``fieldRef`` resolved), user and group (``fsGroup`` added),
  read-only root filesystem, dropped capabilities, no privilege escalation, CPU and memory
  limits, each emptyDir a fresh podman volume shared by the pod's containers, and the Secrets
  as read-only files (mode and group as the kubelet makes them);
- the readiness probe is the rendered one (path, scheme, port), asked every second; a pod is in
  the Service while its last probe passed;
- the Service is a TCP round-robin over the ready pods (TLS passes through to the pods);
- deleting a pod follows Kubernetes' order: out of the Service, the preStop pause, SIGTERM, and
  SIGKILL after ``terminationGracePeriodSeconds``.

Skipped unless FEDGE_K8S_TEST_IMAGE names the image (``make k8s-test`` sets it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy.engine import make_url

from fedge.coordinator.migrate import head_revision
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import create_ca_and_server_cert
from fedge.edge_agent.admin_client import AdminClient
from fedge.edge_agent.errors import ApiError, Unreachable
from fedge.edge_agent.sim.datasets import load_dataset
from fedge.edge_agent.sim.fleet import Fleet
from fedge.edge_agent.sim.partition import iid_partition
from tests.coordinator.test_device_work_sync import assert_weights_equal, expected_model
from tests.support import k8s
from tests.support.chaos import check_invariants
from tests.support.databases import PostgresDatabase, postgres_admin_url
from tests.support.rounds import Db

IMAGE_ENV = "FEDGE_K8S_TEST_IMAGE"
IMAGE = os.environ.get(IMAGE_ENV, "")
PODMAN = ["podman", "--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
PROBE_PERIOD_S = 1.0
DEVICES = 4
ROUNDS = 5

pytestmark = [
    pytest.mark.slow,
    # Each phase waits with its own deadline; pods start slowly on a loaded 2-core machine
    # (about 5 minutes in all at load average 40, where the default 300 s cut it off).
    pytest.mark.timeout(900),
    pytest.mark.skipif(not IMAGE, reason=f"{IMAGE_ENV} is not set (make k8s-test)"),
]


def _smoke() -> Any:
    path = k8s.ROOT / "docker" / "smoke.py"
    spec = importlib.util.spec_from_file_location("fedge_docker_smoke", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PODMAN, *args], check=check, capture_output=True, text=True, timeout=timeout
    )


def wait_for(
    what: str, probe: Callable[[], bool], *, timeout_s: float, every_s: float = 0.5
) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)


def quantity_bytes(value: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", value)
    assert match, value
    return int(match.group(1)) * units.get(match.group(2), 1)


def cpus(value: str) -> str:
    return str(int(value[:-1]) / 1000) if value.endswith("m") else value


# -- pods from the rendered spec -----------------------------------------------------------------


class Pod:
    """One pod of the coordinator Deployment, as podman containers on the host network."""

    def __init__(
        self, name: str, spec: dict[str, Any], files: dict[str, Path], port: int, db_host: str
    ) -> None:
        self.name = name
        self.db_host = db_host  # the in-cluster name fedge-postgres resolves to this address
        self.spec = spec
        self.files = files  # secret volume name -> directory of its files
        self.port = port
        self.main = f"{name}-coordinator"
        self.ready = False
        self.terminating = False  # out of the Service whatever its probe says
        self.init_log = ""

    def _run_args(self, container: dict[str, Any]) -> list[str]:
        spec = self.spec
        pod_sc = spec.get("securityContext", {})
        sc = {**pod_sc, **container.get("securityContext", {})}
        args = ["--network", "host", *LIMITS, "--health-interval", "disable"]
        args += ["--add-host", f"fedge-postgres:{self.db_host}"]
        args += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
        if "fsGroup" in pod_sc:
            args += ["--group-add", str(pod_sc["fsGroup"])]
        if sc.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]
        for cap in sc.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", cap.lower()]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        limits = container.get("resources", {}).get("limits", {})
        if "cpu" in limits:
            args += ["--cpus", cpus(limits["cpu"])]
        if "memory" in limits:
            args += ["--memory", str(quantity_bytes(limits["memory"]))]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "emptyDir" in volume:  # a fresh volume of the pod's, shared by its containers
                args += ["-v", f"{self.name}-{mount['name']}:{mount['mountPath']}"]
            elif "secret" in volume:
                args += ["-v", f"{self.files[mount['name']]}:{mount['mountPath']}:ro"]
            else:
                raise AssertionError(f"volume {mount['name']}: no podman equivalent here")
        for env in container.get("env", []):
            if "value" in env:
                value = env["value"]
            else:
                field = env["valueFrom"]["fieldRef"]["fieldPath"]
                assert field == "metadata.name", field
                value = self.name
            if env["name"] == "FEDGE_PORT":  # one host network: each pod its own port
                value = str(self.port)
            args += ["-e", f"{env['name']}={value}"]
        return [*args, IMAGE, *container.get("args", [])]

    def start(self) -> None:
        """Init containers to completion, then the coordinator container."""
        for init in self.spec.get("initContainers", []):
            name = f"{self.name}-{init['name']}"
            done = podman(
                "run", "--rm", "--name", name, *self._run_args(init), check=False, timeout=300
            )
            assert done.returncode == 0, f"init container {name}: {done.stdout}{done.stderr}"
            self.init_log += done.stdout + done.stderr
        container = next(c for c in self.spec["containers"] if c["name"] == k8s.CONTAINER)
        podman("run", "--detach", "--name", self.main, *self._run_args(container))

    def probe(self, kind: str = "readinessProbe") -> bool:
        container = next(c for c in self.spec["containers"] if c["name"] == k8s.CONTAINER)
        get = container[kind]["httpGet"]
        url = f"{get.get('scheme', 'HTTP').lower()}://127.0.0.1:{self.port}{get['path']}"
        try:  # the kubelet does not verify the certificate of an HTTPS probe
            return (
                httpx.get(
                    url, verify=False, timeout=container[kind].get("timeoutSeconds", 1)
                ).status_code
                == 200
            )
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        self.terminating, self.ready = True, False
        podman("kill", "--signal", "KILL", self.main)

    def delete(self) -> int:
        """Kubernetes' order: out of the Service, preStop, SIGTERM, SIGKILL at the grace
        period. The container's exit status."""
        self.terminating, self.ready = True, False
        container = next(c for c in self.spec["containers"] if c["name"] == k8s.CONTAINER)
        time.sleep(
            container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        )
        grace = self.spec.get("terminationGracePeriodSeconds", 30)
        podman("stop", "--time", str(grace), self.main, timeout=grace + 30)
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.main).stdout.strip())

    def logs(self) -> str:
        out = podman("logs", self.main, check=False)
        return out.stdout + out.stderr

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.main, check=False)
        for volume in self.spec.get("volumes", []):
            if "emptyDir" in volume:
                podman("volume", "rm", "--force", f"{self.name}-{volume['name']}", check=False)


class Starter(threading.Thread):
    """Start a pod in the background; ``join`` re-raises what went wrong."""

    def __init__(self, pod: Pod) -> None:
        super().__init__(daemon=True)
        self.pod = pod
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.pod.start()
        except BaseException as exc:  # handed to the test's thread in join()
            self.error = exc

    def join(self, timeout: float | None = 300) -> None:
        super().join(timeout)
        assert not self.is_alive(), f"pod {self.pod.name} did not start in {timeout} s"
        if self.error is not None:
            raise self.error


class Service:
    """kube-proxy for one Service: TCP round-robin over the ready pods (TLS passes through)."""

    def __init__(self, pods: list[Pod]) -> None:
        self.pods = pods
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.stopped = threading.Event()
        self.turn = 0
        self.lock = threading.Lock()
        # Connections by id with the directions still copying; closed at the latest when the
        # Service stops.
        self.conns: dict[int, tuple[list[int], socket.socket, socket.socket]] = {}
        self.threads = [
            threading.Thread(target=self._accept, daemon=True),
            threading.Thread(target=self._prober, daemon=True),
        ]

    def __enter__(self) -> Service:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.listener.close()
        for t in self.threads:
            t.join(10)
        with self.lock:
            for _, client, upstream in self.conns.values():
                client.close()
                upstream.close()
            self.conns.clear()

    def _prober(self) -> None:
        while not self.stopped.is_set():
            for pod in list(self.pods):
                pod.ready = not pod.terminating and pod.probe()
            self.stopped.wait(PROBE_PERIOD_S)

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            ready = [p for p in self.pods if p.ready]
            if not ready:
                client.close()
                continue
            self.turn += 1
            pod = ready[self.turn % len(ready)]
            try:
                upstream = socket.create_connection(("127.0.0.1", pod.port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            key = id(client)
            with self.lock:
                self.conns[key] = ([2], client, upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(key, a, b), daemon=True).start()

    def _pipe(self, key: int, src: socket.socket, dst: socket.socket) -> None:
        """Copy one direction; the first to end ends both, the second closes them."""
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self.lock:
            conn = self.conns.get(key)
            if conn is None:  # the Service stopped and closed it
                return
            conn[0][0] -= 1
            if conn[0][0] == 0:
                del self.conns[key]
                src.close()
                dst.close()


# -- the test ------------------------------------------------------------------------------------


@pytest.fixture
def database() -> Iterator[PostgresDatabase]:
    admin_url = postgres_admin_url()
    if admin_url is None:
        pytest.fail("FEDGE_TEST_POSTGRES_URL is not set")
    db = PostgresDatabase(admin_url)
    db.create()
    yield db
    db.drop()


def secret_files(objs: list[dict[str, Any]], root: Path, db_url: str) -> dict[str, Path]:
    """The pod's secret volumes as the kubelet lays them out: one file per key, owned by root
    with the volume's defaultMode and the pod's fsGroup. The dev overlay's database URL names
    the in-cluster PostgreSQL; here its user and database become the test's own database on
    the same server (host fedge-postgres resolves to it)."""
    spec = k8s.coordinator_pod(objs)
    fs_group = spec["securityContext"]["fsGroup"]
    files: dict[str, Path] = {}
    tls = root / "tls-src"
    paths = create_ca_and_server_cert(tls)
    for volume in spec["volumes"]:
        if "secret" not in volume:
            continue
        name = volume["secret"]["secretName"]
        directory = root / volume["name"]
        directory.mkdir()
        if name == "fedge-tls":  # created by the operator (kubectl create secret tls)
            data = {
                "tls.crt": paths.server_cert.read_text(),
                "tls.key": paths.server_key.read_text(),
            }
        else:
            data = {
                key: __import__("base64").b64decode(value).decode()
                for key, value in k8s.one(objs, "Secret", name)["data"].items()
            }
            rendered = make_url(data["url"])
            ours = make_url(db_url)
            data["url"] = rendered.set(
                username=ours.username, password=None, database=ours.database, port=ours.port
            ).render_as_string(hide_password=False)
        for key, value in data.items():
            path = directory / key
            path.write_text(value)
            os.chown(path, 0, fs_group)
            path.chmod(volume["secret"].get("defaultMode", 0o644))
        directory.chmod(0o755)
        files[volume["name"]] = directory
    root.chmod(0o755)
    (root / "ca.crt").write_bytes(paths.ca_cert.read_bytes())
    return files


def test_two_coordinators_from_the_dev_overlay_lose_no_update_through_a_kill_and_a_restart(
    database: PostgresDatabase,
) -> None:
    assert shutil.which("podman"), "podman is not installed (make docker-test installs it)"
    assert podman("image", "exists", IMAGE, check=False).returncode == 0, f"no image {IMAGE}"
    objs = k8s.render("dev")
    spec = k8s.coordinator_pod(objs)
    run_id = secrets.token_hex(3)
    root = Path(tempfile.mkdtemp(prefix="fedge-k8s-test-"))
    files = secret_files(objs, root, database.url)
    db_host = socket.gethostbyname(make_url(database.url).host or "127.0.0.1")
    pods: list[Pod] = []

    def new_pod(suffix: str) -> Pod:
        pod = Pod(f"fedge-k8s-{run_id}-{suffix}", spec, files, free_port(), db_host)
        pods.append(pod)
        return pod

    try:
        # Two pods at once: both init containers race for the migration lock.
        a, b = new_pod("a"), new_pod("b")
        starters = [threading.Thread(target=p.start) for p in (a, b)]
        for t in starters:
            t.start()
        for t in starters:
            t.join(300)
        logs = a.init_log + b.init_log
        assert logs.count("migrated schema from nothing") == 1, logs
        assert logs.count(f"schema already at {head_revision()}") == 1, logs

        with Service(pods) as service:
            wait_for("both pods ready", lambda: a.ready and b.ready, timeout_s=120)
            assert all(p.probe("livenessProbe") for p in (a, b))
            out = podman(
                "exec",
                a.main,
                "fedge",
                "coordinator",
                "create-key",
                "--role",
                "admin",
                "--name",
                "k8s-test",
            ).stdout
            key = [line for line in out.splitlines() if line.strip()][-1].split()[0]
            assert key.startswith("fk_")
            url = f"https://127.0.0.1:{service.port}"
            run_fleet(url, root / "ca.crt", key, pods=pods, new_pod=new_pod, database=database)
    finally:
        for pod in pods:
            pod.remove()
        shutil.rmtree(root, ignore_errors=True)


def run_fleet(
    url: str,
    ca: Path,
    key: str,
    *,
    pods: list[Pod],
    new_pod: Callable[[str], Pod],
    database: PostgresDatabase,
) -> None:
    smoke = _smoke()
    rng = np.random.default_rng(7)
    data = load_dataset("digits", test_fraction=0.2, rng=rng)
    parts = iid_partition(data.y_train.size, DEVICES, rng)
    shards = [(data.X_train[p], data.y_train[p]) for p in parts]
    a, b = pods
    context = ssl.create_default_context(cafile=str(ca))
    with AdminClient(url, key, ca_file=str(ca)) as admin:
        body = smoke.task_body(
            input_dim=data.input_dim,
            num_classes=data.num_classes,
            devices=DEVICES,
            rounds=ROUNDS,
            seed=7,
        )
        body["aggregation"]["round_deadline_s"] = 20
        task_id = admin.create_task(body)["id"]
        token = admin.create_enrollment_token(label="k8s-test", max_uses=DEVICES, expires_in_s=900)
        with tempfile.TemporaryDirectory(prefix="fedge-k8s-fleet-") as fleet_root:
            fleet = Fleet(
                url=url, ca_file=str(ca), root=fleet_root, shards=shards, seed=7, poll_wait=2.0
            )
            with fleet:
                fleet.enroll(token["token"])
                fleet.start()
                admin.start_task(task_id)

                def version() -> int:
                    try:
                        return int(admin.get_task(task_id)["current_version"])
                    except (Unreachable, ApiError):  # no ready pod in the Service just now
                        return -1

                # Mid-run: pod a dies (SIGKILL, as on a node failure); its replacement starts
                # meanwhile, as the Deployment's controller would start it.
                wait_for("model version 1", lambda: version() >= 1, timeout_s=120)
                at_kill = version()
                a.kill()
                a2 = Starter(new_pod("a2"))
                # Then pod b is deleted gracefully and replaced, whether or not a2 is ready
                # yet (the Service may have no pod for a while: devices wait and retry).
                wait_for("model version 2", lambda: version() >= 2, timeout_s=120)
                at_delete = version()
                status_b = b.delete()
                b_logs = b.logs()
                b2 = Starter(new_pod("b2"))
                a2.join()
                b2.join()
                task = None

                def finished() -> bool:
                    nonlocal task
                    try:
                        task = admin.get_task(task_id)
                    except (Unreachable, ApiError):
                        return False
                    return task["status"] in smoke.TERMINAL

                wait_for("task finished", finished, timeout_s=180)
            stats = fleet.stats()
    assert at_kill < ROUNDS and at_delete < ROUNDS, "the task ended before the disruptions"
    assert task is not None and task["status"] == "completed", task
    assert not stats.errors, stats.errors
    assert status_b == 0, b_logs
    assert "Traceback" not in b_logs, b_logs
    assert httpx.get(f"{url}/readyz", verify=context, timeout=10).json() == {"status": "ready"}

    # Every accepted update applied exactly once, each version from exactly its updates.
    settings = Settings(database_url=database.url, blob_url="database", data_dir=ca.parent)
    db = Db(settings)
    try:
        assert (
            check_invariants(
                db, task_id, model_check=expected_model, assert_close=assert_weights_equal
            )
            == []
        )
        updates = db.updates(task_id)
        applied = [u for u in updates if u.status == "applied"]
        assert len(applied) >= ROUNDS * (DEVICES - 1)
        assert not [u for u in updates if u.status == "accepted"]
        assert len({u.assignment_id for u in updates}) == len(updates)
        assert {u.applied_version for u in applied} == set(range(1, ROUNDS + 1))
    finally:
        db.close()
