"""Minimal protobuf wire format: just enough to speak Xray's gRPC API without generated code.

Messages are written as concatenated fields (``field_string(1, "x") + field_bytes(2, b"...")``) and
read back with :func:`iter_fields`.  Defaults are omitted on encode, as proto3 does, so an empty string
or a zero never reaches the wire.
"""

from __future__ import annotations

from collections.abc import Iterator

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LEN = 2
WIRE_FIXED32 = 5

_MAX_UINT64 = (1 << 64) - 1


class ProtoDecodeError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def encode_varint(value: int) -> bytes:
    """Base-128 varint of an unsigned 64-bit value; negative int64 values become their two's complement."""
    if value < 0:
        value += 1 << 64
    if not 0 <= value <= _MAX_UINT64:
        raise ValueError(f"varint out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(field_number: int, wire_type: int) -> bytes:
    if not 1 <= field_number < (1 << 29):
        raise ValueError(f"bad field number {field_number}")
    return encode_varint((field_number << 3) | wire_type)


def field_varint(field_number: int, value: int) -> bytes:
    """A varint field (uint32/uint64/int64/bool/enum); zero is the default and is omitted."""
    if value == 0:
        return b""
    return _tag(field_number, WIRE_VARINT) + encode_varint(value)


def field_bool(field_number: int, value: bool) -> bytes:
    return field_varint(field_number, 1 if value else 0)


def field_bytes(field_number: int, value: bytes) -> bytes:
    """A length-delimited field (bytes or an embedded message); empty is the default and is omitted."""
    if not value:
        return b""
    return _tag(field_number, WIRE_LEN) + encode_varint(len(value)) + value


def field_message(field_number: int, encoded: bytes) -> bytes:
    """An embedded message field.  Unlike :func:`field_bytes`, an empty message is still sent, because
    presence matters for message fields (``AlterInboundRequest.operation`` must be there)."""
    return _tag(field_number, WIRE_LEN) + encode_varint(len(encoded)) + encoded


def field_string(field_number: int, value: str) -> bytes:
    return field_bytes(field_number, value.encode("utf-8"))


def decode_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Read a varint at ``pos``; returns ``(value, next_pos)``."""
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise ProtoDecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result > _MAX_UINT64:
                raise ProtoDecodeError("varint longer than 64 bits")
            return result, pos
        shift += 7
        if shift >= 70:
            raise ProtoDecodeError("varint longer than 10 bytes")


def as_int64(value: int) -> int:
    """Reinterpret a decoded varint as a signed int64."""
    return value - (1 << 64) if value >= (1 << 63) else value


def iter_fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield ``(field_number, wire_type, value)``: an int for varint/fixed fields, bytes for
    length-delimited ones.  Group wire types (deprecated) are rejected."""
    view = memoryview(data)
    pos = 0
    end = len(view)
    while pos < end:
        key, pos = decode_varint(view, pos)
        field_number, wire_type = key >> 3, key & 7
        if field_number == 0:
            raise ProtoDecodeError("field number 0")
        value: int | bytes
        if wire_type == WIRE_VARINT:
            value, pos = decode_varint(view, pos)
        elif wire_type == WIRE_LEN:
            length, pos = decode_varint(view, pos)
            if pos + length > end:
                raise ProtoDecodeError("truncated length-delimited field")
            value = bytes(view[pos : pos + length])
            pos += length
        elif wire_type == WIRE_FIXED64:
            if pos + 8 > end:
                raise ProtoDecodeError("truncated fixed64 field")
            value = int.from_bytes(view[pos : pos + 8], "little")
            pos += 8
        elif wire_type == WIRE_FIXED32:
            if pos + 4 > end:
                raise ProtoDecodeError("truncated fixed32 field")
            value = int.from_bytes(view[pos : pos + 4], "little")
            pos += 4
        else:
            raise ProtoDecodeError(f"unsupported wire type {wire_type}")
        yield field_number, wire_type, value


def decode_fields(data: bytes) -> dict[int, list[int | bytes]]:
    """All fields of a message grouped by number, in wire order (repeated fields keep every value)."""
    fields: dict[int, list[int | bytes]] = {}
    for number, _wire_type, value in iter_fields(data):
        fields.setdefault(number, []).append(value)
    return fields


def last_bytes(fields: dict[int, list[int | bytes]], number: int) -> bytes:
    """The last value of a length-delimited field (proto3: last one wins), or b"" if absent."""
    for value in reversed(fields.get(number, [])):
        if isinstance(value, bytes):
            return value
        raise ProtoDecodeError(f"field {number}: expected length-delimited, got varint")
    return b""


def last_int(fields: dict[int, list[int | bytes]], number: int) -> int:
    """The last value of a varint field, or 0 if absent."""
    for value in reversed(fields.get(number, [])):
        if isinstance(value, int):
            return value
        raise ProtoDecodeError(f"field {number}: expected varint, got length-delimited")
    return 0


def last_string(fields: dict[int, list[int | bytes]], number: int) -> str:
    try:
        return last_bytes(fields, number).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtoDecodeError(f"field {number}: invalid UTF-8") from exc
