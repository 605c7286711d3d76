"""The fake Telegram's HTTP face: a plain ASGI app (no framework) served by hypercorn's Trio worker.

Routes:

* ``/bot<token>/<method>`` — the Bot API (any HTTP verb, like Telegram), see :class:`FakeTelegram`.
* ``/file/bot<token>/<file_path>`` — file downloads, as on api.telegram.org (path from ``getFile``).
* ``/`` and ``/sandbox`` — the web chat page (``static/webchat.html``).
* ``/sandbox/files/<file_id>`` — a stored photo/document's bytes, for the web chat.
* ``/sandbox/api/...`` — JSON API for simulated users, faults and counters (subprocess tests, web chat).
  Every answer is ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}`` with status 4xx.

==========================================  ===================================================
``GET  /sandbox/api/state``                 bot, users, commands, stats, ``version``
``POST /sandbox/api/users``                 ``{id?, first_name, last_name?, username?, language_code?}``
``POST /sandbox/api/users/<id>/send``       ``{text, reply_to_message_id?}`` → the user's message
``POST /sandbox/api/users/<id>/press``      ``{message_id, data}`` or ``{message_id, text}`` → ``{id}``
``POST /sandbox/api/users/<id>/pay``        ``{message_id}`` → the pre-checkout query
``POST /sandbox/api/users/<id>/block``      (and ``/unblock``)
``GET  /sandbox/api/chats/<id>``            transcript, notices, reply keyboard, ``version``
``GET  /sandbox/api/chats/<id>/wait``       ``?since=&timeout=`` next bot message (408 on timeout)
``POST /sandbox/api/updates``               raw update dict → ``{update_id}``
``GET|POST|DELETE /sandbox/api/faults``     list / inject (``inject_fault`` kwargs) / clear
``GET  /sandbox/api/stats``                 request counters, 429 counts, pending updates
``POST /sandbox/api/limits``                ``{global_rate?, global_burst?, chat_rate?, chat_burst?}``
==========================================  ===================================================

A Bot API request whose client disconnects is cancelled (a long poll that nobody waits for must not
stay "the active poll"). A ``drop`` fault answers with a 200 status line and then closes the connection
mid-body: ASGI has no way to close a connection without any response, and for a client the effect is the
same — the request failed with a broken connection and no result.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import attrs
import trio

from vpnd_sandbox.telegram_fake import BotReply, ChatMessage, FakeTelegram, SandboxError
from vpnd_sandbox.telegram_wire import JSONDict

__all__ = ["FakeTelegramApp"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

MAX_BODY = 60 * 1024 * 1024


class _BodyTooLarge(Exception):
    pass


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise trio.BrokenResourceError("client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(
    send: Send, status: int, body: bytes, content_type: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    headers.extend(extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _respond_json(send: Send, status: int, payload: Any) -> None:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    await _respond(send, status, body, "application/json")


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""


def message_json(message: ChatMessage) -> JSONDict:
    """A transcript entry for the web chat and subprocess tests: the Bot API Message plus sandbox facts."""
    entry = message.to_api()
    entry["from_bot"] = message.from_bot
    entry["revision"] = message.revision
    entry["deleted"] = message.deleted
    if message.photo is not None:
        entry["photo_url"] = message.photo.url or f"/sandbox/files/{message.photo.file_id}"
    if message.document is not None:
        entry["document_url"] = message.document.url or f"/sandbox/files/{message.document.file_id}"
    if message.invoice is not None:
        entry["invoice"]["paid"] = message.invoice.paid_charge_id is not None
    return entry


@attrs.define(eq=False)
class FakeTelegramApp:
    """ASGI application exposing one :class:`FakeTelegram`."""

    fake: FakeTelegram
    _page: bytes | None = attrs.field(default=None, init=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        try:
            if path.startswith("/bot"):
                await self._bot_api(scope, receive, send)
            elif path.startswith("/file/bot"):
                await self._bot_file(path, send)
            elif path in ("/", "/sandbox", "/sandbox/"):
                page = self._webchat()
                await _respond(send, 200, page, "text/html; charset=utf-8", [(b"cache-control", b"no-store")])
            elif path.startswith("/sandbox/files/"):
                await self._serve_file(path.removeprefix("/sandbox/files/"), send)
            elif path.startswith("/sandbox/api/"):
                await self._sandbox_api(scope, receive, send)
            else:
                await _respond(send, 404, b"Not Found", "text/plain")
        except trio.BrokenResourceError:
            return  # the client disconnected while sending its request
        except _BodyTooLarge:
            await _respond_json(send, 413, {"ok": False, "error_code": 413, "description": "Request Entity Too Large"})

    def _webchat(self) -> bytes:
        if self._page is None:
            resource = importlib.resources.files("vpnd_sandbox").joinpath("static/webchat.html")
            self._page = resource.read_bytes()
        return self._page

    # ------------------------------------------------------------------------------------------ Bot API

    async def _bot_api(self, scope: Scope, receive: Receive, send: Send) -> None:
        token, _, method = scope["path"].removeprefix("/bot").partition("/")
        body = await _read_body(receive)
        reply: BotReply | None = None
        async with trio.open_nursery() as nursery:

            async def cancel_on_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(cancel_on_disconnect)
            reply = await self.fake.handle_bot_request(
                token, method, _header(scope, b"content-type"), body, scope.get("query_string", b"")
            )
            nursery.cancel_scope.cancel()
        if reply is None:
            return  # client gone
        if reply.body is None:
            # Broken connection: status line, then close before the (chunked) body ends.
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            return
        await _respond_json(send, reply.status, reply.body)

    async def _bot_file(self, path: str, send: Send) -> None:
        token, _, file_path = path.removeprefix("/file/bot").partition("/")
        if token != self.fake.token:
            await _respond_json(send, 401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
            return
        await self._serve_file(file_path.rpartition("/")[2], send)

    async def _serve_file(self, file_id: str, send: Send) -> None:
        stored = self.fake.files.get(file_id)
        if stored is None or stored.data is None:
            await _respond(send, 404, b"Not Found", "text/plain")
            return
        content_type = stored.mime_type or "application/octet-stream"
        if stored.kind == "photo":
            data = stored.data
            content_type = (
                "image/png" if data.startswith(b"\x89PNG") else "image/gif" if data.startswith(b"GIF8")
                else "image/webp" if data[8:12] == b"WEBP" else "image/jpeg"
            )
        await _respond(send, 200, stored.data, content_type, [(b"cache-control", b"max-age=3600")])

    # ------------------------------------------------------------------------------------- sandbox API

    async def _sandbox_api(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        route = scope["path"].removeprefix("/sandbox/api/").strip("/")
        query = {key: values[-1] for key, values in parse_qs(scope.get("query_string", b"").decode()).items()}
        try:
            payload: Any = json.loads(body) if body.strip() else {}
        except ValueError:
            await _respond_json(send, 400, {"ok": False, "error": "body must be JSON"})
            return
        if not isinstance(payload, dict):
            await _respond_json(send, 400, {"ok": False, "error": "body must be a JSON object"})
            return
        try:
            result = await self._sandbox_route(scope["method"], route, query, payload)
        except (SandboxError, ValueError, TypeError, KeyError) as error:
            await _respond_json(send, 400, {"ok": False, "error": str(error)})
            return
        except _HttpError as error:
            await _respond_json(send, error.status, {"ok": False, "error": str(error)})
            return
        await _respond_json(send, 200, {"ok": True, "result": result})

    async def _sandbox_route(self, method: str, route: str, query: dict[str, str], payload: JSONDict) -> Any:
        fake = self.fake
        if route == "state" and method == "GET":
            return {
                "bot": fake.bot_user(),
                "users": [self._user_json(user.id) for user in fake.users.values()],
                "commands": fake.commands.get(("default", ""), []),
                "stats": fake.stats(),
                "version": fake.change_seq,
            }
        if route == "users" and method == "POST":
            user_id = payload.get("id")
            if user_id is None:
                user_id = max([100_000, *fake.users]) + 1
            user = fake.add_user(
                int(user_id),
                str(payload.get("first_name") or f"User {user_id}"),
                last_name=payload.get("last_name") or None,
                username=payload.get("username") or None,
                language_code=payload.get("language_code") or None,
            )
            return self._user_json(user.id)
        if match := re.fullmatch(r"users/(\d+)/(send|press|pay|block|unblock)", route):
            if method != "POST":
                raise _HttpError(405, "use POST")
            user_id, action = int(match.group(1)), match.group(2)
            if action == "send":
                reply_to = payload.get("reply_to_message_id")
                sent = fake.user_sends(user_id, str(payload["text"]), reply_to_message_id=reply_to)
                return message_json(sent)
            if action == "press":
                query_obj = fake.user_presses_button(
                    user_id, int(payload["message_id"]), payload.get("data"), text=payload.get("text")
                )
                return {"id": query_obj.id, "data": query_obj.data}
            if action == "pay":
                checkout = fake.user_pays_invoice(user_id, int(payload["message_id"]))
                return {"id": checkout.id, "total_amount": checkout.invoice.total_amount}
            if action == "block":
                fake.user_blocks_bot(user_id)
            else:
                fake.user_unblocks_bot(user_id)
            return self._user_json(user_id)
        if match := re.fullmatch(r"chats/(\d+)", route):
            chat_id = int(match.group(1))
            if chat_id not in fake.users:
                raise _HttpError(404, f"no user {chat_id}")
            return {
                "version": fake.change_seq,
                "user": self._user_json(chat_id),
                "messages": [message_json(m) for m in fake.transcript(chat_id)],
                "notices": [attrs.asdict(n) for n in fake.notices_for(chat_id)],
                "reply_keyboard": fake.reply_keyboards.get(chat_id),
                "commands": fake.commands.get(("default", ""), []),
            }
        if match := re.fullmatch(r"chats/(\d+)/wait", route):
            chat_id = int(match.group(1))
            since = int(query["since"]) if "since" in query else None
            timeout = min(float(query.get("timeout", "10")), 120.0)
            try:
                found = await fake.wait_for_bot_message(chat_id, timeout=timeout, since=since)
            except trio.TooSlowError as error:
                raise _HttpError(408, str(error)) from None
            return message_json(found)
        if route == "updates" and method == "POST":
            return {"update_id": fake.inject_update(payload)}
        if route == "faults":
            if method == "POST":
                kind = payload.pop("kind")
                return fake.inject_fault(kind, **payload).to_json()
            if method == "DELETE":
                fake.clear_faults()
            return [rule.to_json() for rule in fake.faults]
        if route == "stats":
            return fake.stats()
        if route == "limits" and method == "POST":
            for name in ("global_rate", "global_burst", "chat_rate", "chat_burst"):
                if name in payload:
                    setattr(fake, name, float(payload[name]))
            return {name: getattr(fake, name) for name in ("global_rate", "global_burst", "chat_rate", "chat_burst")}
        raise _HttpError(404, f"no sandbox route {method} /sandbox/api/{route}")

    def _user_json(self, user_id: int) -> JSONDict:
        user = self.fake.users[user_id]
        return {**user.to_api(), "started": user.started, "blocked": user.blocked}
