"""Message round trips through the versioned Avro schemas, and the ways a message can be bad."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from galsift import messages


def _tile(**over: Any) -> dict[str, Any]:
    pixels = np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32)
    record = {
        "survey": "legacy_dr9_south",
        "external_id": "J000411.19+020924.0",
        "ra": 1.046625,
        "dec": 2.156667,
        "bands": ["g", "r", "z"],
        "pixel_scale": 0.262,
        "obs_time": datetime(2020, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        "shape": [3, 32, 32],
        "dtype": "float32",
        "compression": "zlib",
        "pixels": messages.pack_pixels(pixels),
        "pixels_uri": None,
        "header": "SIMPLE  =                    T",
        "meta": {"ring": "1"},
    }
    record.update(over)
    return record


def test_tile_round_trip_is_exact() -> None:
    record = _tile()
    body = messages.encode("tile", record)
    back = messages.decode("tile", body, header=b"galsift.tile.v1")
    assert back == record
    pixels = messages.unpack_pixels(back["pixels"], shape=back["shape"], dtype=back["dtype"])
    original = messages.unpack_pixels(record["pixels"], shape=record["shape"], dtype="float32")
    assert pixels.tobytes() == original.tobytes()


def test_uint8_and_uncompressed_pixels() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, size=(3, 20, 24), dtype=np.uint8)
    for compression, data in (("zlib", messages.pack_pixels(rgb)), ("none", rgb.tobytes())):
        record = _tile(dtype="uint8", shape=[3, 20, 24], compression=compression, pixels=data)
        back = messages.decode("tile", messages.encode("tile", record))
        out = messages.unpack_pixels(
            back["pixels"], shape=back["shape"], dtype="uint8", compression=compression
        )
        np.testing.assert_array_equal(out, rgb)


def test_null_position_and_defaults() -> None:
    record = _tile(ra=None, dec=None)
    del record["meta"], record["header"], record["obs_time"]
    back = messages.decode("tile", messages.encode("tile", record))
    assert back["ra"] is None and back["dec"] is None
    assert back["meta"] == {} and back["header"] is None and back["compression"] == "zlib"


def test_accepted_and_dead_round_trip() -> None:
    accepted = {
        "tile_id": messages.tile_id("s", "x"),
        "survey": "s",
        "external_id": "x",
        "ra": None,
        "dec": None,
        "healpix": 12,
        "bands": ["R", "G", "B"],
        "shape": [3, 16, 16],
        "dtype": "uint8",
        "pixels_uri": "file:///tmp/x.npy",
        "checksum": "ab" * 32,
    }
    assert messages.decode("accepted", messages.encode("accepted", accepted)) == accepted
    dead = {
        "stage": "ingest",
        "reason": "nonfinite",
        "detail": "3 NaN",
        "topic": "tiles.raw",
        "partition": 2,
        "offset": 41,
        "key": b"s/x",
        "payload": b"\x00\x01",
    }
    assert messages.decode("dead", messages.encode("dead", dead)) == dead


def test_encode_refuses_records_off_schema() -> None:
    with pytest.raises(messages.MessageError) as err:
        messages.encode("tile", _tile(dtype="float64"))
    assert err.value.reason == "schema"
    with pytest.raises(messages.MessageError):
        messages.encode("tile", _tile(shape="3x32x32"))


@pytest.mark.parametrize(
    ("mangle", "header"),
    [
        (lambda b: b[: len(b) // 2], None),  # truncated
        (lambda b: b + b"\x00\x01", None),  # trailing bytes
        (lambda b: b"\xff" * 64, None),  # garbage
        (lambda b: b"", None),  # empty
        (lambda b: b, b"galsift.tile.v2"),  # a version this code does not know
        (lambda b: b, b"galsift.accepted.v1"),  # another topic's schema
    ],
)
def test_decode_refuses_bad_messages(mangle: Any, header: bytes | None) -> None:
    body = messages.encode("tile", _tile())
    with pytest.raises(messages.MessageError) as err:
        messages.decode("tile", mangle(body), header=header)
    assert err.value.reason == "schema"


def test_unpack_refuses_wrong_sizes_and_corrupt_data() -> None:
    data = messages.pack_pixels(np.zeros((3, 16, 16), np.float32))
    with pytest.raises(messages.MessageError) as err:
        messages.unpack_pixels(data, shape=[4, 16, 16], dtype="float32")
    assert err.value.reason == "shape"
    with pytest.raises(messages.MessageError) as err:
        messages.unpack_pixels(data[:-10], shape=[3, 16, 16], dtype="float32")
    assert err.value.reason == "payload"


def test_tile_ids_are_deterministic_and_distinct() -> None:
    a = messages.tile_id("legacy", "x1")
    assert a == messages.tile_id("legacy", "x1")
    assert uuid.UUID(a).version == 5
    assert len({a, messages.tile_id("legacy", "x2"), messages.tile_id("other", "x1")}) == 3
    assert messages.headers("tile") == [("schema", b"galsift.tile.v1")]
    assert messages.header_value([("other", b"x"), ("schema", b"galsift.tile.v1")]) == b"galsift.tile.v1"
    assert messages.header_value(None) is None
