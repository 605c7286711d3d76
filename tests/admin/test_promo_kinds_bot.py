"""A promo code of any kind made in /admin by typing its kind: CODE KIND VALUE [MAX_USES] [DAYS_VALID]."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from tests.admin.harness import ADMIN, start_admin_vpnd
from tests.harness import bot_config, has_button, press, say, sql, text_has
from vpnd_sandbox.telegram_fake import FakeTelegram


async def test_admin_types_a_kind_and_the_list_shows_what_each_code_does(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_admin_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ADMIN, "Admin", language_code="en")
    with trio.fail_after(40):
        menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:pr"))
        promos = await press(fake, ADMIN, menu, "adm:pr", predicate=text_has("No promo codes"))
        await press(fake, ADMIN, promos, "adm:pn", predicate=text_has("KIND VALUE"))
        for garbage in ("X days 0", "X coupon 5", "X amount 1.234", "X percent 101", "X balance"):
            await say(fake, ADMIN, garbage, predicate=text_has("Send it as"))
        listed = await say(fake, ADMIN, "back amount 2.50 50 30", predicate=text_has("Created BACK: −2.50 USD."))
        assert "BACK −2.50 USD · used 0/50" in (listed.text or "")
        await press(fake, ADMIN, listed, "adm:pn", predicate=text_has("KIND VALUE"))
        listed = await say(fake, ADMIN, "WEEK days 7", predicate=text_has("Created WEEK: +7 days."))
        await press(fake, ADMIN, listed, "adm:pn", predicate=text_has("KIND VALUE"))
        listed = await say(fake, ADMIN, "CASH Balance 5", predicate=text_has("Created CASH: +5.00 USD balance."))
        await press(fake, ADMIN, listed, "adm:pn", predicate=text_has("KIND VALUE"))
        listed = await say(fake, ADMIN, "OLD 15", predicate=text_has("Created OLD: −15%."))
        assert "WEEK +7 days · used 0/" in (listed.text or "") and "CASH +5.00 USD balance" in (listed.text or "")
    rows = sql(db_dsn, "SELECT code, kind, percent, amount_minor, currency, grant_days FROM promo_codes ORDER BY code")
    assert rows == [
        ("BACK", "amount", None, 250, "USD", None),
        ("CASH", "balance", None, 500, "USD", None),
        ("OLD", "percent", 15, None, None, None),
        ("WEEK", "days", None, None, None, 7),
    ]
    await vpnd.stop()
