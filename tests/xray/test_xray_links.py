import base64
import ipaddress
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpnd.xray.links import (
    build_vless_reality_link,
    decode_subscription_body,
    parse_vless_link,
    subscription_body,
    subscription_userinfo_header,
    validate_host,
    validate_port,
    validate_reality_public_key,
    validate_short_id,
)

PBK = base64.urlsafe_b64encode(bytes(range(32))).rstrip(b"=").decode()
UUID = "6f1e2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b"


def link(**overrides):
    args = dict(
        uuid=UUID,
        host="vpn.example.com",
        port=443,
        public_key=PBK,
        short_id="6ba85179e30d4fc2",
        sni="www.microsoft.com",
        fingerprint="chrome",
        name="My VPN",
    )
    args.update(overrides)
    return build_vless_reality_link(**args)


def test_link_shape():
    assert link() == (
        f"vless://{UUID}@vpn.example.com:443?type=tcp&encryption=none&security=reality"
        f"&pbk={PBK}&fp=chrome&sni=www.microsoft.com&sid=6ba85179e30d4fc2&flow=xtls-rprx-vision#My%20VPN"
    )


def test_ipv6_host_is_bracketed_and_round_trips():
    text = link(host="2001:DB8::1", port=8443)
    assert "@[2001:db8::1]:8443?" in text
    parsed = parse_vless_link(text)
    assert (parsed.host, parsed.port) == ("2001:db8::1", 8443)


def test_name_with_special_characters_is_escaped_like_encode_uri_component():
    name = "Нидерланды 🇳🇱 #1 & 50%+ a/b?c=d 'ok' (x)!"
    text = link(name=name)
    fragment = text.split("#", 1)[1]
    assert "#" not in fragment and " " not in fragment and "&" not in fragment and "+" not in fragment
    assert "'ok'" in fragment and "(x)!" in fragment  # left alone, as encodeURIComponent does
    assert parse_vless_link(text).name == name


def test_empty_flow_is_omitted():
    parsed = parse_vless_link(link(flow=""))
    assert "flow" not in parsed.params and parsed.flow == ""


def test_parse_rejects_duplicates_and_garbage():
    with pytest.raises(ValueError, match="repeats"):
        parse_vless_link(link().replace("&fp=chrome", "&fp=chrome&fp=firefox"))
    for bad in ["vmess://x@h:1", "vless://h:1", "vless://u@h", "vless://u@h:99999", "vless://u@[::1:443"]:
        with pytest.raises(ValueError):
            parse_vless_link(bad)


def test_plus_is_literal_plus():
    assert parse_vless_link("vless://u@h.com:1?a=b+c#x+y").params["a"] == "b+c"


hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.from_regex(r"\A([a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\.){1,3}[a-z]{2,10}\Z"),
)


@given(
    uuid_=st.uuids().map(str),
    host=hosts,
    port=st.integers(1, 65535),
    short_id=st.from_regex(r"\A([0-9a-f]{2}){0,8}\Z"),
    key=st.binary(min_size=32, max_size=32),
    name=st.text(),
    flow=st.sampled_from(["", "xtls-rprx-vision"]),
)
def test_round_trip(uuid_, host, port, short_id, key, name, flow):
    pbk = base64.urlsafe_b64encode(key).rstrip(b"=").decode()
    text = link(uuid=uuid_, host=host, port=port, short_id=short_id, public_key=pbk, name=name, flow=flow)
    assert text.isascii() and " " not in text
    parsed = parse_vless_link(text)
    assert parsed.uuid == uuid_
    assert parsed.host == (str(ipaddress.ip_address(host)) if ":" in host else host)
    assert parsed.port == port
    assert parsed.name == name
    assert parsed.public_key == pbk and parsed.short_id == short_id and parsed.flow == flow
    assert (parsed.security, parsed.network, parsed.sni, parsed.fingerprint) == (
        "reality",
        "tcp",
        "www.microsoft.com",
        "chrome",
    )
    assert parsed.params["encryption"] == "none"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"uuid": "not-a-uuid"}, "not a UUID"),
        ({"uuid": UUID.upper()}, "lowercase"),
        ({"host": "bad_host.com"}, "invalid host name"),
        ({"host": "300.1.1.1"}, "invalid IPv4"),
        ({"host": "fe80::1%eth0"}, "zone id"),
        ({"port": 0}, "1..65535"),
        ({"public_key": PBK[:-1]}, "43 characters"),
        ({"short_id": "abc"}, "even length"),
        ({"sni": "1.2.3.4"}, "IPv4"),
        ({"fingerprint": "netscape"}, "fingerprint"),
        ({"flow": "xtls-rprx-direct"}, "flow"),
    ],
)
def test_build_rejects_bad_parts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        link(**kwargs)


def test_validators():
    assert validate_reality_public_key(PBK) == PBK
    with pytest.raises(ValueError, match="base64url"):
        validate_reality_public_key("+" * 43)
    with pytest.raises(ValueError, match="canonical"):
        validate_reality_public_key(PBK[:-1] + "B")  # stray low bits in the last character
    assert validate_short_id("") == ""
    assert validate_short_id("0123456789abcdef") == "0123456789abcdef"
    for bad, message in [("0123456789abcdef00", "at most 16"), ("zz", "hex"), ("a", "even")]:
        with pytest.raises(ValueError, match=message):
            validate_short_id(bad)
    assert validate_host("[::1]") == "::1"
    assert validate_host("127.0.0.1") == "127.0.0.1"
    assert validate_host("xn--80ak6aa92e.com") == "xn--80ak6aa92e.com"
    for bad in ["", "[vpn.example.com]", "-a.com", "a..b", "a" * 64 + ".com", "пример.рф", "1.2.3"]:
        with pytest.raises(ValueError):
            validate_host(bad)
    assert validate_port(65535) == 65535
    for bad in [True, 0, 65536, "443"]:
        with pytest.raises(ValueError):
            validate_port(bad)


def test_subscription_body_is_base64_of_newline_joined_links():
    links = [link(name="a"), link(name="b", uuid=str(uuid.uuid4()))]
    body = subscription_body(links)
    assert base64.b64decode(body).decode() == "\n".join(links)
    assert decode_subscription_body(body) == links


def test_userinfo_header():
    assert subscription_userinfo_header(1, 2, 3, 1700000000) == "upload=1; download=2; total=3; expire=1700000000"
    assert subscription_userinfo_header(0, 0, 0, None) == "upload=0; download=0; total=0"
    with pytest.raises(ValueError, match="download"):
        subscription_userinfo_header(0, -1, 0, None)
