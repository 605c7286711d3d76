"""Rich broadcasts through the fake Bot API, the database and the CLI: media by file_id with a caption,
URL and "go to plan" buttons, the test send, the new segments (and who every segment leaves out),
language versions, scheduled sends (cancelled before the start; set before a restart, fired once after
it), and the delivery report (403 → blocked and skipped next time; the CSV)."""

from __future__ import annotations

import csv
import datetime as dt
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest
import trio

from tests.admin.harness import ADMIN, give_subscription, seed_users, start_admin_vpnd
from tests.harness import (
    bot_config,
    cli_result,
    has_button,
    press,
    say,
    sql,
    start_daemon,
    text_has,
    vpnd_cli,
    wait_ready,
)
from vpnd.config import ConfigError, load_config
from vpnd.db import broadcasts as bdb
from vpnd.telegram.admin.broadcasts import BadButtons, parse_buttons, parse_start_at
from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram


def is_media(message: ChatMessage) -> bool:
    return any(x is not None for x in (message.photo, message.video, message.document, message.animation))


async def compose(fake: FakeTelegram, *, media: str | None, caption: str, buttons: str | None) -> ChatMessage:
    """The admin composes up to the segment keyboard; returns it."""
    menu = await say(fake, ADMIN, "/admin", predicate=has_button("adm:bc"))
    await press(fake, ADMIN, menu, "adm:bc", predicate=text_has("broadcast text"))
    if media is None:
        ask = await say(fake, ADMIN, caption, predicate=has_button("adm:bn"))
    else:
        fake.user_sends_media(ADMIN, media, caption=caption)  # type: ignore[arg-type]
        ask = await fake.wait_for_bot_message(ADMIN, has_button("adm:bn"))
    if buttons is None:
        return await press(fake, ADMIN, ask, "adm:bn", predicate=has_button("adm:bs:"))
    return await say(fake, ADMIN, buttons, predicate=has_button("adm:bs:"))


# --- media, buttons, the test send ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["photo", "video", "document", "animation"])
async def test_media_broadcast_with_url_and_plan_buttons_and_a_test_send_first(
    kind: str,
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, broadcast={"progress_interval": 0.5})
    users = seed_users(db_dsn, fake, 10_000, 5)
    vpnd = await start_admin_vpnd(nursery, config)
    fake.add_user(ADMIN, "Admin")
    with trio.fail_after(60):
        segments = await compose(
            fake, media=kind, caption="<b>Winter sale</b> −30%", buttons="Site - https://example.com\nBuy now - plan:m1"
        )
        preview = [m for m in fake.bot_messages(ADMIN) if is_media(m)]
        assert len(preview) == 2  # the media preview, then again with the buttons
        confirm = await press(fake, ADMIN, segments, "adm:bs:all", predicate=has_button("adm:bgo:"))
        assert "6 recipients" in (confirm.text or "")  # five users and the admin
        test = await press(fake, ADMIN, confirm, "adm:bt:", predicate=has_button("adm:bgo:"))
        assert "only to you" in (test.text or "")
        assert len([m for m in fake.bot_messages(ADMIN) if is_media(m)]) == 3
        assert sql(db_dsn, "SELECT count(*) FROM broadcasts") == [(0,)]  # a test is no broadcast
        assert all(not fake.bot_messages(uid) for uid in users)  # and nobody else saw it
        await press(fake, ADMIN, test, "adm:bgo:", predicate=has_button("adm:bp:"))
        await fake.wait_until(lambda: all(any(is_media(m) for m in fake.bot_messages(uid)) for uid in users), 30)
        await fake.wait_for_bot_message(ADMIN, text_has("skipped of"), timeout=15)
    sent = [fake.bot_messages(uid)[-1] for uid in users]
    stored = getattr(preview[0], kind)
    for message in sent:
        media = getattr(message, kind)
        assert media is not None and media.file_id == stored.file_id  # sent on by Telegram's file_id
        assert message.caption == "Winter sale −30%" and message.caption_entities[0]["type"] == "bold"
        assert message.buttons == [
            {"text": "Site", "url": "https://example.com"},
            {"text": "Buy now", "callback_data": "plan:m1"},
        ]
    assert sql(db_dsn, "SELECT status, count(*) FROM broadcast_recipients GROUP BY status") == [("sent", 6)]
    assert sql(db_dsn, "SELECT media_kind FROM broadcasts") == [(kind,)]
    # The "go to plan" button opens that plan's purchase screen for the recipient.
    fake.user_presses_button(users[0], sent[0].message_id, "plan:m1")
    await fake.wait_for_bot_message(users[0], lambda m: m.message_id != sent[0].message_id)
    await vpnd.stop()


