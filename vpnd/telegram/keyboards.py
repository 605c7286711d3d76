"""Inline keyboards and callback data (pure). Callback data is short ASCII, always ≤ 64 bytes.

Callback data scheme (`verb` or `verb:arg[:arg]`):
    menu, sub, buy, trial, promo, promo_cancel, invite, lang, lang:<code>, help, qr, reissue, ar:<on|off>,
    plan:<code>, pay:<code>:<method>, pays:<page>,
    trialchk, support, support:write, support:cancel, conn, conn:<platform>
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

MAX_CALLBACK_BYTES = 64

Button = dict[str, str]
Keyboard = dict[str, list[list[Button]]]

#: The language menu: each language named in itself (a test keeps it equal to SUPPORTED_LANGUAGES).
LANGUAGE_NAMES = {
    "en": "🇬🇧 English",
    "ru": "🇷🇺 Русский",
    "uk": "🇺🇦 Українська",
    "tr": "🇹🇷 Türkçe",
    "fa": "🇮🇷 فارسی",
    "zh": "🇨🇳 简体中文",
}


def button(text: str, data: str) -> Button:
    if len(data.encode()) > MAX_CALLBACK_BYTES:
        raise ValueError(f"callback data over {MAX_CALLBACK_BYTES} bytes: {data!r}")
    return {"text": text, "callback_data": data}


def url_button(text: str, url: str) -> Button:
    return {"text": text, "url": url}


def keyboard(*rows: Sequence[Button]) -> Keyboard:
    return {"inline_keyboard": [list(row) for row in rows if row]}


def parse_callback(data: str) -> tuple[str, list[str]]:
    verb, *args = data.split(":")
    return verb, args


def main_menu(t: Callable[[str], str], *, trial_eligible: bool, has_subscription: bool) -> Keyboard:
    return keyboard(
        [button(t("menu.subscription"), "sub"), button(t("menu.payments"), "pays")],
        [button(t("menu.renew") if has_subscription else t("menu.buy"), "buy")],
        [button(t("menu.trial"), "trial")] if trial_eligible else [],
        [button(t("menu.promo"), "promo"), button(t("menu.invite"), "invite")],
        [button(t("menu.gifts"), "gifts")],
        [button(t("menu.language"), "lang"), button(t("menu.help"), "help")],
        [button(t("menu.support"), "support")],
    )


def back_to_menu(t: Callable[[str], str]) -> Keyboard:
    return keyboard([button(t("common.menu"), "menu")])


def languages(t: Callable[[str], str]) -> Keyboard:
    """Each language in its own name, two per row (the names are never translated)."""
    choices = [button(name, f"lang:{code}") for code, name in LANGUAGE_NAMES.items()]
    return keyboard(*(choices[i : i + 2] for i in range(0, len(choices), 2)), [button(t("common.back"), "menu")])
