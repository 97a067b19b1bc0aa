"""The Kubernetes manifests in deploy/kubernetes/: rendering them with ``kubectl kustomize`` and
the rules every rendered overlay must keep.

Each ``problems_*`` function reads rendered objects (dicts, as ``yaml.safe_load_all`` gives
them) and returns what is wrong, empty when nothing is; the tests run them on every overlay and
on mutated copies, so that each rule is shown to catch what it is about.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from fedge.coordinator.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE_ROOT = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("dev", "prod")
COORDINATOR = "fedge-coordinator"
CONTAINER = "coordinator"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "Pod")
#: Environment variable names that must never carry a value in plain ``env``.
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|PRIVATE|API_KEY|CREDENTIAL)", re.I)

Obj = dict[str, Any]


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(target: str) -> list[Obj]:
    """``kubectl kustomize`` of an overlay (``dev``, ``prod``) or of ``base``."""
    exe = kubectl()
    assert exe is not None, "kubectl is not installed"
    path = KUSTOMIZE_ROOT / ("base" if target == "base" else f"overlays/{target}")
    out = subprocess.run(
        [exe, "kustomize", str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": os.devnull},
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(objs: Iterable[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o for o in objs if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objs: Iterable[Obj], kind: str, name: str) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def pod_spec(obj: Obj) -> Obj:
    spec: Obj = obj["spec"]
    if obj["kind"] == "Pod":
        return spec
    if obj["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return spec["template"]["spec"]  # type: ignore[no-any-return]


def workloads(objs: Iterable[Obj]) -> Iterator[Obj]:
    return (o for o in objs if o.get("kind") in WORKLOADS)


def all_containers(spec: Obj) -> list[Obj]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def coordinator_pod(objs: Iterable[Obj]) -> Obj:
    return pod_spec(one(objs, "Deployment", COORDINATOR))


def coordinator_container(objs: Iterable[Obj]) -> Obj:
    containers = coordinator_pod(objs)["containers"]
    return next(c for c in containers if c["name"] == CONTAINER)  # type: ignore[no-any-return]


def plain_env(container: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def option(args: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in a container's args."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


# -- the rules ---------------------------------------------------------------------------------


def problems_probes(objs: list[Obj], served: set[str]) -> list[str]:
    """Every HTTP probe of the coordinator asks a path the app serves (``served``: its GET
    routes), on a port the container declares, with the scheme the coordinator speaks; the
    readiness probe is ``/readyz`` (database and schema), liveness something else."""
    bad: list[str] = []
    container = coordinator_container(objs)
    env = plain_env(container)
    insecure = env.get("FEDGE_INSECURE_HTTP", "false").lower() in {"1", "true", "yes", "on"}
    scheme = "HTTP" if insecure else "HTTPS"
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    port = int(env.get("FEDGE_PORT", Settings.model_fields["port"].default))
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if probe is None:
            if kind != "startupProbe":
                bad.append(f"no {kind}")
            continue
        get = probe.get("httpGet")
        if get is None:
            bad.append(f"{kind} is not an HTTP probe")
            continue
        if get["path"] not in served:
            bad.append(f"{kind} asks {get['path']}, which the coordinator does not serve")
        target = ports.get(get["port"], get["port"])
        if target != port:
            bad.append(f"{kind} probes port {get['port']} ({target}), the server is on {port}")
        if get.get("scheme", "HTTP") != scheme:
            bad.append(f"{kind} uses {get.get('scheme', 'HTTP')}, the coordinator serves {scheme}")
    ready = container.get("readinessProbe", {}).get("httpGet", {}).get("path")
    live = container.get("livenessProbe", {}).get("httpGet", {}).get("path")
    if ready is not None and ready != "/readyz":
        bad.append(f"readinessProbe asks {ready}: readiness is /readyz (database, schema)")
    if live is not None and live == ready:
        bad.append("liveness and readiness probe the same path")
    return bad


def _loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def problems_bind(objs: list[Obj]) -> list[str]:
    """The coordinator listens on every interface (its default, 127.0.0.1, fails every probe
    and every Service)."""
    container = coordinator_container(objs)
    host = option(container.get("args", []), "--host") or plain_env(container).get(
        "FEDGE_HOST", Settings.model_fields["host"].default
    )
    if _loopback(host):
        return [f"the coordinator binds {host}: loopback only"]
    return []


def secret_values(objs: list[Obj]) -> set[str]:
    values: set[str] = set()
    for secret in find(objs, "Secret"):
        for raw in (secret.get("data") or {}).values():
            values.add(base64.b64decode(raw).decode("utf-8", "replace"))
        values.update((secret.get("stringData") or {}).values())
    return {v for v in values if len(v) >= 4}


def _url_password(value: str) -> str | None:
    if "://" not in value:
        return None
    try:
        return make_url(value).password  # type: ignore[return-value]
    except (ArgumentError, ValueError):
        return None


def problems_secrets_in_env(objs: list[Obj]) -> list[str]:
    """No secret in any container's environment: no plain value that is a Secret's value,
    holds a URL with a password or has a secret's name, and no ``secretKeyRef`` (secrets reach
    the coordinator as files, through the ``*_FILE`` settings)."""
    bad: list[str] = []
    secrets = secret_values(objs)
    for obj in workloads(objs):
        for c in all_containers(pod_spec(obj)):
            where = f"{obj['kind']}/{obj['metadata']['name']} container {c['name']}"
            for e in c.get("env", []):
                name = e["name"]
                if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]:
                    bad.append(f"{where}: {name} takes a Secret into the environment")
                if "value" not in e:
                    continue
                value = str(e["value"])
                if any(s in value for s in secrets):
                    bad.append(f"{where}: {name} holds a Secret's value")
                elif _url_password(value):
                    bad.append(f"{where}: {name} holds a URL with a password")
                elif SECRET_NAME.search(name) and not name.endswith("_FILE"):
                    bad.append(f"{where}: {name} is a secret in plain env")
            if c.get("envFrom"):
                bad.append(f"{where}: envFrom puts a whole object into the environment")
    return bad


def dockerfile_user(dockerfile: Path = ROOT / "docker" / "Dockerfile") -> str | None:
    """The last ``USER`` of the Dockerfile (the runtime stage's)."""
    users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(encoding="utf-8"), re.M)
    return users[-1] if users else None


