"""fedge.shared.durable: atomic, durable replacement of a file, and the sweep of leftovers."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from fedge.shared import durable
from fedge.shared.durable import remove_temp_files, write_atomic, write_bytes_atomic


@pytest.fixture
def umask() -> Iterator[None]:
    """A strict umask, so that a mode the helper did not set explicitly would show."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_content_is_replaced_and_no_temp_file_stays(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "file.bin"  # missing parents are created
    write_bytes_atomic(path, b"old")
    write_bytes_atomic(path, b"new content")
    assert path.read_bytes() == b"new content"
    assert names(path.parent) == ["file.bin"]


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
def test_the_file_gets_exactly_the_mode(tmp_path: Path, umask: None, mode: int) -> None:
    path = tmp_path / "key.pem"
    write_bytes_atomic(path, b"first", mode=0o666)
    write_bytes_atomic(path, b"secret", mode=mode)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_the_temp_file_has_the_mode_before_any_byte_is_written(tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []

    def write(fh: BinaryIO) -> None:
        (temp,) = [name for name in names(tmp_path) if name.startswith(".")]
        seen.append((temp, stat.S_IMODE(os.fstat(fh.fileno()).st_mode)))
        fh.write(b"k")

    write_atomic(tmp_path / "key.pem", write, mode=0o600)
    write_atomic(tmp_path / "blob", write, mode=0o644, temp_prefix=".tmp-")
    (key_tmp, key_mode), (blob_tmp, blob_mode) = seen
    assert key_tmp.startswith(".key.pem.tmp-") and key_mode == 0o600
    assert blob_tmp.startswith(".tmp-") and blob_mode == 0o644
    assert names(tmp_path) == ["blob", "key.pem"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_an_error_while_writing_keeps_the_old_file(tmp_path: Path, error: BaseException) -> None:
    path = tmp_path / "state.json"
    write_bytes_atomic(path, b'{"v": 1}', mode=0o600)

    def write(fh: BinaryIO) -> None:
        fh.write(b'{"v": 2, "half')
        fh.flush()
        raise error

    with pytest.raises(type(error)):
        write_atomic(path, write, mode=0o644)
    assert path.read_bytes() == b'{"v": 1}'
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert names(tmp_path) == ["state.json"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failing_system_call_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "file.bin"
    write_bytes_atomic(path, b"old")

    def boom(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="No space left"):
        write_bytes_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert names(tmp_path) == ["file.bin"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_directory_that_is_not_writable_keeps_the_old_file(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    path = directory / "file.bin"
    write_bytes_atomic(path, b"old")
    directory.chmod(0o500)
    try:
        with pytest.raises(PermissionError):
            write_bytes_atomic(path, b"new")
    finally:
        directory.chmod(0o700)
    assert path.read_bytes() == b"old"
    assert names(directory) == ["file.bin"]


def test_the_file_is_fsynced_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace, real_fsync_dir = os.fsync, os.replace, durable.fsync_dir

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str, dst: os.PathLike[str]) -> None:
        events.append("replace")
        real_replace(src, dst)

    def fsync_dir(directory: Path) -> None:
        assert Path(directory) == tmp_path
        real_fsync_dir(directory)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(durable, "fsync_dir", fsync_dir)
    write_bytes_atomic(tmp_path / "f", b"x")
    assert events == ["fsync file", "replace", "fsync dir"]


def test_remove_temp_files_deletes_only_leftovers(tmp_path: Path) -> None:
    (tmp_path / "keep.json").write_text("{}")
    (tmp_path / ".hidden").write_text("not a temp file")
    (tmp_path / ".keep.json.tmp-abc123").write_text("{")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".x.tmp-1").write_bytes(b"")
    partial = tmp_path / ".7.tmp-dir"
    partial.mkdir()
    (partial / "update.bin").write_bytes(b"half")
    (tmp_path / ".r.res.xyz.tmp").write_bytes(b"FEDR")
    assert remove_temp_files(tmp_path) == 3
    assert names(tmp_path) == [".hidden", ".r.res.xyz.tmp", "keep.json", "sub"]
    assert remove_temp_files(tmp_path, patterns=(".*.tmp",)) == 1
    assert names(tmp_path) == [".hidden", "keep.json", "sub"]
    assert names(tmp_path / "sub") == []
    assert remove_temp_files(tmp_path / "missing") == 0


def test_directories_created_on_the_way_are_made_durable_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob store's two-level shard directories: each new directory's entry is fsynced in
    its parent before the file is written below it, and an existing path costs no fsync."""
    events: list[str] = []
    real_fsync_dir = durable.fsync_dir

    def fsync_dir(directory: Path) -> None:
        events.append(Path(directory).relative_to(tmp_path).as_posix())
        real_fsync_dir(directory)

    monkeypatch.setattr(durable, "fsync_dir", fsync_dir)
    write_bytes_atomic(tmp_path / "ab" / "cd" / "blob", b"x")
    # the parent of each created directory in order, then the file's own directory
    assert events == [".", "ab", "ab/cd"]
    assert (tmp_path / "ab" / "cd" / "blob").read_bytes() == b"x"
    events.clear()
    write_bytes_atomic(tmp_path / "ab" / "cd" / "other", b"y")
    assert events == ["ab/cd"]
    events.clear()
    write_bytes_atomic(tmp_path / "ab" / "ef" / "third", b"z")
    assert events == ["ab", "ab/ef"]


def test_a_path_through_a_file_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"not a directory")
    with pytest.raises((FileExistsError, NotADirectoryError)):
        write_bytes_atomic(tmp_path / "plain" / "sub" / "f", b"x")
    assert (tmp_path / "plain").read_bytes() == b"not a directory"
    assert names(tmp_path) == ["plain"]
