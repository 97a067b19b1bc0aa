"""The content-addressed blob store: round trips, addressing, atomic writes, digest checks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from fedge.coordinator.blobstore import BlobNotFound, BlobStore, FileBlobStore


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return FileBlobStore(tmp_path / "blobs")


@pytest.mark.parametrize("size", [0, 1, 4096, 1 << 20])
def test_put_get_round_trip(store: BlobStore, size: int) -> None:
    data = np.random.default_rng(size).bytes(size)
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.get(digest) == data
    assert store.exists(digest)
    assert store.size(digest) == size
    assert store.verify(digest)
    assert store.path(digest) == store.root / digest[:2] / digest[2:4] / digest


def test_same_bytes_one_blob(store: BlobStore) -> None:
    data = b"the same model bytes"
    first = store.put(data)
    second = store.put(bytes(bytearray(data)))
    assert first == second
    assert files_under(store.root) == [store.path(first)]


def test_different_bytes_different_blobs(store: BlobStore) -> None:
    a, b = store.put(b"version 1"), store.put(b"version 2")
    assert a != b
    assert files_under(store.root) == sorted([store.path(a), store.path(b)])
    assert store.get(a) == b"version 1"
    assert store.get(b) == b"version 2"


def test_survives_reopening(tmp_path: Path) -> None:
    digest = FileBlobStore(tmp_path / "blobs").put(b"durable")
    assert FileBlobStore(tmp_path / "blobs").get(digest) == b"durable"


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_write_leaves_no_blob_and_no_temp_file(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    def boom(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    data = b"x" * 10_000
    digest = hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="No space left"):
        store.put(data)
    monkeypatch.undo()
    assert not store.exists(digest)
    assert files_under(store.root) == []
    # The store still works afterwards.
    assert store.put(data) == digest
    assert files_under(store.root) == [store.path(digest)]


def test_verify_detects_corruption(store: BlobStore) -> None:
    digest = store.put(b"original bytes")
    store.path(digest).write_bytes(b"flipped bytes!")
    assert not store.verify(digest)


def test_missing_blob(store: BlobStore) -> None:
    digest = hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(digest)
    with pytest.raises(BlobNotFound):
        store.get(digest)
    with pytest.raises(BlobNotFound):
        store.size(digest)


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
@pytest.mark.parametrize("operation", ["path", "get", "exists", "size", "verify"])
def test_invalid_digests_rejected(store: BlobStore, digest: str, operation: str) -> None:
    with pytest.raises(ValueError, match="not a SHA-256 hex digest"):
        getattr(store, operation)(digest)
    assert files_under(store.root) == []


def test_delete_and_list(store: FileBlobStore) -> None:
    a, b = store.put(b"kept"), store.put(b"dropped")
    (store.root / "ab").mkdir()
    (store.root / "ab" / "cd").mkdir()
    (store.root / "ab" / "cd" / ".tmp-stray").write_bytes(b"x")  # not a blob
    listed = {info.digest: info for info in store.list_blobs()}
    assert set(listed) == {a, b}
    assert listed[a].size == 4 and listed[b].size == 7
    assert store.delete(b) is True
    assert store.delete(b) is False
    assert not store.exists(b) and store.get(a) == b"kept"
    assert [info.digest for info in store.list_blobs()] == [a]
    with pytest.raises(BlobNotFound):
        store.get(b)


def test_putting_stored_bytes_again_refreshes_the_write_time(store: FileBlobStore) -> None:
    digest = store.put(b"model")
    os.utime(store.path(digest), (1_000_000, 1_000_000))
    (before,) = store.list_blobs()
    assert before.written_at == 1_000_000
    assert store.put(b"model") == digest
    (after,) = store.list_blobs()
    assert after.written_at > 1_000_000 + 10**8