def problems_security(objs: list[Obj], image_user: str | None) -> list[str]:
    """Non-root (the image's USER and the pods' securityContext), read-only root filesystem
    with writable emptyDirs where the coordinator writes, no privilege escalation or
    capabilities, no service-account token."""
    bad: list[str] = []
    user = (image_user or "root").split(":")[0]
    if user in {"root", "0"}:
        bad.append(f"the image runs as {image_user or 'root (no USER)'}")
    for obj in workloads(objs):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        spec = pod_spec(obj)
        pod_sc = spec.get("securityContext", {})
        if spec.get("automountServiceAccountToken") is not False:
            bad.append(f"{where}: the service-account token is mounted")
        for c in all_containers(spec):
            sc = {**pod_sc, **c.get("securityContext", {})}
            cw = f"{where} container {c['name']}"
            if sc.get("runAsNonRoot") is not True:
                bad.append(f"{cw}: runAsNonRoot is not true")
            if sc.get("runAsUser") == 0:
                bad.append(f"{cw}: runAsUser 0")
            if sc.get("readOnlyRootFilesystem") is not True:
                bad.append(f"{cw}: the root filesystem is writable")
            if sc.get("allowPrivilegeEscalation") is not False:
                bad.append(f"{cw}: privilege escalation allowed")
            if sc.get("privileged"):
                bad.append(f"{cw}: privileged")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                bad.append(f"{cw}: capabilities not dropped")
            if sc.get("capabilities", {}).get("add"):
                bad.append(f"{cw}: adds capabilities")
            resources = c.get("resources", {})
            for part in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    if res not in resources.get(part, {}):
                        bad.append(f"{cw}: no {part}.{res}")
    for sa in find(objs, "ServiceAccount"):
        if sa.get("automountServiceAccountToken") is not False:
            bad.append(f"ServiceAccount/{sa['metadata']['name']} mounts its token")
    # Where the coordinator writes: its data directory and /tmp, emptyDirs.
    spec = coordinator_pod(objs)
    empty = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
    container = coordinator_container(objs)
    data_dir = plain_env(container).get("FEDGE_DATA_DIR", "")
    mounted = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    for path in ("/tmp", data_dir):
        if mounted.get(path) not in empty:
            bad.append(f"no writable emptyDir at {path or 'FEDGE_DATA_DIR (unset)'}")
    return bad


