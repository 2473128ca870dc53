"""sd_notify without libsystemd: one datagram to ``$NOTIFY_SOCKET`` (``@`` = abstract socket)."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*lines: str) -> bool:
    """Send ``READY=1``, ``STATUS=…`` etc.; False (and no error) when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode("utf-8", "replace"))
        return True
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", address, exc)
        return False


def watchdog_timeout() -> float | None:
    """``$WATCHDOG_USEC`` (systemd's ``WatchdogSec``) in seconds, if its watchdog is on for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1_000_000 or None
    except ValueError:
        return None


def watchdog_interval() -> float | None:
    """How often to ping the watchdog: half its timeout, as sd_watchdog_enabled(3) advises."""
    timeout = watchdog_timeout()
    return timeout / 2 if timeout else None
