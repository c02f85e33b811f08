"""The pixel store: the bytes ``np.save`` writes, whole files or none, no debris after a failure."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest

from galsift.messages import sha256
from galsift.objectstore import ObjectStore, encode_array, npy_parts, read_array


@pytest.mark.parametrize(
    "pixels",
    [
        np.random.default_rng(0).normal(size=(3, 64, 64)).astype(np.float32),
        np.random.default_rng(1).integers(0, 255, size=(3, 152, 152), dtype=np.uint8),
        np.asfortranarray(np.random.default_rng(2).normal(size=(2, 20, 30)).astype(np.float32)),
        np.zeros((1, 32, 32), np.float32)[:, ::2],  # a strided view
    ],
)
def test_encode_array_writes_what_np_save_writes(pixels: np.ndarray) -> None:
    saved = io.BytesIO()
    np.save(saved, np.ascontiguousarray(pixels), allow_pickle=False)
    data, checksum = encode_array(pixels)
    assert data == saved.getvalue()
    assert checksum == sha256(saved.getvalue())
    # the zero-copy parts ingest writes are the same file
    (head, body), parts_checksum = npy_parts(pixels)
    assert head + body.tobytes() == saved.getvalue()
    assert parts_checksum == checksum


def test_short_writes_resume_where_they_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ObjectStore(f"file://{tmp_path}")
    real_writev = os.writev

    calls = []

    def a_few_bytes_at_a_time(fd: int, buffers: list[memoryview]) -> int:
        # what a signal or a nearly full disk can do: write only a prefix (here 100 bytes, so
        # that one call ends inside the header and another spans the header and the pixels)
        budget, prefix = 100, []
        for b in buffers:
            prefix.append(b[:budget])
            budget -= len(prefix[-1])
        calls.append(len(buffers))
        return real_writev(fd, prefix)

    monkeypatch.setattr("galsift.objectstore.os.writev", a_few_bytes_at_a_time)
    pixels = np.random.default_rng(3).normal(size=(3, 20, 20)).astype(np.float32)
    uri, checksum = store.put_array("tiles/s/short.npy", pixels)
    assert np.array_equal(read_array(uri, checksum=checksum), pixels)
    assert len(calls) > 10 and calls[0] == 2


def test_put_and_read_round_trip_with_checksum(tmp_path: Path) -> None:
    store = ObjectStore(f"file://{tmp_path}")
    pixels = np.arange(3 * 16 * 16, dtype=np.float32).reshape(3, 16, 16)
    uri, checksum = store.put_array("tiles/s/a.npy", pixels)
    assert np.array_equal(read_array(uri, checksum=checksum), pixels)
    # a replay writes the same bytes over the same name
    assert store.put_array("tiles/s/a.npy", pixels) == (uri, checksum)
    assert sorted(p.name for p in (tmp_path / "tiles" / "s").iterdir()) == ["a.npy"]
    with pytest.raises(OSError, match="checksum mismatch"):
        read_array(uri, checksum="0" * 64)


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ObjectStore(f"file://{tmp_path}")
    real_writev = os.writev

    def full_after_a_bit(fd: int, buffers: list[memoryview]) -> int:
        if sum(len(b) for b in buffers) < 100:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev(fd, [buffers[0][:64]])

    monkeypatch.setattr("galsift.objectstore.os.writev", full_after_a_bit)
    with pytest.raises(OSError) as err:
        store.put_bytes("tiles/s/b.npy", b"x" * 1000)
    assert err.value.errno == errno.ENOSPC
    assert list((tmp_path / "tiles" / "s").iterdir()) == []


def test_durable_writes_sync_data_before_the_name_and_each_directory_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_replace = os.replace

    def fdatasync(fd: int) -> None:
        synced.append("data:" + os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[1])

    def fsync(fd: int) -> None:
        synced.append("dir:" + os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[1])

    def replace(src: str, dst: str) -> None:
        synced.append("rename:" + dst.rsplit("/", 1)[1])
        real_replace(src, dst)

    monkeypatch.setattr("galsift.objectstore.os.fdatasync", fdatasync)
    monkeypatch.setattr("galsift.objectstore.os.fsync", fsync)
    monkeypatch.setattr("galsift.objectstore.os.replace", replace)
    store = ObjectStore(f"file://{tmp_path}")
    keys = ["tiles/a/1.npy", "tiles/a/2.npy", "tiles/b/3.npy"]
    for key in keys:
        store.put_bytes(key, b"x" * 100)
    store.sync_dirs(keys)
    # each file's data is on the disk before it has its name; each directory is synced once
    assert synced[0].startswith("data:1.npy.") and synced[0].endswith(".tmp")  # the temporary name
    assert synced[1] == "rename:1.npy"
    assert [s for s in synced if s.startswith("rename")] == ["rename:1.npy", "rename:2.npy", "rename:3.npy"]
    assert sum(s.startswith("data:") for s in synced) == 3
    assert [s for s in synced if s.startswith("dir:")] == ["dir:a", "dir:b"]

    synced.clear()
    fast = ObjectStore(f"file://{tmp_path}", durable=False)
    fast.put_bytes("tiles/c/4.npy", b"y" * 10)
    fast.sync_dirs(["tiles/c/4.npy"])
    assert synced == ["rename:4.npy"]
