"""TFRecord files and tf.train.Example records, written without TensorFlow: importing TensorFlow costs
each make_shards worker process seconds and hundreds of MB, and the two formats are small and stable.
tests/test_tfrecord.py checks both against TensorFlow's own reader and parser."""

from __future__ import annotations

import struct

import google_crc32c


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _SMALL_VARINTS[value]  # most tags, lengths and labels: keeps the per-record cost low
    value &= (1 << 64) - 1  # negative int64s are ten-byte two's complement varints
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


_SMALL_VARINTS = [bytes((value,)) for value in range(0x80)]


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def encode_example(features: dict[str, bytes | int | tuple[float, ...]]) -> bytes:
    """tf.train.Example{features{feature{key: Feature}}}; bytes -> bytes_list (1), int -> int64_list
    (3), a tuple of floats -> float_list (2, packed float32; an empty tuple is an empty list)."""
    entries = b""
    for key in sorted(features):
        value = features[key]
        if isinstance(value, bytes):
            feature = _length_delimited(1, _length_delimited(1, value))
        elif isinstance(value, tuple):
            packed = struct.pack(f"<{len(value)}f", *value)
            feature = _length_delimited(2, _length_delimited(1, packed) if value else b"")
        else:
            feature = _length_delimited(3, _length_delimited(1, _varint(value)))
        entries += _length_delimited(1, _length_delimited(1, key.encode()) + _length_delimited(2, feature))
    return _length_delimited(1, entries)


def _masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(record: bytes) -> bytes:
    length = struct.pack("<Q", len(record))
    return (
        length
        + struct.pack("<I", _masked_crc32c(length))
        + record
        + struct.pack("<I", _masked_crc32c(record))
    )
