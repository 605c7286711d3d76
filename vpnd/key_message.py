"""The key message (pure): one photo with the QR code of the subscription URL, the confirmation that
granted it, the URL to copy, and the "Connect a device" / "My subscription" buttons.

Sent right after a trial is granted (`vpnd.telegram.flows.access.trial`) and, through the outbox, right
after a payment that grants or extends a subscription: finalize queues the row with method
`vpnd.db.outbox.KEY_METHOD` and the confirmation as its text; the outbox sender reads the subscription's
current token and draws the QR code at send time (no image is stored), or sends the plain text when the
key cannot be built.
"""

from __future__ import annotations

import html

from vpnd.telegram import keyboards as kb
from vpnd.texts import Texts

#: Telegram's limit on a photo caption, in characters after entity parsing (the HTML is longer, so safe).
CAPTION_LIMIT = 1024


def subscription_url(public_base_url: str, sub_token: str) -> str:
    return f"{public_base_url.rstrip('/')}/sub/{sub_token}"


def key_caption(texts: Texts, lang: str, confirmation: str, url: str) -> str | None:
    """The photo's caption: the confirmation (HTML) and the URL in <code>; None when over Telegram's limit."""
    caption = confirmation + "\n\n" + texts.get(lang, "connect.key_link", url=url)
    return caption if len(caption) <= CAPTION_LIMIT else None


def key_keyboard(texts: Texts, lang: str) -> kb.Keyboard:
    return kb.keyboard(
        [kb.button(texts.get(lang, "connect.button"), "conn")],
        [kb.button(texts.get(lang, "menu.subscription"), "sub")],
    )


def code(text: str) -> str:
    """`text` as HTML <code> (escaped)."""
    return f"<code>{html.escape(text, quote=False)}</code>"