def test_buttons_are_parsed_line_by_line_and_plans_must_exist() -> None:
    plans = frozenset({"m1"})
    assert parse_buttons("A - https://a.example\nB | https://b.example\n\nC - plan:m1", plans) == [
        {"text": "A", "url": "https://a.example"},
        {"text": "B", "url": "https://b.example"},
        {"text": "C", "plan": "m1"},
    ]
    for bad in ["no url here", "X - plan:nope", "X - javascript:alert(1)", "", "\n".join(["A - https://a.b"] * 9)]:
        with pytest.raises(BadButtons):
            parse_buttons(bad, plans)


async def test_the_fake_sends_media_by_file_id_like_telegram(fake_telegram: tuple[FakeTelegram, str]) -> None:
    fake, base_url = fake_telegram
    fake.add_user(500, "Alice").started = True
    photo = fake.user_sends_media(500, "photo", caption="hi")
    assert photo.photo is not None
    url = f"{base_url}/bot{fake.token}"
    markup = {"inline_keyboard": [[{"text": "Go", "url": "https://example.com"}]]}
    async with httpx.AsyncClient(timeout=10) as http:
        ok = await http.post(
            f"{url}/sendPhoto",
            json={
                "chat_id": 500,
                "photo": photo.photo.file_id,
                "caption": "<i>again</i>",
                "parse_mode": "HTML",
                "reply_markup": markup,
            },
        )
        result = ok.json()["result"]
        assert result["photo"][0]["file_id"] == photo.photo.file_id and result["caption"] == "again"
        assert result["reply_markup"] == markup
        bad = await http.post(f"{url}/sendVideo", json={"chat_id": 500, "video": "no-such-file"})
        assert bad.status_code == 400 and "wrong file identifier" in bad.json()["description"]
        wrong_kind = await http.post(f"{url}/sendAnimation", json={"chat_id": 500, "animation": photo.photo.file_id})
        assert wrong_kind.status_code == 400
        broken = await http.post(
            f"{url}/sendPhoto",
            json={"chat_id": 500, "photo": photo.photo.file_id, "caption": "<b>open", "parse_mode": "HTML"},
        )
        assert broken.status_code == 400 and "can't parse entities" in broken.json()["description"]


# --- segments ---------------------------------------------------------------------------------------


def pay(dsn: str, user_ids: list[int], days_ago: int) -> None:
    sql(
        dsn,
        "INSERT INTO purchases (user_id, kind, plan_code, days, method, amount_minor, currency, status, "
        "expires_at, paid_at) SELECT u, 'plan', 'm1', 30, 'stars', 100, 'XTR', 'paid', now(), "
        "now() - %s * interval '1 day' FROM unnest(%s::bigint[]) u",
        days_ago,
        user_ids,
    )


def members(dsn: str, segment: bdb.Segment) -> list[int]:
    with psycopg.connect(dsn) as conn:
        broadcast = bdb.create_broadcast(conn, created_by=1, text="x", segment=segment)
        rows = conn.execute(
            "SELECT user_id FROM broadcast_recipients WHERE broadcast_id = %s ORDER BY user_id", (broadcast.id,)
        ).fetchall()
        assert bdb.count_segment(conn, segment) == len(rows) == broadcast.total
    return [r[0] for r in rows]


