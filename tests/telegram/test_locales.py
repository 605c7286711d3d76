"""Every locale against en.json: keys, placeholders, HTML tags; and the language picked from Telegram."""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import psycopg
import pytest
import trio

from tests.harness import bot_config, start_vpnd
from vpnd.config import SUPPORTED_LANGUAGES
from vpnd.telegram import keyboards as kb
from vpnd.texts import Texts, language_for
from vpnd_sandbox.telegram_fake import FakeTelegram

ALICE, BOB = 1001, 1002

TAG = re.compile(r"<(/?)(b|i|code|a)\b[^>]*>")


def catalog(lang: str) -> dict[str, str]:
    loaded = json.loads((resources.files("vpnd.locales") / f"{lang}.json").read_text("utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def tags(template: str) -> Counter[str]:
    """Opening and closing <b>, <i>, <code>, <a> tags, counted."""
    return Counter(f"<{close}{name}>" for close, name in TAG.findall(template))


def problems(lang: str, en: dict[str, str], other: dict[str, str]) -> list[str]:
    found = []
    if missing := sorted(set(en) - set(other)):
        found.append(f"{lang}.json misses {len(missing)} key(s) of en.json: " + ", ".join(missing))
    if extra := sorted(set(other) - set(en)):
        found.append(f"{lang}.json has key(s) en.json lacks: " + ", ".join(extra))
    for key in sorted(set(en) & set(other)):
        if placeholders(other[key]) != placeholders(en[key]):
            theirs, ours = sorted(placeholders(other[key])), sorted(placeholders(en[key]))
            found.append(f"{lang}.json {key}: placeholders {theirs}, en has {ours}")
        if tags(other[key]) != tags(en[key]):
            found.append(f"{lang}.json {key}: HTML tags {dict(tags(other[key]))}, en has {dict(tags(en[key]))}")
    return found


def test_every_locale_matches_english_keys_placeholders_and_tags() -> None:
    en = catalog("en")
    found = [line for lang in SUPPORTED_LANGUAGES if lang != "en" for line in problems(lang, en, catalog(lang))]
    assert not found, "\n".join(found)


def test_no_locale_has_a_key_twice() -> None:
    """JSON keeps the last of two equal keys silently: "admin.user.devices" was once both a button label
    and a "{used} of {limit}" line, and the button showed the placeholders."""
    root = resources.files("vpnd.locales")
    for lang in SUPPORTED_LANGUAGES:
        pairs = json.loads((root / f"{lang}.json").read_text("utf-8"), object_pairs_hook=lambda p: p)
        twice = [key for key, count in Counter(key for key, _ in pairs).items() if count > 1]
        assert twice == [], (lang, twice)


def test_the_check_catches_a_missing_key_a_foreign_placeholder_and_a_lost_tag() -> None:
    en = {"a": "<b>Hi</b> {name}", "b": "x"}
    assert problems("xx", en, {"a": "<b>Hi</b> {name}", "b": "y"}) == []
    assert problems("xx", en, {"a": "<b>Hi</b> {name}"}) == ["xx.json misses 1 key(s) of en.json: b"]
    assert problems("xx", en, {"a": "<b>Hi</b> {nom}", "b": "y"})[0].startswith("xx.json a: placeholders ['nom']")
    assert problems("xx", en, {"a": "<b>Hi {name}", "b": "y"})[0].startswith("xx.json a: HTML tags")
    assert problems("xx", en, {"a": "<b>Hi</b> {name}", "b": "y", "c": "z"}) == ["xx.json has key(s) en.json lacks: c"]


def test_every_supported_language_has_a_catalog_and_a_button() -> None:
    assert set(Texts.load().catalogs) == set(SUPPORTED_LANGUAGES) == set(kb.LANGUAGE_NAMES)
    menu = kb.languages(lambda key: key)
    offered = [b["callback_data"] for row in menu["inline_keyboard"] for b in row]
    assert offered == [f"lang:{code}" for code in kb.LANGUAGE_NAMES] + ["menu"]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("uk", "uk"),
        ("tr", "tr"),
        ("fa", "fa"),
        ("fa-IR", "fa"),
        ("zh-hans", "zh"),
        ("zh-CN", "zh"),
        ("zh_CN", "zh"),
        ("zh-hant", "zh"),
        ("ru-RU", "ru"),
        ("EN-us", "en"),
        ("pt-br", "ru"),
        ("de", "ru"),
        ("", "ru"),
        (None, "ru"),
        ("-", "ru"),
        ("ukr", "ru"),
    ],
)
def test_telegram_language_code_maps_to_our_language(code: str | None, expected: str) -> None:
    assert language_for(code, SUPPORTED_LANGUAGES, "ru") == expected  # "ru" as default shows the fallback


async def test_a_ukrainian_user_gets_ukrainian_at_start_and_switches_to_turkish(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ALICE, "Олена", language_code="uk")
    fake.add_user(BOB, "李雷", language_code="zh-hans")
    with trio.fail_after(30):
        fake.user_sends(ALICE, "/start")
        menu = await fake.wait_for_bot_message(ALICE)
        assert "Вітаю, Олена!" in (menu.text or "") and "Головне меню" in (menu.text or "")
        fake.user_presses_button(ALICE, menu.message_id, "lang")
        chooser = await fake.wait_for_bot_message(ALICE, lambda m: "lang:tr" in m.callback_data)
        assert "Оберіть мову" in (chooser.text or "")
        assert {f"lang:{code}" for code in SUPPORTED_LANGUAGES} <= set(chooser.callback_data)
        fake.user_presses_button(ALICE, chooser.message_id, "lang:tr")
        menu = await fake.wait_for_bot_message(ALICE, lambda m: "Dil ayarlandı" in (m.text or ""))
        assert "Ana menü" in (menu.text or "")
        fake.user_presses_button(ALICE, menu.message_id, "help")
        help_ = await fake.wait_for_bot_message(ALICE, lambda m: "Yardım" in (m.text or ""))
        assert "Aboneliğim" in (help_.text or "")  # later screens stay Turkish

        fake.user_sends(BOB, "/start")
        menu = await fake.wait_for_bot_message(BOB)
        assert "您好，李雷！" in (menu.text or "")  # "zh-hans" from Telegram → Chinese (simplified)
    with psycopg.connect(db_dsn) as conn:
        rows = conn.execute("SELECT id, language FROM users ORDER BY id").fetchall()
    assert rows == [(ALICE, "tr"), (BOB, "zh")]
    await vpnd.stop()
