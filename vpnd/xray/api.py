"""Client for Xray's gRPC API (HandlerService to add/remove users live, StatsService for traffic).

A remote node's API is reached over mutual TLS (`ApiTls`): the node's TLS-terminating proxy (nginx in
the README's example) requires vpnd's client certificate, and vpnd trusts only the node CA.

The few messages needed are hand-encoded with :mod:`vpnd.xray.protowire` and sent through grpcio's
generic ``unary_unary`` with raw bytes, so no generated code is involved.  The protobuf package prefix
is configurable: ``"xray."`` for Xray-core, ``"v2ray.core."`` for V2Ray 4.x (same wire format).

Calls are Trio-native: grpcio's future API runs the RPC on grpcio's own threads and wakes the Trio
task when it completes; cancelling the task cancels the RPC.  Every call is also bounded by
``timeout`` seconds.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import attrs
import grpc
import trio

from vpnd.xray import protowire as pw


class XrayError(Exception):
    """Base of the errors talking to Xray's API."""


class XrayUnavailable(XrayError):
    """Xray's API did not answer (not running, not listening yet, or too slow). Transient: retry later."""


class XrayApiError(XrayError):
    """Xray answered with an error (wrong inbound tag, bad request...). Not fixed by retrying."""

    def __init__(self, method: str, code: str, details: str) -> None:
        super().__init__(f"{method}: {code}: {details}")
        self.method = method
        self.code = code
        self.details = details


class Traffic(NamedTuple):
    """Bytes a user sent (uplink) and received (downlink) since the counters were last reset."""

    uplink: int
    downlink: int


_CHANNEL_OPTIONS = (
    # Xray's API is local: never route it through an http_proxy from the environment.
    ("grpc.enable_http_proxy", 0),
    # After Xray restarts, be back within seconds rather than grpc's default backoff of up to 2 min.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 3000),
)
_UNAVAILABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_USER_COUNTER = re.compile(r"user>>>(?P<email>.+)>>>traffic>>>(?P<direction>uplink|downlink)\Z", re.DOTALL)


def _typed_message(type_name: str, value: bytes) -> bytes:
    """``TypedMessage { string type = 1; bytes value = 2; }``"""
    return pw.field_string(1, type_name) + pw.field_bytes(2, value)


def encode_add_vless_user(prefix: str, inbound_tag: str, email: str, uuid: str, flow: str) -> bytes:
    """``AlterInboundRequest`` carrying ``AddUserOperation { User { email, account: vless.Account } }``."""
    account = pw.field_string(1, uuid) + pw.field_string(2, flow) + pw.field_string(3, "none")
    user = (
        pw.field_varint(1, 0)  # level 0: the level the template's policy gives per-user stats
        + pw.field_string(2, email)
        + pw.field_message(3, _typed_message(f"{prefix}proxy.vless.Account", account))
    )
    operation = _typed_message(f"{prefix}app.proxyman.command.AddUserOperation", pw.field_message(1, user))
    return pw.field_string(1, inbound_tag) + pw.field_message(2, operation)


def encode_remove_user(prefix: str, inbound_tag: str, email: str) -> bytes:
    """``AlterInboundRequest`` carrying ``RemoveUserOperation { email }``."""
    operation = _typed_message(f"{prefix}app.proxyman.command.RemoveUserOperation", pw.field_string(1, email))
    return pw.field_string(1, inbound_tag) + pw.field_message(2, operation)


def encode_query_stats(pattern: str, reset: bool) -> bytes:
    """``QueryStatsRequest { string pattern = 1; bool reset = 2; }``"""
    return pw.field_string(1, pattern) + pw.field_bool(2, reset)


def decode_query_stats(data: bytes) -> list[tuple[str, int]]:
    """``QueryStatsResponse { repeated Stat stat = 1; }``, ``Stat { string name = 1; int64 value = 2; }``"""
    stats = []
    for number, _wire, value in pw.iter_fields(data):
        if number != 1 or not isinstance(value, bytes):
            continue
        fields = pw.decode_fields(value)
        stats.append((pw.last_string(fields, 1), pw.as_int64(pw.last_int(fields, 2))))
    return stats


def _identity(data: bytes) -> bytes:
    return data


@attrs.frozen(repr=False)
class ApiTls:
    """Mutual TLS to a remote node's API (PEM bytes): vpnd trusts only `ca` for the node's certificate
    and presents `cert` + `key` as its own. The key never appears in a repr or a log."""

    ca: bytes
    cert: bytes
    key: bytes
    #: The name in the node's certificate when it is not the host of the address (e.g. an IP address).
    server_name: str = ""

    def __repr__(self) -> str:
        return f"ApiTls(server_name={self.server_name!r})"


