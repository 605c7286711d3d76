"""`vpnd sandbox` (what `make demo` runs): starts everything, a person can talk to the bot, Ctrl-C is clean."""

from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from tests.x25519_reference import public_key_of
from vpnd.xray.links import parse_vless_link
from vpnd_sandbox.postgres import free_port

pytestmark = pytest.mark.slow


async def test_demo_starts_answers_in_the_web_chat_and_stops_on_ctrl_c() -> None:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "vpnd", "sandbox", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(60):
            while b"Stop with Ctrl-C" not in output:
                chunk = await process.stdout.receive_some(65536)
                assert chunk, output.decode()
                output += chunk
        url = re.search(rb"Open the web chat:\s+(\S+)", output)
        assert url is not None and url.group(1).decode() == f"http://127.0.0.1:{port}/"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=45) as client:
            page = await client.get("/")
            assert page.status_code == 200 and "<html" in page.text
            with trio.fail_after(30):
                while True:  # the bot polls once it is ready
                    ready = await client.get("/sandbox/api/stats")
                    if ready.json()["result"]["requests"].get("getUpdates"):
                        break
                    await trio.sleep(0.2)
            sent = await client.post("/sandbox/api/users/1001/send", json={"text": "/start"})
            assert sent.status_code == 200, sent.text
            reply = await client.get("/sandbox/api/chats/1001/wait", params={"timeout": 20})
            assert reply.status_code == 200, reply.text
            assert "Main menu" in reply.text

            # Buy a month with Crypto Pay, as a person would: buttons, the invoice link, "Pay".
            async def press(data: str) -> dict[str, object]:
                chat = (await client.get("/sandbox/api/chats/1001")).json()["result"]
                message = next(m for m in reversed(chat["messages"]) if data in str(m.get("reply_markup")))
                pressed = await client.post(
                    "/sandbox/api/users/1001/press", json={"message_id": message["message_id"], "data": data}
                )
                assert pressed.status_code == 200, pressed.text
                waited = await client.get("/sandbox/api/chats/1001/wait", params={"timeout": 20})
                assert waited.status_code == 200, waited.text
                result: dict[str, object] = waited.json()["result"]
                return result

            await press("buy")
            await press("plan:m1")
            invoice = await press("pay:m1:c")
            pay_url = re.search(r"'url': '([^']+/invoice/[^']+)'", str(invoice))
            assert pay_url is not None, invoice
            version = (await client.get("/sandbox/api/chats/1001")).json()["result"]["version"]
            async with httpx.AsyncClient(timeout=10, follow_redirects=True) as pay_client:
                paid = await pay_client.post(pay_url.group(1) + "/pay")
                assert paid.status_code == 200
            received = await client.get("/sandbox/api/chats/1001/wait", params={"timeout": 30, "since": version})
            assert "Payment received" in received.text, received.text

            # "My subscription" shows a key that works with the Xray config vpnd wrote: the link's
            # public key belongs to the template's private key (the example pair of config.toml).
            sent = await client.post("/sandbox/api/users/1001/send", json={"text": "/start"})
            assert sent.status_code == 200, sent.text
            await client.get("/sandbox/api/chats/1001/wait", params={"timeout": 20})
            shown = await press("sub")
            link = re.search(r"vless://[^\s<\"']+", str(shown))
            assert link is not None, shown
            public_key = parse_vless_link(html.unescape(link.group(0))).public_key
            xray_path = re.search(rb"Xray config \(vpnd writes it\): (\S+)", output)
            assert xray_path is not None
            document = json.loads(Path(xray_path.group(1).decode()).read_text())
            reality = next(i for i in document["inbounds"] if i.get("protocol") == "vless")["streamSettings"]
            assert public_key == public_key_of(reality["realitySettings"]["privateKey"])

            # And three months by card (Telegram Payments, in RUB): the invoice, "Pay", the payment received.
            async def messages() -> list[dict[str, object]]:
                result: list[dict[str, object]] = (await client.get("/sandbox/api/chats/1001")).json()["result"][
                    "messages"
                ]
                return result

            sent = await client.post("/sandbox/api/users/1001/send", json={"text": "/buy"})
            assert sent.status_code == 200, sent.text
            await client.get("/sandbox/api/chats/1001/wait", params={"timeout": 20})
            await press("plan:m3")
            await press("pay:m3:k")
            with trio.fail_after(20):
                while not (invoices := [m for m in await messages() if "invoice" in m]):
                    await trio.sleep(0.1)
            card = invoices[-1]
            invoice = card["invoice"]
            assert isinstance(invoice, dict) and (invoice["currency"], invoice["amount_text"]) == ("RUB", "799.00 RUB")
            paid = await client.post("/sandbox/api/users/1001/pay", json={"message_id": card["message_id"]})
            assert paid.status_code == 200 and paid.json()["result"]["total_amount"] == 79900, paid.text
            with trio.fail_after(30):
                while sum("Payment received" in str(m.get("text") or m.get("caption")) for m in await messages()) < 2:
                    await trio.sleep(0.2)
    finally:
        process.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            code = await process.wait()
        rest = await process.stdout.receive_some(1 << 20)
        output += rest or b""
    assert code == 0, output.decode()[-3000:]
    assert b"vpnd sandbox stopped." in output
    assert b"Traceback" not in output
