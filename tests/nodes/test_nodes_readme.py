"""README "Several servers (nodes)" shows what the real-node tests run: the nginx server block and the
openssl commands are the tests' own, and its `[[nodes]]` entry loads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.keys import PUBLIC_KEY
from tests.nodes.pki import make_pki, shell_commands
from tests.nodes.real import NGINX_SERVER, README_EXAMPLE
from vpnd.config import load_config


def readme_block(language: str) -> str:
    """The first ```<language> block of README "Several servers (nodes)"."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Several servers (nodes)\n", 1)[1]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_readme_shows_the_tested_nginx_server_block() -> None:
    assert readme_block("nginx") == NGINX_SERVER.format(**README_EXAMPLE)


def test_the_readme_shows_the_openssl_commands_the_tests_run() -> None:
    assert readme_block("sh").splitlines() == shell_commands({"de1": "DNS:de1.example.com"})


def test_the_readmes_node_loads(tmp_path: Path, write_config: Callable[..., Path], db_dsn: str) -> None:
    pki = make_pki(tmp_path / "pki", [])  # the files vpnd checks are there (the key stays a placeholder)
    text = readme_block("toml").replace("/etc/vpnd/nodes/", f"{pki.directory}/")
    config = load_config(write_config(text.replace('"..."', f'"{PUBLIC_KEY}"'), database={"dsn": db_dsn}), environ={})
    (node,) = config.nodes
    assert (node.name, node.api_address, node.label("ru")) == ("de1", "de1.example.com:10443", "🇩🇪 Франкфурт")
    assert node.tls is not None and node.tls.cert_file == str(pki.cert("vpnd"))