def test_new_segments_and_every_segment_leaves_out_banned_and_unreachable(db_dsn: str) -> None:
    russian = seed_users(db_dsn, None, 1000, 3)
    sql(db_dsn, "UPDATE users SET language = 'ru' WHERE id = ANY(%s)", russian)
    on_m1 = seed_users(db_dsn, None, 2000, 2)
    give_subscription(db_dsn, on_m1, kind="paid")
    sql(db_dsn, "UPDATE subscriptions SET plan_code = 'm1' WHERE user_id = ANY(%s)", on_m1)
    lapsed = seed_users(db_dsn, None, 3000, 2)
    give_subscription(db_dsn, lapsed, kind="paid")
    sql(db_dsn, "UPDATE subscriptions SET expires_at = now() - interval '3 days' WHERE user_id = ANY(%s)", lapsed)
    long_lapsed = seed_users(db_dsn, None, 4000, 1)
    give_subscription(db_dsn, long_lapsed, kind="paid")
    sql(db_dsn, "UPDATE subscriptions SET expires_at = now() - interval '40 days' WHERE user_id = ANY(%s)", long_lapsed)
    pay(db_dsn, on_m1, days_ago=2)
    pay(db_dsn, lapsed, days_ago=60)
    # Each group has one banned and one unreachable twin that no segment may contain.
    banned = seed_users(db_dsn, None, 9000, 1)
    unreachable = seed_users(db_dsn, None, 9100, 1)
    for group in (banned, unreachable):
        sql(db_dsn, "UPDATE users SET language = 'ru' WHERE id = ANY(%s)", group)
        give_subscription(db_dsn, group, kind="paid")
        sql(db_dsn, "UPDATE subscriptions SET plan_code = 'm1' WHERE user_id = ANY(%s)", group)
        pay(db_dsn, group, days_ago=1)
    sql(db_dsn, "UPDATE users SET banned_at = now() WHERE id = ANY(%s)", banned)
    sql(db_dsn, "UPDATE users SET reachable = false WHERE id = ANY(%s)", unreachable)

    assert members(db_dsn, bdb.Segment.parse("lang", arg="ru")) == russian
    assert members(db_dsn, bdb.Segment.parse("plan", arg="m1")) == on_m1
    assert members(db_dsn, bdb.Segment.parse("expired", 7)) == lapsed
    assert members(db_dsn, bdb.Segment.parse("expired", 90)) == lapsed + long_lapsed
    assert members(db_dsn, bdb.Segment.parse("paid", 7)) == on_m1
    assert members(db_dsn, bdb.Segment.parse("paid", 90)) == on_m1 + lapsed
    assert members(db_dsn, bdb.Segment.parse("neverpaid")) == russian + long_lapsed
    assert members(db_dsn, bdb.Segment.parse("trial")) == []
    everyone = members(db_dsn, bdb.Segment.parse("all"))
    assert not set(everyone) & set(banned + unreachable)
    for words in (["lang", "ru;drop"], ["lang"], ["paid", "x"], ["paid", "0"], ["neverpaid", "1"], ["nope"]):
        with pytest.raises(bdb.BadSegment):
            bdb.Segment.from_words(words)


# --- language versions ------------------------------------------------------------------------------


async def test_each_recipient_gets_their_language_version_or_the_default(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, broadcast={"progress_interval": 0.5})
    english = seed_users(db_dsn, fake, 10_000, 3)
    russian = seed_users(db_dsn, fake, 20_000, 3)
    sql(db_dsn, "UPDATE users SET language = 'ru' WHERE id = ANY(%s)", russian)
    vpnd = await start_admin_vpnd(nursery, config)
    fake.add_user(ADMIN, "Admin")
    with trio.fail_after(60):
        segments = await compose(fake, media=None, caption="Hello there", buttons=None)
        confirm = await press(fake, ADMIN, segments, "adm:bs:all", predicate=has_button("adm:bv:"))
        ask = await press(fake, ADMIN, confirm, "adm:bv:", predicate=text_has("language code"))
        refused = await say(fake, ADMIN, "xx\nnope", predicate=text_has("language code"))
        assert refused.message_id != ask.message_id
        confirm = await say(fake, ADMIN, "ru\n<b>Привет</b>", predicate=has_button("adm:bgo:"))
        assert "ru" in (confirm.text or "")
        await press(fake, ADMIN, confirm, "adm:bgo:", predicate=has_button("adm:bp:"))
        await fake.wait_for_bot_message(ADMIN, text_has("skipped of"), timeout=30)
    for uid in english:
        assert [m.text for m in fake.bot_messages(uid)] == ["Hello there"]
    for uid in russian:
        assert [m.text for m in fake.bot_messages(uid)] == ["Привет"]
    await vpnd.stop()


