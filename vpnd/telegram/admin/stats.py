"""Stats and health screens."""

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


CALLBACKS: dict[Verb, CallbackAction] = {Verb.STATS: show_stats, Verb.HEALTH: show_health}
