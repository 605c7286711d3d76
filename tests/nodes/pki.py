"""The node certificates of README "Several servers", made with the same openssl commands.

One private CA signs each node's server certificate (for its TLS proxy) and vpnd's client
certificate; both sides trust only that CA, so the API answers vpnd alone and vpnd talks to its
nodes alone.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import attrs

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@attrs.frozen
class Pki:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    def fake_server_tls(self, name: str) -> tuple[bytes, bytes, bytes]:
        """(key, certificate, client CA) for a fake Xray serving mutual TLS as node `name`."""
        return self.key(name).read_bytes(), self.cert(name).read_bytes(), self.ca.read_bytes()

    def node_keys(self, client: str = "vpnd") -> dict[str, str]:
        """The `[[nodes]]` keys that make vpnd use this PKI."""
        return {
            "api_tls_ca": str(self.ca),
            "api_tls_cert": str(self.cert(client)),
            "api_tls_key": str(self.key(client)),
        }


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def ca_command() -> list[str]:
    return ["req", "-x509", *EC, "-days", "3650", "-subj", "/CN=vpnd nodes CA", "-keyout", "ca.key", "-out", "ca.pem"]


def extensions(*, server: bool, san: str) -> str:
    """The certificate's extension file: a node's proxy serves (`san`: its names), vpnd is a client."""
    return f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n" if server else "extendedKeyUsage=clientAuth\n"


def issue_commands(name: str) -> list[list[str]]:
    """A key and a request for `name`, then its certificate signed by the CA with `<name>.ext`."""
    return [
        ["req", *EC, "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr"],
        ["x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-days", "825", "-extfile", f"{name}.ext", "-out", f"{name}.pem"],
    ]  # fmt: skip


def shell_commands(nodes: dict[str, str], client: str = "vpnd") -> list[str]:
    """What `make_pki` runs, as shell lines (README "Several servers (nodes)"): node name → its names."""
    lines = [shlex.join(["openssl", *ca_command()])]
    for name, server, san in [*((node, True, san) for node, san in nodes.items()), (client, False, "")]:
        printf = extensions(server=server, san=san).replace("\n", "\\n")
        lines.append(f"printf '{printf}' > {name}.ext")
        lines += [shlex.join(["openssl", *command]) for command in issue_commands(name)]
    return lines


def make_ca(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(*ca_command(), cwd=directory)
    return Pki(directory)


def issue(pki: Pki, name: str, *, server: bool, san: str = "DNS:localhost,IP:127.0.0.1") -> None:
    """A certificate for a node's TLS proxy (`server`) or for vpnd (a client), signed by the CA."""
    (pki.directory / f"{name}.ext").write_text(extensions(server=server, san=san))
    for command in issue_commands(name):
        _openssl(*command, cwd=pki.directory)


def make_pki(directory: Path, nodes: list[str], client: str = "vpnd") -> Pki:
    pki = make_ca(directory)
    for name in nodes:
        issue(pki, name, server=True)
    issue(pki, client, server=False)
    return pki
