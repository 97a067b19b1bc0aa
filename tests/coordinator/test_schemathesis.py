"""Property-based run over the coordinator's OpenAPI document (schemathesis).

Every operation gets generated requests (valid and invalid) sent over HTTPS with an admin key;
no answer may be a 5xx, and every answer must match the documented status codes, content
types and response schemas. It runs on SQLite only (its own module-scoped coordinator, not the
per-backend ``coordinator`` fixture), because it is the slowest test of the suite.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import select

from fedge.coordinator.app import create_app
from fedge.coordinator.models import ApiKey
from fedge.coordinator.secrets import hash_secret
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths
from tests.coordinator.conftest import make_key
from tests.support.databases import SqliteTemplate
from tests.support.rows import db_session
from tests.support.servers import serve_in_thread

MIN_TOTAL_CASES = 500
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

schema = schemathesis.openapi.from_dict(create_app(Settings(data_dir=Path("unused"))).openapi())
# The coverage phase sends several hundred boundary cases for the task body alone (minutes on
# two cores); the examples and fuzzing phases with MAX_EXAMPLES per operation keep the run
# within budget while still sending valid and invalid requests to every operation.
schema.config.phases.coverage.enabled = False
OPERATIONS = sum(len(ops) for ops in schema.raw_schema["paths"].values())
# Operations without parameters run out of distinct inputs early; the margin covers them.
MAX_EXAMPLES = math.ceil(MIN_TOTAL_CASES / OPERATIONS) + 10
CASES: Counter[str] = Counter()
SUCCEEDED: set[str] = set()
#: Operations that must have answered 2xx at least once (their success bodies were checked).
MUST_SUCCEED = {
    "POST /api/v1/tasks",
    "GET /api/v1/tasks",
    "PATCH /api/v1/tasks/{task_id}",
    "GET /api/v1/tasks/{task_id}/models/{version}",
    "POST /api/v1/enrollment-tokens",
    "POST /api/v1/api-keys",
    "GET /api/v1/devices",
}


class Api:
    def __init__(self, url: str, settings: Settings, admin_key: str, ca_file: Path) -> None:
        self.url = url
        self.settings = settings
        self.admin_key = admin_key
        with db_session(settings) as s:
            self.admin_key_id = s.scalar(
                select(ApiKey.id).where(ApiKey.key_hash == hash_secret(admin_key))
            )
        self.ca_file = str(ca_file)
        self.session = requests.Session()


@pytest.fixture(scope="module")
def api(
    sqlite_template: SqliteTemplate,
    tls_paths: TlsPaths,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Api]:
    directory = tmp_path_factory.mktemp("schemathesis")
    # Small models keep generated tasks cheap (at most 64k parameters).
    cfg = Settings(
        data_dir=directory / "data",
        database_url=sqlite_template.fresh(directory),
        tls_cert=tls_paths.server_cert,
        tls_key=tls_paths.server_key,
        max_model_bytes=1 << 18,
        scheduler_interval_s=0.2,
    )
    app = create_app(cfg)
    admin_key = make_key(cfg, "admin")
    with serve_in_thread(app, certfile=cfg.tls_cert, keyfile=cfg.tls_key) as url:
        api = Api(url, cfg, admin_key, tls_paths.ca_cert)
        yield api
        api.session.close()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case, api: Api) -> None:
    CASES[f"{case.method} {case.path}"] += 1
    # Generated admin keys could otherwise revoke the key the run uses (a valid action).
    if (case.path_parameters or {}).get("key_id") == api.admin_key_id:
        case.path_parameters["key_id"] = 2**31 - 1
    response = case.call_and_validate(
        base_url=api.url,
        session=api.session,
        headers={"Authorization": f"Bearer {api.admin_key}"},
        checks=CHECKS,
        verify=api.ca_file,
    )
    if response.status_code < 300:
        SUCCEEDED.add(f"{case.method} {case.path}")


def test_enough_cases_were_generated_and_succeeded() -> None:
    if not CASES:
        pytest.skip("the schemathesis run was not selected")
    assert sum(CASES.values()) >= MIN_TOTAL_CASES, CASES
    assert MUST_SUCCEED <= SUCCEEDED, MUST_SUCCEED - SUCCEEDED
