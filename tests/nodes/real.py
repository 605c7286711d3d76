"""Real nodes for tests: V2Ray processes, each with its API on loopback behind nginx terminating mutual
TLS — README "Several servers (nodes)", with the very server block the README shows (`NGINX_SERVER`).

Each node is a V2Ray (`tests.v2ray`: API inbound and VLESS inbound on 127.0.0.1) with its own server
block in one nginx: TLS with the node's certificate, `ssl_verify_client on` against the private nodes
CA (`tests.nodes.pki`), HTTP/2 (gRPC clients insist on ALPN h2), `grpc_pass` to the API. vpnd reaches
the node only through that port, with its client certificate, as in production.

    apt-get install -y v2ray nginx      # or `make system-deps` as root; tests skip without them
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from tests.harness import toml_value
from tests.keys import PUBLIC_KEY, SHORT_ID
from tests.nodes.pki import Pki, make_pki
from tests.v2ray import TAG, Processes, free_port, server_template, v2ray_commands
from vpnd.xray.api import ApiTls, XrayApi, XrayUnavailable

NGINX = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
NO_NGINX = "no nginx binary (install it with: apt-get install -y nginx, or make system-deps as root)"
PREFIX = "v2ray.core."

#: A node's server block. The README shows it with `README_EXAMPLE`; the tests run it as it is.
NGINX_SERVER = """\
upstream {upstream} {{
    server 127.0.0.1:{api_port};
    keepalive 32;
}}

server {{
    listen {listen} ssl http2;
    ssl_certificate        {cert};
    ssl_certificate_key    {key};
    ssl_client_certificate {ca};
    ssl_verify_client      on;
    ssl_protocols          TLSv1.3;

    location / {{
        grpc_pass grpc://{upstream};
    }}
}}
"""

#: The README's values: the node "de1" with Xray's API inbound on 127.0.0.1:10085.
README_EXAMPLE: dict[str, Any] = {
    "listen": "10443",
    "cert": "/etc/nginx/vpnd/de1.pem",
    "key": "/etc/nginx/vpnd/de1.key",
    "ca": "/etc/nginx/vpnd/ca.pem",
    "api_port": 10085,
    "upstream": "xray_de1",
}


def nginx_conf(directory: Path, servers: list[str]) -> str:
    """A whole nginx.conf that runs from `directory` (pid, error log, temp files in it), as any user.

    As root nginx's workers would switch to `nobody`, who cannot enter the test's 0700 directory:
    `user root;` keeps them able to (a real node keeps the default user; the master reads the keys).
    """
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = "".join(f"    {kind}_temp_path {directory / kind};\n" for kind in kinds)
    return (
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"worker_processes 1;\npid {directory / 'nginx.pid'};\nerror_log {directory / 'error.log'} info;\n"
        + "events { worker_connections 256; }\n"
        + "http {\n    access_log off;\n"
        + temp
        + "".join(servers)
        + "}\n"
    )


@attrs.define(eq=False)
class RealNode:
    name: str
    api_port: int
    vless_port: int
    tls_port: int
    config: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def api_address(self) -> str:
        """What vpnd dials: the node's nginx (mutual TLS), never the API itself."""
        return f"127.0.0.1:{self.tls_port}"


@attrs.define(eq=False)
class RealNodes:
    directory: Path
    pki: Pki
    processes: Processes
    nodes: dict[str, RealNode]

    def start(self, name: str) -> None:
        """Start the node's V2Ray (its config file has no user: vpnd adds them live)."""
        node = self.nodes[name]
        node.process = self.processes.start(name, v2ray_commands(node.config)[0])

    def kill(self, name: str) -> None:
        process = self.nodes[name].process
        assert process is not None
        self.processes.kill(process)

    def api(self, name: str, tls: ApiTls | None = None) -> XrayApi:
        """A client of the node's API through its nginx, as vpnd (or with `tls`)."""
        return XrayApi(self.nodes[name].api_address, prefix=PREFIX, timeout=10, tls=tls or self.tls())

    def tls(self, client: str = "vpnd", pki: Pki | None = None) -> ApiTls:
        """The mutual-TLS material of `client` (of `pki`, another CA, when given)."""
        issuer = pki or self.pki
        return ApiTls(self.pki.ca.read_bytes(), issuer.cert(client).read_bytes(), issuer.key(client).read_bytes())

    async def wait_up(self, name: str) -> None:
        """Until the node's API answers through nginx."""
        with self.api(name) as api, trio.fail_after(30):
            while True:
                try:
                    await api.ping()
                    return
                except XrayUnavailable:
                    await trio.sleep(0.05)

    def node_toml(self, name: str) -> str:
        """The node's `[[nodes]]` table for vpnd (flow "": V2Ray 4 has no Vision)."""
        node = self.nodes[name]
        keys: dict[str, Any] = {
            "name": name,
            "host": "127.0.0.1",
            "port": node.vless_port,
            "public_key": PUBLIC_KEY,
            "short_id": SHORT_ID,
            "flow": "",
            "inbound_tag": TAG,
            "api_address": node.api_address,
            "api_prefix": PREFIX,
            **self.pki.node_keys(),
        }
        lines = [f"{key} = {toml_value(value)}\n" for key, value in keys.items()]
        return f'[[nodes]]\nlocation = {{ en = "Node {name}" }}\n' + "".join(lines)

    def nginx_log(self) -> str:
        return (self.directory / "error.log").read_text(errors="replace")


@asynccontextmanager
async def open_real_nodes(directory: Path, names: list[str]) -> AsyncIterator[RealNodes]:
    """V2Ray nodes `names` behind one nginx (a server block each), all answering; stopped at exit."""
    assert NGINX is not None
    pki = make_pki(directory / "pki", names)
    processes = Processes(directory)
    nodes = {}
    for name in names:
        node = RealNode(name, free_port(), free_port(), free_port(), directory / f"{name}.json")
        node.config.write_text(json.dumps(server_template(node.api_port, node.vless_port)))
        nodes[name] = node
    servers = [
        NGINX_SERVER.format(
            listen=f"127.0.0.1:{node.tls_port}",
            cert=pki.cert(name),
            key=pki.key(name),
            ca=pki.ca,
            api_port=node.api_port,
            upstream=f"xray_{name}",
        )
        for name, node in nodes.items()
    ]
    conf = directory / "nginx.conf"
    conf.write_text(nginx_conf(directory, servers))
    real = RealNodes(directory, pki, processes, nodes)
    try:
        processes.start("nginx", [NGINX, "-e", "stderr", "-p", str(directory), "-c", str(conf), "-g", "daemon off;"])
        for name in names:
            real.start(name)
        for name in names:
            await real.wait_up(name)
        yield real
    except BaseException:
        print(processes.logs())
        raise
    finally:
        processes.stop_all()
