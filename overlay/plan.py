"""The pure planner: (self node, peers, policies, config) -> DesiredState.

No I/O here. The result is expressed in the table vocabulary of
:mod:`overlay.ops`, which every datapath understands, plus the list of peers
that were applied and of those excluded, each with a reason.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from overlay.config import Config
from overlay.model import Node, Policy
from overlay.ops import (
    FS_ALL,
    FS_SSH,
    MODE_AUDIT,
    MODE_ENFORCE,
    PORT_SLOTS,
    NatEntry,
    PeerEntry,
    empty_state,
)
from overlay.ownership import Conflict, Grants, granted, resolve
from overlay.policy import group_set_key, plan_policies


@dataclass(frozen=True)
class AppliedPeer:
    node_id: str
    network: str
    overlay: str
    real: str
    groups: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "node_id": self.node_id,
            "network": self.network,
            "overlay": self.overlay,
            "real": self.real,
            "groups": list(self.groups),
        }


@dataclass(frozen=True)
class DesiredState:
    tables: dict[str, dict]
    peers: tuple[AppliedPeer, ...] = ()
    excluded: tuple[tuple[str, str], ...] = ()
    selected_by: tuple[str, ...] = ()  # ids of the policies that select this node (default-deny)
    conflicts: tuple[Conflict, ...] = ()             # peers excluded for an address held earlier
    ungranted: tuple[tuple[str, tuple[str, ...]], ...] = ()   # (node_id, groups claimed, not granted)
    groups: tuple[str, ...] = ()                     # this node's effective groups


def ports_bitmap(specs: Iterable[tuple[int, int]], protos: Iterable[str] = ("tcp", "udp")) -> dict:
    """Port specs -> {(slot, word): bits}, the kernel's open-ports bitmap, non-zero words only."""
    words: dict[tuple[int, int], int] = defaultdict(int)
    for proto in protos:
        slot = PORT_SLOTS[proto]
        for lo, hi in specs:
            for port in range(lo, hi + 1):
                words[(slot, port >> 6)] |= 1 << (port & 63)
    return {k: v for k, v in words.items() if v}


def bitmap_ports(words: Mapping[tuple[int, int], int], slot: int) -> list[int]:
    """The inverse of :func:`ports_bitmap` for one slot: the sorted open ports."""
    out = []
    for (s, word), bits in words.items():
        if s != slot:
            continue
        for bit in range(64):
            if bits >> bit & 1:
                out.append(word * 64 + bit)
    return sorted(out)


def _registry_addresses(config: Config) -> list[str]:
    """IP literals of what this node's registry backend talks to: the controller
    (backend grpc) or the ZooKeeper hosts (never locked out, DESIGN §5)."""
    reg = config.registry
    targets = [reg.controller] if reg.backend == "grpc" and reg.controller else list(reg.hosts)
    out = []
    for hp in targets:
        host = hp.rpartition(":")[0].strip("[]")
        try:
            out.append(str(ipaddress.IPv4Address(host)))
        except ValueError:
            continue  # a name; resolved addresses can be passed in as extra_failsafe
    return out


def plan(
    self_node: Node,
    peers: Iterable[Node],
    config: Config,
    extra_failsafe: Iterable[str] = (),
    *,
    policies: Iterable[Policy] | Mapping[str, Policy] = (),
    grants: Grants | None = None,
    order: Mapping[str, int] | None = None,
) -> DesiredState:
    """Compute the desired datapath state for ``self_node`` among ``peers``.

    ``extra_failsafe`` are more addresses never to lock out (the registry's
    resolved addresses, a controller's). ``policies`` (DESIGN §4.2, with their
    ``policy_id``; or a mapping id -> policy) become the ``policy``,
    ``cidr_ident`` and ``names`` tables and the peers' identities
    (:mod:`overlay.policy`); those that select this node (``to.group`` in its
    groups) make it default-deny.

    ``grants`` (node id -> granted groups; None: the registry's records carry only granted
    groups) narrows every node's groups, this one's included (:mod:`overlay.ownership`).
    ``order`` (node id -> the registry's order key) decides conflicts: of the peers that
    claim one overlay or real address, the earliest keeps it and the others are excluded
    and listed in ``conflicts``.
    """
    subnet = config.overlay_subnet
    excluded: dict[str, str] = {}
    candidates: list[Node] = []
    ungranted: list[tuple[str, tuple[str, ...]]] = []
    if grants is not None:
        self_node, dropped = granted(self_node, grants)
        if dropped:
            ungranted.append((self_node.node_id, dropped))
    for node in peers:
        if node.node_id == self_node.node_id:
            continue
        if grants is not None:
            node, dropped = granted(node, grants)
            if dropped:
                ungranted.append((node.node_id, dropped))
        try:
            ip = ipaddress.IPv4Address(node.overlay)
        except ValueError:
            excluded[node.node_id] = f"overlay address {node.overlay!r} is not an IPv4 address"
            continue
        if ip not in subnet or ip in (subnet.network_address, subnet.broadcast_address):
            excluded[node.node_id] = f"overlay address {node.overlay} is outside the overlay subnet {subnet}"
            continue
        if node.overlay == self_node.overlay:
            excluded[node.node_id] = f"overlay address {node.overlay} is this node's own"
            continue
        real = node.real_address_from(self_node.network)
        if real in (self_node.private, self_node.public) and node.network == self_node.network:
            excluded[node.node_id] = f"real address {real} is this node's own"
            continue
        candidates.append(node)

    def claims(node: Node) -> list[tuple[str, ...]]:
        return [("overlay", node.overlay), ("real", node.real_address_from(self_node.network))]

    kept, conflicts = resolve(candidates, order or {}, claims)
    for c in conflicts:
        excluded[c.node_id] = c.reason
    applied = [AppliedPeer(n.node_id, n.network, n.overlay, n.real_address_from(self_node.network), n.groups)
               for n in kept]

    pol = plan_policies(self_node.groups, (p.groups for p in applied), policies)
    tables = empty_state()
    nat, rnat, peer_table = tables["nat"], tables["rnat"], tables["peers"]
    for p in applied:
        nat[p.overlay] = NatEntry(p.real)
        rnat[p.real] = p.overlay
        peer_table[p.real] = PeerEntry(identity=pol.identity_of[group_set_key(p.groups)])
    for overlay, real in config.nat_overrides:
        if overlay == self_node.overlay:
            continue
        nat[overlay] = NatEntry(real, override=True)
        rnat.setdefault(real, overlay)

    tables["ports"] = ports_bitmap(config.filter.open_ports)

    failsafe: dict[str, int] = defaultdict(int)
    for cidr in config.filter.ssh_whitelist:
        failsafe[cidr] |= FS_SSH
    for ip in [*_registry_addresses(config), *extra_failsafe]:
        failsafe[f"{ip}/32"] |= FS_ALL
    tables["failsafe"] = dict(failsafe)

    tables["config"] = {
        "reject_all": int(config.filter.reject_all),
        "mode": MODE_AUDIT if config.filter.mode == "audit" else MODE_ENFORCE,
        **pol.config,
    }
    tables["policy"] = pol.policy
    tables["cidr_ident"] = pol.cidr_ident
    tables["names"] = pol.names
    applied.sort(key=lambda p: p.node_id)
    return DesiredState(
        tables=tables,
        peers=tuple(applied),
        excluded=tuple(sorted(excluded.items())),
        selected_by=pol.selected_by,
        conflicts=tuple(conflicts),
        ungranted=tuple(sorted(ungranted)),
        groups=self_node.groups,
    )

