"""The fake Telegram Bot API, driven over loopback HTTP by python-telegram-bot and by raw httpx.

These tests pin the behaviours the daemon relies on being realistic: long polling and offsets, the
flood limits, HTML and keyboard validation, the Stars payment flow, faults, and what users see.
"""

from __future__ import annotations

import html
import json
from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx
import hypothesis
import hypothesis.strategies
import pytest
import telegram
import telegram.error
import trio
import trio.testing

from vpnd_sandbox.telegram.formatting import EntityParseError, detect_bot_commands, parse_html, utf16_len
from vpnd_sandbox.telegram_fake import FakeTelegram, serve_fake_telegram

IO_TIMEOUT = 10
ALICE = 1001
BOB = 1002
# A valid 2x3 PNG (what segno and friends produce starts the same way).
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000002000000030806000000"
    "9d74e1380000001049444154789c63f8ffff3f0305a0000000ffff03000e3cbd2b0000000049454e44ae426082"
)


@attrs.define
class Telegram:
    fake: FakeTelegram
    base_url: str
    http: httpx.AsyncClient
    bot: telegram.Bot

    async def call(self, method: str, **params: Any) -> httpx.Response:
        """A raw JSON Bot API call, as a hand-written client would make it."""
        return await self.http.post(f"{self.base_url}/bot{self.fake.token}/{method}", json=params)


@pytest.fixture
async def tg(nursery: trio.Nursery) -> AsyncIterator[Telegram]:
    fake = FakeTelegram()
    base_url = await nursery.start(serve_fake_telegram, fake)
    fake.add_user(ALICE, "Alice", username="alice", language_code="en")
    fake.add_user(BOB, "Bob", language_code="ru")
    async with httpx.AsyncClient(timeout=30) as http:
        # Bot() works without initialize(): its HTTPXRequest builds its client in __init__.
        bot = telegram.Bot(fake.token, base_url=f"{base_url}/bot")
        yield Telegram(fake, base_url, http, bot)
        await bot.request.shutdown()


# ------------------------------------------------------------------------------------------- basics


async def test_get_me_and_first_contact_through_ptb(tg: Telegram) -> None:
    with trio.fail_after(IO_TIMEOUT):
        me = await tg.bot.get_me()
        assert me.is_bot and me.username == "vpnd_demo_bot" and me.id == tg.fake.bot_id

        with pytest.raises(telegram.error.BadRequest, match=r"[Cc]hat not found"):
            await tg.bot.send_message(ALICE, "hello before /start")

        tg.fake.user_sends(ALICE, "/start promo42")
        updates = await tg.bot.get_updates(timeout=5)
        assert len(updates) == 1
        message = updates[0].message
        assert message is not None and message.text == "/start promo42"
        assert message.from_user is not None and message.from_user.username == "alice"
        assert message.from_user.language_code == "en"
        assert [(e.type, e.offset, e.length) for e in message.entities] == [("bot_command", 0, 6)]

        sent = await tg.bot.send_message(ALICE, "<b>Welcome</b>, Alice!", parse_mode="HTML")
        assert sent.text == "Welcome, Alice!"
        assert sent.message_id == 2  # per-chat numbering shared by both sides
        assert [(e.type, e.offset, e.length) for e in sent.entities] == [("bold", 0, 7)]

    assert [(m.from_bot, m.text) for m in tg.fake.transcript(ALICE)] == [
        (False, "/start promo42"),
        (True, "Welcome, Alice!"),
    ]


async def test_wrong_token_is_401_and_unknown_method_404(tg: Telegram) -> None:
    with trio.fail_after(IO_TIMEOUT):
        wrong = await tg.http.post(f"{tg.base_url}/bot123:nope/getMe")
        assert wrong.status_code == 401
        assert wrong.json() == {"ok": False, "error_code": 401, "description": "Unauthorized"}
        unknown = await tg.call("sendTelepathy")
        assert unknown.status_code == 404
        assert unknown.json() == {"ok": False, "error_code": 404, "description": "Not Found"}
        # Method names are case-insensitive on Telegram.
        assert (await tg.call("GETME")).json()["ok"] is True
        with pytest.raises(telegram.error.InvalidToken):
            await telegram.Bot("123:nope", base_url=f"{tg.base_url}/bot").get_me()


async def test_form_encoded_and_query_string_parameters(tg: Telegram) -> None:
    tg.fake.user_sends(ALICE, "hi")
    with trio.fail_after(IO_TIMEOUT):
        url = f"{tg.base_url}/bot{tg.fake.token}/sendMessage"
        markup = json.dumps({"inline_keyboard": [[{"text": "Go", "callback_data": "go"}]]})
        form = await tg.http.post(url, data={"chat_id": str(ALICE), "text": "form", "reply_markup": markup})
        assert form.json()["result"]["reply_markup"]["inline_keyboard"][0][0]["callback_data"] == "go"
        query = await tg.http.get(url, params={"chat_id": ALICE, "text": "query"})
        assert query.json()["result"]["text"] == "query"
        bad = await tg.call("sendMessage", chat_id="not a number", text="x")
        assert bad.status_code == 400


