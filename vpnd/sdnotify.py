"""sd_notify(3) spoken directly: READY=1, STATUS=, WATCHDOG=1, STOPPING=1 over $NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import attrs
import trio

log = logging.getLogger("vpnd.systemd")


@attrs.define(eq=False)
class Notifier:
    """Sends datagrams to systemd's notify socket; does nothing when not run by systemd."""

    address: str | None
    sock: trio.socket.SocketType | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        return cls(address)

    async def notify(self, *lines: str) -> None:
        if not self.address:
            return
        if self.sock is None:
            self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            await self.sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            log.warning("event=sd_notify_failed error=%s", exc.strerror or type(exc).__name__)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Half of $WATCHDOG_USEC in seconds, if the watchdog is on for this process."""
    environ = os.environ if environ is None else environ
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1_000_000 / 2
    except ValueError:
        return None
