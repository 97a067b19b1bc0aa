"""Coordinator settings: environment variables with the ``FEDGE_`` prefix (pydantic-settings)."""

from __future__ import annotations

import secrets
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Threads kept free beyond one per request in flight (the scheduler runs in threads too).
THREAD_MARGIN = 16


class Settings(BaseSettings):
    """Everything the coordinator reads from its environment. See docs/configuration.md."""

    model_config = SettingsConfigDict(env_prefix="FEDGE_", extra="ignore")

    data_dir: Path = Field(default=Path("fedge-data"), description="Root of local state.")
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL; default sqlite:///<data_dir>/fedge.db. "
        "PostgreSQL: postgresql+psycopg://user@host/db",
    )
    blob_dir: Path | None = Field(default=None, description="Blob store; default <data_dir>/blobs")
    tls_cert: Path | None = Field(default=None, description="Server certificate chain (PEM)")
    tls_key: Path | None = Field(default=None, description="Server private key (PEM)")
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
    device_rate_per_minute: int = Field(default=600, ge=1)
    device_seen_window_s: int = Field(default=600, ge=1)

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
        "503 overloaded (each device keeps at most two).",
    )

    scheduler_enabled: bool = True
    scheduler_interval_s: float = Field(default=0.5, gt=0)
    lease_ttl_s: float = Field(default=10.0, gt=0)
    instance_id: str = Field(default_factory=lambda: secrets.token_hex(6))
    eval_hook: str | None = Field(
        default=None,
        description="module:function called with (task_config, weights) -> metrics, after "
        "each aggregation (server-side evaluation on held-out data).",
    )
    log_level: str = "info"

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if self.worker_threads < self.max_connections + THREAD_MARGIN:
            raise ValueError(
                f"worker_threads ({self.worker_threads}) must exceed max_connections "
                f"({self.max_connections}) by at least {THREAD_MARGIN}: a request holding a "
                "database lock must always find a thread for its next step"
            )
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'fedge.db').resolve()}"
        if self.blob_dir is None:
            self.blob_dir = self.data_dir / "blobs"
        if self.tls_cert is None:
            self.tls_cert = self.data_dir / "tls" / "server.crt"
        if self.tls_key is None:
            self.tls_key = self.data_dir / "tls" / "server.key"
        return self

    @property
    def blobs(self) -> Path:
        assert self.blob_dir is not None
        return self.blob_dir