# --- scheduled sends --------------------------------------------------------------------------------


def test_start_at_is_read_in_the_operator_time_zone() -> None:
    now = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
    when = parse_start_at("2026-06-01 18:30", "Europe/Berlin", now)
    assert when == dt.datetime(2026, 6, 1, 16, 30, tzinfo=dt.UTC)  # CEST is UTC+2
    assert parse_start_at("2026-06-01 13:00", "UTC", now) == dt.datetime(2026, 6, 1, 13, 0, tzinfo=dt.UTC)
    for bad in ["2026-06-01 11:59", "2026-02-30 10:00", "tomorrow", "2026-06-01 25:00", "2028-01-01 00:00"]:
        assert parse_start_at(bad, "UTC", now) is None, bad


def test_a_bad_time_zone_names_the_key_and_the_file(write_config: Callable[..., Path]) -> None:
    path = write_config(broadcast={"timezone": "Mars/Olympus"})
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert "[broadcast].timezone" in str(caught.value) and str(path.name) in str(caught.value)
    ok = write_config(broadcast={"timezone": "Asia/Tehran"}, name="ok.toml")
    assert load_config(ok, environ={}).broadcast.timezone == "Asia/Tehran"


async def schedule(fake: FakeTelegram, text: str, when: str) -> ChatMessage:
    segments = await compose(fake, media=None, caption=text, buttons=None)
    confirm = await press(fake, ADMIN, segments, "adm:bs:all", predicate=has_button("adm:bsc:"))
    await press(fake, ADMIN, confirm, "adm:bsc:", predicate=text_has("When should it start"))
    await say(fake, ADMIN, "tomorrow-ish", predicate=text_has("not a time in the future"))
    fake.user_sends(ADMIN, when)
    return await fake.wait_for_bot_message(ADMIN, has_button("adm:bx:"))


async def test_a_scheduled_broadcast_can_be_cancelled_before_it_starts(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, broadcast={"timezone": "Asia/Tokyo"})
    users = seed_users(db_dsn, fake, 10_000, 3)
    vpnd = await start_admin_vpnd(nursery, config)
    fake.add_user(ADMIN, "Admin")
    tokyo = dt.datetime.now(dt.UTC).astimezone(dt.timezone(dt.timedelta(hours=9))) + dt.timedelta(minutes=2)
    with trio.fail_after(60):
        scheduled = await schedule(fake, "Later news", tokyo.strftime("%Y-%m-%d %H:%M"))
        assert "scheduled for" in (scheduled.text or "") and "Asia/Tokyo" in (scheduled.text or "")
        start_at, status = sql(db_dsn, "SELECT start_at, status FROM broadcasts")[0]
        assert status == "scheduled" and start_at == tokyo.replace(second=0, microsecond=0)
        assert sql(db_dsn, "SELECT count(*) FROM broadcast_recipients") == [(0,)]
        listed = cli_result(vpnd_cli(Path(config.path))("broadcast", "list", "--json"))
        assert listed[0]["broadcast"]["status"] == "scheduled"
        cancelled = await press(fake, ADMIN, scheduled, "adm:bx:", predicate=text_has("cancelled"))
        assert cancelled is not None
        sql(db_dsn, "UPDATE broadcasts SET start_at = now() - interval '1 second'")  # its time passes
        await trio.sleep(1.5)  # three supervisor rounds
    assert sql(db_dsn, "SELECT status FROM broadcasts") == [("cancelled",)]
    assert all(not fake.bot_messages(uid) for uid in users)
    await vpnd.stop()


