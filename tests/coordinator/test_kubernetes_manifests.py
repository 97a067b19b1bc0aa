"""deploy/kubernetes/: every overlay rendered with ``kubectl kustomize``, validated offline in
strict mode against the Kubernetes schemas (kubernetes-validate bundles them), and held to the
deployment's rules (tests/support/k8s.py). Each rule is also run on a mutated render, to show
it catches what it is about. The manifests run for real in ``make k8s-test``
(deploy/kubernetes/test/live.py)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import kubernetes_validate
import pytest
import yaml

from fedge.coordinator.app import create_app
from fedge.coordinator.settings import Settings
from tests.support import k8s
from tests.support.databases import in_ci

#: Validated against this Kubernetes version: the newest the installed package knows.
K8S_VERSION = kubernetes_validate.latest_version()


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    if k8s.kubectl() is None:
        if in_ci():
            pytest.fail("CI=true but kubectl (with its built-in kustomize) is not installed")
        pytest.skip("kubectl is not installed")
    return {target: k8s.render(target) for target in ("base", *k8s.OVERLAYS)}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The GET paths the coordinator's app serves (without path parameters), from its
    OpenAPI description (FastAPI includes routers lazily: ``app.routes`` does not list them)."""
    data = tmp_path_factory.mktemp("routes")
    app = create_app(Settings(data_dir=data, database_url=f"sqlite:///{data / 'fedge.db'}"))
    paths = app.openapi()["paths"]
    return {path for path, ops in paths.items() if "get" in ops and "{" not in path}


def test_the_app_serves_the_probe_paths_the_rules_expect(served):
    assert {"/healthz", "/readyz", "/metrics"} <= served


@pytest.mark.parametrize("target", ["base", *k8s.OVERLAYS])
def test_render_validates_strictly_against_the_kubernetes_schemas(rendered, target):
    objs = rendered[target]
    assert objs
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_strict_validation_refuses_an_unknown_field(rendered):
    objs = copy.deepcopy(rendered["dev"])
    k8s.coordinator_container(objs)["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    deployment = k8s.one(objs, "Deployment", k8s.COORDINATOR)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_every_rule_holds_on_the_overlay(rendered, served, overlay):
    objs = rendered[overlay]
    problems = [
        *k8s.problems_probes(objs, served),
        *k8s.problems_bind(objs),
        *k8s.problems_secrets_in_env(objs),
        *k8s.problems_security(objs, k8s.dockerfile_user()),
        *k8s.problems_lifecycle(objs),
        *k8s.problems_wiring(objs),
    ]
    if overlay == "prod":
        problems += k8s.problems_prod(objs)
    assert problems == []


def test_dev_runs_postgres_with_a_claim_and_only_the_coordinator_reaches_it(rendered):
    objs = rendered["dev"]
    pg = k8s.one(objs, "StatefulSet", "fedge-postgres")
    assert [t["metadata"]["name"] for t in pg["spec"]["volumeClaimTemplates"]] == ["pgdata"]
    policy = k8s.one(objs, "NetworkPolicy", "fedge-postgres")
    assert policy["spec"]["podSelector"]["matchLabels"] == pg["spec"]["selector"]["matchLabels"]
    sources = [
        s["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for s in rule["from"]
    ]
    pod_labels = k8s.one(objs, "Deployment", k8s.COORDINATOR)["spec"]["template"]["metadata"][
        "labels"
    ]
    assert sources and all(s.items() <= pod_labels.items() for s in sources)


# -- each rule catches what it is about ----------------------------------------------------------

Mutation = Callable[[list[dict[str, Any]]], None]


def _env(objs: list[dict[str, Any]], name: str, value: str) -> None:
    env = k8s.coordinator_container(objs)["env"]
    env[:] = [e for e in env if e["name"] != name] + [{"name": name, "value": value}]


def _probe_path(path: str) -> Mutation:
    return lambda objs: k8s.coordinator_container(objs)["readinessProbe"]["httpGet"].update(
        path=path
    )


def _drop_tmp(objs: list[dict[str, Any]]) -> None:
    c = k8s.coordinator_container(objs)
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] != "/tmp"]


