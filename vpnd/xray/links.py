"""VLESS + REALITY share links, subscription bodies, and the validators config loading uses.

The link format follows the VLESS share-link standard (XTLS/Xray-core discussion #716):
``vless://$(uuid)@host:port?<params>#$(name)`` where every ``$()`` and every parameter value is
escaped like JavaScript's ``encodeURIComponent``, an IPv6 host is bracketed, and no parameter repeats.
All functions are pure.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import uuid as uuid_module
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from urllib.parse import quote, unquote

import attrs

# encodeURIComponent leaves A-Z a-z 0-9 - _ . ! ~ * ' ( ) alone; quote() always keeps the first
# four kinds, the rest are listed here.
_URI_COMPONENT_SAFE = "!~*'()"

_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_SHORT_ID = re.compile(r"[0-9a-fA-F]*\Z")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*\Z")

#: uTLS fingerprints Xray accepts in ``fp`` (client side).
FINGERPRINTS = frozenset({"chrome", "firefox", "safari", "ios", "android", "edge", "360", "qq", "random", "randomized"})

#: Flows a VLESS user can have; "" is plain VLESS.
FLOWS = frozenset({"", "xtls-rprx-vision", "xtls-rprx-vision-udp443"})


def encode_uri_component(value: str) -> str:
    """Escape like JavaScript's ``encodeURIComponent`` (UTF-8, ``%XX``, space as ``%20``)."""
    return quote(value, safe=_URI_COMPONENT_SAFE)


# --- validators ---------------------------------------------------------------------------------


def validate_uuid(value: str) -> str:
    """A UUID in canonical lowercase hyphenated form (what Xray prints and what the DB stores)."""
    try:
        parsed = uuid_module.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"not a UUID: {value!r}") from None
    if str(parsed) != value:
        raise ValueError(f"UUID must be lowercase with hyphens (like {str(parsed)!r}), got {value!r}")
    return value


def validate_reality_public_key(value: str) -> str:
    """A REALITY x25519 public key: 32 bytes as unpadded base64url, 43 characters (``xray x25519``
    prints it as "Public key")."""
    if not isinstance(value, str):
        raise ValueError(f"REALITY public key must be a string, got {type(value).__name__}")
    if len(value) != 43:
        raise ValueError(f"REALITY public key must be 43 characters of unpadded base64url (x25519), got {len(value)}")
    if not _BASE64URL.match(value):
        raise ValueError("REALITY public key must use only base64url characters A-Z a-z 0-9 - _ (no padding)")
    raw = base64.urlsafe_b64decode(value + "=")
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != value:
        raise ValueError("REALITY public key is not canonical base64url (last character has stray bits)")
    return value


def validate_reality_private_key(value: str) -> str:
    """Same encoding as the public key; the server config's ``realitySettings.privateKey``."""
    try:
        return validate_reality_public_key(value)
    except ValueError as exc:
        raise ValueError(str(exc).replace("public key", "private key")) from None


def validate_short_id(value: str) -> str:
    """A REALITY short id: hex digits, even length, at most 16 ("" is allowed: the empty short id)."""
    if not isinstance(value, str):
        raise ValueError(f"REALITY short id must be a string, got {type(value).__name__}")
    if not _SHORT_ID.match(value):
        raise ValueError(f"REALITY short id must be hex digits, got {value!r}")
    if len(value) % 2 or len(value) > 16:
        raise ValueError(f"REALITY short id must have an even length of at most 16, got {len(value)}: {value!r}")
    return value


def validate_hostname(value: str) -> str:
    """An ASCII DNS name (IDN already in xn-- form), not an IP address."""
    if not isinstance(value, str) or not value:
        raise ValueError("host name must be a non-empty string")
    if len(value) > 253:
        raise ValueError(f"host name longer than 253 characters: {value[:40]!r}...")
    labels = value.split(".")
    for label in labels:
        if not _HOSTNAME_LABEL.match(label):
            raise ValueError(
                f"invalid host name {value!r}: label {label!r} must be 1-63 letters, digits or hyphens "
                "(IDN names in xn-- form), not starting or ending with a hyphen"
            )
    if labels[-1].isdigit():
        raise ValueError(f"invalid host name {value!r}: looks like an IPv4 address but is not one")
    return value


def validate_host(value: str) -> str:
    """A host name, IPv4 address or IPv6 address (brackets accepted and removed).

    Returns the host as it should be stored: IP addresses in their compressed form, names unchanged.
    """
    if not isinstance(value, str) or not value:
        raise ValueError("host must be a non-empty string")
    bracketed = value.startswith("[") and value.endswith("]")
    candidate = value[1:-1] if bracketed else value
    if ":" in candidate:
        try:
            address = ipaddress.IPv6Address(candidate)
        except ValueError as exc:
            raise ValueError(f"invalid IPv6 address {value!r}: {exc}") from None
        if address.scope_id:
            raise ValueError(f"IPv6 address with a zone id is not reachable by clients: {value!r}")
        return str(address)
    if bracketed:
        raise ValueError(f"brackets are only for IPv6 addresses: {value!r}")
    if re.fullmatch(r"[0-9.]+", candidate):
        try:
            return str(ipaddress.IPv4Address(candidate))
        except ValueError as exc:
            raise ValueError(f"invalid IPv4 address {value!r}: {exc}") from None
    return validate_hostname(candidate)


