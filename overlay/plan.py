"""The pure planner: (self node, peers, policies, config) -> DesiredState.

No I/O here. The result is expressed in the table vocabulary of
:mod:`overlay.ops`, which every datapath understands, plus the list of peers
that were applied and of those excluded, each with a reason.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from overlay.abi import FS_ALL, FS_SSH, SELF_F_OWN, FilterMode, ports_bitmap
from overlay.config import Config, ConntrackConfig
from overlay.model import Node, Policy
from overlay.ops import NatEntry, PeerEntry, empty_state
from overlay.ownership import Conflict, Grants, granted, resolve
from overlay.policy import group_set_key, plan_policies


@dataclass(frozen=True, slots=True)
class AppliedPeer:
    node_id: str
    network: str
    overlay: str
    real: str
    groups: tuple[str, ...] = ()
    real6: str | None = None

    def to_dict(self) -> dict:
        out = {
            "node_id": self.node_id,
            "network": self.network,
            "overlay": self.overlay,
            "real": self.real,
            "groups": list(self.groups),
        }
        if self.real6:
            out["real6"] = self.real6
        return out


@dataclass(frozen=True)
class DesiredState:
    tables: dict[str, dict]
    peers: tuple[AppliedPeer, ...] = ()
    excluded: tuple[tuple[str, str], ...] = ()
    selected_by: tuple[str, ...] = ()  # ids of the policies that select this node (default-deny)
    conflicts: tuple[Conflict, ...] = ()             # peers excluded for an address held earlier
    ungranted: tuple[tuple[str, tuple[str, ...]], ...] = ()   # (node_id, groups claimed, not granted)
    groups: tuple[str, ...] = ()                     # this node's effective groups


def _registry_addresses(config: Config) -> list[str]:
    """IP literals (IPv4 or IPv6) of what this node's registry backend talks to: every
    controller replica (backend grpc) or the ZooKeeper hosts (never locked out, DESIGN §5)."""
    reg = config.registry
    targets = list(reg.controller) if reg.backend == "grpc" and reg.controller else list(reg.hosts)
    out = []
    for hp in targets:
        host = hp.rpartition(":")[0].strip("[]")
        try:
            out.append(str(ipaddress.ip_address(host)))
        except ValueError:
            continue  # a name; resolved addresses can be passed in as extra_failsafe
    return out


def _host_prefix(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def self_addresses(node: Node) -> dict[str, int]:
    """The ``self`` table: this node's own addresses (private, public, overlay,
    private6, public6). A packet arriving on the uplink with one of them (or a
    loopback address) as source is a martian."""
    addrs = (node.private, node.public, node.overlay, node.private6, node.public6)
    return {a: SELF_F_OWN for a in addrs if a}


def conntrack_config(config: Config) -> dict[str, int]:
    """The ``config`` entries of the conntrack lifetimes (seconds) that differ
    from their defaults: the datapath takes an absent (0) lifetime as its
    default, so a default configuration writes nothing (like ``ports`` words)."""
    ct, default = config.datapath.conntrack, ConntrackConfig()
    return {
        f"ct_{f.name}" if f.name != "frag_s" else f.name: getattr(ct, f.name)
        for f in dataclasses.fields(ct)
        if getattr(ct, f.name) != getattr(default, f.name)
    }


def exclusion(node: Node, self_node: Node, config: Config) -> str | None:
    """Why :func:`plan` leaves the peer ``node`` out before address conflicts are weighed
    (an overlay address that is not one, outside the subnet or this node's own; a real
    address that is this node's own), or None."""
    subnet = config.overlay_subnet
    try:
        ip = ipaddress.IPv4Address(node.overlay)
    except ValueError:
        return f"overlay address {node.overlay!r} is not an IPv4 address"
    if ip not in subnet or ip in (subnet.network_address, subnet.broadcast_address):
        return f"overlay address {node.overlay} is outside the overlay subnet {subnet}"
    if node.overlay == self_node.overlay:
        return f"overlay address {node.overlay} is this node's own"
    real = node.real_address_from(self_node.network)
    if real in (self_node.private, self_node.public) and node.network == self_node.network:
        return f"real address {real} is this node's own"
    return None


def failsafe_table(config: Config, extra_failsafe: Iterable[str] = ()) -> dict[str, int]:
    """The ``failsafe`` table: SSH whitelist and the registry's addresses, never locked out."""
    failsafe: dict[str, int] = defaultdict(int)
    for cidr in config.filter.ssh_whitelist:
        failsafe[cidr] |= FS_SSH
    for ip in [*_registry_addresses(config), *extra_failsafe]:
        failsafe[_host_prefix(ip)] |= FS_ALL
    return dict(failsafe)


def config_table(config: Config, policy_config: dict) -> dict:
    """The ``config`` table: the filter's switches, the policy's and the conntrack lifetimes."""
    return {
        "reject_all": int(config.filter.reject_all),
        "mode": int(FilterMode.AUDIT if config.filter.mode == "audit" else FilterMode.ENFORCE),
        **policy_config,
        **conntrack_config(config),
    }


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
        reason = exclusion(node, self_node, config)
        if reason is not None:
            excluded[node.node_id] = reason
            continue
        candidates.append(node)

    def claims(node: Node) -> list[tuple[str, ...]]:
        return [("overlay", node.overlay), ("real", node.real_address_from(self_node.network))]

    kept, conflicts = resolve(candidates, order or {}, claims)
    for c in conflicts:
        excluded[c.node_id] = c.reason
    applied = [AppliedPeer(n.node_id, n.network, n.overlay, n.real_address_from(self_node.network), n.groups,
                           n.real6_from(self_node.network))
               for n in kept]

    pol = plan_policies(self_node.groups, (p.groups for p in applied), policies)
    tables = empty_state()
    nat, peer_table = tables["nat"], tables["peers"]
    own6 = {self_node.private6, self_node.public6} - {None}
    used6 = defaultdict(list)
    for p in applied:
        if p.real6:
            used6[p.real6].append(p.node_id)
    for p in applied:
        nat[p.overlay] = NatEntry(p.real)
        entry = PeerEntry(identity=pol.identity_of[group_set_key(p.groups)])
        peer_table[p.real] = entry
        # an IPv6 address claimed by two peers, or this node's own, admits neither
        if p.real6 and len(used6[p.real6]) == 1 and p.real6 not in own6:
            peer_table[p.real6] = entry
    for overlay, real in config.nat_overrides:
        if overlay == self_node.overlay:
            continue
        nat[overlay] = NatEntry(real, override=True)

    tables["ports"] = ports_bitmap(config.filter.open_ports)

    tables["failsafe"] = failsafe_table(config, extra_failsafe)
    tables["self"] = self_addresses(self_node)

    tables["config"] = config_table(config, pol.config)
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

