"""Pixel storage behind fsspec: a local directory by default, ``s3://...`` in production.

Tiles are stored as ``.npy`` files so that the exact bytes (dtype, shape, values) come back; the
database keeps the URI and the sha256 of the stored file.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Sequence
from contextlib import suppress

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from galsift.messages import sha256

#: anything the buffer protocol exposes as bytes
Buffer = bytes | bytearray | memoryview


class ObjectStore:
    """Write-once pixel store addressed by relative keys under a root URL.

    Parameters
    ----------
    root_url
        fsspec URL of the store root, e.g. ``file:///srv/galsift/objects`` or ``s3://bucket/galsift``.
    durable
        Local stores only: each file's data is flushed to the disk before it gets its name
        (``fdatasync``), and :meth:`sync_dirs` flushes the names. Without it a power loss (not
        a process crash: the page cache survives those) can lose files whose rows and offsets
        were already committed. Remote stores are durable when a write returns.
    """

    def __init__(self, root_url: str, *, durable: bool = True) -> None:
        self.root_url = root_url.rstrip("/")
        self.durable = durable
        self.fs, self.root = fsspec.core.url_to_fs(self.root_url)
        #: directories already made by this store: one makedirs per directory, not per tile
        self._made: set[str] = set()
        #: a local store writes with plain system calls: fsspec's file objects cost more than
        #: the write itself at ingest rates (~0.3 ms a tile)
        self._local = isinstance(self.fs, LocalFileSystem)

    def uri(self, key: str) -> str:
        """Full URI of ``key``."""
        return f"{self.root_url}/{key}"

    def put_array(self, key: str, pixels: np.ndarray) -> tuple[str, str]:
        """Store ``pixels`` at ``key`` (``.npy``) and return ``(uri, sha256)``.

        Writing the same array twice yields the same bytes and checksum, so replays are harmless.
        """
        parts, checksum = npy_parts(pixels)
        return self.put_bytes(key, parts), checksum

    def put_bytes(self, key: str, data: Buffer | Sequence[Buffer]) -> str:
        """Store ``data`` (one buffer, or parts written back to back) at ``key`` and return its URI.

        The file appears whole or not at all: a failed write (a full disk, say) leaves no
        temporary file behind.
        """
        parts: Sequence[Buffer] = [data] if isinstance(data, bytes | bytearray | memoryview) else data
        path = f"{self.root}/{key}"
        parent = path.rsplit("/", 1)[0]
        if parent not in self._made:
            self.fs.makedirs(parent, exist_ok=True)
            self._made.add(parent)
        # write to a temporary name and rename, so a crash never leaves a half-written tile; the
        # name is unique per process and thread, and a thread writes one file at a time
        tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
        try:
            if self._local:
                _write_local(tmp, parts, sync=self.durable)
                os.replace(tmp, path)
            else:
                with self.fs.open(tmp, "wb") as fh:
                    for part in parts:
                        fh.write(part)
                self.fs.mv(tmp, path)
        except BaseException:
            with suppress(Exception):
                if self._local:
                    os.unlink(tmp)
                else:
                    self.fs.rm(tmp)
            raise
        return self.uri(key)

    def sync_dirs(self, keys: Sequence[str]) -> None:
        """Make the names of the files at ``keys`` durable: one ``fsync`` per parent directory.

        Each file's data was synced as it was written (``durable``); its name lives in its
        directory, synced here once per batch instead of once per file. Called after a batch's
        files are written and before its offsets are committed. No-op for remote stores and when
        not ``durable``.
        """
        if not (self._local and self.durable):
            return
        for parent in sorted({f"{self.root}/{key}".rsplit("/", 1)[0] for key in keys}):
            fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _write_local(path: str, parts: Sequence[Buffer], *, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            written = os.writev(fd, views)
            # a short write (signals, a nearly full disk) resumes where it stopped
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views:
                views[0] = views[0][written:]
        if sync:
            # the data reaches the disk before the rename names it (fdatasync: the size is
            # flushed with the data; no other metadata is needed to read the file back)
            os.fdatasync(fd)
    finally:
        os.close(fd)


def npy_parts(pixels: np.ndarray) -> tuple[tuple[bytes, memoryview], str]:
    """The ``.npy`` file of ``pixels`` as (header, pixel view), and the file's sha256.

    Nothing is copied: the header is ~128 bytes and the pixels are written and hashed where they
    lie. A copy of each tile into a fresh 0.2-0.8 MB buffer (page faults included) cost the store
    path ~15% of its rate (README, ingest benchmark).
    """
    arr = np.ascontiguousarray(pixels)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(arr))
    head = header.getvalue()
    body = arr.reshape(-1).view(np.uint8).data
    digest = hashlib.sha256(head)
    digest.update(body)
    return (head, body), digest.hexdigest()


def encode_array(pixels: np.ndarray) -> tuple[bytes, str]:
    """The ``.npy`` bytes of ``pixels`` (what :func:`numpy.save` writes) and their sha256."""
    (head, body), checksum = npy_parts(pixels)
    return head + body.tobytes(), checksum


def read_array(uri: str, *, checksum: str | None = None) -> np.ndarray:
    """Read a stored ``.npy`` tile, verifying its sha256 when ``checksum`` is given.

    Raises
    ------
    IOError
        If the stored bytes do not match ``checksum``.
    """
    with fsspec.open(uri, "rb") as fh:
        data = fh.read()
    if checksum is not None and sha256(data) != checksum:
        raise OSError(f"checksum mismatch for {uri}")
    return np.load(io.BytesIO(data), allow_pickle=False)
