"""End to end against a real V2Ray 4.x (Debian's `v2ray` package): users added and removed live
through XrayApi decide whether a VLESS client gets through.

    apt-get install -y v2ray      # V2Ray 4.34 on Debian 12; skipped when the binary is absent

V2Ray 4.x has no REALITY, so the VLESS inbound is plain TCP; the API wire format (prefix
"v2ray.core.") and the config layout are the same as Xray-core's.
"""

import json
import shutil
import socket
import subprocess
import uuid

import pytest
import trio

from vpnd.xray.api import XrayApi, XrayApiError, XrayUnavailable
from vpnd.xray.render import Client, load_template, render_config, write_atomically

V2RAY = shutil.which("v2ray")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(V2RAY is None, reason="no v2ray binary (install it with: apt-get install -y v2ray)"),
]

TAG = "vless-in"
PAGE = b"hello through vless"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def v2ray_commands(config):
    """(run, test) argv for this v2ray: 4.x takes flags, 5.x takes subcommands."""
    version = subprocess.run([V2RAY, "-version"], capture_output=True, text=True, timeout=30).stdout
    if version.startswith("V2Ray 4."):
        return [V2RAY, "-config", str(config)], [V2RAY, "-test", "-config", str(config)]
    return [V2RAY, "run", "-c", str(config)], [V2RAY, "test", "-c", str(config)]


def server_template(api_port, vless_port):
    return {
        "log": {"loglevel": "warning"},
        "api": {"tag": "api", "services": ["HandlerService", "StatsService"]},
        "stats": {},
        "policy": {"levels": {"0": {"statsUserUplink": True, "statsUserDownlink": True}}},
        "inbounds": [
            {
                "tag": "api",
                "listen": "127.0.0.1",
                "port": api_port,
                "protocol": "dokodemo-door",
                "settings": {"address": "127.0.0.1"},
            },
            {
                "tag": TAG,
                "listen": "127.0.0.1",
                "port": vless_port,
                "protocol": "vless",
                "settings": {"clients": [], "decryption": "none"},
                "streamSettings": {"network": "tcp", "security": "none"},
            },
        ],
        "outbounds": [{"protocol": "freedom", "tag": "direct"}],
        "routing": {"rules": [{"type": "field", "inboundTag": ["api"], "outboundTag": "api"}]},
    }


def client_config(vless_port, socks_ports_by_uuid):
    """One v2ray acting as VLESS client: a SOCKS inbound per user id, each routed to its own outbound."""
    inbounds, outbounds, rules = [], [], []
    for n, (user_id, socks_port) in enumerate(socks_ports_by_uuid.items()):
        inbounds.append(
            {
                "tag": f"socks{n}",
                "listen": "127.0.0.1",
                "port": socks_port,
                "protocol": "socks",
                "settings": {"auth": "noauth", "udp": False},
            }
        )
        outbounds.append(
            {
                "tag": f"vless{n}",
                "protocol": "vless",
                "settings": {
                    "vnext": [
                        {"address": "127.0.0.1", "port": vless_port, "users": [{"id": user_id, "encryption": "none"}]}
                    ]
                },
            }
        )
        rules.append({"type": "field", "inboundTag": [f"socks{n}"], "outboundTag": f"vless{n}"})
    return {"log": {"loglevel": "warning"}, "inbounds": inbounds, "outbounds": outbounds, "routing": {"rules": rules}}


async def serve_page(port, *, task_status=trio.TASK_STATUS_IGNORED):
    async def handle(stream):
        with trio.move_on_after(5):
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                request += chunk
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(PAGE), PAGE)
            )
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started()
    await trio.serve_listeners(handle, listeners)


