"""Connect in one tap: the key photo after a trial and a payment, "Connect a device", the import pages.

End to end: the fake Bot API over HTTP, the whole daemon tree, real HTTP to vpnd, a real PostgreSQL.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import httpx
import psycopg
import trio

from tests.harness import bot_config, press, scalar, start_shop, start_vpnd
from vpnd.connect_apps import load_catalog
from vpnd.qr import qr_png
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay
from vpnd_sandbox.telegram_fake import ChatMessage, FakeTelegram

ALICE = 1001
BOB = 1002
BASE = "https://vpn.example.test"


def is_key_photo(message: ChatMessage) -> bool:
    return message.photo is not None and "/sub/" in (message.caption or "")


def token_of(db_dsn: str, user_id: int) -> str:
    token = scalar(db_dsn, "SELECT sub_token FROM subscriptions WHERE user_id = %s", user_id)
    assert isinstance(token, str)
    return token


def forge_callback(fake: FakeTelegram, user_id: int, message: ChatMessage, data: str) -> None:
    """A callback query with data no button carries (a modified client can send anything)."""
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


def url_buttons(message: ChatMessage) -> dict[str, str]:
    return {b["text"]: b["url"] for b in message.buttons if "url" in b}


class PageParser(HTMLParser):
    """What a browser would act on: the meta refresh target, the "Open" button's href, links, scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.refresh: str | None = None
        self.open_href: str | None = None
        self.links: list[str] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self.lang: str | None = None
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "html":
            self.lang = values.get("lang")
        if tag == "meta" and values.get("http-equiv") == "refresh":
            content = values.get("content") or ""
            self.refresh = content.partition(";url=")[2]
        if tag == "a":
            self.links.append(values.get("href") or "")
            if values.get("id") == "open":
                self.open_href = values.get("href")
        if tag in ("script", "style"):
            self._in = tag

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "script":
            self.scripts.append(data)
        elif self._in == "style":
            self.styles.append(data)


def parse_page(body: str) -> PageParser:
    parser = PageParser()
    parser.feed(body)
    return parser


def csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


async def start_trial(fake: FakeTelegram, user_id: int) -> ChatMessage:
    """/start, then "Free trial": the one key message that answers it."""
    fake.user_sends(user_id, "/start")
    menu = await fake.wait_for_bot_message(user_id)
    before = len(fake.bot_messages(user_id))
    key = await press(fake, user_id, menu, "trial", predicate=is_key_photo)
    await fake.wait_until(lambda: all(q.answered for q in fake.callback_queries.values()))
    assert len(fake.bot_messages(user_id)) == before + 1  # one message: the photo (the menu is left as it was)
    return key


