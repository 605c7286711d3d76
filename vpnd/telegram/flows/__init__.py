"""User flows: each function handles one user intent for one `Turn`.

A flow module that adds routes has `register(routes)`; `register_all` calls them in order.
The core flows (menu, access) are registered by `vpnd.telegram.router.register`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vpnd.telegram.router import Routes


def register_all(routes: Routes) -> None:
    """Flows beyond the core: promo codes, buying, payment history, and the admin tools."""
    # Imported here: the admin module imports flows.menu, a top-level import would be circular.
    from vpnd.telegram import admin
    from vpnd.telegram.flows import buy, channel, gifts, history, promo, support

    promo.register(routes)
    buy.register(routes)
    gifts.register(routes)
    history.register(routes)
    channel.register(routes)
    support.register(routes)
    admin.register(routes)