def problems_lifecycle(objs: list[Obj]) -> list[str]:
    """Stopping loses nothing: the grace period outlasts the preStop pause plus the long-poll
    or the graceful timeout; migrations run in the init container (under the advisory lock)
    and never in the serving container; no service links leak FEDGE_* variables."""
    bad: list[str] = []
    spec = coordinator_pod(objs)
    container = coordinator_container(objs)
    env = plain_env(container)
    long_poll = int(
        env.get("FEDGE_LONG_POLL_MAX_S", Settings.model_fields["long_poll_max_s"].default)
    )
    graceful = int(option(container.get("args", []), "--graceful-timeout") or 10)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    # SIGTERM answers waiting long-polls at once; the grace period still outlasts a whole
    # long-poll begun before it, and the graceful timeout the uploads in flight get.
    if grace <= pre_stop + max(long_poll, graceful):
        bad.append(
            f"terminationGracePeriodSeconds {grace} is not above the preStop ({pre_stop} s) "
            f"+ the long-poll ({long_poll} s) or the graceful timeout ({graceful} s)"
        )
    if env.get("FEDGE_MIGRATE_ON_START", "true").lower() not in {"0", "false", "no", "off"}:
        bad.append("the serving container migrates at start (FEDGE_MIGRATE_ON_START)")
    migrators = [c for c in spec.get("initContainers", []) if c.get("args") == ["migrate"]]
    if len(migrators) != 1:
        bad.append(f"{len(migrators)} init containers run `migrate`")
    elif migrators[0]["image"] != container["image"]:
        bad.append("the migrate init container runs another image than the coordinator")
    if spec.get("enableServiceLinks") is not False:
        bad.append("service links are enabled (they set FEDGE_*-prefixed variables)")
    return bad


def problems_wiring(objs: list[Obj]) -> list[str]:
    """Names that must meet: Service and PDB selectors match the pods, the HPA targets the
    Deployment, Ingress backends exist, every mounted volume is defined, secret volumes of
    generated Secrets use the generated names, and nothing hard-codes a namespace."""
    bad: list[str] = []
    for obj in objs:
        if "namespace" in obj.get("metadata", {}):
            bad.append(f"{obj['kind']}/{obj['metadata']['name']} hard-codes a namespace")
    pods = {
        o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
        for o in workloads(objs)
        if o["kind"] != "Pod"
    }

    def matches(selector: dict[str, str]) -> bool:
        return any(selector.items() <= labels.items() for labels in pods.values())

    for svc in find(objs, "Service"):
        if not matches(svc["spec"].get("selector", {})):
            bad.append(f"Service/{svc['metadata']['name']} selects no pods")
    for pdb in find(objs, "PodDisruptionBudget"):
        if not matches(pdb["spec"]["selector"]["matchLabels"]):
            bad.append(f"PodDisruptionBudget/{pdb['metadata']['name']} selects no pods")
    for hpa in find(objs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if not find(objs, ref["kind"], ref["name"]):
            bad.append(f"HorizontalPodAutoscaler targets missing {ref['kind']}/{ref['name']}")
    services = {s["metadata"]["name"]: s for s in find(objs, "Service")}
    for ing in find(objs, "Ingress"):
        for rule in ing["spec"].get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                backend = path["backend"]["service"]
                svc = services.get(backend["name"])
                port_names = {p.get("name") for p in (svc or {}).get("spec", {}).get("ports", [])}
                if svc is None or backend["port"].get("name", "") not in port_names:
                    bad.append(f"Ingress/{ing['metadata']['name']} routes to a missing backend")
    secrets = {s["metadata"]["name"] for s in find(objs, "Secret")}
    for obj in workloads(objs):
        spec = pod_spec(obj)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {
            t["metadata"]["name"] for t in obj.get("spec", {}).get("volumeClaimTemplates", [])
        }
        for c in all_containers(spec):
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and m["name"] not in claims:
                    bad.append(f"{obj['metadata']['name']}: mount of undefined volume {m['name']}")
        for v in volumes.values():
            name = v.get("secret", {}).get("secretName")
            generated = any(s.startswith(f"{name}-") for s in secrets) if name else False
            if name and generated and name not in secrets:
                bad.append(
                    f"{obj['metadata']['name']}: volume {v['name']} names {name}, "
                    "not its generated Secret"
                )
    return bad


def problems_prod(objs: list[Obj]) -> list[str]:
    """What the prod overlay promises: blobs in the database, several replicas under an HPA
    on CPU, a PodDisruptionBudget, topology spread across nodes, no Secret in the render."""
    bad: list[str] = []
    env = plain_env(coordinator_container(objs))
    if env.get("FEDGE_BLOB_URL") != "database":
        bad.append("blobs are not in the database (pods would need a shared volume)")
    hpas = find(objs, "HorizontalPodAutoscaler")
    if not hpas or hpas[0]["spec"].get("minReplicas", 1) < 2:
        bad.append("no HorizontalPodAutoscaler keeping at least two replicas")
    elif not any(
        m.get("resource", {}).get("name") == "cpu" for m in hpas[0]["spec"].get("metrics", [])
    ):
        bad.append("the HorizontalPodAutoscaler does not scale on CPU")
    if not find(objs, "PodDisruptionBudget"):
        bad.append("no PodDisruptionBudget")
    spread = coordinator_pod(objs).get("topologySpreadConstraints", [])
    if not any(t["topologyKey"] == "kubernetes.io/hostname" for t in spread):
        bad.append("no topology spread across nodes")
    if find(objs, "Secret"):
        bad.append("the prod render contains a Secret (create it in the cluster, never commit it)")
    return bad
