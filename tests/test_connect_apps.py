"""The client apps catalog: the built-in file is valid, import links are built right, and an operator's
mistake in their copy is a configuration error naming the key and the file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from vpnd.config import ConfigError, load_config
from vpnd.connect_apps import CatalogError, load_catalog, parse_catalog

URL = "https://vpn.example.com/sub/AbC_def-123456789012"


def test_builtin_catalog_offers_an_app_on_every_platform() -> None:
    catalog = load_catalog()
    assert list(catalog.platforms) == ["ios", "android", "windows", "macos", "linux", "androidtv"]
    for platform in catalog.platforms:
        assert catalog.apps_for(platform), platform
    assert catalog.apps_for("ios")[0].id == "happ"


def test_import_links_encode_where_the_scheme_wants_it() -> None:
    catalog = load_catalog()
    happ = catalog.app("happ")
    v2rayng = catalog.app("v2rayng")
    hiddify = catalog.app("hiddify")
    assert happ is not None and v2rayng is not None and hiddify is not None
    assert happ.import_link(URL, "My VPN") == f"happ://add/{URL}"
    assert v2rayng.import_link(URL, "My VPN") == (
        "v2rayng://install-sub?url=https%3A%2F%2Fvpn.example.com%2Fsub%2FAbC_def-123456789012&name=My%20VPN"
    )
    assert hiddify.import_link(URL, "a&b#c") == f"hiddify://import/{URL}#a%26b%23c"


def _catalog(import_link: str = "x://add/{raw_url}", store: str = "https://example.com/x") -> dict[str, object]:
    app = {"id": "x", "name": "X", "import": import_link, "stores": {"ios": store}}
    return {"platforms": {"ios": "iOS"}, "apps": [app]}


@pytest.mark.parametrize(
    ("catalog", "key"),
    [
        (_catalog(import_link="javascript://alert(1)//{url}"), "apps[0].import"),
        (_catalog(import_link="http://evil/{url}"), "apps[0].import"),
        (_catalog(import_link="x://add/{token}"), "apps[0].import"),
        (_catalog(import_link="x://add/"), "apps[0].import"),
        (_catalog(store="http://example.com/x"), "apps[0].stores.ios"),
        ({"platforms": {"ios": "iOS"}, "apps": [{"id": "x", "name": "X", "stores": {"tv": "https://e.com"}}]},
         "apps[0].stores.tv"),
        ({"platforms": {"ios": "iOS"}, "apps": [{"id": "Bad Id", "name": "X", "stores": {"ios": "https://e.com"}}]},
         "apps[0].id"),
        ({"platforms": {}, "apps": []}, "platforms"),
    ],
)
def test_mistakes_name_their_key(catalog: dict[str, object], key: str) -> None:
    with pytest.raises(CatalogError) as caught:
        parse_catalog(catalog)
    assert caught.value.key == key


def test_operator_copy_is_read_relative_to_the_config_and_errors_name_file_and_key(
    write_config: Callable[..., Path],
) -> None:
    path = write_config(connect={"apps_file": "apps.toml"})
    (path.parent / "apps.toml").write_text(
        '[platforms]\nios = "iOS"\n[[apps]]\nid = "only"\nname = "Only"\nimport = "only://{raw_url}"\n'
        '[apps.stores]\nios = "https://example.com/only"\n'
    )
    config = load_config(path)
    assert [app.id for app in config.connect.catalog.apps] == ["only"]

    (path.parent / "apps.toml").write_text('[platforms]\nios = "iOS"\n[[apps]]\nid = "only"\nname = "Only"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "[connect].apps_file"
    assert "apps.toml: apps[0].stores" in str(caught.value)

    (path.parent / "apps.toml").unlink()
    with pytest.raises(ConfigError, match=r"\[connect\]\.apps_file: cannot read"):
        load_config(path)