async def test_trial_sends_the_key_as_one_photo_and_connect_lists_the_apps(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url)
    vpnd = await start_vpnd(nursery, config)
    fake.add_user(ALICE, "Alice", language_code="en")
    fake.add_user(BOB, "Bob", language_code="en")
    catalog = load_catalog()
    with trio.fail_after(40):
        key = await start_trial(fake, ALICE)
        token = token_of(db_dsn, ALICE)
        sub_url = f"{BASE}/sub/{token}"
        assert key.photo is not None and key.photo.data is not None and key.photo.data.startswith(b"\x89PNG\r\n\x1a\n")
        assert key.photo.data == qr_png(sub_url)  # the QR code of exactly this URL (no decoder here to read it)
        caption = key.caption or ""
        assert "free trial is active for 3 days" in caption and sub_url in caption
        assert any(e["type"] == "code" for e in key.caption_entities)  # the link is tap-to-copy
        assert key.text is None
        assert key.callback_data == ["conn", "sub"]

        platforms = await press(fake, ALICE, key, "conn")  # a photo cannot be edited into text: a new message
        assert platforms.callback_data[: len(catalog.platforms)] == [f"conn:{p}" for p in catalog.platforms]
        assert "sub" in platforms.callback_data  # back

        apps = await press(fake, ALICE, platforms, "conn:android")
        assert apps.message_id == platforms.message_id  # the menu message turns into the list
        assert sub_url in (apps.text or "")
        assert any(e["type"] == "code" for e in apps.entities)
        buttons = url_buttons(apps)
        for app in catalog.apps_for("android"):
            assert buttons[f"⬇️ Install {app.name}"] == app.stores["android"]
            assert buttons[f"➕ Add to {app.name}"] == f"{BASE}/connect/{token}/{app.id}"
        assert all(url.startswith("https://") for url in buttons.values())  # never an app scheme in a button
        assert "conn" in apps.callback_data  # back to the platforms
        assert next(b["text"] for b in apps.buttons if "url" in b) == "➕ Add to Happ"  # the recommended one first

        ios = await press(fake, ALICE, apps, "conn")
        ios = await press(fake, ALICE, ios, "conn:ios")
        assert "➕ Add to Streisand" in url_buttons(ios) and "➕ Add to v2rayNG" not in url_buttons(ios)

        # Forged presses: an unknown platform, extra parts, and a user with no subscription.
        for forged in ("conn:nope", "conn:android:x", "conn:" + "z" * 59):
            forge_callback(fake, ALICE, ios, forged)
        # (The fake refuses answers to query ids it never issued, so the alert is not seen here.)
        # The list turns back into the platform menu, and the bot goes on answering.
        menu = await fake.wait_for_bot_message(ALICE, lambda m: "conn:ios" in m.callback_data)
        assert menu.message_id == ios.message_id and "Which device" in (menu.text or "")
        ios = await press(fake, ALICE, menu, "conn:ios", predicate=lambda m: "Streisand" in str(m.buttons))
        fake.user_sends(BOB, "/start")
        bob_menu = await fake.wait_for_bot_message(BOB)
        forge_callback(fake, BOB, bob_menu, "conn:android")
        refused = await fake.wait_for_bot_message(BOB, lambda m: "no subscription yet" in (m.text or ""))
        assert "/connect/" not in str(refused.buttons)
        forge_callback(fake, BOB, refused, "conn")
        await fake.wait_until(lambda: all(q.answered for q in fake.callback_queries.values()))
        assert not any("/connect/" in str(m.buttons) or "/sub/" in (m.text or "") for m in fake.bot_messages(BOB))

        # "My subscription" has the button too.
        fake.user_sends(ALICE, "/subscription")
        details = await fake.wait_for_bot_message(ALICE, lambda m: "conn" in m.callback_data)
        assert "qr" in details.callback_data
        await fake.wait_until(lambda: all(q.answered for q in fake.callback_queries.values()))
    await vpnd.stop()


async def test_import_pages_redirect_escape_limit_and_speak_the_language(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ALICE, "Alice", language_code="en")
    catalog = load_catalog()
    with trio.fail_after(40):
        await start_trial(fake, ALICE)
    token = token_of(db_dsn, ALICE)
    sub_url = f"{BASE}/sub/{token}"
    expected = {
        "happ": f"happ://add/{sub_url}",
        "v2raytun": f"v2raytun://import/{sub_url}",
        "hiddify": f"hiddify://import/{sub_url}#vpnd",
        "streisand": f"streisand://import/{sub_url}#vpnd",
        "v2rayng": f"v2rayng://install-sub?url={quote(sub_url, safe='')}&name=vpnd",
    }
    assert {app.id for app in catalog.apps} == set(expected)
    assert "url=https%3A%2F%2Fvpn.example.test%2Fsub%2F" in expected["v2rayng"]
    async with httpx.AsyncClient(base_url=vpnd.http_url, timeout=10) as client:
        for app in catalog.apps:
            answer = await client.get(f"/connect/{token}/{app.id}")
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"] == "text/html; charset=utf-8"
            assert answer.headers["cache-control"] == "no-store"
            assert answer.headers["referrer-policy"] == "no-referrer"
            page = parse_page(answer.text)
            assert page.refresh == expected[app.id] and page.open_href == expected[app.id]
            assert "&amp;name=" in answer.text or "&" not in expected[app.id]  # escaped in the attribute
            assert set(app.stores.values()) <= set(page.links)
            assert sub_url in answer.text and page.lang == "en"
            assert f"Open in {app.name}" in answer.text
            # The strict policy: nothing from outside, the one inline script and style by their hashes.
            policy = answer.headers["content-security-policy"]
            assert "default-src 'none'" in policy and "unsafe-inline" not in policy
            assert page.scripts and all(csp_hash(script) in policy for script in page.scripts)
            assert page.styles and all(csp_hash(style) in policy for style in page.styles)
            assert "http" not in policy

        head = await client.head(f"/connect/{token}/happ")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-security-policy"]

        russian = await client.get(f"/connect/{token}/happ", headers={"accept-language": "ru-RU,ru;q=0.9,en;q=0.8"})
        assert russian.status_code == 200 and "Открыть в Happ" in russian.text
        assert parse_page(russian.text).lang == "ru"
        weighted = await client.get(f"/connect/{token}/happ", headers={"accept-language": "de, en;q=0.1, fa;q=0.5"})
        assert parse_page(weighted.text).lang == "fa" and 'dir="rtl"' in weighted.text

        # Unknown app, unknown token, a token with markup in it: 404, and nothing of the request comes back.
        unknown_app = await client.get(f"/connect/{token}/nosuchapp")
        assert unknown_app.status_code == 404 and "nosuchapp" not in unknown_app.text and token not in unknown_app.text
        assert "content-security-policy" in unknown_app.headers
        forged = "A" * 20 + "ZZforgedtoken"
        unknown_token = await client.get(f"/connect/{forged}/happ")
        assert unknown_token.status_code == 404 and forged not in unknown_token.text
        assert "not valid" in unknown_token.text
        for evil in ('"><script>alert(1)</script>', "x'onload='alert(1)", "<b>" + "A" * 20):
            path = f"/connect/{quote(evil, safe='')}/happ"
            answer = await client.get(path)
            assert answer.status_code == 404
            assert "alert" not in answer.text and "<b>" not in answer.text and "onload" not in answer.text
        app_evil = await client.get(f"/connect/{token}/{quote('<i>happ', safe='')}")
        assert app_evil.status_code == 404 and "<i>" not in app_evil.text

        # The per-token limit: a burst, then 429 with Retry-After (another token is not affected).
        statuses = [(await client.get(f"/connect/{'B' * 24}/happ")).status_code for _ in range(12)]
        assert statuses[:10] == [404] * 10 and statuses[10:] == [429, 429]
        limited = await client.get(f"/connect/{'B' * 24}/happ")
        assert int(limited.headers["retry-after"]) >= 1
        assert (await client.get(f"/connect/{'C' * 24}/happ")).status_code == 404
    await vpnd.stop()


