"""Static checks of the deployment files: docker/Dockerfile, .dockerignore, docker/compose.yaml
and docker/.env.example. Cheap enough for every `make test`; `make docker-test` builds and runs
the image for real."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from pathlib import Path

import pytest

from fedge.coordinator.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
# Variables the image's entrypoint reads besides the coordinator's settings.
ENTRYPOINT_VARS = {
    "FEDGE_DB_WAIT_ATTEMPTS",
    "FEDGE_DB_WAIT_INTERVAL_S",
    "FEDGE_MIGRATE_ON_START",
    "FEDGE_REQUIRE_INIT",
    "FEDGE_INIT_WAIT_INTERVAL_S",
}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append((keyword.upper(), args.strip()))
    assert not pending, "dangling line continuation at the end of the Dockerfile"
    return result


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKER / "Dockerfile")


def stages(dockerfile: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for keyword, args in dockerfile:
        if keyword == "FROM":
            out.append([])
        if out:
            out[-1].append((keyword, args))
    return out


def test_base_image_is_a_build_argument_defaulting_to_python_311_slim(dockerfile):
    first_from = next(i for i, (k, _) in enumerate(dockerfile) if k == "FROM")
    global_args = [a for k, a in dockerfile[:first_from] if k == "ARG"]
    assert "BASE_IMAGE=python:3.11-slim" in global_args
    froms = [a for k, a in dockerfile if k == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE} AS runtime"]


def test_runtime_stage_copies_only_the_venv_and_container_scripts(dockerfile):
    runtime = stages(dockerfile)[-1]
    copies = [a for k, a in runtime if k == "COPY"]
    assert copies == [
        "--from=builder /opt/venv /opt/venv",
        "docker/entrypoint.py docker/healthcheck.py /opt/fedge/",
    ]
    assert not [a for k, a in runtime if k == "RUN" and "pip install" in a]


def test_only_the_coordinator_extra_is_installed(dockerfile):
    installs = " ".join(a for k, a in dockerfile if k == "RUN" and "pip install" in a)
    extras = re.findall(r"\.\[([a-z,]+)\]", installs)
    assert extras == ["coordinator"]


def test_pip_ca_comes_from_a_build_secret_never_a_layer(dockerfile):
    runs = [a for k, a in dockerfile if k == "RUN"]
    assert any("--mount=type=secret,id=pipca" in a and "PIP_CERT" in a for a in runs)
    for keyword, args in dockerfile:
        if keyword in {"COPY", "ADD"}:
            assert ".crt" not in args and "pipca" not in args and "certs" not in args
        if keyword == "ENV":
            assert "PIP_CERT" not in args


def test_runs_as_a_fixed_non_root_user(dockerfile):
    users = [a for k, a in stages(dockerfile)[-1] if k == "USER"]
    assert users, "the runtime stage sets no USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) != 0
    assert group == "" or (group.isdigit() and int(group) != 0)


def test_healthcheck_and_entrypoint_use_the_container_scripts(dockerfile):
    runtime = dict(stages(dockerfile)[-1])
    assert "/opt/fedge/healthcheck.py" in runtime["HEALTHCHECK"]
    assert "curl" not in runtime["HEALTHCHECK"]
    assert json.loads(runtime["ENTRYPOINT"]) == ["python", "/opt/fedge/entrypoint.py"]
    assert json.loads(runtime["CMD"]) == ["serve"]


def test_configuration_defaults_are_fedge_settings(dockerfile):
    env_lines = " ".join(a for k, a in stages(dockerfile)[-1] if k == "ENV")
    names = set(re.findall(r"\b(FEDGE_[A-Z_]+)=", env_lines))
    assert names
    assert names <= settings_variables()


def settings_variables() -> set[str]:
    return {f"FEDGE_{name.upper()}" for name in Settings.model_fields} | ENTRYPOINT_VARS


def dockerignore_allows(path: str) -> bool:
    """Whether the build context keeps ``path`` (last matching pattern wins, '!' re-includes)."""
    kept = True
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatch(p, pattern) for p in prefixes)
        if pattern.startswith("**/"):
            hit = hit or any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        if hit:
            kept = negate
    return kept


def test_build_context_holds_every_copied_path(dockerfile):
    sources = []
    for keyword, args in dockerfile:
        if keyword == "COPY" and "--from=" not in args:
            sources += args.split()[:-1]
    assert sources
    for source in sources:
        assert dockerignore_allows(source), f"{source} is excluded by .dockerignore"
        if source != "README.md":  # the project's README; pyproject.toml names it as well
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is missing"


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "bench/codec.py",
        "fedge-data/x",
        "coordinator/__pycache__/app.cpython-311.pyc",
        "docker/.env",
    ],
)
def test_build_context_leaves_out_local_state(path):
    assert not dockerignore_allows(path)


# -- compose ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))


def test_compose_starts_the_coordinator_after_a_healthy_postgres(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "coordinator"}
    coordinator = services["coordinator"]
    assert coordinator["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert coordinator["build"]["dockerfile"] == "docker/Dockerfile"
    for service in services.values():
        assert service["healthcheck"]["test"]


def test_compose_keeps_blobs_and_database_in_named_volumes(compose):
    coordinator = compose["services"]["coordinator"]
    env = coordinator["environment"]
    mounts = dict(v.split(":", 1) for v in coordinator["volumes"])
    assert mounts["fedge-blobs"] == env["FEDGE_BLOB_DIR"]
    postgres_mounts = [v.split(":")[0] for v in compose["services"]["postgres"]["volumes"]]
    assert "pgdata" in postgres_mounts
    assert {"fedge-blobs", "pgdata"} <= set(compose["volumes"])


def test_compose_configures_the_coordinator_only_through_known_fedge_variables(compose):
    env = compose["services"]["coordinator"]["environment"]
    assert all(name.startswith("FEDGE_") for name in env)
    assert set(env) <= settings_variables()
    assert env["FEDGE_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in env["FEDGE_DATABASE_URL"]


def test_env_example_sets_every_required_compose_variable():
    text = (DOCKER / "compose.yaml").read_text(encoding="utf-8")
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    assert "FEDGE_PUBLIC_HOST" in required
    example = (DOCKER / ".env.example").read_text(encoding="utf-8")
    assigned = set(re.findall(r"^([A-Z_]+)=", example, re.M))
    assert required <= assigned
    referenced = set(re.findall(r"\$\{([A-Z_]+)", text))
    mentioned = set(re.findall(r"^#?\s*([A-Z_]+)=", example, re.M))
    assert referenced <= mentioned, referenced - mentioned


def test_the_dependency_layer_makes_every_package_pyproject_lists() -> None:
    """The dependency layer installs from empty package folders: a package pyproject.toml
    lists that the loop does not make fails the image build (``package directory ... does not
    exist``)."""
    project = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())
    dirs = project["tool"]["setuptools"]["package-dir"]
    wanted = set()
    for package in project["tool"]["setuptools"]["packages"]:
        parts = package.split(".")
        root = ".".join(parts[:2])
        wanted.add("/".join([dirs[root], *parts[2:]]))
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    loop = text.split("for pkg in", 1)[1].split("; do", 1)[0]
    assert set(loop.split()) == wanted
