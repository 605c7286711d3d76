"""A fake Xray API server: a real gRPC server on 127.0.0.1 speaking Xray's wire protocol.

It implements the parts of HandlerService and StatsService vpnd uses, with Xray's semantics and
error texts: users are keyed by lowercased email per inbound tag, a duplicate add fails with
"User X already exists.", removing an unknown user fails with "User X not found.", an unknown
inbound tag fails with "failed to get handler", and per-user traffic counters are named
``user>>>EMAIL>>>traffic>>>uplink|downlink``.  Tests can bump counters and switch faults on:
stop/start (Xray down), a delay per call (Xray slow), or the next N calls failing.

    with start_fake_xray("xray.", inbound_tags=("vless-in",)) as fake:
        api = XrayApi(fake.address, prefix="xray.")
        ...
        assert "alice" in fake.users("vless-in")
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid as uuid_module
from collections.abc import Iterable
from concurrent import futures
from typing import Any

import attrs
import grpc

from vpnd.xray import protowire as pw

_SERVICE_HANDLER = "app.proxyman.command.HandlerService"
_SERVICE_STATS = "app.stats.command.StatsService"


@attrs.frozen
class FakeUser:
    """A user as the fake Xray holds it (email as sent; lookups are case-insensitive like Xray's)."""

    email: str
    uuid: str
    flow: str
    level: int


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _unknown(details: str) -> _Abort:
    # Go's gRPC turns a plain error into status UNKNOWN with err.Error() as the message.
    return _Abort(grpc.StatusCode.UNKNOWN, details)


def _decode_typed_message(data: bytes) -> tuple[str, bytes]:
    fields = pw.decode_fields(data)
    return pw.last_string(fields, 1), pw.last_bytes(fields, 2)


@attrs.define(eq=False)
class FakeXray:
    """Handle on a running fake.  Thread-safe: gRPC handlers run on the server's worker threads."""

    prefix: str
    port: int = 0
    #: (server key, server certificate, client CA) PEM: serve mutual TLS, as a node behind its TLS proxy.
    tls: tuple[bytes, bytes, bytes] | None = None
    _lock: threading.Lock = attrs.field(factory=threading.Lock)
    _inbounds: dict[str, dict[str, FakeUser]] = attrs.field(factory=dict)
    _counters: dict[str, int] = attrs.field(factory=dict)
    _delay: float = 0.0
    _failures_left: int = 0
    _failure_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    _failure_details: str = ""
    _calls: list[str] = attrs.field(factory=list)
    _operations: list[tuple[str, str, str]] = attrs.field(factory=list)
    _server: Any = None
    _stopping: threading.Event = attrs.field(factory=threading.Event)
    _delay_changed: threading.Condition = attrs.field(factory=threading.Condition)
    _delay_methods: frozenset[str] | None = None
    _started_at: float = attrs.field(factory=time.monotonic)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, *, reset: bool = False, config_path: str | os.PathLike[str] | None = None) -> None:
        """Start serving (again, on the same port after :meth:`stop`).  ``reset`` drops every live
        user and counter and restarts the uptime clock, as a real Xray restart does; it then comes
        back with the users of ``config_path`` (an Xray config file) for the inbounds it knows, or
        with none (set them with :meth:`set_users`).  Without ``reset`` the fake plays an API that
        was unreachable for a while with Xray itself still running."""
        if self._server is not None:
            raise RuntimeError("fake Xray is already running")
        if reset:
            loaded = users_from_config(config_path) if config_path is not None else {}
            with self._lock:
                for tag, users in self._inbounds.items():
                    users.clear()
                    users.update({user.email.lower(): user for user in loaded.get(tag, [])})
                self._counters.clear()
                self._started_at = time.monotonic()
        self._stopping.clear()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="fake-xray"))
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    f"{self.prefix}{_SERVICE_HANDLER}",
                    {"AlterInbound": grpc.unary_unary_rpc_method_handler(self._wrap("AlterInbound"))},
                ),
                grpc.method_handlers_generic_handler(
                    f"{self.prefix}{_SERVICE_STATS}",
                    {
                        name: grpc.unary_unary_rpc_method_handler(self._wrap(name))
                        for name in ("QueryStats", "GetStats", "GetSysStats")
                    },
                ),
            )
        )
        if self.tls is None:
            port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        else:
            key, cert, client_ca = self.tls
            credentials = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=client_ca, require_client_auth=True
            )
            port = server.add_secure_port(f"127.0.0.1:{self.port}", credentials)
        if port == 0:
            raise OSError(f"fake Xray could not bind 127.0.0.1:{self.port}")
        self.port = port
        server.start()
        self._server = server

    def stop(self) -> None:
        """Stop serving at once (in-flight calls are cancelled); clients then get UNAVAILABLE."""
        server, self._server = self._server, None
        if server is not None:
            self._stopping.set()
            server.stop(grace=None).wait(timeout=10)

    def __enter__(self) -> FakeXray:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- state for tests -------------------------------------------------------------------------

    def add_inbound(self, tag: str) -> None:
        with self._lock:
            self._inbounds.setdefault(tag, {})

    def users(self, tag: str) -> dict[str, FakeUser]:
        """A snapshot of the live users of inbound ``tag``, keyed by email as sent."""
        with self._lock:
            return {user.email: user for user in self._inbounds[tag].values()}

    def set_users(self, tag: str, users: list[FakeUser]) -> None:
        """Replace the users of ``tag`` (as if Xray had just started from a config file)."""
        with self._lock:
            self._inbounds[tag] = {user.email.lower(): user for user in users}

    def bump_traffic(self, email: str, *, uplink: int = 0, downlink: int = 0) -> None:
        """Count traffic for ``email`` (creates the counters, as Xray does on first use)."""
        with self._lock:
            for direction, amount in (("uplink", uplink), ("downlink", downlink)):
                name = f"user>>>{email}>>>traffic>>>{direction}"
                self._counters[name] = self._counters.get(name, 0) + amount

    def counter(self, name: str) -> int | None:
        with self._lock:
            return self._counters.get(name)

    def set_delay(self, seconds: float, methods: Iterable[str] | None = None) -> None:
        """Make every call (or only calls of ``methods``, e.g. ``["AlterInbound"]``) wait this long before
        answering (0 to turn off).

        The new delay applies to calls already waiting too: lowering it releases them, so a test can hold
        calls with a long delay for as long as it needs ("the writer is inside AddUser now") and then let
        them go at once, instead of guessing a delay long enough for its checks.
        """
        with self._delay_changed:
            self._delay = seconds
            self._delay_methods = frozenset(methods) if methods is not None else None
            self._delay_changed.notify_all()

    def _wait_out_delay(self) -> bool:
        """Wait while the call's delay lasts (measured from now); True if the server stops meanwhile."""
        started = time.monotonic()
        with self._delay_changed:
            while not self._stopping.is_set():
                remaining = started + self._delay - time.monotonic()
                if remaining <= 0:
                    return False
                self._delay_changed.wait(min(remaining, 0.1))  # re-checks `_stopping` at least that often
        return True

    def fail_next(
        self, count: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, details: str = "injected fault"
    ) -> None:
        """Answer the next ``count`` calls with status ``code`` instead of doing them."""
        with self._lock:
            self._failures_left = count
            self._failure_code = code
            self._failure_details = details

    def calls(self) -> list[str]:
        """Names of the methods called so far, in order (including failed ones)."""
        with self._lock:
            return list(self._calls)

    def operations(self) -> list[tuple[str, str, str]]:
        """User changes done so far, in order: ``("add", email, uuid)`` / ``("remove", email, "")``
        (only those that changed something; refused duplicates and unknown users are not listed)."""
        with self._lock:
            return list(self._operations)

    # --- gRPC handlers ---------------------------------------------------------------------------

    def _wrap(self, method: str) -> Any:
        handlers = {
            "AlterInbound": self._alter_inbound,
            "QueryStats": self._query_stats,
            "GetStats": self._get_stats,
            "GetSysStats": self._get_sys_stats,
        }
        handler = handlers[method]

        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self._lock:
                self._calls.append(method)
                failing = self._failures_left > 0
                if failing:
                    self._failures_left -= 1
                    code, details = self._failure_code, self._failure_details
            delayed = self._delay > 0 and (self._delay_methods is None or method in self._delay_methods)
            if delayed and self._wait_out_delay():
                context.abort(grpc.StatusCode.UNAVAILABLE, "server shutting down")
            if failing:
                context.abort(code, details)
            try:
                response: bytes = handler(request)
            except _Abort as exc:
                context.abort(exc.code, exc.details)
            except pw.ProtoDecodeError as exc:
                context.abort(grpc.StatusCode.INTERNAL, f"grpc: error unmarshalling request: {exc}")
            return response

        return call

    def _alter_inbound(self, request: bytes) -> bytes:
        fields = pw.decode_fields(request)
        tag = pw.last_string(fields, 1)
        op_type, op_value = _decode_typed_message(pw.last_bytes(fields, 2))
        add_type = f"{self.prefix}app.proxyman.command.AddUserOperation"
        remove_type = f"{self.prefix}app.proxyman.command.RemoveUserOperation"
        if op_type not in (add_type, remove_type):
            raise _unknown(f"app/proxyman/command: unknown operation > common/serial: {op_type} is not registered")
        with self._lock:
            users = self._inbounds.get(tag)
            if users is None:
                raise _unknown(
                    f"app/proxyman/command: failed to get handler: {tag} > "
                    f"app/proxyman/inbound: handler not found: {tag}"
                )
            if op_type == add_type:
                user = self._parse_user(pw.last_bytes(pw.decode_fields(op_value), 1))
                key = user.email.lower()
                if user.email and key in users:
                    raise _unknown(f"proxy/vless/inbound: User {user.email} already exists.")
                users[key or f"\0{user.uuid}"] = user
                self._operations.append(("add", user.email, user.uuid))
            else:
                email = pw.last_string(pw.decode_fields(op_value), 1)
                if not email:
                    raise _unknown("proxy/vless/inbound: Email must not be empty.")
                if users.pop(email.lower(), None) is None:
                    raise _unknown(f"proxy/vless/inbound: User {email} not found.")
                self._operations.append(("remove", email, ""))
        return b""

    def _parse_user(self, data: bytes) -> FakeUser:
        fields = pw.decode_fields(data)
        account_type, account_value = _decode_typed_message(pw.last_bytes(fields, 3))
        if account_type != f"{self.prefix}proxy.vless.Account":
            raise _unknown(f"app/proxyman/command: failed to parse user > unknown account type {account_type!r}")
        account = pw.decode_fields(account_value)
        user_id = pw.last_string(account, 1)
        try:
            parsed = uuid_module.UUID(user_id)
        except ValueError:
            raise _unknown(
                f"app/proxyman/command: failed to parse user > proxy/vless: failed to parse ID > {user_id!r}"
            ) from None
        return FakeUser(
            email=pw.last_string(fields, 2),
            uuid=str(parsed),
            flow=pw.last_string(account, 2),
            level=pw.last_int(fields, 1),
        )

    def _query_stats(self, request: bytes) -> bytes:
        fields = pw.decode_fields(request)
        pattern, reset = pw.last_string(fields, 1), bool(pw.last_int(fields, 2))
        out = b""
        with self._lock:
            for name in sorted(self._counters):
                if pattern in name:
                    value = self._counters[name]
                    if reset:
                        self._counters[name] = 0
                    out += pw.field_message(1, pw.field_string(1, name) + pw.field_varint(2, value))
        return out

    def _get_stats(self, request: bytes) -> bytes:
        fields = pw.decode_fields(request)
        name, reset = pw.last_string(fields, 1), bool(pw.last_int(fields, 2))
        with self._lock:
            if name not in self._counters:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"{name} not found.")
            value = self._counters[name]
            if reset:
                self._counters[name] = 0
        return pw.field_message(1, pw.field_string(1, name) + pw.field_varint(2, value))

    def _get_sys_stats(self, request: bytes) -> bytes:
        uptime = int(time.monotonic() - self._started_at)
        return pw.field_varint(1, threading.active_count()) + pw.field_varint(10, uptime)


