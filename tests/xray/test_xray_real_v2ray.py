"""End to end against a real V2Ray 4.x (Debian's `v2ray` package): users added and removed live
through XrayApi decide whether a VLESS client gets through (helpers: `tests.v2ray`).
"""

import json
import uuid

import pytest
import trio

from tests.v2ray import (
    NO_V2RAY,
    PAGE,
    TAG,
    V2RAY,
    Processes,
    client_config,
    fetch_via_socks,
    free_port,
    serve_page,
    server_template,
    v2ray_commands,
    wait_for_port,
)
from vpnd.xray.api import XrayApi, XrayApiError, XrayUnavailable
from vpnd.xray.render import Client, load_template, render_config, write_atomically

pytestmark = [pytest.mark.slow, pytest.mark.skipif(V2RAY is None, reason=NO_V2RAY)]


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
    client_path.write_text(json.dumps(client_config((port, vless_port, user) for user, port in socks.items())))

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
