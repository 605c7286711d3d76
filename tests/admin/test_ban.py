"""Banning a user (issue 20): through the CLI and the admin bot, against the whole daemon, the fake Xray
and the fake Bot API. A banned user's key leaves Xray within a second, the bot answers them nothing,
their subscription URL is gone, an invoice sent before the ban is refused at pre-checkout; an unban
gives all of it back (the subscription kept its expiry)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import trio

from tests.admin.harness import start_admin_vpnd
from tests.harness import bot_config, button, cli_result, has_button, press, say, sql, start_vpnd, text_has, vpnd_cli
from tests.telegram.test_card import ALICE, card_config, card_invoice
from tests.telegram.test_flows import forge_callback
from tests.test_notify import add_users, daemon_with_xray, emails, until, vpnd_admin
from vpnd_sandbox.telegram_fake import FakeTelegram

USER = 5101
ADMIN = 1  # bot_config's [telegram].admin_ids
#: The issue's promise: a banned user's key is gone from Xray within a second of the commit.
WITHIN = 1.0


def handled_updates(dsn: str, chat_id: int) -> int:
    query = "SELECT count(*) FROM telegram_inbox WHERE chat_id = %s AND handled_at IS NOT NULL"
    return int(sql(dsn, query, chat_id)[0][0])


async def test_ban_takes_the_key_off_xray_at_once_and_silences_the_bot(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    fake, _ = fake_telegram
    add_users(db_dsn, USER, 1, days=30)
    fake.add_user(USER, "Mallory").started = True
    [(token, expires_before)] = sql(db_dsn, "SELECT sub_token, expires_at FROM subscriptions WHERE user_id = %s", USER)
    cli_config = write_config(name="cli.toml", database={"dsn": db_dsn}, telegram={"admin_ids": [ADMIN]})
    async with daemon_with_xray(nursery, fake_telegram, db_dsn, write_config, tmp_path) as (vpnd, xray):
        await until(lambda: f"u{USER}" in emails(xray), 10)
        sub_url = f"{vpnd.http_url}/sub/{token}"
        async with httpx.AsyncClient() as http:
            assert (await http.get(sub_url)).status_code == 200
            with trio.fail_after(10):
                fake.user_sends(USER, "/start")
                menu = await fake.wait_for_bot_message(USER)

            out = await vpnd_admin(cli_config, "ban", str(USER), "--reason", "chargeback fraud")
            assert f"banned user {USER}" in out
            took = await until(lambda: f"u{USER}" not in emails(xray), WITHIN)
            print(f"ban reached Xray in {took:.3f}s")

            seen = len(fake.bot_messages(USER))
            handled = handled_updates(db_dsn, USER)
            fake.user_sends(USER, "/start")
            fake.user_presses_button(USER, menu.message_id, "sub")
            fake.user_sends(USER, "hello?")
            await until(lambda: handled_updates(db_dsn, USER) == handled + 3, 10)
            assert len(fake.bot_messages(USER)) == seen  # nothing at all
            assert (await http.get(sub_url)).status_code == 404  # as if it never existed

            # Nothing else puts the key back: another writer pass still leaves them out.
            vpnd.app.xray_changed.nudge()
            await trio.sleep(0.5)
            assert f"u{USER}" not in emails(xray)

            out = await vpnd_admin(cli_config, "unban", str(USER))
            assert f"unbanned user {USER}" in out
            await until(lambda: f"u{USER}" in emails(xray), WITHIN)
            assert (await http.get(sub_url)).status_code == 200
            with trio.fail_after(10):
                fake.user_sends(USER, "/start")
                again = await fake.wait_for_bot_message(USER, lambda m: m.message_id != menu.message_id)
            assert "sub" in again.callback_data
    assert sql(db_dsn, "SELECT expires_at FROM subscriptions WHERE user_id = %s", USER) == [(expires_before,)]
    audit = sql(db_dsn, "SELECT action, target, result, details ->> 'reason' FROM admin_audit ORDER BY id")
    assert audit == [("ban", str(USER), "ok", "chargeback fraud"), ("unban", str(USER), "ok", None)]


def test_cli_refuses_to_ban_an_admin_or_nobody_and_says_when_nothing_changed(
    db_dsn: str, write_config: Callable[..., Path]
) -> None:
    add_users(db_dsn, USER, 1)
    add_users(db_dsn, ADMIN, 1)
    run = vpnd_cli(write_config(database={"dsn": db_dsn}, telegram={"admin_ids": [ADMIN]}))

    admin = run("admin", "ban", str(ADMIN))
    assert admin.returncode == 1 and "is an admin" in admin.stderr
    nobody = run("admin", "ban", "999999")
    assert nobody.returncode == 1 and "no user 999999" in nobody.stderr
    assert run("admin", "unban", str(USER)).stdout.strip().endswith("nothing changed")

    first = cli_result(run("admin", "ban", str(USER), "--json", "--reason", "x" * 500))
    assert first["changed"] is True and first["banned_at"] is not None
    again = cli_result(run("admin", "ban", str(USER), "--json"))
    assert again["changed"] is False
    assert "banned:" in run("admin", "user", str(USER)).stdout
    [(reason,)] = sql(db_dsn, "SELECT ban_reason FROM users WHERE id = %s", USER)
    assert reason == "x" * 200  # bounded
    results = sql(db_dsn, "SELECT action, result FROM admin_audit WHERE action LIKE '%%ban' ORDER BY id")
    assert results == [("ban", "admin"), ("ban", "not_found"), ("unban", "ok"), ("ban", "ok"), ("ban", "ok")]


async def test_admin_bot_bans_with_a_confirmation_that_works_once(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    add_users(db_dsn, USER, 1, days=30)
    fake.add_user(ADMIN, "Admin")
    vpnd = await start_admin_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    with trio.fail_after(30):
        menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:fu"))
        await press(fake, ADMIN, menu, "adm:fu", predicate=text_has("user id or @username"))
        card = await say(fake, ADMIN, str(USER), predicate=has_button(f"adm:bn1:{USER}:on"))
        confirm = await press(fake, ADMIN, card, f"adm:bn1:{USER}:on", predicate=has_button("adm:bnc:"))
        assert "Ban user" in (confirm.text or "")
        data = button(confirm, f"adm:bnc:{USER}:on:")
        card = await press(fake, ADMIN, confirm, data, predicate=text_has(f"User {USER} banned"))
        assert f"adm:bn1:{USER}:off" in card.callback_data and "banned since" in (card.text or "")
        forge_callback(fake, ADMIN, confirm, data)  # the same confirmation again
        await fake.wait_for_bot_message(ADMIN, text_has("Already done"))

        # An admin cannot be banned, even with a hand-made button.
        forge_callback(fake, ADMIN, card, f"adm:bnc:{ADMIN}:on:0123abcd")
        await fake.wait_for_bot_message(ADMIN, text_has("is an admin"))
    assert sql(db_dsn, "SELECT action, result FROM admin_audit WHERE action = 'ban' ORDER BY id") == [
        ("ban", "ok"),
        ("ban", "admin"),
    ]
    assert sql(db_dsn, "SELECT banned_at IS NOT NULL FROM users WHERE id = %s", USER) == [(True,)]
    await vpnd.stop()


async def test_an_invoice_sent_before_the_ban_is_refused_at_pre_checkout(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, card_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ALICE, "Alice")
    with trio.fail_after(30):
        invoice = await card_invoice(fake)
        run = vpnd_cli(write_config(name="cli.toml", database={"dsn": db_dsn}))
        assert (await trio.to_thread.run_sync(run, "admin", "ban", str(ALICE))).returncode == 0
        fake.user_pays_invoice(ALICE, invoice.message_id)
        answered = fake.pre_checkout_queries.values
        await fake.wait_until(lambda: [q.ok for q in answered()] in ([True], [False]), timeout=10)
    assert [q.ok for q in fake.pre_checkout_queries.values()] == [False]
    assert sql(db_dsn, "SELECT count(*) FROM payments") == [(0,)]
    await vpnd.stop()
