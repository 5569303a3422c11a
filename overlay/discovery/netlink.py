"""``netlink``: the first IPv4 address of ``discovery.interface`` (read with pyroute2).

The public address is the first IPv4 address of ``discovery.public_interface``
when given, else the same as the private one (a host whose edge does no NAT).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from overlay.discovery import DiscoveryError

if TYPE_CHECKING:
    from overlay.config import Config

IFA_F_SECONDARY = 0x01


def first_ipv4(ipr, interface: str) -> str:
    """The first (primary) IPv4 address of ``interface``, via an open pyroute2 IPRoute."""
    index = ipr.link_lookup(ifname=interface)
    if not index:
        raise DiscoveryError(f"discovery: interface {interface!r} does not exist")
    msgs = [m for m in ipr.get_addr(family=socket.AF_INET, index=index[0]) if m.get("index") == index[0]]
    primary = [m for m in msgs if not m.get("flags", 0) & IFA_F_SECONDARY] or msgs
    for m in primary:
        value = m.get("IFA_LOCAL") or m.get("IFA_ADDRESS")
        if value:
            return value
    raise DiscoveryError(f"discovery: interface {interface!r} has no IPv4 address")


def addresses(interface: str, public_interface: str | None = None) -> tuple[str, str]:
    """``(private, public)`` from the interfaces' addresses."""
    try:
        from pyroute2 import IPRoute
    except ImportError:  # pragma: no cover - pyroute2 is a dependency
        raise DiscoveryError("discovery provider netlink needs pyroute2") from None
    try:
        with IPRoute() as ipr:
            private = first_ipv4(ipr, interface)
            public = first_ipv4(ipr, public_interface) if public_interface else private
    except OSError as exc:
        raise DiscoveryError(f"discovery: netlink query failed: {exc}") from None
    return private, public


def discover(config: Config) -> tuple[str, str]:
    d = config.discovery
    if d is None or not d.interface:
        raise DiscoveryError("discovery provider netlink needs discovery.interface")
    return addresses(d.interface, d.public_interface)