@attrs.define
class XrayApi:
    """One gRPC channel to Xray's API inbound (e.g. ``"127.0.0.1:10085"``).

    Use as a context manager, or call :meth:`close`.  The channel connects lazily and reconnects by
    itself after Xray restarts; a call while Xray is down fails fast with :class:`XrayUnavailable`.
    """

    address: str
    prefix: str = "xray."
    timeout: float = 5.0
    #: None: plaintext (only for an API on loopback or inside a tunnel); else mutual TLS.
    tls: ApiTls | None = None
    _channel: Any = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        if self.prefix not in ("xray.", "v2ray.core."):
            raise ValueError(f"unknown Xray API prefix {self.prefix!r}; use 'xray.' or 'v2ray.core.'")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.tls is None:
            self._channel = grpc.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
            return
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.tls.ca, private_key=self.tls.key, certificate_chain=self.tls.cert
        )
        options: tuple[tuple[str, object], ...] = _CHANNEL_OPTIONS
        if self.tls.server_name:
            options = (*options, ("grpc.ssl_target_name_override", self.tls.server_name))
        self._channel = grpc.secure_channel(self.address, credentials, options=options)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> XrayApi:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _path(self, service: str, method: str) -> str:
        return f"/{self.prefix}{service}/{method}"

    async def _call(self, service: str, method: str, request: bytes) -> bytes:
        """One unary call.  Raises grpc.RpcError for an error status; the caller classifies it."""
        path = self._path(service, method)
        stub = self._channel.unary_unary(path, request_serializer=_identity, response_deserializer=_identity)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_future: object) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        future = stub.future(request, timeout=self.timeout)
        future.add_done_callback(wake)
        try:
            await done.wait()
        finally:
            if not future.done():
                future.cancel()  # the task was cancelled: don't leave the RPC running
        try:
            response: bytes = future.result()
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            details = exc.details() or ""
            if code in _UNAVAILABLE_CODES:
                raise XrayUnavailable(f"{path}: {code.name}: {details}") from None
            raise _RpcFailure(path, code, details) from None
        return response

    async def add_vless_user(self, inbound_tag: str, email: str, uuid: str, flow: str) -> bool:
        """Add a VLESS user to a running inbound.  Returns False when Xray already has a user with
        this email (the desired state already holds; Xray does not compare the uuid)."""
        request = encode_add_vless_user(self.prefix, inbound_tag, email, uuid, flow)
        try:
            await self._call("app.proxyman.command.HandlerService", "AlterInbound", request)
        except _RpcFailure as exc:
            if _is_user_message(exc.details, email, "already exists"):
                return False
            raise exc.to_api_error() from None
        return True

    async def remove_user(self, inbound_tag: str, email: str) -> bool:
        """Remove a user from a running inbound.  Returns False when Xray has no such user."""
        request = encode_remove_user(self.prefix, inbound_tag, email)
        try:
            await self._call("app.proxyman.command.HandlerService", "AlterInbound", request)
        except _RpcFailure as exc:
            if _is_user_message(exc.details, email, "not found"):
                return False
            raise exc.to_api_error() from None
        return True

    async def query_user_traffic(self, reset: bool = False) -> dict[str, Traffic]:
        """Per-user traffic counters (``user>>>EMAIL>>>traffic>>>uplink|downlink``).

        Users with no traffic yet may be absent (Xray creates counters on first use).  With ``reset``
        the counters are zeroed atomically with reading, so summing successive results never counts
        a byte twice.
        """
        response = await self._call(
            "app.stats.command.StatsService", "QueryStats", encode_query_stats("user>>>", reset)
        )
        totals: dict[str, list[int]] = {}
        for name, value in decode_query_stats(response):
            match = _USER_COUNTER.match(name)
            if match is None:
                continue
            pair = totals.setdefault(match["email"], [0, 0])
            pair[0 if match["direction"] == "uplink" else 1] = value
        return {email: Traffic(up, down) for email, (up, down) in totals.items()}

    async def ping(self) -> None:
        """A cheap round trip (StatsService.GetSysStats); raises XrayUnavailable/XrayApiError."""
        await self.uptime()

    async def uptime(self) -> int:
        """Seconds since Xray started (``SysStatsResponse.Uptime``, field 10), 0 if it does not say.

        A value smaller than expected from the last reading means Xray restarted: its live users are
        then the config file's, and its counters start from zero.
        """
        try:
            response = await self._call("app.stats.command.StatsService", "GetSysStats", b"")
        except _RpcFailure as exc:
            raise exc.to_api_error() from None
        return pw.last_int(pw.decode_fields(response), 10)


class _RpcFailure(Exception):
    """An error status from Xray, before it is classified as success-by-idempotence or an error."""

    def __init__(self, path: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(path, code, details)
        self.path = path
        self.code = code
        self.details = details

    def to_api_error(self) -> XrayApiError:
        return XrayApiError(self.path, self.code.name, self.details)


def _is_user_message(details: str, email: str, outcome: str) -> bool:
    """Whether Xray's error text is the validator's "User <email> already exists." / "... not found.".

    The email is matched too, because "not found" alone also appears when the inbound tag is wrong
    ("failed to get handler: TAG > handler not found"), which must stay an error.
    """
    return f"user {email} {outcome}".lower() in details.lower()