def validate_port(value: int) -> int:
    """A TCP port number, 1..65535."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"port must be an integer, got {value!r}")
    if not 1 <= value <= 65535:
        raise ValueError(f"port must be in 1..65535, got {value}")
    return value


def validate_fingerprint(value: str) -> str:
    if value not in FINGERPRINTS:
        raise ValueError(f"unknown uTLS fingerprint {value!r}; expected one of {sorted(FINGERPRINTS)}")
    return value


def validate_flow(value: str) -> str:
    if value not in FLOWS:
        raise ValueError(f"unknown VLESS flow {value!r}; expected one of {sorted(FLOWS)}")
    return value


# --- links ----------------------------------------------------------------------------------------


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def build_vless_reality_link(
    *,
    uuid: str,
    host: str,
    port: int,
    public_key: str,
    short_id: str,
    sni: str,
    fingerprint: str,
    flow: str = "xtls-rprx-vision",
    name: str,
) -> str:
    """The share link a client app imports for one user of a VLESS + REALITY (TCP) inbound.

    Raises ValueError for any invalid part, so a bad server setting fails loudly instead of
    producing links that silently do not connect.
    """
    params = {
        "type": "tcp",
        "encryption": "none",
        "security": "reality",
        "pbk": validate_reality_public_key(public_key),
        "fp": validate_fingerprint(fingerprint),
        "sni": validate_hostname(sni),
        "sid": validate_short_id(short_id),
    }
    if validate_flow(flow):
        params["flow"] = flow
    query = "&".join(f"{key}={encode_uri_component(value)}" for key, value in params.items())
    user = encode_uri_component(validate_uuid(uuid))
    netloc = f"{user}@{_host_for_url(validate_host(host))}:{validate_port(port)}"
    return f"vless://{netloc}?{query}#{encode_uri_component(name)}"


def _frozen_mapping(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@attrs.frozen(hash=False)
class VlessLink:
    """A parsed ``vless://`` link.  ``params`` holds every query parameter, decoded."""

    uuid: str
    host: str
    port: int
    name: str
    params: Mapping[str, str] = attrs.field(converter=_frozen_mapping)

    @property
    def network(self) -> str | None:
        return self.params.get("type")

    @property
    def security(self) -> str | None:
        return self.params.get("security")

    @property
    def public_key(self) -> str | None:
        return self.params.get("pbk")

    @property
    def short_id(self) -> str | None:
        return self.params.get("sid")

    @property
    def sni(self) -> str | None:
        return self.params.get("sni")

    @property
    def fingerprint(self) -> str | None:
        return self.params.get("fp")

    @property
    def flow(self) -> str:
        return self.params.get("flow", "")


def parse_vless_link(link: str) -> VlessLink:
    """Parse a ``vless://`` share link (strictly: duplicate parameters and bad ports are errors).

    ``+`` is a literal plus, not a space: links are URI-escaped, not form-encoded.
    """
    scheme, sep, rest = link.partition("://")
    if not sep or scheme.lower() != "vless":
        raise ValueError(f"not a vless:// link: {link[:40]!r}")
    rest, _, fragment = rest.partition("#")
    authority, _, query = rest.partition("?")
    authority = authority.rstrip("/")
    userinfo, at, hostport = authority.rpartition("@")
    if not at or not userinfo:
        raise ValueError("vless link has no uuid@ part")
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            raise ValueError("vless link has an unclosed IPv6 bracket")
        host, after = hostport[1:close], hostport[close + 1 :]
        if not after.startswith(":"):
            raise ValueError("vless link has no port")
        port_text = after[1:]
    else:
        host, colon, port_text = hostport.rpartition(":")
        if not colon:
            raise ValueError("vless link has no port")
    if not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"vless link port is not a number: {port_text!r}")
    params: dict[str, str] = {}
    if query:
        for pair in query.split("&"):
            if not pair:
                continue
            key, _, value = pair.partition("=")
            key = unquote(key, errors="strict")
            if key in params:
                raise ValueError(f"vless link repeats parameter {key!r}")
            params[key] = unquote(value, errors="strict")
    return VlessLink(
        uuid=unquote(userinfo, errors="strict"),
        host=validate_host(host),
        port=validate_port(int(port_text)),
        name=unquote(fragment, errors="strict"),
        params=params,
    )


# --- subscriptions ----------------------------------------------------------------------------------


def subscription_body(links: Iterable[str]) -> bytes:
    """A v2rayN-style subscription: base64 (standard alphabet, padded) of the links joined by newlines."""
    return base64.b64encode("\n".join(links).encode("utf-8"))


def decode_subscription_body(body: bytes) -> list[str]:
    """Inverse of :func:`subscription_body` (tests, and a sanity check for operators)."""
    try:
        text = base64.b64decode(body, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"not a base64 subscription body: {exc}") from None
    return [line for line in text.splitlines() if line]


def subscription_userinfo_header(upload: int, download: int, total: int, expire_unix: int | None) -> str:
    """The ``Subscription-Userinfo`` header value clients show as usage and expiry.

    ``total`` 0 means unlimited; ``expire_unix`` None leaves the expiry out (no expiry).
    """
    values = {"upload": upload, "download": download, "total": total}
    if expire_unix is not None:
        values["expire"] = expire_unix
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"subscription userinfo {key} must be a non-negative integer, got {value!r}")
    return "; ".join(f"{key}={value}" for key, value in values.items())
