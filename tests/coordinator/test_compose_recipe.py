"""The compose deployment as documented: the recipe in docker/compose.yaml's header and in
docs/deploy.md, run against the compose file filled in from docker/.env.example (compose's own
variable substitution, reimplemented for the forms the file uses). No Docker engine needed."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from fedge.coordinator.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
SHELL_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
COMPOSE_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}")


def _entrypoint() -> Any:
    spec = importlib.util.spec_from_file_location("fedge_docker_ep", DOCKER / "entrypoint.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def header_recipe() -> list[str]:
    """The commands of compose.yaml's header (``#   <command>`` lines)."""
    lines = (DOCKER / "compose.yaml").read_text(encoding="utf-8").splitlines()
    header = [line for line in lines if line.startswith("#")]
    return [line[4:] for line in header if line.startswith("#   ") and line[4:5] != " "]


def docs_recipe() -> list[str]:
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    section = text.split("## Deploying with compose", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def command(line: str) -> str:
    """The command without its trailing comment."""
    return re.sub(r"\s+#.*$", "", line).strip()


def env_example() -> dict[str, str]:
    text = (DOCKER / ".env.example").read_text(encoding="utf-8")
    return dict(re.findall(r"^([A-Z_]+)=(.*)$", text, re.M))


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's substitution of ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and
    ``$$``; a missing required variable fails the test with compose's message."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = env.get(name, "")
        if value:
            return value
        if op == ":?":
            pytest.fail(f"compose would stop: {name}: {arg}")
        return arg if op == ":-" else ""

    return COMPOSE_VARIABLE.sub(one, text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    text = (DOCKER / "compose.yaml").read_text(encoding="utf-8")
    loaded: dict[str, Any] = yaml.safe_load(interpolate(text, env_example()))
    return loaded


def test_one_recipe_in_the_compose_header_and_in_the_docs() -> None:
    header = [command(line) for line in header_recipe()]
    docs = [command(line) for line in docs_recipe()]
    assert header == docs[: len(header)], (header, docs)
    assert any(c.endswith("run --rm coordinator fedge coordinator init") for c in header)
    assert header.index(next(c for c in header if c.endswith("coordinator init"))) < next(
        i for i, c in enumerate(header) if c.endswith("up -d")
    ), "init comes before up"
    assert _entrypoint().INIT_COMMAND in header


def test_the_recipe_uses_no_variable_the_users_shell_does_not_have() -> None:
    """The old recipe ran `init --host "$FEDGE_PUBLIC_HOST"`: a variable only docker/.env
    holds, so the shell passed --host "" and init crashed."""
    for line in header_recipe() + docs_recipe():
        assert not SHELL_VARIABLE.findall(command(line)), line


def test_the_public_host_reaches_init_through_the_container_environment(compose) -> None:
    env = compose["services"]["coordinator"]["environment"]
    assert env["FEDGE_PUBLIC_HOSTNAMES"] == f'["{env_example()["FEDGE_PUBLIC_HOST"]}"]'
    text = (DOCKER / "compose.yaml").read_text(encoding="utf-8")
    with pytest.raises(pytest.fail.Exception, match="FEDGE_PUBLIC_HOST"):
        interpolate(text, {k: v for k, v in env_example().items() if k != "FEDGE_PUBLIC_HOST"})


def test_the_database_password_is_a_secret_file_in_no_environment(
    compose, tmp_path, monkeypatch
) -> None:
    secrets = compose["secrets"]
    assert secrets["db_password"]["file"] == "./secrets/db_password"
    recipe = "\n".join(header_recipe())
    assert "docker/secrets/db_password" in recipe  # the file the recipe creates
    postgres = compose["services"]["postgres"]
    coordinator = compose["services"]["coordinator"]
    for service in (postgres, coordinator):
        assert "db_password" in service["secrets"]
        assert not any(
            "PASSWORD=" in str(v) or k.endswith("PASSWORD")
            for k, v in service["environment"].items()
        ), service["environment"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/db_password"
    env = coordinator["environment"]
    assert env["FEDGE_DATABASE_PASSWORD_FILE"] == "/run/secrets/db_password"
    assert make_url(env["FEDGE_DATABASE_URL"]).password is None

    # What the coordinator makes of that environment (the secret mounted elsewhere here).
    secret = tmp_path / "db_password"
    secret.write_text("from-the-secret\n")
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("FEDGE_DATABASE_PASSWORD_FILE", str(secret))
    settings = Settings()
    url = make_url(settings.database_url)
    assert (url.host, url.username, url.password) == ("postgres", "fedge", "from-the-secret")
    assert settings.public_hostnames == [env_example()["FEDGE_PUBLIC_HOST"]]


def test_both_services_have_resource_limits_and_rotated_logs(compose) -> None:
    for name, service in compose["services"].items():
        limits = service["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) > 0 and re.fullmatch(r"\d+[kmg]", limits["memory"]), name
        logging = service["logging"]
        assert logging["driver"] == "json-file", name
        assert logging["options"]["max-size"] and int(logging["options"]["max-file"]) > 1


def test_the_health_check_is_readiness(compose) -> None:
    test = compose["services"]["coordinator"]["healthcheck"]["test"]
    assert test == ["CMD", "python", "/opt/fedge/healthcheck.py"]  # no --live: /readyz
    text = (DOCKER / "healthcheck.py").read_text(encoding="utf-8")
    assert 'READY = "/readyz"' in text and "path: str = READY" in text
