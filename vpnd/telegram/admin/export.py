"""CSV exports of users and payments, sent to the admin as a document."""

from __future__ import annotations

import io
import tempfile
from typing import Any

import psycopg
import telegram

from vpnd.services import admin_actions as actions
from vpnd.telegram.admin.common import CallbackAction, actor
from vpnd.telegram.admin.verbs import Press, Verb
from vpnd.telegram.turn import Turn


def build_csv(conn: psycopg.Connection[Any], who: actions.Actor, kind: str) -> tuple[bytes, int]:
    """Write the export to a temporary file (in the database worker thread) and return its bytes."""
    with tempfile.TemporaryFile("w+b") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        rows = actions.export_csv(conn, who, kind, text)
        text.flush()
        raw.seek(0)
        content = raw.read()
        text.detach()
    return content, rows


async def export_csv(turn: Turn, press: Press) -> None:
    kind = press.args[0]
    what = turn.t(f"admin.export.{kind}")
    await turn.answer(turn.t("admin.export.started", what=what))
    content, rows = await turn.app.db.run(build_csv, actor(turn), kind)
    chat_id = turn.chat_id
    document = telegram.InputFile(content, filename=f"{kind}.csv")
    caption = turn.t("admin.export.done", what=what, rows=rows)
    bot = turn.ctx.bot

    async def send() -> telegram.Message:
        return await bot.send_document(chat_id, document, caption=caption, parse_mode="HTML")

    await turn.ctx.sender.call(chat_id, send)


CALLBACKS: dict[Verb, CallbackAction] = {Verb.EXPORT: export_csv}