async def fetch_via_socks(socks_port, http_port):
    """GET / through a SOCKS5 proxy; returns the raw response (b"" when the tunnel is refused)."""
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream("127.0.0.1", socks_port)
        async with stream:

            async def receive_exactly(n):
                data = b""
                while len(data) < n:
                    chunk = await stream.receive_some(n - len(data))
                    if not chunk:
                        raise EOFError
                    data += chunk
                return data

            try:
                await stream.send_all(b"\x05\x01\x00")
                assert await receive_exactly(2) == b"\x05\x00"
                await stream.send_all(
                    b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + http_port.to_bytes(2, "big")
                )
                reply = await receive_exactly(10)
                if reply[1] != 0:
                    return b""
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                response = b""
                while chunk := await stream.receive_some(65536):
                    response += chunk
                    head, sep, body = response.partition(b"\r\n\r\n")
                    if sep and b"Content-Length: %d" % len(body) in head:
                        break  # complete; don't wait for v2ray's idle timeout to close the tunnel
                return response
            except (EOFError, trio.BrokenResourceError):
                return b""


async def wait_for_port(port):
    with trio.fail_after(30):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


class Processes:
    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs = []

    def start(self, name, argv):
        log = open(self.tmp_path / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.procs.append(proc)
        return proc

    def logs(self):
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp_path.glob("*.log")))

    def stop_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


@pytest.mark.timeout(300)
async def test_live_user_add_and_remove_gate_a_real_vless_client(tmp_path, processes):
    api_port, vless_port, http_port = free_port(), free_port(), free_port()
    in_file, live = str(uuid.uuid4()), str(uuid.uuid4())
    socks = {in_file: free_port(), live: free_port()}

    template_path = tmp_path / "template.json"
    template_path.write_text(json.dumps(server_template(api_port, vless_port)))
    template = load_template(template_path, inbound_tag=TAG)
    server_path = tmp_path / "server.json"
    assert write_atomically(server_path, render_config(template, [Client(uuid=in_file, email="from-file", flow="")]))
    client_path = tmp_path / "client.json"
    client_path.write_text(json.dumps(client_config(vless_port, socks)))

    for path in (server_path, client_path):
        _run, test = v2ray_commands(path)
        with trio.fail_after(30):
            checked = await trio.run_process(test, capture_stdout=True, capture_stderr=True, check=False)
        output = (checked.stdout + checked.stderr).decode(errors="replace")
        assert checked.returncode == 0, output
        assert "Configuration OK" in output

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_page, http_port)
        processes.start("server", v2ray_commands(server_path)[0])
        processes.start("client", v2ray_commands(client_path)[0])
        try:
            with XrayApi(f"127.0.0.1:{api_port}", prefix="v2ray.core.", timeout=10) as api:
                with trio.fail_after(30):
                    while True:
                        try:
                            await api.ping()
                            break
                        except XrayUnavailable:
                            await trio.sleep(0.1)
                    for port in socks.values():
                        await wait_for_port(port)

                # the user from the config file gets through; the other is refused
                assert PAGE in await fetch_via_socks(socks[in_file], http_port)
                assert PAGE not in await fetch_via_socks(socks[live], http_port)

                with trio.fail_after(30):
                    assert await api.add_vless_user(TAG, "live-user", live, "") is True
                    assert await api.add_vless_user(TAG, "live-user", live, "") is False
                assert PAGE in await fetch_via_socks(socks[live], http_port)

                with trio.fail_after(30):
                    traffic = await api.query_user_traffic()
                assert traffic["live-user"].uplink > 0 and traffic["live-user"].downlink > len(PAGE)
                assert traffic["from-file"].downlink > len(PAGE)

                with trio.fail_after(30):
                    with pytest.raises(XrayApiError, match="handler not found"):
                        await api.remove_user("no-such-inbound", "live-user")
                    assert await api.remove_user(TAG, "live-user") is True
                    assert await api.remove_user(TAG, "live-user") is False
                assert PAGE not in await fetch_via_socks(socks[live], http_port)
                assert PAGE in await fetch_via_socks(socks[in_file], http_port)

                with trio.fail_after(30):
                    reset = await api.query_user_traffic(reset=True)
                    after = await api.query_user_traffic()
                assert reset["from-file"].downlink > 0
                assert after["from-file"] == (0, 0)
        except BaseException:
            print(processes.logs())
            raise
        finally:
            nursery.cancel_scope.cancel()
