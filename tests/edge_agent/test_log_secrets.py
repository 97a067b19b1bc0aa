"""No secret reaches a log line: one full round (a real ``fedge coordinator serve`` over
HTTPS with a SQLite database, two real agents enrolled with tokens, the admin API) with every
logger at DEBUG - the coordinator's JSON event log and uvicorn's in its process; httpx,
httpcore, the agents' and the admin client's in this one - and every secret value used in
the run searched for in every line, as text, hex and base64: the API key, the enrollment
tokens, the devices', server's and CA's private keys (PEM and raw), each Authorization header
value and request signature sent."""

from __future__ import annotations

import base64
import logging
import ssl
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedge.coordinator.logs import JsonFormatter
from fedge.coordinator.settings import Settings
from fedge.coordinator.tls import TlsPaths, create_ca_and_server_cert
from fedge.edge_agent.admin_client import AdminClient
from fedge.edge_agent.agent import Agent
from fedge.edge_agent.device import enroll_device, open_client
from fedge.edge_agent.sim.datasets import Dataset
from fedge.edge_agent.state import State
from fedge.edge_agent.transport import RetryPolicy
from fedge.shared import signing
from tests.edge_agent.conftest import SOFTMAX, shard, wait_for
from tests.support import databases
from tests.support.process import coordinator_process

pytestmark = pytest.mark.slow  # a coordinator process and a round: a few seconds


class Recording(httpx.BaseTransport):
    """HTTPS to the coordinator (verified against its CA), noting every Authorization
    header sent."""

    def __init__(self, ca_file: Path, seen: list[str]) -> None:
        self.inner = httpx.HTTPTransport(verify=ssl.create_default_context(cafile=str(ca_file)))
        self.seen = seen

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        value = request.headers.get("authorization")
        if value:
            self.seen.append(value)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