async def test_operator_apps_file_changes_the_menu_and_the_pages(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    db_dsn: str,
    write_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    fake, base_url = fake_telegram
    apps_file = tmp_path / "apps.toml"
    apps_file.write_text(
        '[platforms]\ndesk = "Desktop <PC>"\n\n'
        '[[apps]]\nid = "myapp"\nname = "My & App"\nimport = "myapp://import?u={url}&n={name}"\n'
        '[apps.stores]\ndesk = "https://apps.example.test/myapp?a=1&b=2"\n\n'
        '[[apps]]\nid = "pasteonly"\nname = "PasteOnly"\n[apps.stores]\ndesk = "https://apps.example.test/paste"\n'
    )
    config = bot_config(write_config, db_dsn, fake, base_url, connect={"apps_file": str(apps_file)})
    vpnd = await start_vpnd(nursery, config)
    fake.add_user(ALICE, "Alice", language_code="en")
    with trio.fail_after(40):
        key = await start_trial(fake, ALICE)
        platforms = await press(fake, ALICE, key, "conn")
        assert [d for d in platforms.callback_data if d.startswith("conn:")] == ["conn:desk"]
        assert "Desktop <PC>" in [b["text"] for b in platforms.buttons]
        apps = await press(fake, ALICE, platforms, "conn:desk")
        assert "Desktop <PC>" in (apps.text or "")
        token = token_of(db_dsn, ALICE)
        assert url_buttons(apps) == {
            "➕ Add to My & App": f"{BASE}/connect/{token}/myapp",
            "⬇️ Install My & App": "https://apps.example.test/myapp?a=1&b=2",
            "⬇️ Install PasteOnly": "https://apps.example.test/paste",  # no import link: no "Add" button
        }
        mark = fake.change_seq
        forge_callback(fake, ALICE, apps, "conn:android")  # not a platform of this catalog: its menu again
        again = await fake.wait_for_bot_message(ALICE, lambda m: m.message_id == apps.message_id, since=mark)
        assert [d for d in again.callback_data if d.startswith("conn:")] == ["conn:desk"]
    async with httpx.AsyncClient(base_url=vpnd.http_url, timeout=10) as client:
        answer = await client.get(f"/connect/{token}/myapp")
        page = parse_page(answer.text)
        expected = f"myapp://import?u={quote(f'{BASE}/sub/{token}', safe='')}&n=vpnd"
        assert page.refresh == expected and page.open_href == expected
        assert "My &amp; App" in answer.text and "My & App" not in answer.text
        assert "https://apps.example.test/myapp?a=1&b=2" in page.links
        assert "Desktop &lt;PC&gt;" in answer.text
        paste = await client.get(f"/connect/{token}/pasteonly")
        assert paste.status_code == 200 and parse_page(paste.text).refresh is None
        assert "cannot be opened with a link" in paste.text
        assert (await client.get(f"/connect/{token}/happ")).status_code == 404  # not in this catalog
    await vpnd.stop()


async def test_crypto_pay_payment_sends_the_key_photo_once(
    nursery: trio.Nursery,
    fake_telegram: tuple[FakeTelegram, str],
    fake_cryptopay: tuple[FakeCryptoPay, str],
    db_dsn: str,
    write_config: Callable[..., Path],
) -> None:
    fake, _ = fake_telegram
    pay, _ = fake_cryptopay
    vpnd = await start_shop(nursery, write_config, db_dsn, fake_telegram, fake_cryptopay)
    pay.webhook_copies = 2
    fake.add_user(ALICE, "Alice", language_code="en")
    with trio.fail_after(40):
        fake.user_sends(ALICE, "/buy")
        plans = await fake.wait_for_bot_message(ALICE, lambda m: "plan:m1" in m.callback_data)
        methods = await press(fake, ALICE, plans, "plan:m1")
        await press(fake, ALICE, methods, "pay:m1:c", predicate=lambda m: "Crypto Pay" in (m.text or ""))
        purchase_id = scalar(db_dsn, "SELECT id FROM purchases WHERE user_id = %s", ALICE)
        pay.pay(scalar(db_dsn, "SELECT invoice_id FROM purchases WHERE id = %s", purchase_id))
        key = await fake.wait_for_bot_message(ALICE, is_key_photo)
        await pay.wait_until(lambda: len(pay.successful_deliveries()) == 2)
    token = token_of(db_dsn, ALICE)
    assert key.photo is not None and key.photo.data == qr_png(f"{BASE}/sub/{token}")  # drawn at send time
    caption = key.caption or ""
    assert "Payment received" in caption and "30 days" in caption and f"{BASE}/sub/{token}" in caption
    assert key.callback_data == ["conn", "sub"]
    # The outbox row holds the confirmation and the language, no image; it was sent once.
    with trio.fail_after(10):
        while scalar(db_dsn, "SELECT status FROM outbox WHERE dedupe_key = %s", f"payment:{purchase_id}") != "sent":
            await trio.sleep(0.05)
    rows = scalar(
        db_dsn, "SELECT json_agg(json_build_object('m', method, 'p', payload, 's', status)) FROM outbox "
        "WHERE chat_id = %s AND dedupe_key = %s", ALICE, f"payment:{purchase_id}",
    )  # fmt: skip
    assert len(rows) == 1 and rows[0]["m"] == "sendKey" and rows[0]["s"] == "sent"
    assert set(rows[0]["p"]) == {"text", "parse_mode", "lang"}
    await trio.sleep(0.5)
    assert sum(is_key_photo(m) for m in fake.bot_messages(ALICE)) == 1
    await vpnd.stop()


async def test_balance_payment_sends_the_key_photo_in_the_users_language(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ALICE, "Alice", language_code="ru")
    with trio.fail_after(40):
        fake.user_sends(ALICE, "/start")
        await fake.wait_for_bot_message(ALICE)
        with psycopg.connect(db_dsn, autocommit=True) as conn:
            conn.execute("UPDATE users SET balance_minor = 1000 WHERE id = %s", (ALICE,))
            conn.execute(
                "INSERT INTO balance_ledger (user_id, delta_minor, reason, reference) VALUES (%s, 1000, 'test', 'x')",
                (ALICE,),
            )
        fake.user_sends(ALICE, "/buy")
        plans = await fake.wait_for_bot_message(ALICE, lambda m: "plan:m1" in m.callback_data)
        methods = await press(fake, ALICE, plans, "plan:m1")
        fake.user_presses_button(ALICE, methods.message_id, "pay:m1:b")
        key = await fake.wait_for_bot_message(ALICE, is_key_photo)
    caption = key.caption or ""
    assert "Оплата получена" in caption and f"{BASE}/sub/{token_of(db_dsn, ALICE)}" in caption, caption
    assert "Ваша ссылка на подписку" in caption
    assert [b["text"] for b in key.buttons] == ["📲 Подключить устройство", "🔑 Моя подписка"]
    await vpnd.stop()


def test_caption_and_keyboard_are_plain_values() -> None:
    from vpnd.key_message import CAPTION_LIMIT, key_caption, key_keyboard, subscription_url
    from vpnd.texts import Texts

    texts = Texts.load()
    url = subscription_url("https://a.test/", "tok")
    assert url == "https://a.test/sub/tok"
    assert (
        key_caption(texts, "en", "ok", url)
        == "ok\n\n🔗 Your subscription link (tap to copy):\n<code>" + url + "</code>"
    )
    assert key_caption(texts, "en", "x" * CAPTION_LIMIT, url) is None  # too long for a caption: sent as text
    assert key_keyboard(texts, "en")["inline_keyboard"][0][0]["callback_data"] == "conn"
    assert re.fullmatch(
        r".*<code>https://a\.test/sub/&lt;b&gt;</code>",
        key_caption(texts, "en", "", "https://a.test/sub/<b>") or "",
        re.S,
    )


async def test_stars_payment_sends_the_key_photo(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    vpnd = await start_vpnd(nursery, bot_config(write_config, db_dsn, fake, base_url))
    fake.add_user(ALICE, "Alice", language_code="en")
    with trio.fail_after(40):
        fake.user_sends(ALICE, "/buy")
        plans = await fake.wait_for_bot_message(ALICE, lambda m: "plan:m1" in m.callback_data)
        methods = await press(fake, ALICE, plans, "plan:m1")
        fake.user_presses_button(ALICE, methods.message_id, "pay:m1:s")
        invoice = await fake.wait_for_bot_message(ALICE, lambda m: m.invoice is not None)
        fake.user_pays_invoice(ALICE, invoice.message_id)
        key = await fake.wait_for_bot_message(ALICE, is_key_photo)
    assert "Payment received" in (key.caption or "") and f"/sub/{token_of(db_dsn, ALICE)}" in (key.caption or "")
    assert key.callback_data == ["conn", "sub"]
    await vpnd.stop()


async def test_a_payment_while_keys_cannot_be_built_is_confirmed_as_text(
    nursery: trio.Nursery, fake_telegram: tuple[FakeTelegram, str], db_dsn: str, write_config: Callable[..., Path]
) -> None:
    fake, base_url = fake_telegram
    config = bot_config(write_config, db_dsn, fake, base_url, xray={"enabled": False, "public_key": ""})
    vpnd = await start_vpnd(nursery, config)
    fake.add_user(ALICE, "Alice", language_code="en")
    with trio.fail_after(40):
        fake.user_sends(ALICE, "/buy")
        plans = await fake.wait_for_bot_message(ALICE, lambda m: "plan:m1" in m.callback_data)
        methods = await press(fake, ALICE, plans, "plan:m1")
        fake.user_presses_button(ALICE, methods.message_id, "pay:m1:s")
        invoice = await fake.wait_for_bot_message(ALICE, lambda m: m.invoice is not None)
        fake.user_pays_invoice(ALICE, invoice.message_id)
        told = await fake.wait_for_bot_message(ALICE, lambda m: "Payment received" in (m.text or m.caption or ""))
        while scalar(db_dsn, "SELECT status FROM outbox WHERE dedupe_key LIKE 'payment:%%'") != "sent":
            await trio.sleep(0.05)
    assert told.photo is None and told.caption is None and "30 days" in (told.text or "")
    assert "/sub/" not in (told.text or "")
    await vpnd.stop()


def test_page_language_reads_accept_language_by_quality_and_survives_garbage() -> None:
    from vpnd.connect_page import page_language

    langs = ("en", "ru", "uk", "fa", "zh", "tr")
    assert page_language("ru-RU,ru;q=0.9,en;q=0.8", langs, "en") == "ru"
    assert page_language("de;q=1, uk;q=0.3, tr;q=0.7", langs, "en") == "tr"
    assert page_language("zh-Hant-TW", langs, "en") == "zh"
    assert page_language("*, ru;q=0", langs, "tr") == "tr"  # q=0 means "not this one"
    for garbage in (None, "", ";;;", "ru;q=abc", "\x00<script>", "x" * 10_000, ",".join(["de"] * 500) + ",ru"):
        assert page_language(garbage, langs, "en") == "en"
