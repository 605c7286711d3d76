"""📲 Connect a device: a platform menu, then the recommended apps for it with one-tap import.

Callback data: `conn` (the platform menu) and `conn:<platform>` (the apps of a platform from the catalog,
`[connect].apps_file`). Each app gets an "Install" button (its store link) and, when it has an import
link, an "Add to" button that opens vpnd's import page `/connect/<token>/<app>` (`vpnd.connect_page`):
Telegram's URL buttons take only http(s) and tg links, so an app's own scheme never goes in a button.
A forged platform gets a polite answer and the menu again; without a subscription, the main menu.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from vpnd.connect_apps import import_page_url
from vpnd.db import subscriptions
from vpnd.db.subscriptions import Subscription
from vpnd.telegram import keyboards as kb
from vpnd.telegram.flows import access
from vpnd.telegram.flows.menu import show_menu
from vpnd.telegram.turn import Turn

if TYPE_CHECKING:
    from vpnd.telegram.router import Routes

#: Platform buttons per row in the menu.
PLATFORMS_PER_ROW = 2


async def route(turn: Turn, args: list[str]) -> None:
    sub = await turn.app.db.run(subscriptions.get_subscription, turn.user.id)
    if sub is None:
        await show_menu(turn, turn.t("sub.none"))
        return
    if not args:
        await choose_platform(turn)
        return
    platform = args[0]
    if len(args) != 1 or platform not in turn.app.config.connect.catalog.platforms:
        await turn.answer(turn.t("connect.unknown_platform"), alert=True)
        await choose_platform(turn)
        return
    await show_apps(turn, sub, platform)


async def choose_platform(turn: Turn) -> None:
    platforms = list(turn.app.config.connect.catalog.platforms.items())
    buttons = [kb.button(name, f"conn:{platform}") for platform, name in platforms]
    rows = [buttons[i : i + PLATFORMS_PER_ROW] for i in range(0, len(buttons), PLATFORMS_PER_ROW)]
    await turn.show(turn.t("connect.choose_platform"), kb.keyboard(*rows, [kb.button(turn.t("common.back"), "sub")]))


async def show_apps(turn: Turn, sub: Subscription, platform: str) -> None:
    if await access.links_or_report(turn, sub) is None:
        await turn.show(turn.t("sub.key_pending"), kb.back_to_menu(turn.t))
        return
    config = turn.app.config
    catalog = config.connect.catalog
    rows = []
    for app in catalog.apps_for(platform):
        install = kb.url_button(_label(turn, "connect.install", app.name), app.stores[platform])
        if app.import_template:
            add = kb.url_button(
                _label(turn, "connect.add", app.name),
                import_page_url(config.http.public_base_url, sub.sub_token, app.id),
            )
            rows.append([add, install])
        else:
            rows.append([install])
    text = turn.t("connect.apps", platform=catalog.platforms[platform], url=access.subscription_url(turn, sub))
    await turn.show(text, kb.keyboard(*rows, [kb.button(turn.t("common.back"), "conn")]))


def _label(turn: Turn, key: str, app_name: str) -> str:
    """A button's label: plain text, not HTML (the texts escape the values they put in)."""
    return html.unescape(turn.t(key, app=app_name))


def register(routes: Routes) -> None:
    routes.callbacks["conn"] = route
