"""Rotate all keys from the admin menu (after a leak): a confirmation that says how many subscriptions
(and how many running ones would be told), then the rotation's progress — refreshed on demand, with
Pause/Resume and Stop — while the daemon's `key_rotation` worker replaces the keys batch by batch. The
actions are `vpnd.services.key_rotation`'s, audited like the CLI's; the admin who started it is told
when it ends (through the outbox)."""

from __future__ import annotations

from typing import cast

from vpnd.db.key_rotation import Rotation
from vpnd.db.key_rotation import Verb as Steer
from vpnd.services import key_rotation as service
from vpnd.telegram import keyboards as kb
from vpnd.telegram.admin import views
from vpnd.telegram.admin.common import CallbackAction, actor, nonce, with_notice
from vpnd.telegram.admin.verbs import Press, Verb
from vpnd.telegram.turn import Turn


def progress_text(turn: Turn, r: Rotation) -> str:
    return turn.t(
        "admin.rotate.progress",
        id=r.id,
        status=turn.t(f"admin.rotate.status.{r.status}"),
        done=r.rotated + r.skipped,
        total=r.total,
        rotated=r.rotated,
        skipped=r.skipped,
        notified=r.notified,
        batch=r.batch_size,
        interval=f"{turn.app.config.xray.rotate_interval_seconds:g}",
    )


def progress_keyboard(turn: Turn, r: Rotation) -> kb.Keyboard:
    back = [kb.button(turn.t("admin.back"), Verb.MENU.data())]
    if not r.is_open:
        return kb.keyboard([kb.button(turn.t("admin.rotate.new"), Verb.ROTATE_KEYS_NEW.data())], back)
    steer = (
        kb.button(turn.t("admin.rotate.pause"), Verb.ROTATE_KEYS_STEER.data(r.id, "pause"))
        if r.status == "running"
        else kb.button(turn.t("admin.rotate.resume"), Verb.ROTATE_KEYS_STEER.data(r.id, "resume"))
    )
    return kb.keyboard(
        [kb.button(turn.t("admin.rotate.refresh"), Verb.ROTATE_KEYS.data()), steer],
        [kb.button(turn.t("admin.rotate.cancel"), Verb.ROTATE_KEYS_STEER.data(r.id, "cancel"))],
        back,
    )


async def show_progress(turn: Turn, r: Rotation, notice: str = "") -> None:
    await turn.show(with_notice(notice, progress_text(turn, r)), progress_keyboard(turn, r))


async def show(turn: Turn, press: Press) -> None:
    """The open rotation's progress, else the latest one's summary, else the confirmation."""
    found = await turn.app.db.run(service.status)
    if found is None:
        await ask(turn, press)
        return
    await show_progress(turn, found)


async def ask(turn: Turn, press: Press) -> None:
    facts = await turn.app.db.run(service.rotatable)
    if facts.subscriptions == 0:
        await turn.show(turn.t("admin.rotate.none"), views.back_keyboard(turn.t))
        return
    once = nonce()
    text = turn.t(
        "admin.rotate.confirm",
        total=facts.subscriptions,
        running=facts.running,
        batch=turn.app.config.xray.rotate_batch_size,
        interval=f"{turn.app.config.xray.rotate_interval_seconds:g}",
    )
    await turn.show(
        text,
        kb.keyboard(
            [kb.button(turn.t("admin.rotate.notify", n=facts.running), Verb.ROTATE_KEYS_START.data(1, once))],
            [kb.button(turn.t("admin.rotate.silent"), Verb.ROTATE_KEYS_START.data(0, once))],
            [kb.button(turn.t("admin.cancel"), Verb.CANCEL.data())],
        ),
    )


async def start(turn: Turn, press: Press) -> None:
    notify, once = press.args[0] == "1", press.args[1]
    batch = turn.app.config.xray.rotate_batch_size
    done = await turn.app.db.run(service.start, actor(turn), batch_size=batch, notify=notify, nonce=once)
    if isinstance(done, service.RotationRunning):
        assert done.rotation is not None
        await show_progress(turn, done.rotation, turn.t("admin.rotate.open"))
        return
    notice = turn.t("admin.already_done") if done.repeated else turn.t("admin.rotate.started")
    await show_progress(turn, done.rotation, notice)


async def steer(turn: Turn, press: Press) -> None:
    rotation_id, verb = press.number(0), cast(Steer, press.args[1])
    done = await turn.app.db.run(service.change, actor(turn), verb, rotation_id)
    if isinstance(done, service.NoRotation):
        current = await turn.app.db.run(service.status)
        if current is None:
            await ask(turn, press)
            return
        notice = turn.t("admin.rotate.unchanged", status=turn.t(f"admin.rotate.status.{current.status}"))
        await show_progress(turn, current, notice)
        return
    await show_progress(turn, done)


CALLBACKS: dict[Verb, CallbackAction] = {
    Verb.ROTATE_KEYS: show,
    Verb.ROTATE_KEYS_NEW: ask,
    Verb.ROTATE_KEYS_START: start,
    Verb.ROTATE_KEYS_STEER: steer,
}
