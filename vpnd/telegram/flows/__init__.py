"""User flows: each function handles one user intent for one `Turn`.

A flow module that adds routes has `register(routes)`; `register_all` calls them in order.
The core flows (menu, access) are registered by `vpnd.telegram.router.register`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vpnd.telegram.router import Routes


def register_all(routes: Routes) -> None:
    """Flows beyond the core (promo codes, buying, admin) — each registers its own routes."""
    del routes  # no extra flows yet
