"""`vpnd sandbox` (what `make demo` runs): starts everything, a person can talk to the bot, Ctrl-C is clean."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import pytest
import trio

from vpnd.sandbox.postgres import free_port

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
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
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
    finally:
        process.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            code = await process.wait()
        rest = await process.stdout.receive_some(1 << 20)
        output += rest or b""
    assert code == 0, output.decode()[-3000:]
    assert b"vpnd sandbox stopped." in output
    assert b"Traceback" not in output