# -------------------------------------------------------------------------------------- long polling


async def test_long_poll_returns_as_soon_as_a_user_writes(tg: Telegram) -> None:
    result: list[httpx.Response] = []

    async def poll() -> None:
        result.append(await tg.call("getUpdates", timeout=60))

    # The poll's own timeout (60 s) is far beyond this bound: only the user's message can end it in time.
    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await tg.fake.wait_until(lambda: tg.fake.stats()["polls_waiting"] == 1)
            tg.fake.user_sends(BOB, "привет")
    body = result[0].json()
    assert body["ok"] is True
    assert [u["message"]["text"] for u in body["result"]] == ["привет"]


async def test_empty_long_poll_waits_for_its_timeout(tg: Telegram) -> None:
    with trio.fail_after(IO_TIMEOUT):
        started = trio.current_time()
        response = await tg.call("getUpdates", timeout=1)
        assert response.json() == {"ok": True, "result": []}
        # Not before its timeout (a lower bound holds on any machine); that it ends *at* its timeout is
        # pinned exactly by test_long_poll_runs_on_trio_time.
        assert trio.current_time() - started >= 1.0


async def test_offset_confirms_and_drops_older_updates(tg: Telegram) -> None:
    for text in ("one", "two", "three"):
        tg.fake.user_sends(ALICE, text)
    with trio.fail_after(IO_TIMEOUT):
        first = (await tg.call("getUpdates", limit=2)).json()["result"]
        assert [u["message"]["text"] for u in first] == ["one", "two"]
        ids = [u["update_id"] for u in first]
        assert ids[1] == ids[0] + 1
        # Without a new offset the same updates come again.
        again = (await tg.call("getUpdates")).json()["result"]
        assert [u["update_id"] for u in again][:2] == ids
        rest = (await tg.call("getUpdates", offset=ids[1] + 1)).json()["result"]
        assert [u["message"]["text"] for u in rest] == ["three"]
        assert (await tg.call("getUpdates", offset=rest[0]["update_id"] + 1)).json()["result"] == []
        assert tg.fake.pending_updates == []
        tg.fake.user_sends(ALICE, "four")
        later = (await tg.call("getUpdates")).json()["result"]
        assert later[0]["update_id"] > rest[0]["update_id"]  # ids keep increasing


async def test_overlapping_polls_end_the_older_one_with_409(tg: Telegram) -> None:
    older: list[httpx.Response] = []

    async def poll() -> None:
        older.append(await tg.call("getUpdates", timeout=20))

    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await tg.fake.wait_until(lambda: tg.fake.stats()["polls_waiting"] == 1)
            newer = await tg.call("getUpdates", timeout=0)
        assert newer.json() == {"ok": True, "result": []}
    assert older[0].status_code == 409
    assert older[0].json()["description"].startswith("Conflict: terminated by other getUpdates request")


async def test_allowed_updates_filters_future_updates(tg: Telegram) -> None:
    with trio.fail_after(IO_TIMEOUT):
        await tg.call("getUpdates", allowed_updates=["callback_query"])
        tg.fake.user_sends(ALICE, "ignored")
        assert (await tg.call("getUpdates")).json()["result"] == []
        await tg.call("getUpdates", allowed_updates=[])
        tg.fake.user_sends(ALICE, "seen")
        assert [u["message"]["text"] for u in (await tg.call("getUpdates")).json()["result"]] == ["seen"]


async def test_long_poll_runs_on_trio_time(autojump_clock: trio.testing.MockClock) -> None:
    """In-process (no sockets), a 50 s poll finishes at once under the autojump clock."""
    fake = FakeTelegram()
    start = trio.current_time()
    reply = await fake.handle_bot_request(fake.token, "getUpdates", "application/json", b'{"timeout": 50}', b"")
    assert reply.body == {"ok": True, "result": []}
    assert trio.current_time() - start == pytest.approx(50)  # ends at its timeout: not before, not after


async def test_delete_webhook_can_drop_pending_updates(tg: Telegram) -> None:
    tg.fake.user_sends(ALICE, "old")
    with trio.fail_after(IO_TIMEOUT):
        assert await tg.bot.delete_webhook(drop_pending_updates=True) is True
        assert await tg.bot.get_updates() == ()


# ------------------------------------------------------------------------------------- flood limits


def hold_flood_clock(fake: FakeTelegram) -> list[float]:
    """Stop the flood limits' clock (the rest of the fake keeps Trio time): a burst is then one instant
    however slow the machine is. Returns a one-item list; add to its item to move that clock on."""
    now = [trio.current_time()]
    fake.flood_clock = lambda: now[0]
    return now


