"""The fake Telegram Bot API, under its old name: it lives in :mod:`vpnd_sandbox.telegram` now.

Kept so that ``from vpnd_sandbox.telegram_fake import FakeTelegram`` and
``python -m vpnd_sandbox.telegram_fake`` go on working.
"""

from vpnd_sandbox.telegram import (
    BotReply,
    CallbackQuery,
    ChatMessage,
    FakeTelegram,
    FakeUser,
    FaultKind,
    FaultRule,
    Invoice,
    Notice,
    PreCheckoutQuery,
    SandboxError,
    StarPayment,
    StoredFile,
    TokenBucket,
    serve_fake_telegram,
)
from vpnd_sandbox.telegram.web import main

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
    "main",
    "serve_fake_telegram",
]

if __name__ == "__main__":
    main()
