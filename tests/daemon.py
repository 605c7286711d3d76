"""Moved to vpnd.sandbox.daemon_process (shared with bench/); kept while helpers migrate."""

from vpnd.sandbox.daemon_process import Daemon, NotifySocket, start_daemon, wait_ready

__all__ = ["Daemon", "NotifySocket", "start_daemon", "wait_ready"]
