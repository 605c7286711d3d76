"""The reference bot: aiogram 3 + asyncpg, written the way the seed's bots are, doing vpnd's menu work.

Per update, like vpnd: upsert the user (the same SQL, same tables), read what the main menu depends
on (trial eligibility, current subscription), and answer with the same text and inline keyboard,
HTML, no link preview. `/start` replies with a new message; the `help` and `menu` buttons edit the
message they are on and answer the callback query. Conversation state is aiogram's default
in-memory FSM storage (cleared on a command, as vpnd clears its durable state).

What it does *not* do, and vpnd does: record each update in a durable inbox before confirming it,
record its outcome, order updates per chat, bound concurrency, rate-limit outbound messages. The
benchmark measures what those cost.

    python -m bench.baseline_aiogram --api http://127.0.0.1:PORT --token TOKEN --dsn postgresql://...
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import logging
import secrets
from pathlib import Path
from typing import Any

import asyncpg
from aiogram import Bot, Dispatcher, F, Router
from aiogram.client.default import DefaultBotProperties
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.filters import CommandStart
from aiogram.fsm.context import FSMContext
from aiogram.types import CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, LinkPreviewOptions, Message

LOCALES = Path(__file__).resolve().parents[2] / "vpnd" / "locales"
NO_PREVIEW = LinkPreviewOptions(is_disabled=True)

UPSERT_USER = """
INSERT INTO users (id, username, first_name, language, referral_code)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (id) DO UPDATE SET
    username = EXCLUDED.username,
    first_name = EXCLUDED.first_name,
    reachable = true,
    updated_at = now()
RETURNING id, language, balance_minor, (xmax = 0) AS created
"""
TRIAL_ELIGIBLE = (
    "SELECT NOT EXISTS (SELECT 1 FROM trials WHERE user_id = $1) "
    "AND NOT EXISTS (SELECT 1 FROM subscriptions WHERE user_id = $1)"
)
SUBSCRIPTION = (
    "SELECT user_id, kind, status, uuid, sub_token, plan_code, starts_at, expires_at, auto_renew "
    "FROM subscriptions WHERE user_id = $1"
)


class Texts:
    def __init__(self) -> None:
        self.catalogs = {lang: json.loads((LOCALES / f"{lang}.json").read_text("utf-8")) for lang in ("en", "ru")}

    def language(self, code: str | None) -> str:
        base = (code or "").split("-")[0].lower()
        return base if base in self.catalogs else "en"

    def get(self, lang: str, key: str, **values: object) -> str:
        template = self.catalogs.get(lang, {}).get(key) or self.catalogs["en"][key]
        return (
            template.format(**{k: html.escape(str(v), quote=False) for k, v in values.items()}) if values else template
        )


def button(text: str, data: str) -> InlineKeyboardButton:
    return InlineKeyboardButton(text=text, callback_data=data)


def main_menu(t: Any, *, trial_eligible: bool, has_subscription: bool) -> InlineKeyboardMarkup:
    rows = [
        [button(t("menu.subscription"), "sub")],
        [button(t("menu.renew") if has_subscription else t("menu.buy"), "buy")],
        [button(t("menu.trial"), "trial")] if trial_eligible else [],
        [button(t("menu.promo"), "promo"), button(t("menu.invite"), "invite")],
        [button(t("menu.language"), "lang"), button(t("menu.help"), "help")],
    ]
    return InlineKeyboardMarkup(inline_keyboard=[row for row in rows if row])


def build_router(pool: asyncpg.Pool, texts: Texts) -> Router:
    router = Router()

    async def upsert(user: Any) -> asyncpg.Record:
        language = texts.language(user.language_code)
        referral_code = secrets.token_urlsafe(6).replace("-", "x").replace("_", "y")
        return await pool.fetchrow(
            UPSERT_USER, user.id, user.username, (user.first_name or "")[:256], language, referral_code
        )

    async def menu(user_id: int, lang: str, balance_minor: int, prefix: str) -> tuple[str, InlineKeyboardMarkup]:
        async with pool.acquire() as conn:
            eligible = await conn.fetchval(TRIAL_ELIGIBLE, user_id)
            subscription = await conn.fetchrow(SUBSCRIPTION, user_id)

        def t(key: str, **values: object) -> str:
            return texts.get(lang, key, **values)

        text = t("menu.title")
        if balance_minor:
            text += "\n" + t("menu.balance", balance=f"{balance_minor / 100:.2f} USD")
        if prefix:
            text = prefix + "\n\n" + text
        return text, main_menu(t, trial_eligible=bool(eligible), has_subscription=subscription is not None)

    @router.message(CommandStart())
    async def start(message: Message, state: FSMContext) -> None:
        assert message.from_user is not None
        row = await upsert(message.from_user)
        await state.clear()
        greeting = texts.get(row["language"], "start.welcome", name=message.from_user.first_name or "friend")
        text, keyboard = await menu(row["id"], row["language"], row["balance_minor"], greeting)
        await message.answer(text, reply_markup=keyboard, link_preview_options=NO_PREVIEW)

    @router.callback_query(F.data == "menu")
    async def menu_button(query: CallbackQuery) -> None:
        row = await upsert(query.from_user)
        text, keyboard = await menu(row["id"], row["language"], row["balance_minor"], "")
        if isinstance(query.message, Message):
            await query.message.edit_text(text, reply_markup=keyboard, link_preview_options=NO_PREVIEW)
        await query.answer()

    @router.callback_query(F.data == "help")
    async def help_button(query: CallbackQuery) -> None:
        row = await upsert(query.from_user)
        text = texts.get(row["language"], "help.text", support="@support")
        keyboard = InlineKeyboardMarkup(inline_keyboard=[[button(texts.get(row["language"], "common.menu"), "menu")]])
        if isinstance(query.message, Message):
            await query.message.edit_text(text, reply_markup=keyboard, link_preview_options=NO_PREVIEW)
        await query.answer()

    return router


async def run(api: str, token: str, dsn: str, pool_size: int, concurrency: int | None) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=min(2, pool_size), max_size=pool_size)
    try:
        session = AiohttpSession(api=TelegramAPIServer.from_base(api))
        bot = Bot(token, session=session, default=DefaultBotProperties(parse_mode="HTML"))
        dispatcher = Dispatcher()
        dispatcher.include_router(build_router(pool, Texts()))
        await dispatcher.start_polling(bot, polling_timeout=10, tasks_concurrency_limit=concurrency)
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", required=True, help="Bot API base URL (the fake's), without /bot")
    parser.add_argument("--token", required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--pool-size", type=int, default=10, help="asyncpg pool size (vpnd's pool_max default)")
    parser.add_argument("--concurrency", type=int, default=None, help="aiogram tasks_concurrency_limit (default none)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args.api, args.token, args.dsn, args.pool_size, args.concurrency))


if __name__ == "__main__":
    main()