async def test_per_chat_burst_gets_429_with_retry_after(tg: Telegram) -> None:
    tg.fake.user_sends(ALICE, "/start")
    flood_now = hold_flood_clock(tg.fake)
    with trio.fail_after(IO_TIMEOUT):
        burst = int(tg.fake.chat_burst)
        statuses = [(await tg.call("sendMessage", chat_id=ALICE, text=f"m{i}")).status_code for i in range(burst)]
        assert statuses == [200] * burst
        limited = await tg.call("sendMessage", chat_id=ALICE, text="one too many")
        assert limited.status_code == 429
        assert limited.json() == {
            "ok": False,
            "error_code": 429,
            "description": "Too Many Requests: retry after 1",
            "parameters": {"retry_after": 1},
        }
        with pytest.raises(telegram.error.RetryAfter):
            await tg.bot.send_message(ALICE, "ptb sees RetryAfter")
        assert tg.fake.too_many_requests_sent == 2
        flood_now[0] += 0.95
        assert (await tg.call("sendMessage", chat_id=ALICE, text="too early")).status_code == 429
        flood_now[0] += 0.1  # retry_after (1 s) has passed
        assert (await tg.call("sendMessage", chat_id=ALICE, text="after waiting")).status_code == 200
    # The refused messages never reached the user.
    assert [m.text for m in tg.fake.bot_messages(ALICE)] == [f"m{i}" for i in range(burst)] + ["after waiting"]


async def test_global_limit_spans_chats(tg: Telegram) -> None:
    tg.fake.global_rate = tg.fake.global_burst = 5
    hold_flood_clock(tg.fake)  # no refill while the ten sends go out, however long they take
    users = range(2000, 2010)
    for user_id in users:
        tg.fake.add_user(user_id, f"U{user_id}")
        tg.fake.user_sends(user_id, "/start")
    with trio.fail_after(IO_TIMEOUT):
        statuses = [(await tg.call("sendMessage", chat_id=u, text="news")).status_code for u in users]
    assert statuses.count(200) == 5
    assert statuses.count(429) == 5
    assert tg.fake.rate_limited == 5


