"""systemd readiness notification (``Type=notify``), without a dependency.

``notify("READY=1")`` sends one datagram to the unix socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace), as
sd_notify(3) does. Without ``$NOTIFY_SOCKET`` (not started by systemd, or a unit
of another type) it does nothing. A failure to send is logged, never raised: the
notification must not take the daemon down.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock: and other forms are not used by a local systemd unit


def notify(*assignments: str) -> bool:
    """Send ``KEY=value`` lines (``READY=1``, ``STATUS=...``, ``STOPPING=1``); True if sent."""
    value = os.environ.get(ENV)
    if not value:
        return False
    address = _address(value)
    if address is None:
        log.warning("%s=%r is not a unix socket path: readiness not sent", ENV, value)
        return False
    message = "\n".join(a.replace("\n", " ") for a in assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", value, exc.strerror or exc)
        return False
    return True