async def test_a_scheduled_broadcast_set_before_a_restart_fires_once_after_it(
    fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path], tmp_path: Path
) -> None:
    fake, base_url = fake_telegram
    port = free_port()
    config = write_config(
        telegram={
            "token": fake.token,
            "api_base_url": base_url,
            "poll_timeout": 1,
            "admin_ids": [ADMIN],
            "rate_per_second": 50.0,
        },
        database={"dsn": db_dsn, "pool_min": 1, "pool_max": 6},
        http={"listen": f"127.0.0.1:{port}"},
        shutdown={"grace_seconds": 5.0},
        broadcast={"timezone": "Europe/Berlin"},
    )
    url = f"http://127.0.0.1:{port}"
    users = seed_users(db_dsn, fake, 10_000, 20)
    fake.add_user(ADMIN, "Admin")
    berlin = dt.datetime.now(dt.UTC).astimezone(dt.timezone(dt.timedelta(hours=1))) + dt.timedelta(minutes=5)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(120):
            first = await start_daemon(nursery, config, tmp_path)
            await wait_ready(first, url)
            await schedule(fake, "Scheduled hello", berlin.strftime("%Y-%m-%d %H:%M"))
            first.signal(signal.SIGTERM)
            assert await first.wait(timeout=15) == 0, first.log()
            assert sql(db_dsn, "SELECT status FROM broadcasts") == [("scheduled",)]
            listing = vpnd_cli(config)("broadcast", "list")
            assert "scheduled" in listing.stdout and "starts" in listing.stdout, listing
            # While vpnd is down, its time comes (the test moves it from minutes ahead to now).
            sql(db_dsn, "UPDATE broadcasts SET start_at = now()")
            second = await start_daemon(nursery, config, tmp_path)
            await wait_ready(second, url)
            while sql(db_dsn, "SELECT status FROM broadcasts")[0][0] != "done":
                await trio.sleep(0.2)
            await trio.sleep(1.0)  # a second start would show up by now
            second.signal(signal.SIGTERM)
            assert await second.wait(timeout=15) == 0, second.log()
        nursery.cancel_scope.cancel()
    for uid in users:
        assert [m.text for m in fake.bot_messages(uid)] == ["Scheduled hello"]
    assert sql(db_dsn, "SELECT count(*), sum(total) FROM broadcasts") == [(1, 21)]


# --- the delivery report ----------------------------------------------------------------------------


async def test_report_counts_blocked_marks_them_unreachable_and_the_csv_lists_everyone(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, broadcast={"progress_interval": 0.5})
    users = seed_users(db_dsn, fake, 10_000, 6)
    blockers = users[:2]
    for uid in blockers:
        fake.users[uid].blocked = True
    vpnd = await start_admin_vpnd(nursery, config)
    fake.add_user(ADMIN, "Admin")
    with trio.fail_after(60):
        segments = await compose(fake, media=None, caption="First news", buttons=None)
        confirm = await press(fake, ADMIN, segments, "adm:bs:all", predicate=has_button("adm:bgo:"))
        await press(fake, ADMIN, confirm, "adm:bgo:", predicate=has_button("adm:bp:"))
        summary = await fake.wait_for_bot_message(ADMIN, has_button("adm:brp:"), timeout=30)
        await press(fake, ADMIN, summary, "adm:brp:", predicate=lambda m: m.document is not None)
    document = [m for m in fake.bot_messages(ADMIN) if m.document is not None][-1]
    assert "5 sent, 2 blocked the bot" in (document.caption or "")
    assert document.document is not None and document.document.data is not None
    rows = list(csv.DictReader(document.document.data.decode().splitlines()))
    assert {int(r["user_id"]): r["outcome"] for r in rows} == {
        ADMIN: "sent",
        **{uid: ("blocked" if uid in blockers else "sent") for uid in users},
    }
    assert sql(db_dsn, "SELECT id FROM users WHERE NOT reachable ORDER BY id") == [(u,) for u in blockers]
    run = vpnd_cli(Path(config.path))
    out = tmp_path / "report.csv"
    report = cli_result(run("broadcast", "report", "1", "--csv", str(out), "--json"))
    assert report == {"sent": 5, "blocked": 2, "failed": 0, "skipped": 0, "pending": 0}
    assert out.read_text().splitlines()[0] == "user_id,outcome,sent_at,error" and len(out.read_text().splitlines()) == 8
    assert run("broadcast", "report", "99").returncode == 1
    again = run("broadcast", "report", "1", "--csv", str(out))  # never over an existing file
    assert again.returncode == 1 and "exists already" in again.stderr
    # The next broadcast leaves the blockers out.
    with psycopg.connect(db_dsn) as conn:
        assert bdb.count_segment(conn, bdb.Segment.parse("all")) == 5
    await vpnd.stop()


