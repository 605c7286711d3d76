"""The Bot client on Trio: PTB's pinned version, TrioBot's sequential initialize/shutdown, Sender errors."""

from __future__ import annotations

import importlib.metadata

import pytest
import telegram
import trio

from vpnd.config import TelegramConfig
from vpnd.telegram.client import ChatNotFound, ChatUnreachable, Sender, SendFailed, TrioBot, build_bot
from vpnd.telegram.ratelimit import OutboundLimiter
from vpnd_sandbox.telegram_fake import FakeTelegram


def test_python_telegram_bot_minor_version_is_the_pinned_one() -> None:
    """TrioBot overrides Bot.initialize/shutdown (asyncio.gather in PTB); a new minor must be re-checked."""
    version = importlib.metadata.version("python-telegram-bot")
    assert version.startswith("22."), version
    import inspect

    source = inspect.getsource(telegram.Bot.initialize)
    assert "asyncio.gather" in source, "PTB changed Bot.initialize: re-check TrioBot's override"
    assert "asyncio" not in inspect.getsource(TrioBot.initialize)


async def bot_for(fake: FakeTelegram, base_url: str) -> TrioBot:
    return build_bot(TelegramConfig(token=fake.token, api_base_url=base_url))


async def test_trio_bot_initializes_and_shuts_down_on_trio(fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base_url = fake_telegram
    bot = await bot_for(fake, base_url)
    with trio.fail_after(10):
        await bot.initialize()
        assert bot.username == fake.bot_username
        await bot.shutdown()
    assert fake.requests["getMe"] == 1


async def test_sender_maps_telegram_errors(fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base_url = fake_telegram
    bot = await bot_for(fake, base_url)
    await bot.initialize()
    sender = Sender(bot, OutboundLimiter(), max_attempts=3, max_backoff=0.2)
    fake.add_user(5, "Eve")
    with trio.fail_after(20):
        with pytest.raises(ChatNotFound):
            await sender.send_message(5, "hello")  # Eve never started the bot
        fake.user_sends(5, "/start")
        await sender.send_message(5, "hello")
        fake.user_blocks_bot(5)
        with pytest.raises(ChatUnreachable):
            await sender.send_message(5, "still there?")
        fake.user_unblocks_bot(5)
        fake.inject_fault("5xx", count=5, methods=["sendMessage"])
        with pytest.raises(SendFailed):
            await sender.send_message(5, "flaky")
        assert fake.requests["sendMessage"] == 3 + 3  # 3 earlier sends; then 3 attempts and it gave up
        fake.clear_faults()
        fake.inject_fault("429", count=1, retry_after=1, methods=["sendMessage"])
        started = trio.current_time()
        await sender.send_message(5, "after a 429")
        assert trio.current_time() - started >= 1.0  # waited retry_after, then delivered
    assert [m.text for m in fake.bot_messages(5)][-1] == "after a 429"
    await bot.shutdown()
