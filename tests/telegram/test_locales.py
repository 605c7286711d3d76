"""Every locale against en.json: keys, placeholders, HTML tags; and the language picked from Telegram."""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from importlib import resources

import pytest

from vpnd.config import SUPPORTED_LANGUAGES
from vpnd.telegram import keyboards as kb
from vpnd.texts import Texts, language_for

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
            found.append(f"{lang}.json {key}: placeholders {sorted(placeholders(other[key]))}, en has {sorted(placeholders(en[key]))}")
        if tags(other[key]) != tags(en[key]):
            found.append(f"{lang}.json {key}: HTML tags {dict(tags(other[key]))}, en has {dict(tags(en[key]))}")
    return found


def test_every_locale_matches_english_keys_placeholders_and_tags() -> None:
    en = catalog("en")
    found = [line for lang in SUPPORTED_LANGUAGES if lang != "en" for line in problems(lang, en, catalog(lang))]
    assert not found, "\n".join(found)


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
