"""The content-addressed blob stores: round trips, addressing, digest checks and the write
time, on every backend (files; rows in SQLite; rows in PostgreSQL when
FEDGE_TEST_POSTGRES_URL is set); atomic file writes for the file store; chunking,
concurrency and damage for the database store."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import delete, update

from fedge.coordinator.blobstore import (
    BlobDamaged,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    FileBlobStore,
)
from fedge.coordinator.blobstore_db import DatabaseBlobStore
from fedge.coordinator.models import Blob, BlobChunk
from tests.support import databases

#: Chunk size of the database stores under test: small and odd, so blobs span many chunks.
CHUNK = 1000

MakeStore = Callable[[], BlobStore]

DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture(params=["file", *DATABASES])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeStore]:
    """Opens a store on the test's storage; every call opens another one on the same
    storage (a restart, or another process)."""
    opened: list[DatabaseBlobStore] = []
    if request.param == "file":
        yield lambda: FileBlobStore(tmp_path / "blobs")
        return
    for url in databases.fresh_database(request, request.param, tmp_path):

        def make(url: str = url) -> BlobStore:
            store = DatabaseBlobStore(url, chunk_size=CHUNK)
            opened.append(store)
            return store

        yield make
        for store in opened:
            store.close()


@pytest.fixture
def store(make_store: MakeStore) -> BlobStore:
    return make_store()


@pytest.fixture(params=DATABASES)
def db_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DatabaseBlobStore]:
    for url in databases.fresh_database(request, request.param, tmp_path):
        store = DatabaseBlobStore(url, chunk_size=CHUNK)
        yield store
        store.close()


@pytest.fixture
def file_store(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "blobs")


def stored(store: BlobStore) -> list[str]:
    """The digests the store holds; for files, checked against the files on disk."""
    digests = sorted(info.digest for info in store.list_blobs())
    if isinstance(store, FileBlobStore):
        assert files_under(store.root) == sorted(store.path(d) for d in digests)
    return digests


def set_written_at(store: BlobStore, digest: str, when: float) -> None:
    if isinstance(store, FileBlobStore):
        os.utime(store.path(digest), (when, when))
        return
    assert isinstance(store, DatabaseBlobStore)
    with store.engine.begin() as conn:
        conn.execute(
            update(Blob.__table__)
            .where(Blob.__table__.c.digest == digest)
            .values(written_at=datetime.fromtimestamp(when, UTC))
        )


def overwrite(store: BlobStore, digest: str, data: bytes) -> None:
    """Change a blob's bytes behind the store's back (same length, so only the digest tells)."""
    if isinstance(store, FileBlobStore):
        store.path(digest).write_bytes(data)
        return
    assert isinstance(store, DatabaseBlobStore)
    with store.engine.begin() as conn:
        conn.execute(
            update(BlobChunk.__table__)
            .where(BlobChunk.__table__.c.digest == digest, BlobChunk.__table__.c.seq == 0)
            .values(data=data)
        )


# ------------------------------------------------------------------ every backend


@pytest.mark.parametrize("size", [0, 1, 4096, 1 << 20])
def test_put_get_round_trip(store: BlobStore, size: int) -> None:
    data = np.random.default_rng(size).bytes(size)
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.get(digest) == data
    assert store.exists(digest)
    assert store.size(digest) == size
    assert store.verify(digest)
    assert stored(store) == [digest]


def test_same_bytes_one_blob(store: BlobStore) -> None:
    data = b"the same model bytes"
    first = store.put(data)
    second = store.put(bytes(bytearray(data)))
    assert first == second
    assert stored(store) == [first]


def test_different_bytes_different_blobs(store: BlobStore) -> None:
    a, b = store.put(b"version 1"), store.put(b"version 2")
    assert a != b
    assert stored(store) == sorted([a, b])
    assert store.get(a) == b"version 1"
    assert store.get(b) == b"version 2"


def test_survives_reopening(make_store: MakeStore) -> None:
    digest = make_store().put(b"durable")
    assert make_store().get(digest) == b"durable"


def test_verify_detects_corruption(store: BlobStore) -> None:
    digest = store.put(b"original bytes")
    overwrite(store, digest, b"flipped bytes!")
    assert not store.verify(digest)


def test_missing_blob(store: BlobStore) -> None:
    digest = hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(digest)
    with pytest.raises(BlobNotFound) as err:
        store.get(digest)
    assert err.value.args == (digest,)  # the KeyError names the missing blob
    with pytest.raises(BlobNotFound) as err:
        store.size(digest)
    assert err.value.args == (digest,)
    assert store.delete(digest) is False


BAD_DIGESTS = [
    "",
    "abc",
    "0" * 63,
    "0" * 65,
    "A" * 64,  # upper case is not the canonical form
    "g" * 64,
    "../" + "0" * 61,
    "0" * 62 + "/x",
    "0" * 64 + "\n",
]


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_invalid_digests_rejected(store: BlobStore, digest: str) -> None:
    for operation in ("get", "exists", "size", "verify", "delete"):
        with pytest.raises(ValueError, match="not a SHA-256 hex digest"):
            getattr(store, operation)(digest)
    assert stored(store) == []


def test_delete_and_list(store: BlobStore) -> None:
    a, b = store.put(b"kept"), store.put(b"dropped")
    listed = {info.digest: info for info in store.list_blobs()}
    assert set(listed) == {a, b}
    assert listed[a].size == 4 and listed[b].size == 7
    assert store.delete(b) is True
    assert store.delete(b) is False
    assert not store.exists(b) and store.get(a) == b"kept"
    assert [info.digest for info in store.list_blobs()] == [a]
    with pytest.raises(BlobNotFound):
        store.get(b)


def test_putting_stored_bytes_again_refreshes_the_write_time(store: BlobStore) -> None:
    digest = store.put(b"model")
    set_written_at(store, digest, 1_000_000)
    (before,) = store.list_blobs()
    assert before.written_at == 1_000_000
    assert store.put(b"model") == digest
    (after,) = store.list_blobs()
    assert after.written_at > 1_000_000 + 10**8


def test_delete_if_older_keeps_what_was_written_since(store: BlobStore) -> None:
    digest, other = store.put(b"old model"), store.put(b"other")
    (written,) = [b.written_at for b in store.list_blobs() if b.digest == digest]
    assert store.delete_if_older(digest, written) is False  # written at the cut-off: kept
    assert store.get(digest) == b"old model"
    assert store.delete_if_older(digest, written + 3600) is True
    assert not store.exists(digest) and store.get(other) == b"other"
    assert store.delete_if_older(digest, written + 3600) is False  # nothing left to delete
    assert [b.digest for b in store.list_blobs()] == [other]


def test_check_passes_on_a_usable_store(store: BlobStore) -> None:
    assert store.check() == (True, "ok")


# ------------------------------------------------------------------ files only


def test_blob_paths_are_sharded_by_digest(file_store: FileBlobStore) -> None:
    digest = file_store.put(b"x")
    assert file_store.path(digest) == file_store.root / digest[:2] / digest[2:4] / digest
    with pytest.raises(ValueError, match="not a SHA-256 hex digest"):
        file_store.path("../" + "0" * 61)


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_write_leaves_no_blob_and_no_temp_file(
    file_store: FileBlobStore, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    def boom(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    data = b"x" * 10_000
    digest = hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="No space left"):
        file_store.put(data)
    monkeypatch.undo()
    assert not file_store.exists(digest)
    assert files_under(file_store.root) == []
    # The store still works afterwards.
    assert file_store.put(data) == digest
    assert files_under(file_store.root) == [file_store.path(digest)]


def test_list_ignores_temporary_files(file_store: FileBlobStore) -> None:
    a = file_store.put(b"kept")
    (file_store.root / "ab" / "cd").mkdir(parents=True)
    (file_store.root / "ab" / "cd" / ".tmp-stray").write_bytes(b"x")  # not a blob
    assert [info.digest for info in file_store.list_blobs()] == [a]


def test_blobs_and_rewritten_blobs_get_mode_0600_through_a_tmp_file(
    file_store: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every write (a put, and the write-back of a blob refreshed while a sweep deleted it)
    goes through a temporary file named .tmp-<random> beside the blob."""
    renamed: list[tuple[str, str]] = []
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        renamed.append((Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    digest = file_store.put(b"model")
    path = file_store.path(digest)
    assert path.stat().st_mode & 0o777 == 0o600
    (written,) = [b.written_at for b in file_store.list_blobs()]
    assert file_store.delete_if_older(digest, written) is False  # written again meanwhile
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_bytes() == b"model"
    assert len(renamed) == 2
    for src, dst in renamed:
        assert dst == digest and src.startswith(".tmp-") and not src.startswith(".tmp-gc-")
    assert files_under(file_store.root) == [path]


def test_the_root_and_its_parents_are_created(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "a" / "b" / "blobs")
    assert store.root.is_dir() and store.check() == (True, "ok")


def test_check_reports_a_missing_or_unwritable_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    real_access = os.access

    def read_only(path: object, mode: int) -> bool:  # as for a directory mounted read-only
        return not mode & os.W_OK and real_access(path, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", read_only)
    assert store.check() == (False, f"blob directory {store.root} is not readable and writable")
    monkeypatch.undo()
    store.root.rmdir()
    assert store.check() == (False, f"blob directory {store.root} does not exist")


def test_list_skips_strangers_at_every_level(file_store: FileBlobStore) -> None:
    """Files and directories that are not shard directories or blobs are skipped, wherever
    they sort: a file "0" and a file "ab" at the root, a directory "0a0" (not a shard) holding
    a blob-like file, a file "!" in a shard directory, temporary files beside blobs."""
    digests = {file_store.put(f"blob {i}".encode()) for i in range(20)}
    root = file_store.root
    (root / "0").write_bytes(b"x")
    (root / "ab").write_bytes(b"x")
    (root / "0a0" / "ab").mkdir(parents=True)
    (root / "0a0" / "ab" / hashlib.sha256(b"not a blob").hexdigest()).write_bytes(b"x")
    for first in {d[:2] for d in digests}:
        (root / first / "!").write_bytes(b"x")
    leaves = {file_store.path(d).parent for d in digests}
    for leaf in leaves:
        for i in range(8):
            (leaf / f".tmp-stray{i}").write_bytes(b"x")
    # Some temporary file comes before some blob in a directory listing's own order.
    assert any(os.listdir(leaf)[0].startswith(".tmp-") for leaf in leaves)
    assert sorted(info.digest for info in file_store.list_blobs()) == sorted(digests)


def test_list_skips_a_blob_deleted_while_listing(file_store: FileBlobStore) -> None:
    """Three blobs in one leaf directory: after the first is listed, the one the directory
    lists next is deleted; the listing goes on with the third."""
    by_leaf: dict[str, list[bytes]] = {}
    i = 0
    while True:  # three contents whose digests share their first four hex digits
        data = f"content {i}".encode()
        group = by_leaf.setdefault(hashlib.sha256(data).hexdigest()[:4], [])
        group.append(data)
        if len(group) == 3:
            break
        i += 1
    digests = [file_store.put(data) for data in group]
    leaf = file_store.path(digests[0]).parent
    order = [name for name in os.listdir(leaf) if name in digests]
    assert sorted(order) == sorted(digests)
    listing = file_store.list_blobs()
    first = next(listing)
    assert first.digest == order[0]
    file_store.path(order[1]).unlink()
    assert [info.digest for info in listing] == [order[2]]


class _MemoryStore(BlobStore):
    """The smallest store: only what BlobStore leaves abstract (for its default methods)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def get(self, digest: str) -> bytes:
        try:
            return self.blobs[digest]
        except KeyError:
            raise BlobNotFound(digest) from None

    def exists(self, digest: str) -> bool:
        return digest in self.blobs

    def size(self, digest: str) -> int:
        return len(self.get(digest))

    def check(self) -> tuple[bool, str]:
        return True, "ok"

    def delete(self, digest: str) -> bool:
        return self.blobs.pop(digest, None) is not None

    def list_blobs(self) -> Iterator[BlobInfo]:
        return iter(BlobInfo(d, len(b), 0.0) for d, b in self.blobs.items())


def test_default_delete_if_older_deletes_and_verify_hashes() -> None:
    store = _MemoryStore()
    a, b = store.put(b"a"), store.put(b"b")
    assert store.delete_if_older(a, 1.0) is True
    assert not store.exists(a) and store.exists(b)
    assert store.delete_if_older(a, 1.0) is False
    assert store.verify(b)
    store.blobs[b] = b"changed"
    assert not store.verify(b)


# ------------------------------------------------------------------ database only


@pytest.mark.parametrize("size", [0, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_blobs_are_chunked(db_store: DatabaseBlobStore, size: int) -> None:
    data = np.random.default_rng(size).bytes(size)
    digest = db_store.put(data)
    assert db_store.count_chunks(digest) == -(-size // CHUNK)
    assert db_store.get(digest) == data
    assert db_store.size(digest) == size
    # Another store on the same database with another chunk size reads it the same.
    other = DatabaseBlobStore(engine=db_store.engine, chunk_size=7)
    assert other.get(digest) == data


def test_chunk_size_is_bounded() -> None:
    for bad in (0, (1 << 20) + 1):
        with pytest.raises(ValueError, match="chunk_size"):
            DatabaseBlobStore("sqlite://", chunk_size=bad)


def test_concurrent_puts_of_the_same_bytes_store_one_blob(db_store: DatabaseBlobStore) -> None:
    """Eight writers, half of them through a second store (another replica's engine), put
    the same bytes at once: one row, one set of chunks, every put succeeds."""
    data = np.random.default_rng(5).bytes(5 * CHUNK + 17)
    replica = DatabaseBlobStore(
        db_store.engine.url.render_as_string(hide_password=False), chunk_size=CHUNK
    )
    writers = 8
    start = threading.Barrier(writers)

    def put(i: int) -> str:
        start.wait(timeout=30)
        return (db_store if i % 2 else replica).put(data)

    try:
        with ThreadPoolExecutor(writers) as pool:
            digests = list(pool.map(put, range(writers)))
    finally:
        replica.close()
    digest = hashlib.sha256(data).hexdigest()
    assert digests == [digest] * writers
    assert stored(db_store) == [digest]
    assert db_store.count_chunks(digest) == 6
    assert db_store.get(digest) == data


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("drop-middle", "chunk 1 of 3 is missing"),
        ("drop-last", "2 of 3 chunks present"),
        ("truncate", "bytes in its chunks"),
        ("extra", "more bytes than"),
    ],
)
def test_a_damaged_blob_is_refused(db_store: DatabaseBlobStore, damage: str, message: str) -> None:
    data = bytes(range(256)) * 10  # 2560 bytes: 3 chunks
    digest = db_store.put(data)
    chunks = BlobChunk.__table__
    mine = chunks.c.digest == digest
    with db_store.engine.begin() as conn:
        if damage == "drop-middle":
            conn.execute(delete(chunks).where(mine, chunks.c.seq == 1))
        elif damage == "drop-last":
            conn.execute(delete(chunks).where(mine, chunks.c.seq == 2))
        elif damage == "truncate":
            conn.execute(update(chunks).where(mine, chunks.c.seq == 2).values(data=b"short"))
        else:
            conn.execute(chunks.insert().values(digest=digest, seq=3, data=b"more"))
    with pytest.raises(BlobDamaged, match=message) as caught:
        db_store.get(digest)
    assert digest in str(caught.value) and caught.value.digest == digest
    assert not db_store.verify(digest)
    assert db_store.exists(digest)  # the row is still there: damage, not absence


def test_delete_removes_the_chunks(db_store: DatabaseBlobStore) -> None:
    gone = db_store.put(b"g" * (2 * CHUNK + 1))
    kept = db_store.put(b"k" * (CHUNK + 1))
    assert db_store.delete(gone) is True
    assert db_store.count_chunks(gone) == 0
    assert db_store.count_chunks(kept) == 2
    # Stored again after a delete, the blob is whole again.
    assert db_store.put(b"g" * (2 * CHUNK + 1)) == gone
    assert db_store.get(gone) == b"g" * (2 * CHUNK + 1)


def test_list_pages_through_many_blobs(
    db_store: DatabaseBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fedge.coordinator.blobstore_db.LIST_BATCH", 3)
    digests = sorted(db_store.put(f"blob {i}".encode()) for i in range(10))
    assert [info.digest for info in db_store.list_blobs()] == digests


def test_check_reports_an_unusable_database(tmp_path: Path) -> None:
    unreachable = DatabaseBlobStore(f"sqlite:///{tmp_path / 'no-such-dir' / 'fedge.db'}")
    not_migrated = DatabaseBlobStore(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        for store in (unreachable, not_migrated):
            ok, detail = store.check()
            assert not ok
            assert detail.startswith("blob database unreachable: ")
    finally:
        unreachable.close()
        not_migrated.close()


def test_the_file_store_keeps_nothing_in_a_database_transaction(file_store: FileBlobStore) -> None:
    assert file_store.inline_limit == 0
    refusal = r"^FileBlobStore keeps no blobs in the database$"
    with pytest.raises(NotImplementedError, match=refusal):
        file_store.put_in(None, b"x")  # type: ignore[arg-type]
    assert list(file_store.list_blobs()) == []
