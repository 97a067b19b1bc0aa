"""Enrolling a device and opening a client from its state directory.

:func:`enroll_device` creates the identity key (kept in the state dir, mode 0600), registers
its public half with an enrollment token, and records the device id, the coordinator URL and
a copy of the coordinator's CA. :func:`open_client` builds a signed client from that state.
"""

from __future__ import annotations

import logging
import os
import platform
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from fedge.edge_agent.client import CoordinatorClient
from fedge.edge_agent.state import AgentConfig, State, StateError, new_seed
from fedge.edge_agent.transport import RetryPolicy
from fedge.shared import signing

log = logging.getLogger(__name__)


def default_capabilities() -> dict[str, Any]:
    return {
        "platform": platform.system().lower(),
        "machine": platform.machine(),
        "cpus": os.cpu_count() or 1,
        "python": platform.python_version(),
    }


def enroll_device(
    state_dir: str | os.PathLike[str],
    *,
    url: str,
    token: str,
    ca_file: str | None = None,
    name: str | None = None,
    capabilities: Mapping[str, Any] | None = None,
    tags: Sequence[str] = (),
    seed: int | None = None,
    transport: httpx.BaseTransport | None = None,
    retry: RetryPolicy | None = None,
) -> AgentConfig:
    """Enroll a new device into ``state_dir`` (which must not hold an enrolled device)."""
    state = State(state_dir)
    if state.is_enrolled():
        existing = state.load_config()
        raise StateError(
            f"{state} already holds device {existing.device_id}; use another --state-dir"
        )
    if ca_file is not None and not Path(ca_file).is_file():
        raise StateError(f"CA file {ca_file} does not exist")
    key = state.load_or_create_key()
    device_name = name or f"{platform.node() or 'device'}-{Path(state_dir).name}"
    with CoordinatorClient(url, ca_file=ca_file, transport=transport, retry=retry) as client:
        device_id = client.enroll(
            token,
            device_name,
            dict(capabilities) if capabilities is not None else default_capabilities(),
            public_key=signing.public_key_to_b64(key.public_key()),
            tags=tags,
        )
    ca_name = state.save_ca(ca_file) if ca_file is not None else None
    config = AgentConfig(
        device_id=device_id,
        url=url.rstrip("/"),
        name=device_name,
        seed=new_seed() if seed is None else seed,
        ca_file=ca_name,
        enrolled_at=time.time(),
    )
    state.save_config(config)
    log.info("enrolled as device %s at %s", device_id, config.url)
    return config


def open_client(
    state: State,
    *,
    transport: httpx.BaseTransport | None = None,
    retry: RetryPolicy | None = None,
    sleep: Callable[[float], Any] | None = None,
    interrupted: Callable[[], bool] | None = None,
    timeout: float = 30.0,
) -> CoordinatorClient:
    """A signed client for the device enrolled in ``state``."""
    config = state.load_config()
    return CoordinatorClient(
        config.url,
        ca_file=state.ca_path(config),
        transport=transport,
        identity=(config.device_id, state.load_key()),
        retry=retry,
        sleep=sleep,
        rng=random.Random(config.seed),  # nosec B311  # retry jitter, not a secret
        interrupted=interrupted,
        timeout=timeout,
    )
