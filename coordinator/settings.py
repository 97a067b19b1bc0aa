"""Coordinator settings: environment variables with the ``FEDGE_`` prefix (pydantic-settings)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

#: Threads kept free beyond one per request in flight (the scheduler runs in threads too).
THREAD_MARGIN = 16
#: Largest default of ``reserved_connections`` (requests in flight kept for non-device routes).
MAX_DEFAULT_RESERVE = 32
#: The ``blob_url`` that keeps blobs in the coordinator's database.
BLOBS_IN_DATABASE = "database"


def read_secret(path: Path, setting: str) -> str:
    """A secret file's content without one trailing newline; ValueError naming the setting
    and the file when it cannot be used."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{setting}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{setting}: cannot read {path}: {exc}") from None
    value = text.removesuffix("\n").removesuffix("\r")
    if not value.strip():
        raise ValueError(f"{setting}: {path} is empty")
    return value


class Settings(BaseSettings):
    """Everything the coordinator reads from its environment. See docs/configuration.md."""

    model_config = SettingsConfigDict(env_prefix="FEDGE_", extra="ignore")

    data_dir: Path = Field(default=Path("fedge-data"), description="Root of local state.")
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL; default sqlite:///<data_dir>/fedge.db. "
        "PostgreSQL: postgresql+psycopg://user@host/db",
    )
    database_url_file: Path | None = Field(
        default=None,
        description="A file holding the database URL (a Docker secret), instead of "
        "database_url; one trailing newline is ignored.",
    )
    database_password_file: Path | None = Field(
        default=None,
        description="A file holding the database password (a Docker secret), put into "
        "database_url (given without a password); one trailing newline is ignored.",
    )
    blob_dir: Path | None = Field(default=None, description="Blob store; default <data_dir>/blobs")
    blob_url: str | None = Field(
        default=None,
        description="Where blobs live. Unset: files under blob_dir. 'file:<path>' or "
        "'file://<absolute path>': files there. 'database': rows in the coordinator's own "
        "database (PostgreSQL only), so replicas on several hosts share nothing else.",
    )
    inline_update_max_bytes: int = Field(
        default=262_144,
        ge=0,
        le=1 << 20,
        description="Update bodies up to this size are stored as rows of the coordinator's "
        "own database, written in the upload's own transaction: one commit makes the update "
        "and its bytes durable, with no file and no fsyncs of its own. Larger bodies (and "
        "models) go to the blob store. 0: every update to the blob store.",
    )
    tls_cert: Path | None = Field(default=None, description="Server certificate chain (PEM)")
    tls_key: Path | None = Field(default=None, description="Server private key (PEM)")
    tls_group: Literal["X25519", "P-256", "P-384"] = Field(
        default="X25519",
        description="The one ECDHE key-exchange group the server offers (TLS 1.2 and 1.3).",
    )
    tls_check_interval_s: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds between checks of the certificate files: renewal from the private "
        "CA when fewer than 30 days are left, loading a replaced certificate.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    insecure_http: bool = Field(
        default=False, description="Serve plain HTTP (only behind a TLS-terminating proxy)."
    )
    public_hostnames: list[str] = Field(
        default_factory=list, description="Extra DNS names for the generated certificate."
    )

    max_upload_bytes: int = Field(default=64 << 20, ge=1024)
    max_model_bytes: int = Field(default=512 << 20, ge=1024)
    signature_skew_s: int = Field(default=300, ge=1)
    long_poll_max_s: int = Field(default=60, ge=0)
    long_poll_recheck_s: float = Field(default=1.0, gt=0)
    keepalive_s: float = Field(
        default=75.0,
        gt=0,
        description="Seconds an idle device connection stays open, so a device's next request "
        "(after local training) reuses its connection instead of a new TLS handshake.",
    )
    device_rate_per_minute: int = Field(default=600, ge=1)
    pace_min_fleet: int = Field(
        default=5000,
        ge=0,
        description="Enrolled active devices from which idle devices are paced instead of "
        "long-polling: a work poll without work answers at once with the time to come back "
        "(docs/protocol.md, 'Pace steering'). 0: always; a huge value: never.",
    )
    pace_window_s: float = Field(
        default=60.0,
        gt=0,
        description="Paced fleets: the selection window, in which a round's devices should "
        "check in; check-ins are paced so that enough come in any such window.",
    )
    pace_safety: float = Field(
        default=3.0,
        ge=1,
        description="Paced fleets: how many times the devices the running rounds need "
        "should check in per selection window.",
    )
    pace_min_s: float = Field(
        default=30.0, gt=0, description="Paced fleets: the shortest check-in period."
    )
    pace_max_s: float = Field(
        default=900.0, gt=0, description="Paced fleets: the longest check-in period."
    )
    checkin_batch_s: float = Field(
        default=0.05,
        gt=0,
        le=5,
        description="Paced fleets: idle check-ins arriving within this time are committed "
        "together (one transaction for their nonces and last-seen times).",
    )
    device_seen_window_s: int = Field(
        default=600,
        ge=1,
        description="The longest a device may stay unseen and still be selected (a cap on "
        "the liveness window; docs/rounds.md, 'Liveness').",
    )
    device_liveness_polls: float = Field(
        default=3.0,
        ge=1,
        le=1000,
        description="A device is selected only while seen within this many of its poll "
        "intervals (its reported poll_interval_s, at most long_poll_max_s; long_poll_max_s "
        "when it reported none).",
    )

    worker_threads: int = Field(
        default=1024,
        ge=16,
        le=8192,
        description="Worker threads for blocking request work (created on demand). Must exceed "
        "max_connections by at least 16 (the scheduler's threads).",
    )
    max_connections: int = Field(
        default=1000,
        ge=1,
        description="Requests in flight, long-polls included, before the coordinator answers "
        "503 overloaded. Device routes may fill all but reserved_connections of them.",
    )
    reserved_connections: int | None = Field(
        default=None,
        ge=0,
        description="Requests in flight kept for /healthz, /readyz and the admin API: device "
        "routes get 503 overloaded beyond max_connections minus this. Unset: a quarter of "
        "max_connections, at most 32.",
    )
    device_max_in_flight: int = Field(
        default=8,
        ge=2,
        description="Requests one device may have in flight, long-polls included, before it "
        "gets 429 too_many_requests.",
    )
    device_max_long_polls: int = Field(
        default=4,
        ge=1,
        description="Work long-polls one device may have open before it gets 429 "
        "too_many_requests. Must be below device_max_in_flight.",
    )

    workers: int = Field(
        default=1,
        ge=1,
        le=512,
        description="Worker processes `fedge coordinator serve` runs on its one port (more "
        "than 1 needs PostgreSQL; see docs/deploy.md).",
    )

    scheduler_enabled: bool = True
    scheduler_interval_s: float = Field(default=0.5, gt=0)
    scheduler_workers: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Tasks the scheduler steps at once, each in its own thread (a long "
        "aggregation of one task then does not delay another task's deadlines). Each running "
        "aggregation holds its model-sized buffers in memory.",
    )
    decoded_cache_mb: float = Field(
        default=64.0,
        ge=0,
        le=1_000_000,
        description="Memory (MB) for updates decoded at upload and kept for their aggregation "
        "(each is decoded once instead of twice; 0 disables).",
    )
    lease_ttl_s: float = Field(
        default=10.0,
        gt=0,
        description="Lifetime of a task lease; renewed every third of it while a step runs.",
    )
    instance_id: str = Field(default_factory=lambda: secrets.token_hex(6))
    eval_hook: str | None = Field(
        default=None,
        description="module:function called with (task_config, weights) -> metrics, after "
        "each aggregation (server-side evaluation on held-out data).",
    )
    log_level: str = "info"
    log_format: str = Field(
        default="text",
        description="Log lines as readable text or as one JSON object per line (event, task, "
        "round and device ids as fields; see docs/operations.md).",
    )
    metrics_enabled: bool = Field(
        default=True,
        description="Serve Prometheus metrics at /metrics (an API key is required to read "
        "them; see docs/operations.md).",
    )
    dashboard_session_s: int = Field(
        default=8 * 3600,
        ge=60,
        le=30 * 86400,
        description="Lifetime of a dashboard login (seconds).",
    )

    keep_versions: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Model versions of each task whose blobs are kept (the newest ones), for "
        "tasks whose aggregation config sets no keep_versions; 0 keeps every version. Version 0 "
        "and the base versions of work in progress are always kept.",
    )
    gc_grace_s: float = Field(
        default=3600.0,
        ge=0,
        description="Garbage collection deletes only blobs written longer ago than this, and "
        "prunes a version only this long after it left the kept window. Must exceed the "
        "longest time between writing a blob and committing the row that names it (an "
        "upload, an aggregation with its eval hook) and any clock skew between hosts sharing "
        "the blob store.",
    )
    gc_interval_s: float = Field(
        default=3600.0,
        ge=0,
        description="Seconds between automatic garbage collections in the coordinator process; "
        "0 disables them (run `fedge coordinator gc` instead).",
    )

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        value = value.lower()
        if value not in ("text", "json"):
            raise ValueError(f"log_format {value!r}: use 'text' or 'json'")
        return value

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if self.worker_threads < self.max_connections + THREAD_MARGIN:
            raise ValueError(
                f"worker_threads ({self.worker_threads}) must exceed max_connections "
                f"({self.max_connections}) by at least {THREAD_MARGIN}: a request holding a "
                "database lock must always find a thread for its next step"
            )
        if (
            self.reserved_connections is not None
            and self.reserved_connections >= self.max_connections
        ):
            raise ValueError(
                f"reserved_connections ({self.reserved_connections}) must be below "
                f"max_connections ({self.max_connections}): device routes need at least one"
            )
        if self.pace_min_s > self.pace_max_s:
            raise ValueError(
                f"pace_min_s ({self.pace_min_s}) must not exceed pace_max_s ({self.pace_max_s})"
            )
        if self.device_max_long_polls >= self.device_max_in_flight:
            raise ValueError(
                f"device_max_long_polls ({self.device_max_long_polls}) must be below "
                f"device_max_in_flight ({self.device_max_in_flight}): a device whose "
                "long-polls are all open must still be able to upload"
            )
        self._read_secret_files()
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'fedge.db').resolve()}"
        self._check_blob_url()
        if self.blob_dir is None:
            self.blob_dir = self.data_dir / "blobs"
        if self.tls_cert is None:
            self.tls_cert = self.data_dir / "tls" / "server.crt"
        if self.tls_key is None:
            self.tls_key = self.data_dir / "tls" / "server.key"
        return self

    def _read_secret_files(self) -> None:
        """``database_url_file`` and ``database_password_file`` into ``database_url``."""
        if self.database_url_file is not None:
            if self.database_url:
                raise ValueError(
                    "set FEDGE_DATABASE_URL or FEDGE_DATABASE_URL_FILE, not both (the file "
                    "keeps a password out of the environment)"
                )
            self.database_url = read_secret(self.database_url_file, "FEDGE_DATABASE_URL_FILE")
        if self.database_password_file is not None:
            password = read_secret(self.database_password_file, "FEDGE_DATABASE_PASSWORD_FILE")
            if not self.database_url:
                raise ValueError(
                    "FEDGE_DATABASE_PASSWORD_FILE needs FEDGE_DATABASE_URL (a URL without the "
                    "password, e.g. postgresql+psycopg://fedge@postgres:5432/fedge)"
                )
            try:
                url = make_url(self.database_url)
            except ArgumentError:
                raise ValueError("FEDGE_DATABASE_URL is not a database URL") from None
            if url.password is not None:
                raise ValueError(
                    "FEDGE_DATABASE_URL holds a password and FEDGE_DATABASE_PASSWORD_FILE "
                    "gives another; leave the password out of the URL"
                )
            self.database_url = url.set(password=password).render_as_string(hide_password=False)

    @property
    def secrets_from_files(self) -> bool:
        """The database URL or password came from a file (then it is never written out)."""
        return self.database_url_file is not None or self.database_password_file is not None

    def _check_blob_url(self) -> None:
        """Refuse a ``blob_url`` the coordinator cannot use; ``file:`` sets ``blob_dir``."""
        if self.blob_url is None:
            return
        value = self.blob_url
        if value == BLOBS_IN_DATABASE:
            if self.database_url.startswith("sqlite"):
                raise ValueError(
                    "blob_url 'database' needs a PostgreSQL database_url: SQLite allows one "
                    "writer at a time and the coordinator holds it while it stores a model, "
                    "so keep the file store (the default) with SQLite"
                )
            return
        if value.startswith("file://"):
            path = value.removeprefix("file://")
            if not path.startswith("/"):
                raise ValueError(
                    f"blob_url {value!r}: write file://<absolute path> (three slashes) or "
                    "file:<path>; a host name is not supported"
                )
        elif value.startswith("file:"):
            path = value.removeprefix("file:")
        else:
            raise ValueError(
                f"blob_url {value!r} is not supported: use 'file:<path>', "
                "'file://<absolute path>' or 'database' (or leave it unset for files under "
                "blob_dir)"
            )
        if not path:
            raise ValueError(f"blob_url {value!r} names no directory")
        if self.blob_dir is not None and Path(self.blob_dir) != Path(path):
            raise ValueError(
                f"blob_dir ({self.blob_dir}) and blob_url ({value}) name different blob "
                "stores; set one of them"
            )
        self.blob_dir = Path(path)

    @property
    def blobs_in_database(self) -> bool:
        """True when blobs are rows of the coordinator's database (``blob_url=database``)."""
        return self.blob_url == BLOBS_IN_DATABASE

    @property
    def connection_reserve(self) -> int:
        """Requests in flight kept for non-device routes (derived when unset; computed here
        rather than stored, so a ``model_copy`` that changes ``max_connections`` follows)."""
        if self.reserved_connections is not None:
            return self.reserved_connections
        return min(MAX_DEFAULT_RESERVE, self.max_connections // 4)

    @property
    def device_connections(self) -> int:
        """Requests in flight device routes may fill: ``max_connections`` minus the reserve."""
        return self.max_connections - self.connection_reserve

    @property
    def blobs(self) -> Path:
        assert self.blob_dir is not None
        return self.blob_dir
