import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpnd.xray import protowire as pw
from vpnd.xray.api import decode_query_stats, encode_add_vless_user


def test_known_encodings():
    assert pw.encode_varint(0) == b"\x00"
    assert pw.encode_varint(300) == b"\xac\x02"
    assert pw.encode_varint(-1) == b"\xff" * 9 + b"\x01"  # int64 -1
    assert pw.field_string(1, "") == b""  # proto3 default omitted
    assert pw.field_message(2, b"") == b"\x12\x00"  # but an empty message is present


@given(st.integers(-(2**63), 2**64 - 1))
def test_varint_round_trip(value):
    decoded, end = pw.decode_varint(pw.encode_varint(value), 0)
    assert pw.as_int64(decoded) == (value if value < 2**63 else value - 2**64)
    assert end == len(pw.encode_varint(value))


@given(st.lists(st.tuples(st.integers(1, 1000), st.binary(min_size=1) | st.integers(1, 2**64 - 1))))
def test_fields_round_trip(fields):
    data = b"".join(pw.field_bytes(n, v) if isinstance(v, bytes) else pw.field_varint(n, v) for n, v in fields)
    assert [(n, v) for n, _wire, v in pw.iter_fields(data)] == fields


@pytest.mark.parametrize("bad", [b"\x08", b"\x0a\x05abc", b"\x0b", b"\x08" + b"\xff" * 11, b"\x00\x00"])
def test_malformed_is_rejected(bad):
    with pytest.raises(pw.ProtoDecodeError):
        list(pw.iter_fields(bad))


def test_add_user_request_layout():
    request = pw.decode_fields(encode_add_vless_user("xray.", "in", "a@b", "u-u-i-d", "xtls-rprx-vision"))
    assert pw.last_string(request, 1) == "in"
    operation = pw.decode_fields(pw.last_bytes(request, 2))
    assert pw.last_string(operation, 1) == "xray.app.proxyman.command.AddUserOperation"
    user = pw.decode_fields(pw.last_bytes(pw.decode_fields(pw.last_bytes(operation, 2)), 1))
    assert pw.last_string(user, 2) == "a@b"
    account = pw.decode_fields(pw.last_bytes(user, 3))
    assert pw.last_string(account, 1) == "xray.proxy.vless.Account"
    fields = pw.decode_fields(pw.last_bytes(account, 2))
    assert [pw.last_string(fields, n) for n in (1, 2, 3)] == ["u-u-i-d", "xtls-rprx-vision", "none"]


def test_negative_stat_value_decodes_as_int64():
    stat = pw.field_string(1, "x") + pw.field_varint(2, -5)
    assert decode_query_stats(pw.field_message(1, stat)) == [("x", -5)]
