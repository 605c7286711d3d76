"""Support texts as values (pure): the operator's contact as a link, and HTML that fits Telegram's limit."""

from __future__ import annotations

import html
import re
from collections.abc import Callable

#: Telegram's limit on a message's text, in UTF-16 code units after entities are parsed.
MAX_TEXT = 4096

_TAG = re.compile(r"<[^>]*>")
_USERNAME = re.compile(r"@([A-Za-z][A-Za-z0-9_]{3,31})")


def contact_url(contact: str) -> str | None:
    """`[telegram] support_contact` as a URL button's target: "@name" → https://t.me/name, an https URL as
    it is; anything else (an e-mail, a phone number) has no button and is only shown as text."""
    contact = contact.strip()
    match = _USERNAME.fullmatch(contact)
    if match:
        return f"https://t.me/{match[1]}"
    if contact.startswith("https://") and " " not in contact:
        return contact
    return None


def utf16_len(text: str) -> int:
    return sum(2 if ord(char) > 0xFFFF else 1 for char in text)


def visible_len(markup: str) -> int:
    """The length Telegram counts for an HTML message: tags removed, entities decoded."""
    return utf16_len(html.unescape(_TAG.sub("", markup)))


def cut_utf16(text: str, units: int) -> str:
    """The longest prefix of `text` of at most `units` UTF-16 code units (never half a character)."""
    used = 0
    for index, char in enumerate(text):
        used += 2 if ord(char) > 0xFFFF else 1
        if used > units:
            return text[:index]
    return text


def fit_html(render: Callable[[str], str], text: str, note: str, limit: int = MAX_TEXT) -> str:
    """`render(escaped text)`, with `text` cut so the message stays within Telegram's limit; a cut text
    ends with "…" and `note` (plain text, escaped here) on its own line."""
    full = render(html.escape(text, quote=False))
    if visible_len(full) <= limit:
        return full
    overhead = visible_len(render("")) + utf16_len(note) + 2  # "…" and the newline
    kept = cut_utf16(text, max(0, limit - overhead))
    return render(html.escape(kept, quote=False) + "…\n<i>" + html.escape(note, quote=False) + "</i>")
