"""The incremental planner: the desired state maintained, not recomputed (issue 14).

:func:`overlay.plan.plan` computes the desired state of this node from the whole view
(O(fleet) per call). :class:`IncrementalPlanner` holds the same result and indexes over
it, and turns one registry event (nodes added, removed or changed, their order keys or
assignments; policies added, removed or changed) into the delta of desired entries in
time proportional to what the event touches:

* a node's own entries: ``nat`` of its overlay, ``peers`` of its real address and of
  its IPv6 real address;
* address conflicts: only the records that share a claimed address with the changed
  one, transitively (the "component"), are resolved again with
  :func:`overlay.ownership.resolve`, so when a holder leaves the next claimant takes over
  exactly as ``plan`` decides;
* the policy tables: they depend on the *set* of distinct group sets among the applied
  peers and on the policies, not on the peers; they are recomputed
  (:func:`overlay.policy.plan_policies` over the distinct group sets, O(group sets x
  policies)) only when a group set appears or disappears or a policy changes, and the
  peers' identities are touched only if an identity moved (a hash collision's probing);
* ``nat_overrides`` and this node's own addresses are folded in per key.

A change of this node's record or of the config rebuilds everything (:meth:`rebuild`);
``plan()`` remains the reference, and ``tests/unit/test_incremental.py`` drives random
event sequences and checks after every event that this state equals ``plan()`` of the
same view. Every mutating method returns the touched keys per table (a :data:`Touched`):
the agent diffs only those keys.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping

from overlay.abi import ports_bitmap
from overlay.config import Config
from overlay.model import Node, Policy
from overlay.ops import NatEntry, PeerEntry, empty_state
from overlay.ownership import Claim, Conflict, Grants, granted, order_of, resolve
from overlay.plan import (
    AppliedPeer,
    DesiredState,
    config_table,
    exclusion,
    failsafe_table,
    self_addresses,
)
from overlay.policy import PolicyTables, group_set_key, plan_policies

Touched = dict[str, set]            # table name -> keys whose desired value may have changed
POLICY_TABLES = ("policy", "cidr_ident", "names", "config")
_intern = sys.intern


class IncrementalPlanner:
    """The desired state of ``self_node`` among the registry's nodes, kept up to date.

    The planner keeps references to the registry's :class:`Node` objects (no copies);
    applied peers are compact :class:`AppliedPeer` records whose strings are shared with
    the table keys.
    """

    def __init__(self, self_node: Node, config: Config, extra_failsafe: Iterable[str] = ()):
        self.self_raw = self_node
        self.config = config
        self.extra_failsafe = tuple(extra_failsafe)
        self.nodes: dict[str, Node] = {}
        self.order: dict[str, int] = {}
        self.grants: dict[str, tuple[str, ...]] | None = None
        self.policies: dict[str, Policy] = {}
        self.rebuild({}, {}, None, {})

    # --- the whole state -------------------------------------------------------------------

    def rebuild(self, nodes: Mapping[str, Node], order: Mapping[str, int], grants: Grants | None,
                policies: Mapping[str, Policy]) -> Touched:
        """Start again from a whole view (at start and on every resync); touches every key."""
        old = self.tables if hasattr(self, "tables") else empty_state()
        # the view's dicts are taken over, not copied, when they are plain dicts (the agent
        # hands over a fresh snapshot): one copy of the fleet less
        self.nodes = nodes if type(nodes) is dict else dict(nodes)
        self.order = order if type(order) is dict else dict(order)
        self.grants = None if grants is None else dict(grants)
        self.policies = dict(policies)
        self._reset_self()
        self.tables = empty_state()
        self.pre_excluded: dict[str, str] = {}            # node id -> why, before conflicts
        self.conflicts: dict[str, Conflict] = {}
        self.ungranted_peers: dict[str, tuple[str, ...]] = {}
        # claimed address -> the candidate claiming it (a set when several do), per kind
        self.claimed: dict[str, dict[str, str | set[str]]] = {"overlay": {}, "real": {}}
        self.applied: dict[str, AppliedPeer] = {}         # node id -> applied peer
        self.used6: dict[str, set[str]] = defaultdict(set)
        self.set_count: dict[str, int] = defaultdict(int)  # group set key -> applied peers in it
        self._entries: dict[int, PeerEntry] = {}
        for node_id in self.nodes:
            self._evaluate(node_id)
        cands = [n for n in map(self._cand, self.nodes) if n is not None]
        for node in cands:
            self._claim(node, True)
        kept, conflicts = resolve(cands, self.order, self._claims)
        self.conflicts = {c.node_id: c for c in conflicts}
        built: Touched = defaultdict(set)
        for node in kept:
            self._set_applied(node.node_id, self._applied_peer(node), built)
        built["nat"].update(self.ovr_nat)
        self.pol = PolicyTables()
        self._policy_tables()
        for name in ("nat", "peers"):
            for key in built[name]:
                self._recompute(name, key)
        t = self.tables
        t["ports"] = ports_bitmap(self.config.filter.open_ports)
        t["failsafe"] = failsafe_table(self.config, self.extra_failsafe)
        t["self"] = self_addresses(self.self_node)
        return {name: set(t[name]) | set(old.get(name, ())) for name in t}

    def set_self(self, self_node: Node) -> Touched:
        self.self_raw = self_node
        return self.rebuild(self.nodes, self.order, self.grants, self.policies)

    def set_config(self, config: Config, extra_failsafe: Iterable[str] | None = None) -> Touched:
        self.config = config
        if extra_failsafe is not None:
            self.extra_failsafe = tuple(extra_failsafe)
        return self.rebuild(self.nodes, self.order, self.grants, self.policies)

    def _reset_self(self) -> None:
        me = self.self_raw
        self.ungranted_self: tuple[str, ...] = ()
        if self.grants is not None:
            me, self.ungranted_self = granted(me, self.grants)
        self.self_node = me
        self.own6 = {me.private6, me.public6} - {None}
        self.ovr_nat: dict[str, NatEntry] = {}
        for overlay, real in self.config.nat_overrides:
            if overlay == me.overlay:
                continue
            self.ovr_nat[overlay] = NatEntry(real, override=True)

    # --- events ----------------------------------------------------------------------------

    def update(self, nodes: Mapping[str, Node | None] = {}, order: Mapping[str, int | None] = {},
               grants: Mapping[str, tuple[str, ...] | None] = {},
               policies: Mapping[str, Policy | None] = {}) -> Touched:
        """Apply one event: the new value (None: gone) of every node record, order key,
        assignment and policy that changed. Returns the touched keys per table."""
        touched: Touched = defaultdict(set)
        self_id = self.self_raw.node_id
        ids = {*nodes, *order, *grants} - {self_id}
        # the claims indexed for these records now (before their new values land)
        old_claims = [c for node_id in ids if (old := self._cand(node_id)) is not None for c in self._claims(old)]
        for node_id in ids:
            if (old := self._cand(node_id)) is not None:
                self._claim(old, False)
        for node_id, node in nodes.items():
            _put(self.nodes, node_id, node)
        for node_id, key in order.items():
            _put(self.order, node_id, key)
        for policy_id, pol in policies.items():
            _put(self.policies, policy_id, pol)
        if grants and self.grants is None:     # the registry now grants groups: every record changes
            return self.rebuild(self.nodes, self.order, {k: v for k, v in grants.items() if v is not None},
                                self.policies)
        for node_id, groups in grants.items():
            _put(self.grants, node_id, groups)
        if self_id in grants:
            self._reset_self()     # this node's groups: which policies select it
        if ids:
            self._nodes_changed(ids, set(old_claims), touched)
        if policies or self_id in grants:
            self._policy_changed(touched)
        return touched

    def _nodes_changed(self, ids: set[str], seeds: set[Claim], touched: Touched) -> None:
        """Re-evaluate ``ids`` (their old claims, already forgotten, are ``seeds``), resolve
        the conflict component of their old and new claims, update the applied peers."""
        for node_id in ids:
            self._evaluate(node_id)
            new = self._cand(node_id)
            if new is not None:
                seeds.update(self._claims(new))
                self._claim(new, True)
        component = set(ids)
        todo = list(seeds)
        seen = set(seeds)
        while todo:
            claim = todo.pop()
            for node_id in self._claimants(claim):
                if node_id in component:
                    continue
                component.add(node_id)
                for c in self._claims(self._cand(node_id)):
                    if c not in seen:
                        seen.add(c)
                        todo.append(c)
        for node_id in component:
            self.conflicts.pop(node_id, None)
        members = [n for n in map(self._cand, component) if n is not None]
        kept, conflicts = resolve(members, self.order, self._claims)
        for c in conflicts:
            self.conflicts[c.node_id] = c
        keep = {n.node_id: n for n in kept}
        before = set(self.set_count)
        wanted = {node_id: None if node_id not in keep else self._applied_peer(keep[node_id])
                  for node_id in component}
        wanted = {node_id: peer for node_id, peer in wanted.items() if self.applied.get(node_id) != peer}
        for node_id in wanted:       # every removal first: a kept peer may take a leaver's address
            self._set_applied(node_id, None, touched)
        for node_id, peer in wanted.items():
            if peer is not None:
                self._set_applied(node_id, peer, touched)
        if set(self.set_count) != before:
            self._policy_changed(touched)
        for name in ("nat", "peers"):
            for key in touched.get(name, ()):
                self._recompute(name, key)

    def _policy_changed(self, touched: Touched) -> None:
        old_ident = self.pol.identity_of
        changes = self._policy_tables()
        for name, keys in changes.items():
            touched[name] |= keys
        moved = [k for k, v in old_ident.items() if self.pol.identity_of.get(k, v) != v]
        if moved:    # an identity moved (hash collision probing): every peer entry may change
            for peer in self.applied.values():
                touched["peers"].add(peer.real)
                if peer.real6:
                    touched["peers"].add(peer.real6)
            for key in touched["peers"]:
                self._recompute("peers", key)

    # --- per node ---------------------------------------------------------------------------

    def _claims(self, node: Node | AppliedPeer) -> list[Claim]:
        if isinstance(node, AppliedPeer):
            return [("overlay", node.overlay), ("real", node.real)]
        return [("overlay", node.overlay), ("real", node.real_address_from(self.self_node.network))]

    def _claim(self, node: Node | AppliedPeer, add: bool) -> None:
        """Index (or forget) the claims of a candidate."""
        for kind, address in self._claims(node):
            table = self.claimed[kind]
            cur = table.get(address)
            if add:
                if cur is None:
                    table[address] = node.node_id
                elif isinstance(cur, str):
                    table[address] = {cur, node.node_id}
                else:
                    cur.add(node.node_id)
            elif cur == node.node_id:
                del table[address]
            elif isinstance(cur, set):
                cur.discard(node.node_id)
                if len(cur) == 1:
                    table[address] = next(iter(cur))

    def _claimants(self, claim: Claim) -> tuple[str, ...] | set[str]:
        cur = self.claimed[claim[0]].get(claim[1])
        return () if cur is None else (cur,) if isinstance(cur, str) else cur

    def holder(self, kind: str, address: str) -> AppliedPeer | None:
        """The applied peer holding ``address`` (``overlay`` or ``real``), if any."""
        for node_id in self._claimants((kind, address)):
            peer = self.applied.get(node_id)
            if peer is not None:
                return peer
        return None

    def _cand(self, node_id: str) -> Node | None:
        """The effective record of a peer that passed the per-node checks, or None."""
        node = self.nodes.get(node_id)
        if node is None or node_id in self.pre_excluded or node_id == self.self_raw.node_id:
            return None
        return granted(node, self.grants)[0] if self.grants is not None else node

    def _evaluate(self, node_id: str) -> None:
        """Grants and the per-node checks of ``plan`` for one record (claims not indexed)."""
        self.pre_excluded.pop(node_id, None)
        self.ungranted_peers.pop(node_id, None)
        node = self.nodes.get(node_id)
        me = self.self_node
        if node is None or node_id == self.self_raw.node_id:
            return
        if self.grants is not None:
            node, dropped = granted(node, self.grants)
            if dropped:
                self.ungranted_peers[node_id] = dropped
        reason = exclusion(node, me, self.config)
        if reason is not None:
            self.pre_excluded[node_id] = reason

    def _applied_peer(self, node: Node) -> AppliedPeer:
        net = self.self_node.network
        return AppliedPeer(node.node_id, _intern(node.network), node.overlay, node.real_address_from(net),
                           node.groups, node.real6_from(net))

    def _set_applied(self, node_id: str, new: AppliedPeer | None, touched: Touched) -> None:
        old = self.applied.get(node_id)
        if old == new:
            return
        if old is not None:
            del self.applied[node_id]
            if old.real6:
                holders = self.used6[old.real6]
                holders.discard(node_id)
                if not holders:
                    del self.used6[old.real6]
            key = group_set_key(old.groups)
            self.set_count[key] -= 1
            if not self.set_count[key]:
                del self.set_count[key]
            _touch(touched, old)
        if new is not None:
            self.applied[node_id] = new
            if new.real6:
                self.used6[new.real6].add(node_id)
            self.set_count[group_set_key(new.groups)] += 1
            _touch(touched, new)

    # --- per key ----------------------------------------------------------------------------

    def _recompute(self, name: str, key: str) -> None:
        table = self.tables[name]
        value = None
        if name == "nat":
            value = self.ovr_nat.get(key)
            if value is None and (peer := self.holder("overlay", key)) is not None:
                value = NatEntry(peer.real)
        elif name == "peers":
            peer = self.holder("real", key)
            if peer is None:
                six = self.used6.get(key)
                if six is not None and len(six) == 1 and key not in self.own6:
                    peer = self.applied[next(iter(six))]
            if peer is not None:
                value = self._entry(peer.groups)
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value

    def _entry(self, groups: tuple[str, ...]) -> PeerEntry:
        identity = self.pol.identity_of[group_set_key(groups)]
        entry = self._entries.get(identity)
        if entry is None:
            entry = self._entries[identity] = PeerEntry(identity=identity)
        return entry

    def _policy_tables(self) -> Touched:
        """Recompute the policy tables from the distinct group sets; the changed keys."""
        group_sets = [k.split(",") if k else [] for k in self.set_count]
        pol = plan_policies(self.self_node.groups, group_sets, self.policies)
        self.pol = pol
        t = self.tables
        config = config_table(self.config, pol.config)
        changed: Touched = {}
        for name, new in (("policy", pol.policy), ("cidr_ident", pol.cidr_ident), ("names", pol.names),
                          ("config", config)):
            old = t[name]
            changed[name] = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
            t[name] = new
        return changed

    # --- reading ----------------------------------------------------------------------------

    def excluded(self) -> tuple[tuple[str, str], ...]:
        out = dict(self.pre_excluded)
        out.update((node_id, c.reason) for node_id, c in self.conflicts.items())
        return tuple(sorted(out.items()))

    def conflict_list(self) -> tuple[Conflict, ...]:
        return tuple(sorted(self.conflicts.values(), key=lambda c: order_of(self.order, c.node_id)))

    def ungranted(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        out = dict(self.ungranted_peers)
        if self.ungranted_self:
            out[self.self_node.node_id] = self.ungranted_self
        return tuple(sorted(out.items()))

    def desired(self) -> DesiredState:
        """The whole state as :func:`overlay.plan.plan` returns it (O(fleet): for tests,
        status and resync, not for every event)."""
        return DesiredState(
            tables=self.tables,
            peers=tuple(sorted(self.applied.values(), key=lambda p: p.node_id)),
            excluded=self.excluded(),
            selected_by=self.pol.selected_by,
            conflicts=self.conflict_list(),
            ungranted=self.ungranted(),
            groups=self.self_node.groups,
        )


def _put(table: dict, key, value) -> None:
    if value is None:
        table.pop(key, None)
    else:
        table[key] = value


def _touch(touched: Touched, peer: AppliedPeer) -> None:
    touched["nat"].add(peer.overlay)
    touched["peers"].add(peer.real)
    if peer.real6:
        touched["peers"].add(peer.real6)

