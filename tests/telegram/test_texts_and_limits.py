"""Texts, keyboards and the outbound limiter: pure checks, Trio's autojump clock for time."""

from __future__ import annotations

import itertools
import re
import string

import pytest
import trio
import trio.testing

from vpnd.telegram import keyboards as kb
from vpnd.telegram.ratelimit import OutboundLimiter, Priority
from vpnd.telegram.texts import Html, Texts
from vpnd_sandbox.telegram.formatting import parse_html


def placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def test_every_language_has_every_text_with_the_same_placeholders_and_valid_html() -> None:
    texts = Texts.load()
    en = texts.catalogs["en"]
    for lang, catalog in texts.catalogs.items():
        assert set(catalog) == set(en), f"{lang}: missing {set(en) - set(catalog)}, extra {set(catalog) - set(en)}"
        for key, template in catalog.items():
            assert placeholders(template) == placeholders(en[key]), f"{lang}:{key}"
            filled = template.format_map({name: "x" for name in placeholders(template)})
            parsed = parse_html(filled)  # raises like Telegram's "can't parse entities"
            assert 0 < len(parsed.text) <= 4096, f"{lang}:{key}"


def test_values_are_escaped_unless_marked_html() -> None:
    texts = Texts.load()
    assert "&lt;b&gt;" in texts.get("en", "start.welcome", name="<b>")
    assert "<code>k</code>" in texts.get("en", "help.text", support=Html("<code>k</code>"))
    assert texts.language("ru-RU") == "ru" and texts.language("de") == "en" and texts.language(None, "ru") == "ru"


def test_callback_data_is_limited_to_64_bytes() -> None:
    assert kb.button("ok", "x" * 64)["callback_data"] == "x" * 64
    with pytest.raises(ValueError, match="64 bytes"):
        kb.button("too long", "я" * 33)
    t = Texts.load()
    menu = kb.main_menu(lambda key: t.get("en", key), trial_eligible=True, has_subscription=False)
    for row in menu["inline_keyboard"]:
        for button in row:
            assert re.fullmatch(r"[a-z_]+(:[a-z0-9_]+)*", button["callback_data"])


async def test_global_rate_is_never_exceeded(autojump_clock: trio.testing.MockClock) -> None:
    limiter = OutboundLimiter(rate_per_second=25, per_chat_per_second=1, chat_burst=3)
    sent: list[float] = []

    async def send_many(chat_id: int) -> None:
        for _ in range(10):
            await limiter.acquire(chat_id, Priority.BULK)
            sent.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for chat_id in range(100):
            nursery.start_soon(send_many, chat_id)
    assert len(sent) == 1000
    sent.sort()
    for i in range(len(sent)):  # in any 1-second window, at most the limit (sliding, no extra burst)
        window = [t for t in sent[i : i + 80] if t < sent[i] + 1.0]
        assert len(window) <= 25
    elapsed = sent[-1] - sent[0]
    assert elapsed >= (1000 - 2) / limiter.bulk_rate() - 0.01  # never faster than the bulk pace


async def test_per_chat_rate_with_burst(autojump_clock: trio.testing.MockClock) -> None:
    limiter = OutboundLimiter(rate_per_second=25, per_chat_per_second=1, chat_burst=3)
    times = []
    for _ in range(8):
        await limiter.acquire(42)
        times.append(trio.current_time())
    assert times[2] - times[0] < 0.01  # a burst of 3
    assert [round(b - a, 2) for a, b in itertools.pairwise(times[2:])] == [1.0] * 5


async def test_429_pauses_everyone_and_replies_have_priority(autojump_clock: trio.testing.MockClock) -> None:
    limiter = OutboundLimiter(rate_per_second=10, per_chat_per_second=100, chat_burst=100, reserve=5)
    limiter.pause(3.0)
    start = trio.current_time()
    await limiter.acquire(1)
    assert trio.current_time() - start >= 3.0

    # Bulk senders drain the bucket down to the reserve; a reply still goes out at once.
    for chat_id in range(100, 104):
        await limiter.acquire(chat_id, Priority.BULK)
    before = trio.current_time()
    await limiter.acquire(7, Priority.REPLY)
    assert trio.current_time() - before < 0.01
