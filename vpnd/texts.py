"""User-facing texts, per language, from `vpnd/locales/<lang>.json` (HTML for Telegram).

`Texts.get(lang, key, **values)` fills `{name}` placeholders; values are HTML-escaped unless wrapped
in `Html` (already-safe markup such as a <code> link). A missing key in one language falls back to
English; a key missing everywhere is a bug and raises (tests check that every language has every key).

Texts are values of the domain layer: loaded once when the app is built (`App.texts`, about 70 KB of
JSON for six languages) and handed down to whoever renders a message — flows, workers, payments.
Nothing loads them per call and nothing keeps them in a module global.
"""

from __future__ import annotations

import html
import json
from collections.abc import Collection, Mapping
from importlib import resources

import attrs

from vpnd.config import SUPPORTED_LANGUAGES

FALLBACK = "en"


def language_for(code: str | None, supported: Collection[str], default: str) -> str:
    """The catalog for a Telegram `language_code` (an IETF tag such as "uk", "pt-br", "zh-hans"), or
    `default` when we have none for it.

    Only the primary subtag counts, so regional and script variants share their language's catalog:
    "en-US" → en, "zh-hans"/"zh-CN" → zh. Traditional Chinese ("zh-hant", "zh-TW") gets the simplified
    catalog too: it reads far better for those users than the English fallback. "pt-br" → `default`.
    Underscores ("zh_CN", seen from some clients) count as hyphens; anything odd → `default`.
    """
    if not code:
        return default
    primary = code.strip().replace("_", "-").split("-")[0].lower()
    return primary if primary in supported else default


@attrs.frozen
class Html:
    """Markup that is already safe to put in a Telegram HTML message."""

    markup: str

    def __str__(self) -> str:
        return self.markup


def _escape(value: object) -> str:
    return value.markup if isinstance(value, Html) else html.escape(str(value), quote=False)


@attrs.frozen
class Texts:
    catalogs: Mapping[str, Mapping[str, str]]

    @classmethod
    def load(cls) -> Texts:
        root = resources.files("vpnd.locales")
        return cls({lang: json.loads((root / f"{lang}.json").read_text("utf-8")) for lang in SUPPORTED_LANGUAGES})

    def language(self, code: str | None, default: str = FALLBACK) -> str:
        """Our language for a Telegram `language_code` such as "ru" or "en-US" (see `language_for`)."""
        return language_for(code, self.catalogs.keys(), default)

    def get(self, lang: str, key: str, **values: object) -> str:
        catalog = self.catalogs.get(lang) or self.catalogs[FALLBACK]
        template = catalog.get(key) or self.catalogs[FALLBACK].get(key)
        if template is None:
            raise KeyError(f"no text for {key!r}")
        if not values:
            return template
        return template.format_map({name: _escape(value) for name, value in values.items()})

    def get_or(self, lang: str, key: str, default: str) -> str:
        """`key`'s text (no placeholders), or `default` where no language has it — e.g. the name of a
        payment method that is in the data but has no text yet."""
        catalog = self.catalogs.get(lang) or self.catalogs[FALLBACK]
        return catalog.get(key) or self.catalogs[FALLBACK].get(key) or default