def users_from_config(path: str | os.PathLike[str]) -> dict[str, list[FakeUser]]:
    """The VLESS users of each inbound tag in an Xray config file, as Xray loads them at start."""
    with open(path, encoding="utf-8") as file:
        document = json.load(file)
    out: dict[str, list[FakeUser]] = {}
    for inbound in document.get("inbounds", []):
        if inbound.get("protocol") != "vless" or "tag" not in inbound:
            continue
        clients = inbound.get("settings", {}).get("clients", [])
        out[inbound["tag"]] = [
            FakeUser(
                email=client.get("email", ""),
                uuid=str(uuid_module.UUID(client["id"])),
                flow=client.get("flow", ""),
                level=int(client.get("level", 0)),
            )
            for client in clients
        ]
    return out


def start_fake_xray(
    prefix: str = "xray.",
    *,
    inbound_tags: tuple[str, ...] = ("vless-in",),
    tls: tuple[bytes, bytes, bytes] | None = None,
) -> FakeXray:
    """Start a fake Xray API on 127.0.0.1 (a free port) with empty inbounds ``inbound_tags``.
    Stop it with ``.stop()`` or use it as a context manager."""
    fake = FakeXray(prefix=prefix, tls=tls)
    for tag in inbound_tags:
        fake.add_inbound(tag)
    fake.start()
    return fake
