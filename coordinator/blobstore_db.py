"""Blobs as rows of a database, so that coordinator replicas on several hosts share nothing
but PostgreSQL; and :func:`open_blob_store`, which picks the backend from the settings.

A blob is one ``blobs`` row (digest, size, number of chunks, write time) and its bytes in
``blob_chunks`` rows of at most ``chunk_size`` bytes (1 MiB by default), numbered from 0; an
empty blob has no chunk. The tables come from the migrations (0005).

The store has its own engine and runs short transactions of its own, never the caller's:

- ``put`` writes the row and every chunk in one transaction, so readers see the whole blob
  or none. Bytes already stored only get their ``written_at`` refreshed (the retention grace
  period relies on that, as for files). Concurrent puts of the same bytes, from threads or
  processes, store one blob: the row is inserted with ``ON CONFLICT DO NOTHING`` and only
  the transaction that inserted it writes chunks; the others wait for it on the row's key
  (PostgreSQL) or on the write lock (SQLite) and then refresh the time.
- ``get`` reads the row, then the chunks in the same snapshot (``REPEATABLE READ`` on
  PostgreSQL), and refuses with :class:`BlobDamaged` when their count, numbering or total
  size disagrees with the row, rather than returning short bytes.
- ``delete`` removes the chunks and the row together.

SQLite allows one writer at a time, and a coordinator request holds its write transaction
while it stores a task's model, so ``FEDGE_BLOB_URL=database`` is refused on an SQLite
coordinator database (settings); the class itself works on SQLite (tests, tools).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Engine,
    LargeBinary,
    Table,
    bindparam,
    delete,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from fedge.coordinator.blobstore import (
    BlobDamaged,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    FileBlobStore,
    check_digest,
)
from fedge.coordinator.db import READ_ONLY, make_engine, utcnow
from fedge.coordinator.models import Blob, BlobChunk
from fedge.coordinator.settings import Settings

#: Largest chunk (bytes): well below PostgreSQL's 1 GB field limit, and small enough that a
#: chunk is never a memory problem on either side of the connection.
DEFAULT_CHUNK_SIZE = 1 << 20
#: Rows per query of :meth:`DatabaseBlobStore.list_blobs` (one short transaction each).
LIST_BATCH = 1000

_blobs = cast(Table, Blob.__table__)
_chunks = cast(Table, BlobChunk.__table__)


#: A new blob of one chunk: its row unless the digest is there already (RETURNING names the
#: digest only when the row was inserted) and its chunk; on PostgreSQL both in one statement.
_ONE_CHUNK_ROW = {
    "digest": bindparam("p_digest"),
    "size": bindparam("p_size"),
    "num_chunks": 1,
    "written_at": bindparam("p_at"),
}
_SQLITE_NEW_ROW = (
    sqlite.insert(_blobs).values(_ONE_CHUNK_ROW).on_conflict_do_nothing().returning(_blobs.c.digest)
)
_FIRST_CHUNK = insert(_chunks).values(digest=bindparam("p_digest"), seq=0, data=bindparam("p_data"))
_PG_NEW_BLOB = (
    postgresql.insert(_blobs)
    .values(_ONE_CHUNK_ROW)
    .on_conflict_do_nothing()
    .returning(_blobs.c.digest)
    .cte("new_blob")
)
_PG_ROW_AND_CHUNK = (
    insert(_chunks)
    .from_select(
        ["digest", "seq", "data"],
        select(_PG_NEW_BLOB.c.digest, literal(0), bindparam("p_data", type_=LargeBinary)),
    )
    .returning(_chunks.c.digest)
)


class DatabaseBlobStore(BlobStore):
    """Blobs as rows (module docstring). ``url`` is an SQLAlchemy URL of a migrated database;
    ``engine`` may be given instead (the store then does not dispose of it). ``inline_limit``
    above 0 says that the database is the coordinator's own, so that :meth:`put_in` may write
    blobs up to that size in a transaction of the caller's."""

    def __init__(
        self,
        url: str | None = None,
        *,
        engine: Engine | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        inline_limit: int = 0,
    ) -> None:
        if (url is None) == (engine is None):
            raise ValueError("give the database as url or engine, not both or neither")
        if not 1 <= chunk_size <= DEFAULT_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in 1..{DEFAULT_CHUNK_SIZE}, not {chunk_size}")
        self._owns_engine = engine is None
        self.engine = engine if engine is not None else make_engine(str(url))
        self.chunk_size = chunk_size
        self.inline_limit = inline_limit
        self._dialect = self.engine.dialect.name

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()

    # ------------------------------------------------------------------ writing

    def put(self, data: bytes) -> str:
        with self.engine.begin() as conn:
            return self._write(conn, data)

    def put_in(self, conn: Connection, data: bytes) -> str:
        """The rows of ``data`` written by ``conn`` in its own (caller's) transaction; only
        for a store on the coordinator's database (:attr:`inline_limit` says so)."""
        if len(data) > self.inline_limit:
            raise ValueError(f"{len(data)} bytes is above the inline limit {self.inline_limit}")
        return self._write(conn, data)

    def _write(self, conn: Connection, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        size = len(data)
        num_chunks = -(-size // self.chunk_size)
        if num_chunks == 1 and self._dialect in ("postgresql", "sqlite"):
            # An update body: prebuilt statements (on PostgreSQL the row and its chunk in one).
            params = {"p_digest": digest, "p_size": size, "p_at": utcnow(), "p_data": data}
            if self._dialect == "postgresql":
                inserted = conn.execute(_PG_ROW_AND_CHUNK, params).first() is not None
            else:
                inserted = conn.execute(_SQLITE_NEW_ROW, params).first() is not None
                if inserted:
                    conn.execute(_FIRST_CHUNK, params)
            if not inserted:
                self._refresh(conn, digest)  # stored already (or by a concurrent put)
            return digest
        if not self._insert_row(conn, digest, size=size, num_chunks=num_chunks):
            # Stored already (or a concurrent put inserted it and committed while this one
            # waited): only its write time is refreshed.
            self._refresh(conn, digest)
            return digest
        view = memoryview(data)
        for first in range(0, num_chunks, 64):  # bounded statements for large blobs
            conn.execute(
                insert(_chunks),
                [
                    {
                        "digest": digest,
                        "seq": seq,
                        "data": bytes(view[seq * self.chunk_size : (seq + 1) * self.chunk_size]),
                    }
                    for seq in range(first, min(first + 64, num_chunks))
                ],
            )
        return digest

    def _refresh(self, conn: Connection, digest: str) -> bool:
        result = conn.execute(
            update(_blobs).where(_blobs.c.digest == digest).values(written_at=utcnow())
        )
        return bool(result.rowcount)

    def _insert_row(self, conn: Connection, digest: str, *, size: int, num_chunks: int) -> bool:
        """Insert the blob's row; False when another transaction holds that digest."""
        values: dict[str, Any] = {
            "digest": digest,
            "size": size,
            "num_chunks": num_chunks,
            "written_at": utcnow(),
        }
        if self._dialect == "postgresql":
            stmt: Any = postgresql.insert(_blobs).on_conflict_do_nothing()
        elif self._dialect == "sqlite":
            stmt = sqlite.insert(_blobs).on_conflict_do_nothing()
        else:
            try:
                with conn.begin_nested():
                    conn.execute(insert(_blobs).values(values))
            except IntegrityError:
                return False
            return True
        # RETURNING, not rowcount: the driver's rowcount of an INSERT is not always reliable.
        inserted = conn.execute(stmt.values(values).returning(_blobs.c.digest)).first()
        return inserted is not None

    def delete(self, digest: str) -> bool:
        check_digest(digest)
        with self.engine.begin() as conn:
            conn.execute(delete(_chunks).where(_chunks.c.digest == digest))
            return bool(conn.execute(delete(_blobs).where(_blobs.c.digest == digest)).rowcount)

    def delete_if_older(self, digest: str, written_before: float) -> bool:
        """One conditional ``DELETE``: a ``put`` that refreshed ``written_at`` first keeps
        the blob (on PostgreSQL a concurrent refresh is waited for and re-checked)."""
        check_digest(digest)
        cutoff = datetime.fromtimestamp(written_before, UTC)
        with self.engine.begin() as conn:
            gone = conn.execute(
                delete(_blobs)
                .where(_blobs.c.digest == digest, _blobs.c.written_at < cutoff)
                .returning(_blobs.c.digest)
            ).first()
            if gone is None:
                return False
            conn.execute(delete(_chunks).where(_chunks.c.digest == digest))
            return True

    # ------------------------------------------------------------------ reading

    def _reading(self) -> Connection:
        """A connection whose transaction only reads: a deferred BEGIN on SQLite (no write
        lock), one snapshot for all its statements on PostgreSQL."""
        conn = self.engine.connect()
        if self._dialect == "postgresql":
            return conn.execution_options(isolation_level="REPEATABLE READ")
        return conn.execution_options(**READ_ONLY)

    def get(self, digest: str) -> bytes:
        check_digest(digest)
        with self._reading() as conn, conn.begin():
            row = conn.execute(
                select(_blobs.c.size, _blobs.c.num_chunks).where(_blobs.c.digest == digest)
            ).one_or_none()
            if row is None:
                raise BlobNotFound(digest)
            size, num_chunks = row
            parts: list[bytes] = []
            total = 0
            chunks = conn.execute(
                select(_chunks.c.seq, _chunks.c.data)
                .where(_chunks.c.digest == digest)
                .order_by(_chunks.c.seq)
            )
            for expected_seq, (seq, data) in enumerate(chunks):
                if seq != expected_seq:
                    raise BlobDamaged(digest, f"chunk {expected_seq} of {num_chunks} is missing")
                total += len(data)
                if expected_seq >= num_chunks or total > size:
                    raise BlobDamaged(digest, f"more bytes than the {size} recorded")
                parts.append(bytes(data))
        if len(parts) != num_chunks:
            raise BlobDamaged(digest, f"{len(parts)} of {num_chunks} chunks present")
        if total != size:
            raise BlobDamaged(digest, f"{total} bytes in its chunks, {size} recorded")
        return b"".join(parts)

    def verify(self, digest: str) -> bool:
        try:
            return super().verify(digest)
        except BlobDamaged:
            return False

    def _row(self, digest: str) -> tuple[int, int] | None:
        check_digest(digest)
        with self._reading() as conn, conn.begin():
            row = conn.execute(
                select(_blobs.c.size, _blobs.c.num_chunks).where(_blobs.c.digest == digest)
            ).one_or_none()
        return None if row is None else (row[0], row[1])

    def exists(self, digest: str) -> bool:
        return self._row(digest) is not None

    def size(self, digest: str) -> int:
        row = self._row(digest)
        if row is None:
            raise BlobNotFound(digest)
        return row[0]

    def list_blobs(self) -> Iterator[BlobInfo]:
        """Every blob, by digest, in batches of :data:`LIST_BATCH` (a short read each, so a
        slow consumer holds no transaction open)."""
        after = ""
        while True:
            with self._reading() as conn, conn.begin():
                rows = conn.execute(
                    select(_blobs.c.digest, _blobs.c.size, _blobs.c.written_at)
                    .where(_blobs.c.digest > after)
                    .order_by(_blobs.c.digest)
                    .limit(LIST_BATCH)
                ).all()
            for digest, size, written_at in rows:
                assert isinstance(written_at, datetime)
                yield BlobInfo(digest, size, written_at.timestamp())
            if len(rows) < LIST_BATCH:
                return
            after = rows[-1][0]

    def count_chunks(self, digest: str) -> int:
        """How many chunk rows ``digest`` has (for tests and tools)."""
        with self._reading() as conn, conn.begin():
            return int(
                conn.scalar(
                    select(func.count()).select_from(_chunks).where(_chunks.c.digest == digest)
                )
                or 0
            )

    def check(self) -> tuple[bool, str]:
        """(usable, detail): the database answers a query on the blob table."""
        try:
            with self._reading() as conn, conn.begin():
                conn.execute(select(_blobs.c.digest).limit(1)).all()
        except SQLAlchemyError as exc:
            return False, f"blob database unreachable: {exc.__class__.__name__}"
        return True, "ok"


class TieredBlobStore(BlobStore):
    """The file store, and beside it the blob rows of the coordinator's database for the
    small blobs written in a caller's transaction (:meth:`put_in`: update bodies up to
    ``inline_update_max_bytes``, stored in the upload's own transaction). ``put`` writes files;
    reading, listing and deleting look at both (a digest is in one of them, or in both when
    the same bytes were written both ways: deleting removes it from both)."""

    def __init__(self, files: FileBlobStore, rows: DatabaseBlobStore) -> None:
        self.files = files
        self.rows = rows
        self.inline_limit = rows.inline_limit

    @property
    def root(self) -> Path:
        return self.files.root

    def path(self, digest: str) -> Path:
        """Where the blob's file is (or would be)."""
        return self.files.path(digest)

    def close(self) -> None:
        self.rows.close()

    def put(self, data: bytes) -> str:
        return self.files.put(data)

    def put_in(self, conn: Connection, data: bytes) -> str:
        return self.rows.put_in(conn, data)

    def get(self, digest: str) -> bytes:
        try:
            return self.files.get(digest)
        except BlobNotFound:
            return self.rows.get(digest)

    def exists(self, digest: str) -> bool:
        return self.files.exists(digest) or self.rows.exists(digest)

    def size(self, digest: str) -> int:
        try:
            return self.files.size(digest)
        except BlobNotFound:
            return self.rows.size(digest)

    def verify(self, digest: str) -> bool:
        store: BlobStore = self.files if self.files.exists(digest) else self.rows
        return store.verify(digest)

    def delete(self, digest: str) -> bool:
        in_files = self.files.delete(digest)
        return self.rows.delete(digest) or in_files

    def delete_if_older(self, digest: str, written_before: float) -> bool:
        in_files = self.files.delete_if_older(digest, written_before)
        return self.rows.delete_if_older(digest, written_before) or in_files

    def list_blobs(self) -> Iterator[BlobInfo]:
        """The files, then the rows (a digest stored both ways is listed twice; the sweep
        deletes it from both at its first listing)."""
        yield from self.files.list_blobs()
        yield from self.rows.list_blobs()

    def check(self) -> tuple[bool, str]:
        ok, detail = self.files.check()
        if not ok:
            return ok, detail
        return self.rows.check()


def open_blob_store(settings: Settings) -> BlobStore:
    """The blob store the settings name (``FEDGE_BLOB_URL``, checked by the settings): files
    under ``blob_dir`` by default, rows in the coordinator's database for ``database``. With
    ``inline_update_max_bytes`` above 0 the store also writes small update bodies as rows of
    the coordinator's database in the upload's transaction: files become a
    :class:`TieredBlobStore`. Rows are read through an engine of the store's own, never from
    the coordinator's pool: an aggregation that holds a pooled connection and the task's lock
    must not wait for another pooled connection to read an update while the uploads queued on
    that lock hold the rest of the pool."""
    limit = settings.inline_update_max_bytes
    if settings.blobs_in_database:
        return DatabaseBlobStore(settings.database_url, inline_limit=limit)
    files = FileBlobStore(settings.blobs)
    if limit == 0:
        return files
    return TieredBlobStore(files, DatabaseBlobStore(settings.database_url, inline_limit=limit))
