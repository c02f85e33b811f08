"""Versioned Avro message schemas, validated on both ends of every topic.

Each topic carries exactly one record type, kept as a versioned ``.avsc`` file in
``galsift/schemas``. Messages are Avro *schemaless* bodies; the schema name and version travel
in the Kafka header ``schema`` (``galsift.tile.v1``), so a consumer can refuse a version it does
not understand before trying to decode it.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
import zlib
from functools import cache
from importlib import resources
from typing import Any

import fastavro
import numpy as np
from fastavro.validation import ValidationError, validate

#: header name that carries ``galsift.<name>.v<N>``
SCHEMA_HEADER = "schema"
#: namespace for deterministic tile ids: uuid5(TILE_NAMESPACE, "survey/external_id")
TILE_NAMESPACE = uuid.UUID("5b1f6b0e-3c2a-4f4e-9a77-6a1d2b0c9e10")

_SCHEMAS = {
    "tile": "tile.v1",
    "accepted": "accepted.v1",
    "dead": "dead.v1",
    "embedded": "embedded.v1",
    "alert": "alert.v1",
    "detected": "detected.v1",
    "filter_match": "filter_match.v1",
}


class MessageError(ValueError):
    """A message that does not match its schema; ``reason`` is a short machine-readable class."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@cache
def _parsed(name: str) -> Any:
    text = resources.files("galsift.schemas").joinpath(f"{_SCHEMAS[name]}.avsc").read_text()
    return fastavro.parse_schema(json.loads(text))


def schema_id(name: str) -> str:
    """The header value naming a schema, e.g. ``galsift.tile.v1``."""
    return f"galsift.{_SCHEMAS[name]}"


def encode(name: str, record: dict[str, Any]) -> bytes:
    """Validate ``record`` against schema ``name`` and serialise it.

    Raises
    ------
    MessageError
        If the record does not match the schema (reason ``schema``).
    """
    schema = _parsed(name)
    # Validate a copy whose byte strings are empty: the types are checked all the same, but
    # fastavro renders the datum into the message of every union branch it rules out (0.8 MB of
    # pixels, or ~0.15 ms per small record). The quiet check is ~10x cheaper; only a record that
    # fails it is validated again, loudly, for the message.
    light = {k: b"" if isinstance(v, bytes | bytearray) else v for k, v in record.items()}
    if not validate(light, schema, raise_errors=False):
        try:
            validate(light, schema, raise_errors=True)
        except ValidationError as exc:
            raise MessageError("schema", f"{schema_id(name)}: {exc}") from exc
        raise MessageError("schema", f"{schema_id(name)}: record does not match")  # pragma: no cover
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


def decode(name: str, payload: bytes, *, header: bytes | str | None = None) -> dict[str, Any]:
    """Deserialise a message body written by :func:`encode`.

    Parameters
    ----------
    name
        Expected schema (a key of ``_SCHEMAS``: ``tile``, ``embedded``, ``detected``, ...).
    payload
        The Kafka message value.
    header
        The ``schema`` header, when present; a different schema or version is refused.

    Raises
    ------
    MessageError
        reason ``schema`` for a wrong header, truncated or garbage bytes, or trailing data.
    """
    if isinstance(header, bytes):
        header = header.decode("utf-8", "replace")
    if header is not None and header != schema_id(name):
        raise MessageError("schema", f"expected {schema_id(name)}, header says {header!r}")
    if payload is None:
        raise MessageError("schema", "empty message (tombstone)")
    buf = io.BytesIO(payload)
    try:
        record = fastavro.schemaless_reader(buf, _parsed(name), None)
    except Exception as exc:  # fastavro raises EOFError, UnicodeError, IndexError, ... on garbage
        raise MessageError("schema", f"cannot decode {schema_id(name)}: {exc!r}") from exc
    if buf.tell() != len(payload):
        raise MessageError("schema", f"{len(payload) - buf.tell()} trailing bytes after record")
    if not isinstance(record, dict):
        raise MessageError("schema", "decoded value is not a record")
    return record


def headers(name: str) -> list[tuple[str, bytes]]:
    """Kafka headers to send with a message of schema ``name``."""
    return [(SCHEMA_HEADER, schema_id(name).encode())]


def header_value(msg_headers: list[tuple[str, bytes]] | None) -> bytes | None:
    """The ``schema`` header of a consumed record, if any."""
    for key, value in msg_headers or []:
        if key == SCHEMA_HEADER:
            return value
    return None


def tile_id(survey: str, external_id: str) -> str:
    """Deterministic tile id, so every stage and every replay agrees on it."""
    return str(uuid.uuid5(TILE_NAMESPACE, f"{survey}/{external_id}"))


def pack_pixels(pixels: np.ndarray, *, compression: str = "zlib", level: int = 1) -> bytes:
    """C-order pixel bytes for the ``pixels`` field, raw (``none``) or zlib-compressed.

    Publishers send raw bytes (``compression="none"``): zlib runs at ~20 MB/s and bounded publishing at ~100 tiles/s,
    while survey pixels shrink only ~1.4x. Compression, where the network needs it, belongs to
    the Kafka producer (``kafka_compression``), which does it per batch in C.
    """
    raw = np.ascontiguousarray(pixels).tobytes()
    if compression == "none":
        return raw
    if compression == "zlib":
        return zlib.compress(raw, level)
    raise ValueError(f"unknown pixel compression {compression!r}")


def unpack_pixels(
    data: bytes, *, shape: list[int] | tuple[int, ...], dtype: str, compression: str = "zlib"
) -> np.ndarray:
    """Inverse of :func:`pack_pixels`; raises :class:`MessageError` on size mismatch."""
    try:
        raw = zlib.decompress(data) if compression == "zlib" else data
    except zlib.error as exc:
        raise MessageError("payload", f"pixels do not decompress: {exc}") from exc
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(raw) != expected:
        raise MessageError("shape", f"{len(raw)} pixel bytes, shape {list(shape)} {dtype} needs {expected}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def sha256(data: bytes | bytearray | memoryview) -> str:
    """Hex sha256, the checksum kept for every stored object."""
    return hashlib.sha256(data).hexdigest()
