"""The outbox: computed updates waiting for upload, durable across crashes.

Each entry is a directory ``outbox/<assignment_id>/`` holding ``meta.json`` (task, upload URL,
idempotency key, the assignment's deadline), ``update.bin`` (the encoded update, wire format) and,
when error feedback is on, ``residual-before`` / ``residual-after`` (the task's residual before
and after this update's compression, as :mod:`fedge.edge_agent.residual_store` files). An entry is
built in a temporary directory and renamed into place in one step, so it exists completely or
not at all.

Why both residuals are kept (the ordering argument): compression moves part of the delta into
the update and leaves the rest in the residual, so the new residual is only right if the
update is eventually delivered. The agent therefore commits the entry first and the new
residual second, and :meth:`Outbox.recover` re-applies ``residual-after`` of every pending
entry on start. A crash at any instant leaves one of: no entry and the old residual (the
update was never made: nothing lost), or an entry whose ``residual-after`` becomes current (the
update will be uploaded). When the coordinator refuses the update for good (409 stale_update,
403, 404, ...), :meth:`Outbox.discard` restores ``residual-before``: a refused update leaves
no trace, as if the round had not happened on this device. At most one entry per task is
pending at a time (the agent uploads or discards it before taking new work on that task), so
re-applying a pending entry's residual is always correct.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedge.edge_agent.fsutil import read_json, remove_temp_files, write_json_atomic
from fedge.edge_agent.residual_store import save_residual
from fedge.shared.durable import TEMP_MARKER, fsync_dir, write_bytes_atomic
from fedge.shared.feedback import Residual

META = "meta.json"
BODY = "update.bin"
RESIDUAL_BEFORE = "residual-before"
RESIDUAL_AFTER = "residual-after"
TRASH_MARKER = ".trash-"


@dataclass(frozen=True)
class OutboxEntry:
    """What the agent needs to upload one update, possibly after a restart."""

    assignment_id: int
    task_id: int
    base_version: int
    upload_url: str
    idempotency_key: str
    num_examples: int
    created_at: float
    has_residual: bool = False
    #: The assignment's deadline (seconds since the epoch) when the work answer gave one: the
    #: agent's quick retries of the upload stay within it (docs/agent.md, "Outages").
    deadline: float | None = None

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> OutboxEntry:
        return cls(
            assignment_id=int(value["assignment_id"]),
            task_id=int(value["task_id"]),
            base_version=int(value["base_version"]),
            upload_url=str(value["upload_url"]),
            idempotency_key=str(value["idempotency_key"]),
            num_examples=int(value["num_examples"]),
            created_at=float(value["created_at"]),
            has_residual=bool(value.get("has_residual", False)),
            deadline=None if value.get("deadline") is None else float(value["deadline"]),
        )


def new_idempotency_key() -> str:
    """A key unique to this computed update (``[A-Za-z0-9_-]``, 16 characters: 96 random bits;
    keys are per device)."""
    return secrets.token_urlsafe(12)


class PendingUpdateExists(RuntimeError):
    """A task already has an update waiting; upload or discard it first."""


class Outbox:
    """The ``outbox/`` directory of an agent's state."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)

    def entry_dir(self, assignment_id: int) -> Path:
        return self.directory / str(assignment_id)

    def entries(self) -> list[OutboxEntry]:
        """Committed entries, oldest first. Directories without ``meta.json`` (partial) and
        unreadable metadata are skipped."""
        found = []
        for path in self.directory.iterdir():
            if not path.is_dir() or not path.name.isdigit():
                continue
            try:
                found.append(OutboxEntry.from_json(read_json(path / META)))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(found, key=lambda e: (e.created_at, e.assignment_id))

    def pending_for_task(self, task_id: int) -> OutboxEntry | None:
        return next((e for e in self.entries() if e.task_id == task_id), None)

    def add(
        self,
        entry: OutboxEntry,
        body: bytes,
        *,
        residual_before: Residual | None = None,
        residual_after: Residual | None = None,
    ) -> None:
        """Commit ``entry`` with its update body and, when ``entry.has_residual``, the task's
        residual before and after this update."""
        if self.pending_for_task(entry.task_id) is not None:
            raise PendingUpdateExists(
                f"task {entry.task_id} already has an update waiting in the outbox"
            )
        final = self.entry_dir(entry.assignment_id)
        if final.exists():
            raise PendingUpdateExists(f"assignment {entry.assignment_id} is already in the outbox")
        if entry.has_residual and (residual_before is None or residual_after is None):
            raise ValueError("an entry with has_residual needs both residuals")
        tmp = self.directory / f".{entry.assignment_id}{TEMP_MARKER}{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            write_bytes_atomic(tmp / BODY, body)
            if entry.has_residual:
                assert residual_before is not None and residual_after is not None
                save_residual(residual_before, tmp / RESIDUAL_BEFORE)
                save_residual(residual_after, tmp / RESIDUAL_AFTER)
            write_json_atomic(tmp / META, asdict(entry))
            fsync_dir(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.directory)

    def get(self, assignment_id: int) -> OutboxEntry | None:
        try:
            return OutboxEntry.from_json(read_json(self.entry_dir(assignment_id) / META))
        except FileNotFoundError:
            return None

    def body(self, entry: OutboxEntry) -> bytes:
        return (self.entry_dir(entry.assignment_id) / BODY).read_bytes()

    def residual_file(self, entry: OutboxEntry, which: str) -> Path | None:
        if not entry.has_residual:
            return None
        return self.entry_dir(entry.assignment_id) / which

    def remove(self, entry: OutboxEntry) -> None:
        """Forget ``entry`` (atomically: renamed away first, then deleted)."""
        path = self.entry_dir(entry.assignment_id)
        if not path.exists():
            return
        trash = self.directory / f".{entry.assignment_id}{TRASH_MARKER}{time.time_ns()}"
        os.rename(path, trash)
        fsync_dir(self.directory)
        shutil.rmtree(trash, ignore_errors=True)

    def recover(self) -> int:
        """Delete leftovers of interrupted writes and removals; how many were removed."""
        removed = remove_temp_files(self.directory)
        for path in self.directory.iterdir():
            if path.name.startswith(".") and TRASH_MARKER in path.name:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
            elif path.is_dir() and path.name.isdigit() and not (path / META).exists():
                # Cannot happen with rename-into-place, but never let a partial entry stay.
                with contextlib.suppress(OSError):
                    shutil.rmtree(path)
                removed += 1
        return removed
