"""A fake Telegram Bot API server: in-memory Telegram for tests and for ``make demo``.

The daemon talks to it exactly as to api.telegram.org — python-telegram-bot's ``Bot(token,
base_url=f"{base_url}/bot")`` over HTTP — and the fake answers like Telegram does: the same result
shapes, the same error codes and descriptions, real long polling, per-chat message ids, and Telegram's
flood limits (429 + ``retry_after``). What it does not know, it refuses (unknown method → 404).

Three audiences use it:

* **Bot side** (the daemon under test): the HTTP Bot API under ``/bot<token>/<method>``.
* **Users** (tests, the web chat): :class:`FakeTelegram` methods ``add_user``, ``user_sends``,
  ``user_presses_button``, ``user_pays_invoice``, ``user_blocks_bot``…, mirrored as a JSON API under
  ``/sandbox/api/`` (see :mod:`vpnd_sandbox.telegram.web`) for subprocess tests and the web page at ``/``.
* **Fault injection** (tests): :meth:`FakeTelegram.inject_fault` makes chosen requests fail with 502, 429,
  409, a hung request or a dropped connection; :attr:`FakeTelegram.requests` counts calls per method so a
  test can spot a busy loop.

All timing (rate limits, long-poll timeouts, fault windows) uses ``trio.current_time()``, so in-process
tests can run under Trio's ``autojump_clock``; message ``date`` fields are wall-clock Unix time, as they are
shown to people. All state is in memory and lives as long as the :class:`FakeTelegram` object.

Where each concern lives:

* :mod:`~vpnd_sandbox.telegram.state` — :class:`FakeTelegram`: the state, the update queue, dispatching a
  request, simulated users, waits for tests;
* :mod:`~vpnd_sandbox.telegram.methods` — the Bot API methods by family (``bot``, ``messages``,
  ``payments``) and the parameter checks they share (``checks``);
* :mod:`~vpnd_sandbox.telegram.records` — users, messages, queries, payments, notices as values;
* :mod:`~vpnd_sandbox.telegram.limits` — size limits and flood limits (429 + ``retry_after``);
* :mod:`~vpnd_sandbox.telegram.faults` — injected faults;
* :mod:`~vpnd_sandbox.telegram.files` — uploads, file ids and image facts;
* :mod:`~vpnd_sandbox.telegram.formatting` — HTML/MarkdownV2 entity parsing; :mod:`~vpnd_sandbox.telegram.wire`
  — request parsing and the Bot API's answer shapes;
* :mod:`~vpnd_sandbox.telegram.web` — the HTTP face (Bot API, file downloads, web chat, sandbox JSON API) on
  :mod:`vpnd.web`, and :func:`serve_fake_telegram`.
"""

from vpnd_sandbox.telegram.faults import FaultKind, FaultRule
from vpnd_sandbox.telegram.limits import TokenBucket
from vpnd_sandbox.telegram.records import (
    CallbackQuery,
    ChatMessage,
    FakeUser,
    Invoice,
    Notice,
    PreCheckoutQuery,
    SandboxError,
    StarPayment,
    StoredFile,
)
from vpnd_sandbox.telegram.state import FakeTelegram
from vpnd_sandbox.telegram.web import serve_fake_telegram
from vpnd_sandbox.telegram.wire import BotReply

__all__ = [
    "BotReply",
    "CallbackQuery",
    "ChatMessage",
    "FakeTelegram",
    "FakeUser",
    "FaultKind",
    "FaultRule",
    "Invoice",
    "Notice",
    "PreCheckoutQuery",
    "SandboxError",
    "StarPayment",
    "StoredFile",
    "TokenBucket",
    "serve_fake_telegram",
]
