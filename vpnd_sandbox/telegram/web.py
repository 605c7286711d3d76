"""The fake Telegram's HTTP face: routes on the daemon's own ASGI layer (:mod:`vpnd.web`), served by it.

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
mid-body (:class:`vpnd.web.Hangup`). Bodies are capped at ``MAX_BODY`` (413 in the Bot API's error
format) and, when a ``body_timeout`` is given, must arrive within it (408): both come from
:class:`vpnd.web.Router`, as for the daemon.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from typing import Any

import attrs
import trio

from vpnd.money import format_money
from vpnd.web import Hangup, Request, Response, Router, serve, server_config, text_error_response
from vpnd_sandbox.telegram.files import content_type
from vpnd_sandbox.telegram.records import ChatMessage, SandboxError
from vpnd_sandbox.telegram.state import FakeTelegram
from vpnd_sandbox.telegram.wire import BotReply, JSONDict

__all__ = ["MAX_BODY", "main", "serve_fake_telegram", "telegram_router"]

MAX_BODY = 60 * 1024 * 1024


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error_response(status: int, text: str) -> Response:
    """Errors the router answers itself, as Telegram's server does."""
    if status == 413:
        return Response.json({"ok": False, "error_code": 413, "description": "Request Entity Too Large"}, 413)
    if status == 404:
        return Response(404, b"Not Found", content_type="text/plain")
    return text_error_response(status, text)


def telegram_router(fake: FakeTelegram, *, body_timeout: float = float("inf")) -> Router:
    """The fake's routes (see the module docstring) on a :class:`vpnd.web.Router`."""
    face = _TelegramFace(fake)
    router = Router(max_body_bytes=MAX_BODY, body_timeout=body_timeout, error_response=_error_response)
    router.add("*", "/bot{token}/{method:path}", face.bot_api)
    router.add("*", "/file/bot{token}/{file_path:path}", face.bot_file)
    for path in ("/", "/sandbox", "/sandbox/"):
        router.add("GET", path, face.webchat)
    router.add("GET", "/sandbox/files/{file_id}", face.sandbox_file)
    router.add("*", "/sandbox/api/{route:path}", face.sandbox_api)
    return router


def message_json(message: ChatMessage) -> JSONDict:
    """A transcript entry for the web chat and subprocess tests: the Bot API Message plus sandbox facts."""
    entry = message.to_api()
    entry["from_bot"] = message.from_bot
    entry["revision"] = message.revision
    entry["deleted"] = message.deleted
    if message.photo is not None:
        entry["photo_url"] = message.photo.url or f"/sandbox/files/{message.photo.file_id}"
    media = message.document or message.video or message.animation
    if media is not None:
        entry["document_url"] = media.url or f"/sandbox/files/{media.file_id}"
    if message.invoice is not None:
        entry["invoice"]["paid"] = message.invoice.paid_charge_id is not None
        entry["invoice"]["amount_text"] = format_money(message.invoice.total_amount, message.invoice.currency)
    if message.successful_payment is not None:
        paid = message.successful_payment
        entry["paid_text"] = format_money(paid["total_amount"], paid["currency"])
    return entry


@attrs.define(eq=False)
class _TelegramFace:
    """The handlers over one :class:`FakeTelegram`."""

    fake: FakeTelegram
    _page: bytes | None = attrs.field(default=None, init=False)

    async def webchat(self, request: Request) -> Response:
        if self._page is None:
            self._page = importlib.resources.files("vpnd_sandbox").joinpath("static/webchat.html").read_bytes()
        return Response.html(self._page, headers=[("cache-control", "no-store")])

    # ------------------------------------------------------------------------------------------ Bot API

    async def bot_api(self, request: Request) -> Response:
        body = await request.body()
        reply: BotReply | None = None
        async with trio.open_nursery() as nursery:

            async def cancel_on_disconnect() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(cancel_on_disconnect)
            reply = await self.fake.handle_bot_request(
                request.params["token"],
                request.params["method"],
                request.header("content-type") or "",
                body,
                request.scope.get("query_string", b""),
            )
            nursery.cancel_scope.cancel()
        if reply is None:
            raise Hangup  # the client is gone
        if reply.body is None:
            raise Hangup(200)  # broken connection: status line, then close before the body ends
        return Response.json(reply.body, reply.status)

    async def bot_file(self, request: Request) -> Response:
        if request.params["token"] != self.fake.token:
            return Response.json({"ok": False, "error_code": 401, "description": "Unauthorized"}, 401)
        return self._file(request.params["file_path"].rpartition("/")[2])

    async def sandbox_file(self, request: Request) -> Response:
        return self._file(request.params["file_id"])

    def _file(self, file_id: str) -> Response:
        stored = self.fake.files.get(file_id)
        if stored is None or stored.data is None:
            return _error_response(404, "")
        return Response(200, stored.data, [("cache-control", "max-age=3600")], content_type(stored))

    # ------------------------------------------------------------------------------------- sandbox API

    async def sandbox_api(self, request: Request) -> Response:
        body = await request.body()
        route = request.params["route"].strip("/")
        query = {key: values[-1] for key, values in request.query.items()}
        try:
            payload: Any = json.loads(body) if body.strip() else {}
        except ValueError:
            return Response.json({"ok": False, "error": "body must be JSON"}, 400)
        if not isinstance(payload, dict):
            return Response.json({"ok": False, "error": "body must be a JSON object"}, 400)
        try:
            result = await self._sandbox_route(request.method, route, query, payload)
        except (SandboxError, ValueError, TypeError, KeyError) as error:
            return Response.json({"ok": False, "error": str(error)}, 400)
        except _HttpError as error:
            return Response.json({"ok": False, "error": str(error)}, error.status)
        return Response.json({"ok": True, "result": result})

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


async def serve_fake_telegram(
    fake: FakeTelegram,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    body_timeout: float = float("inf"),
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``fake`` over HTTP with the daemon's server (:func:`vpnd.web.serve`) until cancelled.

    ``task_status.started(base_url)`` once the socket is bound, e.g. ``"http://127.0.0.1:41234"``:
    the Bot API is at ``f"{base_url}/bot{token}/{method}"`` (python-telegram-bot:
    ``Bot(token, base_url=f"{base_url}/bot")``), the web chat at ``base_url + "/"``, the sandbox JSON API
    under ``/sandbox/api/``. A request body must arrive within ``body_timeout`` seconds (else 408).
    """
    await serve(telegram_router(fake, body_timeout=body_timeout), server_config(host, port), task_status=task_status)


def main(argv: list[str] | None = None) -> None:
    """``python -m vpnd_sandbox.telegram [--host H] [--port P] [--token T]``: serve a fresh fake.

    Prints the base URL as the first line of stdout (subprocess tests read it), then serves until killed.
    """
    import argparse
    import functools

    parser = argparse.ArgumentParser(description="Fake Telegram Bot API + web chat (vpnd sandbox)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--token", default=FakeTelegram.__attrs_attrs__.token.default)
    parser.add_argument("--bot-username", default="vpnd_demo_bot")
    args = parser.parse_args(argv)
    fake = FakeTelegram(token=args.token, bot_username=args.bot_username)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            base_url = await nursery.start(functools.partial(serve_fake_telegram, fake, host=args.host, port=args.port))
            print(base_url, flush=True)
            print(f"web chat: {base_url}/   bot API: {base_url}/bot{fake.token}/getMe", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
