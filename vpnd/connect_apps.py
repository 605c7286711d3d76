"""The client apps "Connect a device" recommends, per platform, and their one-tap import links (pure).

The catalog is data (`vpnd/connect_apps.toml`, or the operator's copy named by `[connect].apps_file`),
read with the configuration so a mistake in it is a configuration error naming the key and the file,
and so SIGHUP re-reads it. Telegram's URL buttons accept only http(s) and tg links, so a bot button
never carries an app's own scheme: it opens vpnd's import page (`/connect/<token>/<app>`), which hands
`App.import_link(...)` to the app (see `vpnd.connect_page`).
"""

from __future__ import annotations

import re
import string
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from urllib.parse import quote, urlsplit

import attrs

#: Where the built-in catalog lives inside the package.
BUILTIN = "connect_apps.toml"

_ID = re.compile(r"[a-z0-9_-]{1,32}")
#: An import link's scheme: an app's own ("happ", "v2rayng") or https; never javascript:/data:/file:.
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,31}")
_REFUSED_SCHEMES = {"javascript", "data", "file", "vbscript", "about", "blob"}
_PLACEHOLDERS = {"url", "raw_url", "name"}


class CatalogError(ValueError):
    """A mistake in the apps file: `key` is where (e.g. `apps[2].import`), `detail` what."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key = key
        self.detail = detail


@attrs.frozen
class ClientApp:
    id: str
    name: str
    #: The import link template ("" when the app can only paste a copied link).
    import_template: str
    #: Platform id → where to get the app (https), in the file's order.
    stores: Mapping[str, str]

    def import_link(self, subscription_url: str, profile_name: str) -> str | None:
        """The link that makes the app add `subscription_url` (None: copy and paste only)."""
        if not self.import_template:
            return None
        return self.import_template.format_map(
            {
                "url": quote(subscription_url, safe=""),
                "raw_url": subscription_url,
                "name": quote(profile_name, safe=""),
            }
        )


@attrs.frozen
class Catalog:
    #: Platform id → the name shown, in menu order.
    platforms: Mapping[str, str]
    apps: tuple[ClientApp, ...]

    def apps_for(self, platform: str) -> tuple[ClientApp, ...]:
        """The apps offered on `platform`, the recommended one first."""
        return tuple(app for app in self.apps if platform in app.stores)

    def app(self, app_id: str) -> ClientApp | None:
        return next((app for app in self.apps if app.id == app_id), None)


def import_page_url(public_base_url: str, sub_token: str, app_id: str) -> str:
    """vpnd's import page for `app_id` (`GET /connect/<token>/<app>`): what a bot or web button links to."""
    return f"{public_base_url.rstrip('/')}/connect/{sub_token}/{app_id}"


def load_catalog(path: str | Path | None = None) -> Catalog:
    """The catalog from `path`, or the built-in one. Raises CatalogError (or OSError for an unreadable file)."""
    if path:
        text = Path(path).read_text("utf-8")
    else:
        text = (resources.files("vpnd") / BUILTIN).read_text("utf-8")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError("(file)", f"not valid TOML: {exc}") from None
    return parse_catalog(raw)


def parse_catalog(raw: Mapping[str, object]) -> Catalog:
    unknown = set(raw) - {"platforms", "apps"}
    if unknown:
        raise CatalogError(sorted(unknown)[0], "unknown key (known: platforms, apps)")
    platforms = raw.get("platforms")
    if not isinstance(platforms, dict) or not platforms:
        raise CatalogError("platforms", "expected a table of platform id = name")
    for key, name in platforms.items():
        _check_id(f"platforms.{key}", key)
        if not isinstance(name, str) or not name.strip():
            raise CatalogError(f"platforms.{key}", "expected a non-empty name")
    apps_raw = raw.get("apps")
    if not isinstance(apps_raw, list) or not apps_raw:
        raise CatalogError("apps", "expected at least one [[apps]] entry")
    apps = tuple(_read_app(f"apps[{index}]", entry, platforms) for index, entry in enumerate(apps_raw))
    seen: set[str] = set()
    for app in apps:
        if app.id in seen:
            raise CatalogError("apps", f"two apps have the id {app.id!r}")
        seen.add(app.id)
    return Catalog(dict(platforms), apps)


def _read_app(where: str, entry: object, platforms: Mapping[str, str]) -> ClientApp:
    if not isinstance(entry, dict):
        raise CatalogError(where, "expected a table")
    unknown = set(entry) - {"id", "name", "import", "stores"}
    if unknown:
        raise CatalogError(f"{where}.{sorted(unknown)[0]}", "unknown key (known: id, name, import, stores)")
    app_id = entry.get("id")
    if not isinstance(app_id, str):
        raise CatalogError(f"{where}.id", 'missing (a short name such as "happ")')
    _check_id(f"{where}.id", app_id)
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CatalogError(f"{where}.name", "expected a non-empty name")
    template = entry.get("import", "")
    if not isinstance(template, str):
        raise CatalogError(f"{where}.import", "expected a string")
    if template:
        _check_template(f"{where}.import", template)
    stores = entry.get("stores")
    if not isinstance(stores, dict) or not stores:
        raise CatalogError(f"{where}.stores", "expected a table of platform id = https link")
    for platform, link in stores.items():
        key = f"{where}.stores.{platform}"
        if platform not in platforms:
            raise CatalogError(key, f"unknown platform (known: {', '.join(platforms)})")
        if not isinstance(link, str) or urlsplit(link).scheme != "https" or not urlsplit(link).netloc:
            raise CatalogError(key, "expected an https:// link")
    return ClientApp(app_id, name.strip(), template, dict(stores))


def _check_id(key: str, value: str) -> None:
    if not _ID.fullmatch(value):
        raise CatalogError(key, f"{value!r} is not a short id (a-z, 0-9, '-', '_', at most 32)")


def _check_template(key: str, template: str) -> None:
    scheme, sep, _ = template.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme) or scheme in _REFUSED_SCHEMES or scheme == "http":
        raise CatalogError(key, "expected an app link such as happ://add/{raw_url} (its own scheme, or https)")
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as exc:
        raise CatalogError(key, f"bad placeholder: {exc}") from None
    unknown = fields - _PLACEHOLDERS
    if unknown:
        raise CatalogError(key, f"unknown placeholder {{{sorted(unknown)[0]}}} (known: {{url}}, {{raw_url}}, {{name}})")
    if not fields & {"url", "raw_url"}:
        raise CatalogError(key, "has no {url} or {raw_url}: the app would not get the subscription")