class Lines(logging.Handler):
    """Every record of this process, formatted as the coordinator's JSON lines (message,
    arguments, extra fields and traceback)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def debug_logs() -> Iterator[Lines]:
    handler = Lines()
    root = logging.getLogger()
    names = ["", "httpx", "httpcore", "hpack", "fedge", "fedge.edge_agent"]
    before = {name: logging.getLogger(name).level for name in names}
    root.addHandler(handler)
    for name in names:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


def forms(secret: bytes | str) -> set[str]:
    """``secret`` as it could appear in a log line: itself, hex, base64 and base64url (with
    and without padding)."""
    raw = secret.encode() if isinstance(secret, str) else secret
    out = {raw.hex(), raw.hex().upper()}
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        out |= {encoded.decode(), encoded.decode().rstrip("=")}
    if isinstance(secret, str):
        out.add(secret)
    return {form for form in out if len(form) >= 16}


def leaks(lines: Iterable[str], secrets: dict[str, bytes | str]) -> list[str]:
    found = []
    for line in lines:
        for name, secret in secrets.items():
            if any(form in line for form in forms(secret)):
                found.append(f"{name} in: {line[:300]}")
    return found


def test_the_leak_search_finds_each_form() -> None:
    key = bytes(range(32))
    assert leaks([f"x {key.hex()} y"], {"k": key}) == [f"k in: x {key.hex()} y"]
    assert leaks([base64.urlsafe_b64encode(key).decode().rstrip("=")], {"k": key})
    assert leaks(
        [base64.b64encode(b"fk_secret-value-1234").decode()], {"t": "fk_secret-value-1234"}
    )
    assert leaks(["nothing to see here, all public"], {"k": key, "t": "fk_secret-value-1234"}) == []


def pem_and_raw(path: Path) -> dict[str, bytes | str]:
    pem = path.read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    body = "".join(pem.decode().strip().splitlines()[1:-1])  # the PEM's base64 body
    return {
        f"{path.name} (PEM)": body,
        f"{path.name} (raw)": key.private_numbers().private_value.to_bytes(32, "big"),
    }


def test_no_secret_in_any_log_line_of_a_full_round(
    tmp_path: Path,
    sqlite_template: databases.SqliteTemplate,
    digits: Dataset,
    debug_logs: Lines,
) -> None:
    tls: TlsPaths = create_ca_and_server_cert(tmp_path / "tls")
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=sqlite_template.fresh(tmp_path),
        tls_cert=tls.server_cert,
        tls_key=tls.server_key,
    )
    sent: list[str] = []
    env = {"FEDGE_LOG_LEVEL": "debug", "FEDGE_LOG_FORMAT": "json"}
    with coordinator_process(settings, tmp_path / "run", ca_file=tls.ca_cert, env=env) as proc:
        admin = AdminClient(proc.url, proc.admin_key, transport=Recording(tls.ca_cert, sent))
        tokens = [admin.create_enrollment_token(label=f"d{i}")["token"] for i in range(2)]
        agents: list[Agent] = []
        threads: list[threading.Thread] = []
        stop = threading.Event()
        try:
            for i, token in enumerate(tokens):
                state_dir = tmp_path / f"d{i}"
                enroll_device(
                    state_dir,
                    url=proc.url,
                    token=token,
                    name=f"d{i}",
                    seed=i,
                    transport=Recording(tls.ca_cert, sent),
                )
                state = State(state_dir)
                client = open_client(
                    state,
                    transport=Recording(tls.ca_cert, sent),
                    retry=RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2),
                    sleep=stop.wait,
                    interrupted=stop.is_set,
                )
                agent = Agent(
                    state=state,
                    client=client,
                    data=shard(digits, i),
                    seed=i,
                    stop_event=stop,
                    poll_wait=1.0,
                    error_pause_s=0.1,
                )
                agents.append(agent)
                threads.append(threading.Thread(target=agent.run, kwargs={"once": True}))
                threads[-1].start()
            for agent in agents:
                device_id = agent.state.load_config().device_id
                wait_for(lambda d=device_id: admin.get_device(d)["last_seen_at"], what="a poll")
            task = admin.start_task(
                admin.create_task(
                    {
                        "name": "secrets",
                        "model": dict(SOFTMAX),
                        "aggregation": {
                            "mode": "sync",
                            "num_rounds": 1,
                            "clients_per_round": 2,
                            "over_selection": 0.0,
                            "min_updates": 2,
                            "round_deadline_s": 30,
                        },
                        "compression": {"topk_fraction": 0.05, "bits": 4, "chunk": 64},
                        "training": {"epochs": 1, "batch_size": 16, "lr": 0.1},
                    }
                )["id"]
            )
            done: Any = wait_for(
                lambda: admin.get_task(task["id"])["status"] == "completed",
                timeout=60,
                what="the round to complete",
            )
            assert done
            for thread in threads:
                thread.join(20)
                assert not thread.is_alive()
            assert sum(a.stats.uploaded for a in agents) == 2
            device_keys = [a.state.load_key() for a in agents]
        finally:
            stop.set()
            for agent in agents:
                agent.client.close()
            admin.close()
        server_lines = proc.log().splitlines()

    secrets: dict[str, bytes | str] = {"admin API key": proc.admin_key}
    secrets |= {f"enrollment token {i}": token for i, token in enumerate(tokens)}
    secrets |= pem_and_raw(tls.server_key) | pem_and_raw(tls.ca_key)
    for i, key in enumerate(device_keys):
        pem = signing.private_key_to_pem(key).decode()
        secrets[f"device {i} key (PEM)"] = "".join(pem.strip().splitlines()[1:-1])
        secrets[f"device {i} key (raw)"] = key.private_bytes_raw()
    device_headers = [v for v in sent if not v.startswith("Bearer ")]
    assert len(device_headers) > 4, sent  # polls, downloads, uploads: all signed
    for n, value in enumerate(sent):
        secrets[f"Authorization header {n}"] = value
    for n, value in enumerate(device_headers):
        signature = signing.parse_signed_headers({signing.HEADER_AUTH: value}).signature
        secrets[f"request signature {n}"] = signature

    # What was searched is the real log: the coordinator's JSON events and uvicorn's access
    # lines, httpx's and the agents' DEBUG lines.
    assert any('"logger":"uvicorn.access"' in line for line in server_lines), server_lines[:20]
    assert any('"logger":"fedge.coordinator' in line for line in server_lines)
    mine = debug_logs.lines
    assert any('"logger":"httpx"' in line for line in mine)
    assert any('"logger":"httpcore' in line and '"level":"debug"' in line for line in mine)
    assert any('"logger":"fedge.edge_agent' in line for line in mine)
    assert leaks([*server_lines, *mine], secrets) == []
