"""📱 Devices (from "My subscription"): the apps that took a slot of the device limit, and removing one.

Callback data: `dev` (the list) and `dev:rm:<key>` with `vpnd.devices.device_key` of a device id. The
key is only ever matched against the pressing user's own devices, so a forged one removes nothing.
"""

from __future__ import annotations

from functools import partial

from vpnd.devices import device_key, device_name
from vpnd.quota import limits_of
from vpnd.services import devices as devices_service
from vpnd.telegram import keyboards as kb
from vpnd.telegram.flows.menu import show_menu
from vpnd.telegram.turn import Turn

#: Remove buttons shown (a longer list is still counted and listed in the text).
MAX_BUTTONS = 20
_KEY_LENGTH = 12


async def show_devices(turn: Turn, notice: str = "") -> None:
    view = await turn.app.db.run(devices_service.devices_view, turn.user.id, partial(limits_of, turn.app.config))
    if not view.has_subscription:
        await show_menu(turn, turn.t("sub.none"))
        return
    if view.limit:
        header = turn.t("devices.title", used=view.used, limit=view.limit)
    else:
        header = turn.t("devices.title_unlimited", used=view.used)
    items = []
    for device in view.devices:
        system = " ".join(part for part in (device.os, device.os_version) if part) or turn.t("devices.os_unknown")
        items.append(
            turn.t("devices.item", name=device_name(device), os=system, seen=turn.format_date(device.last_seen))
        )
    footer = turn.t("devices.hint") if view.devices else turn.t("devices.none")
    text = "\n\n".join(part for part in (header, "\n".join(items), footer) if part)
    if notice:
        text = notice + "\n\n" + text
    rows = [
        [kb.button("🗑 " + device_name(device)[:40], f"dev:rm:{device_key(device.hwid)}")]
        for device in view.devices[:MAX_BUTTONS]
    ]
    await turn.show(text, kb.keyboard(*rows, [kb.button(turn.t("common.back"), "sub")]))


async def remove_device(turn: Turn, key: str) -> None:
    valid = len(key) == _KEY_LENGTH and all(c in "0123456789abcdef" for c in key)
    removed = await turn.app.db.run(devices_service.remove_own_device, turn.user.id, key) if valid else None
    await turn.answer()
    if removed is None:  # removed meanwhile (another tap), or data no button of this user's carries
        await show_devices(turn, turn.t("devices.not_found"))
        return
    await show_devices(turn, turn.t("devices.removed", name=device_name(removed)))


async def route(turn: Turn, args: list[str]) -> None:
    """`dev` → the list; `dev:rm:<key>` → remove; anything else → the list."""
    if len(args) == 2 and args[0] == "rm":
        await remove_device(turn, args[1])
    else:
        await show_devices(turn)