MUTATIONS: dict[str, tuple[Mutation, str, str]] = {
    # name: (mutation of the dev render, rule, expected problem)
    "probe at an unserved path": (_probe_path("/health"), "probes", "does not serve"),
    "readiness on liveness": (_probe_path("/healthz"), "probes", "readiness is /readyz"),
    "probe over HTTP": (
        lambda objs: k8s.coordinator_container(objs)["livenessProbe"]["httpGet"].update(
            scheme="HTTP"
        ),
        "probes",
        "the coordinator serves HTTPS",
    ),
    "probe on another port": (
        lambda objs: k8s.coordinator_container(objs)["livenessProbe"]["httpGet"].update(port=8080),
        "probes",
        "probes port 8080",
    ),
    "bind to loopback": (lambda objs: _env(objs, "FEDGE_HOST", "127.0.0.1"), "bind", "loopback"),
    "no FEDGE_HOST (default 127.0.0.1)": (
        lambda objs: k8s.coordinator_container(objs).update(
            env=[e for e in k8s.coordinator_container(objs)["env"] if e["name"] != "FEDGE_HOST"]
        ),
        "bind",
        "loopback",
    ),
    "--host ::1": (
        lambda objs: k8s.coordinator_container(objs)["args"].extend(["--host", "::1"]),
        "bind",
        "loopback",
    ),
    "database URL with password in env": (
        lambda objs: _env(
            objs, "FEDGE_DATABASE_URL", "postgresql+psycopg://fedge:hunter22@db/fedge"
        ),
        "secrets",
        "holds",
    ),
    "a Secret's value in env": (
        lambda objs: _env(objs, "PGPASS", "fedge-dev-only"),
        "secrets",
        "holds a Secret's value",
    ),
    "password by name in env": (
        lambda objs: _env(objs, "FEDGE_DATABASE_PASSWORD", "x"),
        "secrets",
        "secret in plain env",
    ),
    "secretKeyRef": (
        lambda objs: k8s.coordinator_container(objs)["env"].append(
            {
                "name": "FEDGE_DATABASE_URL",
                "valueFrom": {"secretKeyRef": {"name": "s", "key": "url"}},
            }
        ),
        "secrets",
        "takes a Secret into the environment",
    ),
    "runAsUser 0": (
        lambda objs: k8s.coordinator_container(objs)["securityContext"].update(runAsUser=0),
        "security",
        "runAsUser 0",
    ),
    "writable root filesystem": (
        lambda objs: k8s.coordinator_container(objs)["securityContext"].update(
            readOnlyRootFilesystem=False
        ),
        "security",
        "root filesystem is writable",
    ),
    "no emptyDir at /tmp": (_drop_tmp, "security", "no writable emptyDir at /tmp"),
    "service-account token": (
        lambda objs: k8s.coordinator_pod(objs).pop("automountServiceAccountToken"),
        "security",
        "service-account token is mounted",
    ),
    "no memory limit": (
        lambda objs: k8s.coordinator_container(objs)["resources"]["limits"].pop("memory"),
        "security",
        "no limits.memory",
    ),
    "grace period below the long-poll": (
        lambda objs: k8s.coordinator_pod(objs).update(terminationGracePeriodSeconds=60),
        "lifecycle",
        "not above the preStop",
    ),
    "longer long-poll": (
        lambda objs: _env(objs, "FEDGE_LONG_POLL_MAX_S", "120"),
        "lifecycle",
        "the long-poll (120 s)",
    ),
    "replicas migrate at start": (
        lambda objs: _env(objs, "FEDGE_MIGRATE_ON_START", "true"),
        "lifecycle",
        "migrates at start",
    ),
    "no migrate init container": (
        lambda objs: k8s.coordinator_pod(objs).pop("initContainers"),
        "lifecycle",
        "0 init containers",
    ),
    "service links": (
        lambda objs: k8s.coordinator_pod(objs).pop("enableServiceLinks"),
        "lifecycle",
        "service links",
    ),
    "hard-coded namespace": (
        lambda objs: objs[0]["metadata"].update(namespace="default"),
        "wiring",
        "hard-codes a namespace",
    ),
    "Service selects nothing": (
        lambda objs: k8s.one(objs, "Service", k8s.COORDINATOR)["spec"]["selector"].update(app="x"),
        "wiring",
        "selects no pods",
    ),
    "ungenerated Secret name": (
        lambda objs: k8s.coordinator_pod(objs)["volumes"][0]["secret"].update(
            secretName="fedge-database"
        ),
        "wiring",
        "not its generated Secret",
    ),
}


