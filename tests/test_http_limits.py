"""The HTTP endpoint of a real `vpnd run`: slow clients are cut off, connections are capped below
the descriptor limit, /healthz answers under that load, and /metrics and /readyz details are for
operators only (a loopback client no proxy forwarded, or the bearer token)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio

from tests.harness import start_daemon, wait_ready
from vpnd_sandbox.cryptopay_fake import FakeCryptoPay
from vpnd_sandbox.postgres import free_port
from vpnd_sandbox.telegram_fake import FakeTelegram

pytestmark = pytest.mark.slow

#: A request whose body never completes: the webhook route reads bodies.
SLOW_POST = (
    b"POST /webhooks/cryptopay HTTP/1.1\r\nHost: vpnd\r\n"
    b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
)
#: What a reverse proxy on this host adds: the request is then not a local one.
PROXIED = {"x-forwarded-for": "203.0.113.7"}


@pytest.fixture
def config_for(
    write_config: Callable[..., Path],
    db_dsn: str,
    fake_telegram: tuple[FakeTelegram, str],
    fake_cryptopay: tuple[FakeCryptoPay, str],
) -> Callable[..., tuple[Path, int]]:
    def make(**sections: dict[str, object]) -> tuple[Path, int]:
        telegram, telegram_url = fake_telegram
        cryptopay, cryptopay_url = fake_cryptopay
        port = free_port()
        base: dict[str, dict[str, object]] = {
            "telegram": {"token": telegram.token, "api_base_url": telegram_url, "poll_timeout": 1},
            "database": {"dsn": db_dsn, "pool_min": 1, "pool_max": 4},
            "http": {"listen": f"127.0.0.1:{port}"},
            "cryptopay": {"enabled": True, "token": cryptopay.token, "api_base_url": cryptopay_url},
            "shutdown": {"grace_seconds": 2.0},
        }
        for section, values in sections.items():
            base[section] = {**base.get(section, {}), **values}
        return write_config(**base), port

    return make


async def _closed_by_server(stream: trio.SocketStream) -> bytes:
    """Read until the server closes the connection; return what it sent."""
    received = b""
    while True:
        try:
            chunk = await stream.receive_some(4096)
        except trio.BrokenResourceError:  # reset by the server: closed too
            return received
        if not chunk:
            return received
        received += chunk


async def test_a_body_at_one_byte_per_10s_is_cut_off_within_30s(
    config_for: Callable[..., tuple[Path, int]], tmp_path: Path
) -> None:
    """Default timeouts: the slowloris body gets 408 (or is dropped) within 30 s of its start."""
    config, port = config_for()
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config, tmp_path)
        await wait_ready(daemon, f"http://127.0.0.1:{port}")
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(SLOW_POST)
        answer = b""

        async def trickle() -> None:
            # The client under test: one more body byte every 10 s (until the server hangs up).
            while True:
                await trio.sleep(10)
                try:
                    await stream.send_all(b" ")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return

        with trio.fail_after(30):
            async with trio.open_nursery() as client:
                client.start_soon(trickle)
                answer = await _closed_by_server(stream)
                client.cancel_scope.cancel()
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
        await stream.aclose()
        assert (await daemon.get("/healthz")).status_code == 200
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0, daemon.log()
        nursery.cancel_scope.cancel()


async def test_healthz_answers_while_more_slow_clients_than_descriptors_hold_connections(
    config_for: Callable[..., tuple[Path, int]], tmp_path: Path
) -> None:
    """1,300 slow clients against a daemon limited to 1,024 descriptors: /healthz still answers,
    no accept() traceback floods the log (the cap is logged once), and SIGTERM still exits 0."""
    config, port = config_for()
    clients = 1300
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config, tmp_path, nofile=1024)
        await wait_ready(daemon, f"http://127.0.0.1:{port}")
        streams: list[trio.SocketStream] = []

        async def slow_client() -> None:
            # Bounded: without a cap the daemon stops accepting and the kernel's backlog fills up.
            with trio.move_on_after(10):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                streams.append(stream)
                await stream.send_all(SLOW_POST)

        for _ in range(clients // 100):
            async with trio.open_nursery() as batch:
                for _ in range(100):
                    batch.start_soon(slow_client)
        assert len(streams) >= 1000, len(streams)

        with trio.fail_after(10):
            healthz = await daemon.get("/healthz", timeout=10)
        assert healthz.status_code == 200 and healthz.json()["status"] == "ok"
        log = daemon.log()
        assert "Traceback" not in log and "exc=" not in log, log[-3000:]
        assert log.count("event=http_accept_failed") <= 1, log[-3000:]
        assert log.count("event=http_connection_limit ") == 1, log[-3000:]
        assert "event=http_listening" in log and "max_connections=920" in log

        for stream in streams:
            await trio.aclose_forcefully(stream)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0, daemon.log()[-3000:]
        nursery.cancel_scope.cancel()


async def test_metrics_and_readiness_details_are_for_operators_only(
    config_for: Callable[..., tuple[Path, int]], tmp_path: Path
) -> None:
    config, port = config_for(metrics={"token": "metrics-token-for-prometheus"})
    url = f"http://127.0.0.1:{port}"
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config, tmp_path)
        await wait_ready(daemon, url)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            # A proxied (public) client: no metrics, readiness as one word.
            public_metrics = await client.get("/metrics", headers=PROXIED)
            assert public_metrics.status_code == 401 and "vpnd_" not in public_metrics.text
            wrong = await client.get("/metrics", headers={**PROXIED, "authorization": "Bearer nope"})
            assert wrong.status_code == 401
            public_ready = await client.get("/readyz", headers=PROXIED)
            assert public_ready.status_code == 200 and public_ready.json() == {"status": "ready"}

            # The bearer token, or a loopback client no proxy forwarded: everything.
            bearer = {**PROXIED, "authorization": "Bearer metrics-token-for-prometheus"}
            assert "vpnd_db_pool_size" in (await client.get("/metrics", headers=bearer)).text
            assert (await client.get("/readyz", headers=bearer)).json()["checks"]["database"]["ok"] is True
            local = await client.get("/metrics")
            assert local.status_code == 200 and "vpnd_http_connections_open" in local.text
            assert "checks" in (await client.get("/readyz")).json()
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
        assert "metrics-token-for-prometheus" not in daemon.log()
        nursery.cancel_scope.cancel()