# --- forged presses, replays, people who are not admins -----------------------------------------------


def forge(fake: FakeTelegram, user_id: int, message: ChatMessage, data: str) -> None:
    fake.inject_update(
        {
            "callback_query": {
                "id": f"forged-{user_id}-{message.message_id}-{data}",
                "from": fake.users[user_id].to_api(),
                "message": message.to_api(),
                "chat_instance": "1",
                "data": data,
            }
        }
    )


async def test_forged_and_replayed_presses_and_strangers_media_start_nothing(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url)
    (stranger,) = seed_users(db_dsn, fake, 10_000, 1)
    vpnd = await start_admin_vpnd(nursery, config)
    fake.add_user(ADMIN, "Admin")
    with trio.fail_after(150):
        # A stranger's photo is no broadcast draft, and the admin buttons are not theirs to press.
        mark = fake.change_seq
        fake.user_sends_media(stranger, "photo", caption="<b>spam</b>")
        answer = await fake.wait_for_bot_message(stranger, since=mark)
        assert answer.photo is None
        forge(fake, stranger, answer, "adm:bt:deadbeef")
        await fake.wait_for_bot_message(stranger, since=fake.change_seq)
        # The admin's draft, then presses the bot never made.
        for data in ["adm:bs:plan:NOPE", "adm:bs:lang:xx';--", "adm:bs:paid:0"]:
            segments = await compose(fake, media=None, caption="Real news", buttons=None)
            mark = fake.change_seq
            forge(fake, ADMIN, segments, data)
            reply = await fake.wait_for_bot_message(ADMIN, text_has("out of date"), since=mark)
            assert has_button("adm:st")(reply), data
        for data in ["adm:bt:00000000", "adm:bsc:00000000"]:  # a stale confirmation ends the draft politely
            segments = await compose(fake, media=None, caption="Real news", buttons=None)
            confirm = await press(fake, ADMIN, segments, "adm:bs:all", predicate=has_button("adm:bgo:"))
            mark = fake.change_seq
            forge(fake, ADMIN, confirm, data)
            await fake.wait_for_bot_message(ADMIN, text_has("no broadcast draft"), since=mark)
        mark = fake.change_seq
        forge(fake, ADMIN, confirm, "adm:brp:424242")  # the report of a broadcast that does not exist
        await fake.wait_for_bot_message(ADMIN, lambda m: m.text == "Admin", since=mark)
        assert not any(m.document for m in fake.bot_messages(ADMIN))
        # Scheduling, then typing the time again: one broadcast.
        segments = await compose(fake, media=None, caption="Real news", buttons=None)
        confirm = await press(fake, ADMIN, segments, "adm:bs:all", predicate=has_button("adm:bsc:"))
        await press(fake, ADMIN, confirm, "adm:bsc:", predicate=text_has("When should it start"))
        when = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).strftime("%Y-%m-%d %H:%M")
        fake.user_sends(ADMIN, when)
        await fake.wait_for_bot_message(ADMIN, has_button("adm:bx:"))
        mark = fake.change_seq
        fake.user_sends(ADMIN, when)
        await fake.wait_for_bot_message(ADMIN, since=mark)
    assert sql(db_dsn, "SELECT status FROM broadcasts") == [("scheduled",)]
    assert not any(m.text and "Real news" in m.text for m in fake.bot_messages(stranger))
    await vpnd.stop()
