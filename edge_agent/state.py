"""The agent's durable local state, one directory per device.

Layout (see docs/agent.md)::

    <state dir>/
      agent.json              device id, coordinator URL, CA file name, name, seed
      identity.pem            Ed25519 private key, PKCS#8 PEM, mode 0600
      ca.pem                  the coordinator's CA certificate (pinned), when given
      residuals/task-<id>.res error-feedback residual per task (fedge.edge_agent.residual_store)
      outbox/<assignment>/    computed updates waiting for upload (fedge.edge_agent.outbox)
      models/task-<id>/v<n>.bin  cached model versions (wire format) + v<n>.json (ETag)

Every file is written atomically (``fedge.shared.durable``: temp file, fsync, rename, fsync of the
directory), so a crash at any instant leaves each file either old or new; leftovers of
interrupted writes are deleted on open.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.edge_agent.fsutil import read_json, remove_temp_files, write_json_atomic
from fedge.edge_agent.outbox import RESIDUAL_AFTER, Outbox
from fedge.edge_agent.residual_store import RESIDUAL_FILE_MODE, load_residual, save_residual
from fedge.shared import signing
from fedge.shared.durable import write_bytes_atomic
from fedge.shared.feedback import Residual
from fedge.shared.modelspec import ModelSpec

log = logging.getLogger(__name__)

CONFIG = "agent.json"
KEY = "identity.pem"
CA = "ca.pem"
LOCK = ".lock"
STATE_FORMAT = 1
MODELS_KEPT_PER_TASK = 2


class StateError(RuntimeError):
    """The state directory is missing something or is unusable."""


@dataclass(frozen=True)
class AgentConfig:
    """What ``agent.json`` holds."""

    device_id: str
    url: str
    name: str
    seed: int
    ca_file: str | None = None
    enrolled_at: float = 0.0
    format: int = STATE_FORMAT

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> AgentConfig:
        if int(value.get("format", STATE_FORMAT)) != STATE_FORMAT:
            raise StateError(f"unsupported state format {value.get('format')!r}")
        return cls(
            device_id=str(value["device_id"]),
            url=str(value["url"]),
            name=str(value.get("name", "")),
            seed=int(value["seed"]),
            ca_file=value.get("ca_file"),
            enrolled_at=float(value.get("enrolled_at", 0.0)),
        )


def new_seed() -> int:
    return secrets.randbits(63)


class State:
    """Open (or create) a state directory; cleans up after interrupted writes.

    Only the process that runs the agent should recover (and hold :meth:`exclusive`);
    readers such as ``fedge agent status`` open with ``recover=False``."""

    def __init__(self, directory: str | os.PathLike[str], *, recover: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.outbox = Outbox(self.directory / "outbox")
        if recover:
            self.recover()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the state directory's lock: one running agent per state directory."""
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateError(f"another agent is running with {self}") from None
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # -- recovery --------------------------------------------------------------------------

    def recover(self) -> None:
        """Remove temp files of interrupted writes; make pending outbox residuals current."""
        removed = remove_temp_files(self.directory) + self.outbox.recover()
        if removed:
            log.info("cleaned up %d leftover(s) of interrupted writes in %s", removed, self)
        for entry in self.outbox.entries():
            after = self.outbox.residual_file(entry, RESIDUAL_AFTER)
            if after is not None and after.exists():
                self._copy_residual(after, entry.task_id)

    def __str__(self) -> str:
        return str(self.directory)

    # -- config and identity ---------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG

    def load_config(self) -> AgentConfig:
        try:
            return AgentConfig.from_json(read_json(self.config_path))
        except FileNotFoundError:
            raise StateError(f"{self} holds no enrolled device; run `fedge agent enroll`") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"{self.config_path} is unreadable: {exc}") from None

    def is_enrolled(self) -> bool:
        return self.config_path.exists()

    def save_config(self, config: AgentConfig) -> None:
        write_json_atomic(self.config_path, asdict(config), mode=0o600)

    @property
    def key_path(self) -> Path:
        return self.directory / KEY

    def load_or_create_key(self) -> Ed25519PrivateKey:
        """The device's identity key, created (mode 0600) on first use."""
        if self.key_path.exists():
            return self.load_key()
        key = Ed25519PrivateKey.generate()
        write_bytes_atomic(self.key_path, signing.private_key_to_pem(key), mode=0o600)
        return key

    def load_key(self) -> Ed25519PrivateKey:
        try:
            mode = stat.S_IMODE(self.key_path.stat().st_mode)
            data = self.key_path.read_bytes()
        except FileNotFoundError:
            raise StateError(f"{self.key_path} is missing") from None
        if mode & 0o077:
            log.warning("%s is readable by others (mode %o); fixing to 0600", self.key_path, mode)
            os.chmod(self.key_path, 0o600)
        return signing.private_key_from_pem(data)

    def identity(self) -> tuple[str, Ed25519PrivateKey]:
        return self.load_config().device_id, self.load_key()

    def save_ca(self, source: str | os.PathLike[str]) -> str:
        """Copy the coordinator's CA certificate into the state dir; its file name."""
        data = Path(source).read_bytes()
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise StateError(f"{source} is not a PEM certificate")
        write_bytes_atomic(self.directory / CA, data)
        return CA

    def ca_path(self, config: AgentConfig | None = None) -> str | None:
        cfg = config or self.load_config()
        return None if cfg.ca_file is None else str(self.directory / cfg.ca_file)

    # -- residuals -------------------------------------------------------------------------

    def residual_path(self, task_id: int) -> Path:
        return self.directory / "residuals" / f"task-{int(task_id)}.res"

    def load_residual(self, task_id: int, spec: ModelSpec) -> Residual:
        """The task's residual (zeros when there is none yet, or when the stored one does
        not fit ``spec``, e.g. after a task was recreated)."""
        path = self.residual_path(task_id)
        if not path.exists():
            return Residual.zeros(spec)
        try:
            return load_residual(path, spec=spec)
        except (ValueError, OSError) as exc:
            log.warning("ignoring unusable residual %s: %s", path, exc)
            return Residual.zeros(spec)

    def save_residual(self, task_id: int, residual: Residual) -> None:
        save_residual(residual, self.residual_path(task_id))

    def restore_residual(self, task_id: int, source: Path | None) -> None:
        """Make ``source`` (a residual file) the task's residual."""
        if source is not None and source.exists():
            self._copy_residual(source, task_id)

    def _copy_residual(self, source: Path, task_id: int) -> None:
        data = source.read_bytes()
        write_bytes_atomic(self.residual_path(task_id), data, mode=RESIDUAL_FILE_MODE)

    # -- model cache -----------------------------------------------------------------------

    def _model_dir(self, task_id: int) -> Path:
        return self.directory / "models" / f"task-{int(task_id)}"

    def cached_model(self, task_id: int, version: int) -> tuple[bytes, str | None] | None:
        """The cached wire bytes of a model version and its ETag, if present."""
        base = self._model_dir(task_id) / f"v{int(version)}"
        try:
            data = base.with_suffix(".bin").read_bytes()
        except FileNotFoundError:
            return None
        etag = None
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
            etag = read_json(base.with_suffix(".json"))["etag"]
        return data, etag

    def cache_model(self, task_id: int, version: int, data: bytes, etag: str | None) -> None:
        """Store a model version (bytes first, then its ETag) and drop older versions."""
        directory = self._model_dir(task_id)
        base = directory / f"v{int(version)}"
        write_bytes_atomic(base.with_suffix(".bin"), data)
        write_json_atomic(base.with_suffix(".json"), {"etag": etag, "stored_at": time.time()})
        versions = sorted(
            (int(p.stem[1:]) for p in directory.glob("v*.bin") if p.stem[1:].isdigit()),
            reverse=True,
        )
        for old in versions[MODELS_KEPT_PER_TASK:]:
            for suffix in (".bin", ".json"):
                with contextlib.suppress(FileNotFoundError):
                    (directory / f"v{old}{suffix}").unlink()

    def newest_cached_version(self, task_id: int, *, below: int) -> int | None:
        """The newest cached version of the task older than ``below``, if any."""
        directory = self._model_dir(task_id)
        versions = [
            int(p.stem[1:])
            for p in directory.glob("v*.bin")
            if p.stem[1:].isdigit() and int(p.stem[1:]) < below
        ]
        return max(versions, default=None)

    def drop_cached_model(self, task_id: int, version: int) -> None:
        base = self._model_dir(task_id) / f"v{int(version)}"
        for suffix in (".json", ".bin"):
            with contextlib.suppress(FileNotFoundError):
                base.with_suffix(suffix).unlink()

    # -- summary ---------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """What ``fedge agent status`` prints."""
        out: dict[str, Any] = {"state_dir": str(self.directory), "enrolled": self.is_enrolled()}
        if self.is_enrolled():
            cfg = self.load_config()
            out |= {"device_id": cfg.device_id, "url": cfg.url, "name": cfg.name}
            out["ca_file"] = self.ca_path(cfg)
        out["outbox"] = [
            {"assignment_id": e.assignment_id, "task_id": e.task_id, "base_version": e.base_version}
            for e in self.outbox.entries()
        ]
        out["residual_tasks"] = sorted(
            int(p.stem.split("-")[1]) for p in (self.directory / "residuals").glob("task-*.res")
        )
        out["cached_models"] = sorted(
            f"{p.parent.name}/{p.stem}" for p in (self.directory / "models").glob("task-*/v*.bin")
        )
        return out