def _run(rule: str, objs: list[dict[str, Any]], served: set[str]) -> list[str]:
    if rule == "probes":
        return k8s.problems_probes(objs, served)
    if rule == "bind":
        return k8s.problems_bind(objs)
    if rule == "secrets":
        return k8s.problems_secrets_in_env(objs)
    if rule == "security":
        return k8s.problems_security(objs, k8s.dockerfile_user())
    if rule == "lifecycle":
        return k8s.problems_lifecycle(objs)
    assert rule == "wiring"
    return k8s.problems_wiring(objs)


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_each_rule_catches_its_mutation(rendered, served, name):
    mutate, rule, expected = MUTATIONS[name]
    objs = copy.deepcopy(rendered["dev"])
    assert _run(rule, objs, served) == []
    mutate(objs)
    problems = _run(rule, objs, served)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("user", ["USER root", "USER 0:0", ""])
def test_the_image_user_rule_catches_a_root_image(rendered, tmp_path, user):
    dockerfile = (k8s.ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")
    assert k8s.dockerfile_user() not in (None, "root", "0", "0:0")
    mutated = tmp_path / "Dockerfile"
    mutated.write_text(re.sub(r"^USER .*$", user, dockerfile, flags=re.M), encoding="utf-8")
    problems = k8s.problems_security(rendered["dev"], k8s.dockerfile_user(mutated))
    assert any("the image runs as" in p for p in problems), problems


PROD_MUTATIONS: dict[str, tuple[Mutation, str]] = {
    "file blobs": (
        lambda objs: _env(objs, "FEDGE_BLOB_URL", "file:///var/lib/fedge/blobs"),
        "blobs",
    ),
    "no HPA": (
        lambda objs: objs.remove(k8s.one(objs, "HorizontalPodAutoscaler", k8s.COORDINATOR)),
        "HorizontalPodAutoscaler",
    ),
    "HPA on memory": (
        lambda objs: k8s.one(objs, "HorizontalPodAutoscaler", k8s.COORDINATOR)["spec"]["metrics"][
            0
        ]["resource"].update(name="memory"),
        "on CPU",
    ),
    "no PDB": (
        lambda objs: objs.remove(k8s.one(objs, "PodDisruptionBudget", k8s.COORDINATOR)),
        "PodDisruptionBudget",
    ),
    "no spread": (
        lambda objs: k8s.coordinator_pod(objs).pop("topologySpreadConstraints"),
        "topology spread",
    ),
    "a committed Secret": (
        lambda objs: objs.append({"kind": "Secret", "metadata": {"name": "x"}, "data": {}}),
        "contains a Secret",
    ),
}


@pytest.mark.parametrize("name", sorted(PROD_MUTATIONS))
def test_each_prod_rule_catches_its_mutation(rendered, name):
    mutate, expected = PROD_MUTATIONS[name]
    objs = copy.deepcopy(rendered["prod"])
    assert k8s.problems_prod(objs) == []
    mutate(objs)
    assert any(expected in p for p in k8s.problems_prod(objs))


def test_prod_ingress_and_pdb_reach_the_coordinator(rendered):
    objs = copy.deepcopy(rendered["prod"])
    assert k8s.problems_wiring(objs) == []
    k8s.one(objs, "Ingress", k8s.COORDINATOR)["spec"]["rules"][0]["http"]["paths"][0]["backend"][
        "service"
    ]["port"] = {"name": "http"}
    k8s.one(objs, "PodDisruptionBudget", k8s.COORDINATOR)["spec"]["selector"]["matchLabels"] = {
        "a": "b"
    }
    problems = k8s.problems_wiring(objs)
    assert any("missing backend" in p for p in problems)
    assert any("PodDisruptionBudget" in p for p in problems)


def test_the_servicemonitor_example_selects_the_coordinator_service(rendered):
    """examples/servicemonitor.yaml is a custom resource (no schema here): its selector and
    port must still meet the Service."""
    path = k8s.KUSTOMIZE_ROOT / "examples" / "servicemonitor.yaml"
    monitor = yaml.safe_load(path.read_text(encoding="utf-8"))
    service = k8s.one(rendered["prod"], "Service", k8s.COORDINATOR)
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    assert all(
        e["path"] == "/metrics" and "authorization" in e for e in monitor["spec"]["endpoints"]
    )
