"""Stats, health and nodes screens."""

from __future__ import annotations

from vpnd.services import admin_actions as actions
from vpnd.telegram.admin import views
from vpnd.telegram.admin.common import CallbackAction, actor
from vpnd.telegram.admin.verbs import Press, Verb
from vpnd.telegram.turn import Turn


async def show_stats(turn: Turn, press: Press) -> None:
    stats = await turn.app.db.run(actions.stats, actor(turn))
    await turn.show(views.stats_text(turn.t, stats), views.back_keyboard(turn.t))


async def show_health(turn: Turn, press: Press) -> None:
    checks = await turn.app.health.readiness()
    facts = await turn.app.db.run(actions.health, actor(turn))
    await turn.show(views.health_text(turn.t, checks, facts), views.back_keyboard(turn.t))


async def show_nodes(turn: Turn, press: Press) -> None:
    """The Xray nodes as their writers last recorded them (Refresh reads again)."""
    config = turn.app.config
    found = await turn.app.db.run(
        actions.nodes, actor(turn), config.managed_nodes, turn.lang, reconcile_interval=config.xray.reconcile_interval
    )
    await turn.show(views.nodes_text(turn.t, found), views.nodes_keyboard(turn.t))


CALLBACKS: dict[Verb, CallbackAction] = {Verb.STATS: show_stats, Verb.HEALTH: show_health, Verb.NODES: show_nodes}
