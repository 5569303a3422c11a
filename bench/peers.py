"""The synthetic fleet of the benchmarks (pure: no I/O).

``fleet(n, target_real)`` returns ``n`` peers in one network with this host:
``n - 1`` stand-ins whose real addresses are never contacted, and the target
(the peer the load generator talks to) with the HIGHEST overlay address, so
it is the last ``DNAT`` rule of the iptables backend (rules are ordered by
overlay address): every new connection to it walks all the others first.
"""

from __future__ import annotations

import ipaddress

from overlay.model import Node

SUBNET = "100.64.0.0/16"           # overlay subnet: 65,534 hosts, room for 50,000 peers
SELF_OVERLAY = "100.64.255.254"
NETWORK = "bench"
FAKE_PRIVATE = "10.200.0.0"        # stand-ins' real addresses (never routed, never contacted)
ALT_PRIVATE = "10.204.0.0"         # where update_one moves a peer to and back
FAKE_PUBLIC = "198.19.0.0"
MAX_PEERS = 60000


def _add(base: str, i: int) -> str:
    return str(ipaddress.IPv4Address(base) + i)


def overlay_of(i: int) -> str:
    return _add(str(ipaddress.IPv4Network(SUBNET).network_address), 1 + i)


def fleet(n: int, target_real: str) -> list[Node]:
    """``n`` peers; the last (highest overlay address) is the target at ``target_real``."""
    if not 0 <= n <= MAX_PEERS:
        raise ValueError(f"peers must be in 0..{MAX_PEERS}, got {n}")
    nodes = []
    for i in range(n):
        target = i == n - 1
        nodes.append(Node(
            node_id="target" if target else f"peer-{i}",
            network=NETWORK,
            private=target_real if target else _add(FAKE_PRIVATE, 1 + i),
            public=_add(FAKE_PUBLIC, 1 + i),
            overlay=overlay_of(i),
        ))
    return nodes


def target_overlay(n: int) -> str:
    return overlay_of(n - 1)


def moved(node: Node, i: int, away: bool) -> Node:
    """``node`` with its real (private) address moved away (or back)."""
    private = _add(ALT_PRIVATE, 1 + i) if away else _add(FAKE_PRIVATE, 1 + i)
    return Node(node.node_id, node.network, private, node.public, node.overlay,
                node.groups, node.open_ports)


def config_dict(backend: str, interface: str, private: str, pin_root: str | None = None,
                sizes: dict | None = None) -> dict:
    """The daemon config this host would run with (for ``plan``)."""
    dp: dict = {"backend": backend, "interface": interface}
    if pin_root:
        dp["pin_root"] = pin_root
    if sizes:
        dp["sizes"] = sizes
    return {
        "node_id": "bench-client",
        "network": NETWORK,
        "overlay_subnet": SUBNET,
        "addresses": {"private": private, "public": "198.18.0.1", "overlay": SELF_OVERLAY},
        "registry": {"backend": "static"},
        "datapath": dp,
    }
