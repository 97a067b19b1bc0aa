"""Settings: FEDGE_ environment variables, derived defaults, precedence, and the reference
table in docs/configuration.md (which must list every field with its real default).

``python -m tests.coordinator.test_settings`` prints the generated table (the meaning column
comes from each field's description; fields without one need a hand-written meaning).
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from fedge.coordinator.bootstrap import ENV_FILE, load_settings
from fedge.coordinator.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"

_TYPE_NAMES = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
}


def type_name(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args if a is not type(None))
    if typing.get_origin(annotation) is list:
        return f"JSON list of {type_name(args[0])}s"
    if typing.get_origin(annotation) is typing.Literal:
        return " or ".join(dict.fromkeys(type_name(type(a)) for a in args))
    return _TYPE_NAMES.get(annotation, str(annotation))


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        factory = typing.cast(typing.Callable[[], Any], field.default_factory)
        first, second = factory(), factory()
        return f"`{first!r}`" if first == second else "random per process"
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str) and value == "":
        return "derived"
    return f"`{value}`"


def env_name(name: str) -> str:
    return f"FEDGE_{name.upper()}"


def expected_rows() -> dict[str, tuple[str, str]]:
    return {
        env_name(name): (type_name(field.annotation), default_text(field))
        for name, field in Settings.model_fields.items()
    }


def documented_rows() -> dict[str, tuple[str, str, str]]:
    text = DOC.read_text(encoding="utf-8")
    assert START in text and END in text, f"{DOC} lacks the {START} ... {END} markers"
    table = text.split(START, 1)[1].split(END, 1)[0]
    rows: dict[str, tuple[str, str, str]] = {}
    for line in table.strip().splitlines()[2:]:  # skip header and separator
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, f"malformed row in {DOC.name}: {line}"
        name = cells[0].strip("`")
        assert name not in rows, f"{name} is listed twice"
        rows[name] = (cells[1], cells[2], cells[3])
    return rows


def render_table() -> str:
    lines = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        kind, default = type_name(field.annotation), default_text(field)
        lines.append(f"| `{env_name(name)}` | {kind} | {default} | {field.description or ''} |")
    return "\n".join(lines)


def test_configuration_doc_lists_every_setting_with_its_default() -> None:
    documented = documented_rows()
    expected = expected_rows()
    assert sorted(documented) == sorted(expected), (
        "docs/configuration.md and Settings disagree; regenerate the rows with "
        "`python -m tests.coordinator.test_settings`"
    )
    for name, (kind, default) in expected.items():
        doc_kind, doc_default, meaning = documented[name]
        assert (doc_kind, doc_default) == (kind, default), name
        assert len(meaning) >= 10, f"{name} needs a meaning in docs/configuration.md"


def test_defaults_derive_from_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d")
    assert settings.database_url == f"sqlite:///{(tmp_path / 'd' / 'fedge.db').resolve()}"
    assert settings.blobs == tmp_path / "d" / "blobs"
    assert settings.tls_cert == tmp_path / "d" / "tls" / "server.crt"
    assert settings.tls_key == tmp_path / "d" / "tls" / "server.key"
    assert settings.insecure_http is False
    assert settings.instance_id != Settings(data_dir=tmp_path).instance_id


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDGE_DATA_DIR", str(tmp_path / "env-dir"))
    monkeypatch.setenv("FEDGE_DATABASE_URL", "postgresql+psycopg://fedge@db/fedge")
    monkeypatch.setenv("FEDGE_PORT", "9443")
    monkeypatch.setenv("FEDGE_INSECURE_HTTP", "true")
    monkeypatch.setenv("FEDGE_PUBLIC_HOSTNAMES", '["fedge.example.org", "10.0.0.5"]')
    monkeypatch.setenv("FEDGE_SCHEDULER_INTERVAL_S", "0.25")
    settings = Settings()
    assert settings.data_dir == tmp_path / "env-dir"
    assert settings.database_url == "postgresql+psycopg://fedge@db/fedge"
    assert settings.blobs == tmp_path / "env-dir" / "blobs"
    assert settings.port == 9443
    assert settings.insecure_http is True
    assert settings.public_hostnames == ["fedge.example.org", "10.0.0.5"]
    assert settings.scheduler_interval_s == 0.25


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FEDGE_PORT", "70000"),
        ("FEDGE_PORT", "https"),
        ("FEDGE_MAX_UPLOAD_BYTES", "10"),
        ("FEDGE_INSECURE_HTTP", "perhaps"),
        ("FEDGE_SCHEDULER_INTERVAL_S", "0"),
        ("FEDGE_PUBLIC_HOSTNAMES", "not json"),
    ],
)
def test_invalid_values_are_rejected(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises((ValidationError, ValueError)):
        Settings()


def test_precedence_options_then_environment_then_env_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    (data_dir / ENV_FILE).write_text(
        "FEDGE_DATABASE_URL=sqlite:////from/file.db\nFEDGE_PORT=1111\nFEDGE_HOST=0.0.0.0\n",
        encoding="utf-8",
    )
    from_file = load_settings(data_dir=data_dir)
    assert (from_file.database_url, from_file.port, from_file.host) == (
        "sqlite:////from/file.db",
        1111,
        "0.0.0.0",
    )

    monkeypatch.setenv("FEDGE_PORT", "2222")
    from_env = load_settings(data_dir=data_dir)
    assert (from_env.port, from_env.host) == (2222, "0.0.0.0")

    from_option = load_settings(data_dir=data_dir, port=3333, host=None)
    assert (from_option.port, from_option.host) == (3333, "0.0.0.0")


def test_env_file_found_through_fedge_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ENV_FILE).write_text("FEDGE_LOG_LEVEL=debug\n", encoding="utf-8")
    monkeypatch.setenv("FEDGE_DATA_DIR", str(tmp_path))
    assert load_settings().log_level == "debug"
    assert load_settings(data_dir=tmp_path / "elsewhere").log_level == "info"


if __name__ == "__main__":  # pragma: no cover
    print(render_table())
