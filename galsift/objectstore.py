"""Pixel storage behind fsspec: a local directory by default, ``s3://...`` in production.

Tiles are stored as ``.npy`` files so that the exact bytes (dtype, shape, values) come back; the
database keeps the URI and the sha256 of the stored file.
"""

from __future__ import annotations

import io
import uuid

import fsspec
import numpy as np

from galsift.messages import sha256


class ObjectStore:
    """Write-once pixel store addressed by relative keys under a root URL.

    Parameters
    ----------
    root_url
        fsspec URL of the store root, e.g. ``file:///srv/galsift/objects`` or ``s3://bucket/galsift``.
    """

    def __init__(self, root_url: str) -> None:
        self.root_url = root_url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.root_url)
        #: directories already made by this store: one makedirs per directory, not per tile
        self._made: set[str] = set()

    def uri(self, key: str) -> str:
        """Full URI of ``key``."""
        return f"{self.root_url}/{key}"

    def put_array(self, key: str, pixels: np.ndarray) -> tuple[str, str]:
        """Store ``pixels`` at ``key`` (``.npy``) and return ``(uri, sha256)``.

        Writing the same array twice yields the same bytes and checksum, so replays are harmless.
        """
        data, checksum = encode_array(pixels)
        return self.put_bytes(key, data), checksum

    def put_bytes(self, key: str, data: bytes) -> str:
        """Store ``data`` at ``key`` and return its URI; the file appears whole or not at all."""
        path = f"{self.root}/{key}"
        parent = path.rsplit("/", 1)[0]
        if parent not in self._made:
            self.fs.makedirs(parent, exist_ok=True)
            self._made.add(parent)
        # write to a temporary name and rename, so a crash never leaves a half-written tile
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open(tmp, "wb") as fh:
            fh.write(data)
        self.fs.mv(tmp, path)
        return self.uri(key)


def encode_array(pixels: np.ndarray) -> tuple[bytes, str]:
    """The ``.npy`` bytes of ``pixels`` and their sha256 (the checksum the database keeps)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(pixels), allow_pickle=False)
    data = buf.getvalue()
    return data, sha256(data)


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