async def test_strict_window_counts_any_one_second_and_paid_sends_have_their_own_lane(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Strict mode: at most `global_rate` sends in any one second (a bucket would let more through
    after part of a second); paid sends bypass the free window, cost 0.1 Star, and are refused (400)
    once the balance is spent."""
    fake = FakeTelegram(strict_window=True, global_rate=5, stars_balance=0.2)
    for user_id in range(3000, 3020):
        fake.add_user(user_id, f"U{user_id}")
        fake.user_sends(user_id, "/start")

    async def send(user_id: int, **extra: Any) -> int:
        body = json.dumps({"chat_id": user_id, "text": "news", **extra}).encode()
        reply = await fake.handle_bot_request(fake.token, "sendMessage", "application/json", body, b"")
        return reply.status

    assert [await send(u) for u in range(3000, 3005)] == [200] * 5
    await trio.sleep(0.6)
    assert await send(3005) == 429  # a bucket would have refilled 3 tokens by now
    assert [await send(u, allow_paid_broadcast=True) for u in (3006, 3007, 3008)] == [200, 200, 400]
    assert fake.paid_refused == 1 and len(fake.paid_send_times) == 2
    await trio.sleep(0.41)
    assert await send(3009) == 200  # the first five are more than a second old
    assert len(fake.send_times) == 6 and fake.rate_limited == 1


# ----------------------------------------------------------------------------- validation of content


@pytest.mark.parametrize(
    ("html", "error"),
    [
        ("line<br>break", 'Unsupported start tag "br" at byte offset 4'),
        ("1 < 2", 'Unsupported start tag "" at byte offset 2'),
        ("<b>bold", 'Can\'t find end tag corresponding to start tag "b"'),
        ("<b>x</i>", 'Unmatched end tag at byte offset 4, expected "</b>", found "</i>"'),
        ("x</b>", "Unexpected end tag at byte offset 1"),
        ("<span>s</span>", 'Tag "span" must have class "tg-spoiler"'),
        ('<a href="x>y', "Unclosed start tag at byte offset 0"),
    ],
)
def test_html_parse_errors(html: str, error: str) -> None:
    with pytest.raises(EntityParseError, match=error.replace("(", r"\(")):
        parse_html(html)


def test_html_entities_use_utf16_offsets_and_decode_references() -> None:
    parsed = parse_html('  🔒 <b>VPN &amp; <i>more</i></b> <a href="https://t.me/x?a=1&amp;b=2">link</a> &#9733;\n')
    assert parsed.text == "🔒 VPN & more link ★"
    assert parsed.entities == (
        {"type": "bold", "offset": 3, "length": 10},
        {"type": "italic", "offset": 9, "length": 4},
        {"type": "text_link", "offset": 14, "length": 4, "url": "https://t.me/x?a=1&b=2"},
    )
    pre = parse_html('<pre><code class="language-json">{"a": 1}</code></pre>')
    assert pre.entities == ({"type": "pre", "offset": 0, "length": 8, "language": "json"},)
    assert parse_html("a & b; <tg-spoiler>s</tg-spoiler>").text == "a & b; s"


@hypothesis.given(hypothesis.strategies.text())
def test_html_parser_total_and_escaped_text_round_trips(text: str) -> None:
    try:
        parsed = parse_html(text)
    except EntityParseError:
        pass
    else:
        length = utf16_len(parsed.text)
        for entity in parsed.entities:
            assert 0 <= entity["offset"] < entity["offset"] + entity["length"] <= length
    assert parse_html(html.escape(text, quote=False)).text == text.strip()
    wrapped = parse_html("<b>" + html.escape(text) + "</b>")
    assert wrapped.text == text.strip()
    bold = {"type": "bold", "offset": 0, "length": utf16_len(text.strip())}
    assert wrapped.entities == ((bold,) if text.strip() else ())


def test_bot_commands_are_detected_like_telegram() -> None:
    assert detect_bot_commands("/start") == [{"type": "bot_command", "offset": 0, "length": 6}]
    assert [e["offset"] for e in detect_bot_commands("try /buy@vpnd_demo_bot or /help")] == [4, 26]
    assert detect_bot_commands("a/b http://x/y") == []


async def test_send_message_validation_answers_like_telegram(tg: Telegram) -> None:
    tg.fake.user_sends(ALICE, "/start")
    tg.fake.chat_burst = 100
    with trio.fail_after(IO_TIMEOUT):
        bad_html = await tg.call("sendMessage", chat_id=ALICE, text="<b>x</b><br>", parse_mode="HTML")
        assert bad_html.status_code == 400
        assert bad_html.json()["description"] == (
            "Bad Request: can't parse entities: Unsupported start tag \"br\" at byte offset 8"
        )
        with pytest.raises(telegram.error.BadRequest, match="parse entities"):
            await tg.bot.send_message(ALICE, "<unknown>", parse_mode="HTML")
        empty = await tg.call("sendMessage", chat_id=ALICE, text="<b> </b>", parse_mode="HTML")
        assert empty.json()["description"] == "Bad Request: message text is empty"
        too_long = await tg.call("sendMessage", chat_id=ALICE, text="x" * 4097)
        assert too_long.json()["description"] == "Bad Request: message is too long"
        # 4096 after entity parsing is fine even though the HTML source is longer.
        longest = await tg.call("sendMessage", chat_id=ALICE, text="<b>" + "y" * 4096 + "</b>", parse_mode="HTML")
        assert longest.json()["ok"] is True
        no_chat = await tg.call("sendMessage", text="x")
        assert no_chat.json()["description"] == "Bad Request: chat_id is empty"


async def test_callback_data_longer_than_64_bytes_is_refused(tg: Telegram) -> None:
    tg.fake.user_sends(ALICE, "/start")

    def keyboard(data: str) -> telegram.InlineKeyboardMarkup:
        return telegram.InlineKeyboardMarkup([[telegram.InlineKeyboardButton("Buy", callback_data=data)]])

    with trio.fail_after(IO_TIMEOUT):
        with pytest.raises(telegram.error.BadRequest, match=r"(?i)BUTTON_DATA_INVALID"):
            await tg.bot.send_message(ALICE, "plans", reply_markup=keyboard("x" * 65))
        raw = await tg.call(
            "sendMessage",
            chat_id=ALICE,
            text="plans",
            reply_markup={"inline_keyboard": [[{"text": "Buy", "callback_data": "ж" * 33}]]},  # 66 bytes
        )
        assert raw.json() == {"ok": False, "error_code": 400, "description": "Bad Request: BUTTON_DATA_INVALID"}
        text_only = await tg.call(
            "sendMessage", chat_id=ALICE, text="plans", reply_markup={"inline_keyboard": [[{"text": "Buy"}]]}
        )
        assert "Text buttons are unallowed" in text_only.json()["description"]
        ok = await tg.bot.send_message(ALICE, "plans", reply_markup=keyboard("ж" * 32))  # 64 bytes
        assert ok.reply_markup is not None


# ------------------------------------------------------------------------------- buttons and edits


async def test_button_press_reaches_bot_and_can_be_answered_once(tg: Telegram) -> None:
    tg.fake.user_sends(ALICE, "/plans")
    with trio.fail_after(IO_TIMEOUT):
        await tg.bot.get_updates()
        markup = telegram.InlineKeyboardMarkup(
            [[telegram.InlineKeyboardButton("1 month", callback_data="buy:1m")],
             [telegram.InlineKeyboardButton("Site", url="https://example.org")]]
        )
        plans = await tg.bot.send_message(ALICE, "Choose a plan", reply_markup=markup)
        tg.fake.user_presses_button(ALICE, plans.message_id, "buy:1m")
        updates = await tg.bot.get_updates(offset=1, timeout=5)
        query = updates[-1].callback_query
        assert query is not None and query.data == "buy:1m"
        assert query.message is not None and query.message.message_id == plans.message_id
        assert query.from_user.id == ALICE

        assert await tg.bot.answer_callback_query(query.id, text="Creating invoice…") is True
        with pytest.raises(telegram.error.BadRequest, match=r"(?i)query is too old"):
            await tg.bot.answer_callback_query(query.id)
    assert tg.fake.callback_queries[query.id].answer_text == "Creating invoice…"
    assert [n.text for n in tg.fake.notices_for(ALICE)] == ["Creating invoice…"]


async def test_edit_message_text_applies_in_transcript_and_refuses_no_op(tg: Telegram) -> None:
    tg.fake.user_sends(ALICE, "/start")
    with trio.fail_after(IO_TIMEOUT):
        markup = telegram.InlineKeyboardMarkup([[telegram.InlineKeyboardButton("Refresh", callback_data="r")]])
        sent = await tg.bot.send_message(ALICE, "Status: pending", reply_markup=markup)
        edited = await tg.bot.edit_message_text("Status: <b>paid</b>", ALICE, sent.message_id, parse_mode="HTML")
        assert isinstance(edited, telegram.Message) and edited.edit_date is not None
        with pytest.raises(telegram.error.BadRequest, match=r"(?i)message is not modified"):
            await tg.bot.edit_message_text("Status: <b>paid</b>", ALICE, sent.message_id, parse_mode="HTML")
        await trio.sleep(1)  # per-chat budget
        await tg.bot.edit_message_reply_markup(ALICE, sent.message_id, reply_markup=markup)
        with pytest.raises(telegram.error.BadRequest, match=r"(?i)message is not modified"):
            await tg.bot.edit_message_reply_markup(ALICE, sent.message_id, reply_markup=markup)
        with pytest.raises(telegram.error.BadRequest, match=r"(?i)message can.t be edited"):
            await tg.bot.edit_message_text("hijack", ALICE, 1)
        with pytest.raises(telegram.error.BadRequest, match=r"(?i)message to edit not found"):
            await tg.bot.edit_message_text("x", ALICE, 999)
    [bot_message] = tg.fake.bot_messages(ALICE)
    assert bot_message.text == "Status: paid" and bot_message.edit_date is not None
    assert bot_message.callback_data == ["r"]


async def test_delete_message(tg: Telegram) -> None:
    tg.fake.user_sends(ALICE, "/start")
    with trio.fail_after(IO_TIMEOUT):
        sent = await tg.bot.send_message(ALICE, "temporary")
        assert await tg.bot.delete_message(ALICE, sent.message_id) is True
        with pytest.raises(telegram.error.BadRequest, match=r"(?i)message to delete not found"):
            await tg.bot.delete_message(ALICE, sent.message_id)
    assert [m.text for m in tg.fake.transcript(ALICE)] == ["/start"]


async def test_wait_for_bot_message_answers_the_users_last_action(tg: Telegram) -> None:
    tg.fake.user_sends(ALICE, "/start")
    with trio.fail_after(IO_TIMEOUT):
        await tg.bot.send_message(ALICE, "reply to start")
        # Sent before we started waiting: still found, because it follows the user's action.
        assert (await tg.fake.wait_for_bot_message(ALICE)).text == "reply to start"
        tg.fake.user_sends(ALICE, "/help")
        with pytest.raises(trio.TooSlowError, match="reply to start"):
            await tg.fake.wait_for_bot_message(ALICE, timeout=0.2)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tg.bot.send_message, ALICE, "help text")
            found = await tg.fake.wait_for_bot_message(ALICE, lambda m: "help" in (m.text or ""))
        assert found.text == "help text"


# ------------------------------------------------------------------------------------ media, files


async def test_photo_upload_is_visible_in_transcript_and_downloadable(tg: Telegram) -> None:
    tg.fake.user_sends(ALICE, "/connect")
    with trio.fail_after(IO_TIMEOUT):
        sent = await tg.bot.send_photo(ALICE, PNG, caption="Scan this <b>QR</b>", parse_mode="HTML")
        assert sent.caption == "Scan this QR"
        assert (sent.photo[-1].width, sent.photo[-1].height) == (2, 3)
        file_id = sent.photo[-1].file_id
        [message] = tg.fake.bot_messages(ALICE)
        assert message.photo is not None and message.photo.data == PNG

        page = await tg.http.get(f"{tg.base_url}/sandbox/files/{file_id}")
        assert page.content == PNG and page.headers["content-type"] == "image/png"
        chat = (await tg.http.get(f"{tg.base_url}/sandbox/api/chats/{ALICE}")).json()["result"]
        assert chat["messages"][-1]["photo_url"] == f"/sandbox/files/{file_id}"
        # getFile + the file download URL, like api.telegram.org.
        telegram_file = await tg.bot.get_file(file_id)
        download = await tg.http.get(f"{tg.base_url}/file/bot{tg.fake.token}/{telegram_file.file_path}")
        assert download.content == PNG

        again = await tg.bot.send_photo(ALICE, file_id)  # by file_id, no upload
        assert again.photo[-1].file_id == file_id
        with pytest.raises(telegram.error.BadRequest, match=r"(?i)IMAGE_PROCESS_FAILED"):
            await tg.bot.send_photo(ALICE, b"not an image at all")
        doc = await tg.bot.send_document(ALICE, b"vless://config", filename="vpn.txt")
        assert doc.document is not None and doc.document.file_name == "vpn.txt"


# -------------------------------------------------------------------------------------- payments


async def test_stars_invoice_pre_checkout_and_successful_payment(tg: Telegram) -> None:
    tg.fake.user_sends(ALICE, "/buy")
    with trio.fail_after(IO_TIMEOUT):
        updates = await tg.bot.get_updates()
        offset = updates[-1].update_id + 1
        with pytest.raises(telegram.error.BadRequest):
            await tg.bot.send_invoice(
                ALICE, "1 month", "VPN", "order:1", "XTR",
                [telegram.LabeledPrice("a", 50), telegram.LabeledPrice("b", 50)],
            )
        with pytest.raises(telegram.error.BadRequest, match=r"(?i)PAYMENT_PROVIDER_INVALID"):
            await tg.bot.send_invoice(ALICE, "1 month", "VPN", "order:1", "USD", [telegram.LabeledPrice("a", 100)])
        invoice = await tg.bot.send_invoice(
            ALICE, "1 month", "VPN for 30 days", "order:1", "XTR", [telegram.LabeledPrice("30 days", 150)]
        )
        assert invoice.invoice is not None and invoice.invoice.total_amount == 150

        tg.fake.user_pays_invoice(ALICE, invoice.message_id)
        [update] = await tg.bot.get_updates(offset=offset, timeout=5)
        checkout = update.pre_checkout_query
        assert checkout is not None
        assert (checkout.currency, checkout.total_amount, checkout.invoice_payload) == ("XTR", 150, "order:1")
        assert await tg.bot.answer_pre_checkout_query(checkout.id, ok=True) is True
        with pytest.raises(telegram.error.BadRequest, match=r"(?i)query is too old"):
            await tg.bot.answer_pre_checkout_query(checkout.id, ok=True)

        [paid] = await tg.bot.get_updates(offset=update.update_id + 1, timeout=5)
        assert paid.message is not None and paid.message.successful_payment is not None
        payment = paid.message.successful_payment
        assert payment.invoice_payload == "order:1" and payment.total_amount == 150
        charge_id = payment.telegram_payment_charge_id
        assert charge_id

        assert await tg.bot.refund_star_payment(ALICE, charge_id) is True
        with pytest.raises(telegram.error.BadRequest, match=r"(?i)CHARGE_ALREADY_REFUNDED"):
            await tg.bot.refund_star_payment(ALICE, charge_id)
    assert tg.fake.payments[charge_id].refunded


async def test_refused_pre_checkout_shows_the_error_to_the_user(tg: Telegram) -> None:
    tg.fake.user_sends(BOB, "/buy")
    with trio.fail_after(IO_TIMEOUT):
        invoice = await tg.bot.send_invoice(BOB, "Plan", "VPN", "order:2", "XTR", [telegram.LabeledPrice("x", 10)])
        query = tg.fake.user_pays_invoice(BOB, invoice.message_id)
        with pytest.raises(telegram.error.BadRequest):
            await tg.bot.answer_pre_checkout_query(query.id, ok=False)  # error_message is required
        await tg.bot.answer_pre_checkout_query(query.id, ok=False, error_message="Plan sold out")
    assert [n.text for n in tg.fake.notices_for(BOB) if n.kind == "payment_error"] == ["Plan sold out"]
    assert not any(m.successful_payment for m in tg.fake.transcript(BOB))
    assert tg.fake.payments == {}


async def test_card_invoice_is_checked_like_telegram_and_paid_with_both_charge_ids(tg: Telegram) -> None:
    tg.fake.user_sends(ALICE, "/buy")
    token = tg.fake.payment_provider_token
    with trio.fail_after(IO_TIMEOUT):
        offset = (await tg.bot.get_updates())[-1].update_id + 1
        price = [telegram.LabeledPrice("30 days", 29900)]
        refused = [
            (dict(currency="RUB", provider_token=""), "PAYMENT_PROVIDER_INVALID"),  # fiat needs the token
            (dict(currency="RUB", provider_token="1:TEST:other"), "PAYMENT_PROVIDER_INVALID"),
            (dict(currency="XTR", provider_token=token), "PAYMENT_PROVIDER_INVALID"),  # Stars take none
            (dict(currency="ZZZ", provider_token=token), "CURRENCY_INVALID"),
        ]
        for kwargs, error in refused:
            with pytest.raises(telegram.error.BadRequest, match=f"(?i){error}"):
                await tg.bot.send_invoice(ALICE, "1 month", "VPN", "order:3", prices=price, **kwargs)
        with pytest.raises(telegram.error.BadRequest, match=r"(?i)CURRENCY_TOTAL_AMOUNT_INVALID"):
            await tg.bot.send_invoice(
                ALICE, "1 month", "VPN", "order:3", "RUB", [telegram.LabeledPrice("x", 0)], provider_token=token
            )
        fractional = await tg.call(
            "sendInvoice", chat_id=ALICE, title="t", description="d", payload="p", currency="RUB",
            provider_token=token, prices='[{"label": "x", "amount": 299.5}]',
        )  # fmt: skip
        assert fractional.status_code == 400 and "prices" in fractional.json()["description"]  # minor units only
        invoice = await tg.bot.send_invoice(
            ALICE, "1 month", "VPN", "order:3", "RUB", price, provider_token=token, need_email=True,
            send_email_to_provider=True, provider_data='{"receipt": {"items": []}}',
        )  # fmt: skip
        assert invoice.invoice is not None and (invoice.invoice.currency, invoice.invoice.total_amount) == (
            "RUB",
            29900,
        )
        sent = tg.fake.transcript(ALICE)[-1].invoice
        assert sent is not None and sent.need_email and sent.provider_data == '{"receipt": {"items": []}}'

        tg.fake.user_pays_invoice(ALICE, invoice.message_id)
        [update] = await tg.bot.get_updates(offset=offset, timeout=5)
        checkout = update.pre_checkout_query
        assert checkout is not None and (checkout.currency, checkout.total_amount) == ("RUB", 29900)
        assert checkout.order_info is not None and checkout.order_info.email
        assert await tg.bot.answer_pre_checkout_query(checkout.id, ok=True) is True
        [paid] = await tg.bot.get_updates(offset=update.update_id + 1, timeout=5)
        assert paid.message is not None and paid.message.successful_payment is not None
        payment = paid.message.successful_payment
        assert payment.telegram_payment_charge_id and payment.provider_payment_charge_id
        assert payment.telegram_payment_charge_id != payment.provider_payment_charge_id
        with pytest.raises(telegram.error.BadRequest, match=r"(?i)CHARGE_NOT_FOUND"):
            await tg.bot.refund_star_payment(ALICE, payment.telegram_payment_charge_id)  # a card is not Stars


# ------------------------------------------------------------------------------------- blocked bot


async def test_blocked_user_gives_403_and_my_chat_member_update(tg: Telegram) -> None:
    tg.fake.user_sends(ALICE, "/start")
    tg.fake.user_blocks_bot(ALICE)
    with trio.fail_after(IO_TIMEOUT):
        updates = await tg.bot.get_updates()
        member = updates[-1].my_chat_member
        assert member is not None and member.new_chat_member.status == "kicked"
        raw = await tg.call("sendMessage", chat_id=ALICE, text="renew?")
        assert raw.status_code == 403
        assert raw.json()["description"] == "Forbidden: bot was blocked by the user"
        with pytest.raises(telegram.error.Forbidden):
            await tg.bot.send_message(ALICE, "renew?")
        tg.fake.user_sends(ALICE, "/start")  # "Restart" unblocks
        assert (await tg.bot.send_message(ALICE, "welcome back")).text == "welcome back"


# ------------------------------------------------------------------------------------------ faults


async def test_injected_faults_and_request_counting(tg: Telegram) -> None:
    with trio.fail_after(IO_TIMEOUT):
        tg.fake.inject_fault("5xx", count=2, methods=["getMe"])
        for _ in range(2):
            with pytest.raises(telegram.error.NetworkError, match="Bad Gateway"):
                await tg.bot.get_me()
        assert (await tg.bot.get_me()).is_bot

        tg.fake.inject_fault("429", retry_after=7)
        limited = await tg.call("getMe")
        assert limited.json()["parameters"] == {"retry_after": 7}
        assert tg.fake.too_many_requests_sent == 1 and tg.fake.rate_limited == 0

        tg.fake.inject_fault("409", methods=["getUpdates"])
        await tg.call("getMe")  # not matched: the fault waits for getUpdates
        with pytest.raises(telegram.error.Conflict):
            await tg.bot.get_updates()

        tg.fake.inject_fault("drop")
        with pytest.raises(httpx.RemoteProtocolError):
            await tg.call("getMe")
        tg.fake.inject_fault("drop")
        with pytest.raises(telegram.error.NetworkError):
            await tg.bot.get_me()

        tg.fake.inject_fault("timeout", hold_seconds=0.5)
        started = trio.current_time()
        with pytest.raises(httpx.HTTPError):
            await tg.call("getMe")
        assert trio.current_time() - started >= 0.5

        # A window generous enough for the first call to land in it on a busy machine; then wait it out.
        window = tg.fake.inject_fault("5xx", probability=1.0, duration=3.0)
        assert (await tg.call("getMe")).status_code == 502
        assert window.until is not None
        await trio.sleep_until(window.until)
        assert (await tg.call("getMe")).status_code == 200

    assert tg.fake.requests["getMe"] == 10
    assert tg.fake.requests["getUpdates"] == 1
    assert tg.fake.responses[502] == 3


async def test_timeout_fault_makes_ptb_time_out(tg: Telegram) -> None:
    tg.fake.inject_fault("timeout", hold_seconds=5, methods=["getMe"])
    with trio.fail_after(IO_TIMEOUT):
        with pytest.raises(telegram.error.TimedOut):
            await tg.bot.get_me(read_timeout=0.3)
        assert (await tg.bot.get_me()).is_bot


async def test_disconnected_long_poll_is_not_the_active_poll_any_more(tg: Telegram) -> None:
    with trio.fail_after(IO_TIMEOUT):
        with pytest.raises(httpx.ReadTimeout):
            await tg.http.post(
                f"{tg.base_url}/bot{tg.fake.token}/getUpdates", json={"timeout": 20}, timeout=0.3
            )
        await tg.fake.wait_until(lambda: tg.fake.stats()["polls_waiting"] == 0)


# ----------------------------------------------------------------------------- sandbox HTTP + page


async def test_sandbox_http_api_and_web_chat(tg: Telegram) -> None:
    api = f"{tg.base_url}/sandbox/api"
    with trio.fail_after(IO_TIMEOUT):
        page = await tg.http.get(f"{tg.base_url}/")
        assert page.status_code == 200 and "<title>" in page.text and "/sandbox/api/" in page.text

        user = (await tg.http.post(f"{api}/users", json={"first_name": "Carol", "language_code": "de"})).json()
        carol = user["result"]["id"]
        sent = (await tg.http.post(f"{api}/users/{carol}/send", json={"text": "/start"})).json()["result"]
        assert sent["entities"] == [{"type": "bot_command", "offset": 0, "length": 6}]

        async def reply() -> None:
            await trio.sleep(0.1)
            await tg.bot.send_message(
                carol, "Hallo", reply_markup=telegram.InlineKeyboardMarkup(
                    [[telegram.InlineKeyboardButton("Kaufen", callback_data="buy")]]
                )
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reply)
            waited = (await tg.http.get(f"{api}/chats/{carol}/wait", params={"timeout": 5})).json()["result"]
        assert waited["text"] == "Hallo" and waited["from_bot"] is True

        press = f"{api}/users/{carol}/press"
        pressed = await tg.http.post(press, json={"message_id": waited["message_id"], "data": "buy"})
        assert pressed.json()["ok"] is True
        missing = await tg.http.post(press, json={"message_id": waited["message_id"], "data": "nope"})
        assert missing.status_code == 400 and missing.json()["ok"] is False

        injected = (await tg.http.post(f"{api}/updates", json={"update_id": 1, "weird": {"x": [1, 2]}})).json()
        fault = await tg.http.post(f"{api}/faults", json={"kind": "5xx", "count": 1, "methods": ["getMe"]})
        assert fault.json()["result"]["remaining"] == 1
        assert (await tg.call("getMe")).status_code == 502
        chat = (await tg.http.get(f"{api}/chats/{carol}")).json()["result"]
        assert [m["text"] for m in chat["messages"]] == ["/start", "Hallo"]
        stats = (await tg.http.get(f"{api}/stats")).json()["result"]
        assert stats["requests"]["getMe"] == 1 and stats["too_many_requests_sent"] == 0

        updates = (await tg.call("getUpdates")).json()["result"]
        kinds = [next(k for k in u if k != "update_id") for u in updates]
        assert kinds == ["message", "callback_query", "weird"]
        assert updates[-1]["update_id"] == injected["result"]["update_id"]


async def test_set_my_commands_validation(tg: Telegram) -> None:
    with trio.fail_after(IO_TIMEOUT):
        commands = [telegram.BotCommand("start", "Start"), telegram.BotCommand("buy", "Buy VPN")]
        assert await tg.bot.set_my_commands(commands) is True
        assert [c.command for c in await tg.bot.get_my_commands()] == ["start", "buy"]
        with pytest.raises(telegram.error.BadRequest, match=r"(?i)BOT_COMMAND_INVALID"):
            await tg.bot.set_my_commands([telegram.BotCommand("Bad-Name", "x")])


async def test_standalone_process_serves_bot_api_and_sandbox(tmp_path: Any) -> None:
    """``python -m vpnd_sandbox.telegram_fake`` prints its base URL first; the daemon's subprocess tests
    and ``make demo`` talk to it only over HTTP."""
    import subprocess
    import sys

    with trio.fail_after(IO_TIMEOUT):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "vpnd_sandbox.telegram_fake", "--port", "0", "--token", "42:subprocess"],
            stdout=subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            output = b""
            while b"\n" not in output:
                output += await process.stdout.receive_some(1024)
            base_url = output.split(b"\n", 1)[0].decode()
            async with httpx.AsyncClient() as http:
                me = (await http.get(f"{base_url}/bot42:subprocess/getMe")).json()
                assert me["result"]["id"] == 42
                await http.post(f"{base_url}/sandbox/api/users", json={"id": 7, "first_name": "Dan"})
                await http.post(f"{base_url}/sandbox/api/users/7/send", json={"text": "/start"})
                updates = (await http.get(f"{base_url}/bot42:subprocess/getUpdates")).json()["result"]
                assert updates[0]["message"]["text"] == "/start"
        finally:
            process.kill()
            await process.wait()


async def test_the_benchmarks_timed_fake_counts_messages_and_edits(nursery: trio.Nursery) -> None:
    """bench.common.TimedTelegram hooks the fake's `_add_message` and `_edited`: a split of the fake that
    bypasses them leaves the pipeline benchmark waiting forever for edits (it did once)."""
    from bench.common import TimedTelegram

    fake = TimedTelegram()
    base_url = await nursery.start(serve_fake_telegram, fake)
    fake.add_user(ALICE, "Alice")
    fake.user_sends(ALICE, "/start")
    bot = telegram.Bot(fake.token, base_url=f"{base_url}/bot")
    try:
        with trio.fail_after(IO_TIMEOUT):
            sent = await bot.send_message(ALICE, "menu")
            assert fake.outputs(ALICE) == 1
            await bot.edit_message_text("help", ALICE, sent.message_id)
            assert fake.outputs(ALICE) == 2
    finally:
        await bot.request.shutdown()
