"""``registry.neti``: the old system's layout read into a registry's view, and joined
(docs/migration.md, docs/registry.md "The old system's layout").

Under ``registry.neti.prefix`` (names from the config; defaults shown)::

    ip-map/<uuid4 hex>-<public>|<private>|<overlay>|<vpcflag>   EPHEMERAL, no data: a live host
    id-to-ip/<id>       persistent, data = overlay address
    ip-to-id/<overlay>  persistent, data = id
    maxchange           persistent, data = the old guard threshold

:class:`NetiBridge` is the registry worker's memory of that layout: the party's entries
(parsed once, from their names), the old and the native owners of the overlays they claim
(``ip-to-id`` in each layout), and the peers that follow. Persistent recursive watches on
the party, the old ``ip-to-id`` and ``maxchange`` deliver one event per change; only what
an event names is read again, so a change costs O(change) reads. An entry becomes a peer
(no groups) when it parses (:func:`overlay.neti.parse_entry`), its flag names a network in
``registry.neti.vpcflag``, the old ``ip-to-id/<overlay>`` names a valid node id, and the
native ``alloc/ip-to-id/<overlay>``, if any, names the same id; otherwise it is rejected
with a reason under the key ``neti:<entry>`` (logged once, counted in ``rejected_total``).

It also writes this node's own entry (:meth:`NetiBridge.join`), so that old hosts add it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable

from kazoo.exceptions import NodeExistsError, NoNodeError

from overlay.config_neti import NetiConfig
from overlay.errors import RegistryError
from overlay.model import Node, valid_name
from overlay.neti import PartyEntry, format_entry, parse_entry
from overlay.zk.client import EV_DELETED, Session, Unreadable
from overlay.zk.layout import Layout

log = logging.getLogger(__name__)

SOURCE = "neti"
KEY = "neti:"            # prefix of the view's rejected keys for party entries
_UNREADABLE = ""         # an owner cache value: the allocation exists but cannot be read


class NetiPaths:
    """Absolute paths of the old layout."""

    def __init__(self, cfg: NetiConfig):
        self.cfg = cfg
        self.prefix = cfg.prefix
        self.party = cfg.path(cfg.ip_map)
        self.id_to_ip = cfg.path(cfg.id_to_ip)
        self.ip_to_id = cfg.path(cfg.ip_to_id)
        self.max_change = cfg.path(cfg.max_change)

    def parents(self) -> tuple[str, ...]:
        return (self.party, self.id_to_ip, self.ip_to_id)


def parse_max_change(data: bytes) -> int | None:
    text = data.decode("utf-8", "replace").strip()
    return int(text) if text.isdigit() and int(text) <= 1_000_000 else None


class NetiBridge:
    """The old layout as one node (``node_id``; an observer's id is no node) sees it."""

    def __init__(self, session: Session, cfg: NetiConfig, native: Layout, subnet: ipaddress.IPv4Network,
                 node_id: str, log_rejection: Callable[[str, int, str], None]):
        self._zk = session
        self.paths = NetiPaths(cfg)
        self.cfg = cfg
        self._native = native
        self.subnet = subnet
        self.node_id = node_id
        self._log_rejection = log_rejection
        self.entries: dict[str, PartyEntry | str] = {}   # party child -> parsed, or why it does not parse
        self.old_owner: dict[str, str | None] = {}        # overlay -> old ip-to-id data (cache)
        self.old_order: dict[str, int] = {}                # overlay -> czxid of the old ip-to-id
        self.native_owner: dict[str, str | None] = {}     # overlay -> native alloc/ip-to-id data (cache)
        self.max_change: int | None = None
        self.nodes: dict[str, Node] = {}
        self.order: dict[str, int] = {}
        self.rejected: dict[str, str] = {}
        self.own_entry: str | None = None
        self._join_lock = threading.Lock()   # register() (caller's thread) and the worker both join

    # --- watching ---------------------------------------------------------------------------

    def watch_paths(self) -> tuple[str, ...]:
        return (self.paths.party, self.paths.ip_to_id, self.paths.max_change)

    def ensure_layout(self) -> None:
        """The old layout's parents exist (an empty old fleet has none yet)."""
        for p in self.paths.parents():
            if self._zk.exists(p) is None:
                with contextlib.suppress(NodeExistsError):
                    self._zk.client.ensure_path(p)

    def owns(self, path: str) -> bool:
        return path.startswith(self.paths.prefix + "/")

    def resync(self) -> None:
        """Read the whole party again (start, reconnection)."""
        self.entries = {name: self._parse(name) for name in self._zk.children(self.paths.party)}
        self.old_owner.clear()
        self.old_order.clear()
        self.native_owner.clear()
        self._fetch_owners()
        self._read_max_change()
        self._evaluate()

    def apply(self, events: Iterable[tuple], native_ips: Iterable[str]) -> None:
        """Follow the old layout's events (``(_, type, path)``) and the native ``alloc/ip-to-id``
        children that changed; reads only what they name."""
        party, old_ips = self.paths.party + "/", self.paths.ip_to_id + "/"
        max_change = False
        for _, etype, path in events:
            if path.startswith(party):
                name = path[len(party):]
                if "/" in name:
                    continue
                if etype == EV_DELETED:
                    self.entries.pop(name, None)
                elif name not in self.entries:
                    self.entries[name] = self._parse(name)
            elif path.startswith(old_ips):
                self.old_owner.pop(path[len(old_ips):], None)
            elif path == self.paths.max_change:
                max_change = True
        for ip in native_ips:
            self.native_owner.pop(ip, None)
        self._fetch_owners()
        if max_change:
            self._read_max_change()
        self._evaluate()

    def log_keys(self) -> set[str]:
        return set(self.rejected)

    # --- reading --------------------------------------------------------------------------

    def _parse(self, name: str) -> PartyEntry | str:
        try:
            return parse_entry(name, self.subnet)
        except ValueError as exc:
            return str(exc)

    def _fetch_owners(self) -> None:
        """Read the owners (both layouts) of the overlays the entries claim that are not cached;
        forget those no entry claims any more."""
        need = {e.overlay for e in self.entries.values() if isinstance(e, PartyEntry)}
        for cache in (self.old_owner, self.old_order, self.native_owner):
            for ip in [ip for ip in cache if ip not in need]:
                del cache[ip]
        old = sorted(ip for ip in need if ip not in self.old_owner)
        nat = sorted(ip for ip in need if ip not in self.native_owner)
        paths = [f"{self.paths.ip_to_id}/{ip}" for ip in old] + [f"{self._native.ip_to_id}/{ip}" for ip in nat]
        got = self._zk.get_many(paths) if paths else {}
        for ip in old:
            self.old_owner[ip] = _owner(got[f"{self.paths.ip_to_id}/{ip}"])
            res = got[f"{self.paths.ip_to_id}/{ip}"]
            if isinstance(res, tuple):
                self.old_order[ip] = res[1].czxid
        for ip in nat:
            self.native_owner[ip] = _owner(got[f"{self._native.ip_to_id}/{ip}"])

    def _read_max_change(self) -> None:
        got = self._zk.get_many([self.paths.max_change])[self.paths.max_change]
        self.max_change = None
        if isinstance(got, Unreadable):
            self._log_rejection(f"{KEY}{self.cfg.max_change}", -1, f"{self.paths.max_change} cannot be read")
        elif got is not None:
            self.max_change = parse_max_change(got[0])
            if self.max_change is None:
                self._log_rejection(f"{KEY}{self.cfg.max_change}", got[1].mzxid,
                                    f"{self.paths.max_change} holds {got[0][:40]!r}, not an integer in 0..1000000")

    # --- deciding -------------------------------------------------------------------------

    def peer(self, entry: PartyEntry) -> tuple[Node | None, str | None]:
        """The peer an entry stands for, or why it is refused; ``(None, None)`` for this node's own."""
        where = f"{self.cfg.ip_to_id}/{entry.overlay}"
        owner = self.old_owner.get(entry.overlay)
        if owner is None:
            return None, f"overlay {entry.overlay} is not allocated in the old layout (no {where})"
        if owner == _UNREADABLE:
            return None, f"{where} cannot be read, so the entry's id is unknown"
        try:
            valid_name(owner, "node id")
        except ValueError as exc:
            return None, f"{where} names no valid node: {exc}"
        native = self.native_owner.get(entry.overlay)
        if native is not None and native != owner:
            return None, (f"overlay {entry.overlay} is allocated to {owner!r} in the old layout but to {native!r} "
                          f"in alloc/ip-to-id")
        if owner == self.node_id:
            return None, None
        network = self.cfg.network_of(entry.flag)
        if network is None:
            return None, f"vpcflag {entry.flag} has no network in registry.neti.vpcflag"
        return Node(owner, network, entry.private, entry.public, entry.overlay), None

    def _evaluate(self) -> None:
        nodes: dict[str, Node] = {}
        order: dict[str, int] = {}
        rejected: dict[str, str] = {}
        first: dict[str, str] = {}
        for name in sorted(self.entries):
            entry = self.entries[name]
            if isinstance(entry, str):
                node, reason = None, entry
            else:
                node, reason = self.peer(entry)
            if node is not None and node.node_id in first:
                node, reason = None, f"node {node.node_id} is already listed by party entry {first[node.node_id]}"
            if node is not None:
                nodes[node.node_id] = node
                first[node.node_id] = name
                if isinstance(entry, PartyEntry) and entry.overlay in self.old_order:
                    order[node.node_id] = self.old_order[entry.overlay]
            elif reason is not None:
                rejected[KEY + name] = reason
                self._log_rejection(KEY + name, 0, reason)
        self.nodes, self.order, self.rejected = nodes, order, rejected

    # --- this node's entry ------------------------------------------------------------------

    def join(self, node: Node, acl: list) -> None:
        """Keep one entry for ``node`` in the party, under this session (ephemeral): adopt one
        this session already has, replace one with other addresses, else create it."""
        flag = self.cfg.flag_of(node.network)
        if flag is None:
            raise RegistryError(f"registry.neti.vpcflag has no flag for network {node.network!r}: this node "
                                "cannot join the old party")
        want = format_entry(node.public, node.private, node.overlay, flag, uid="x").split("-", 1)[1]
        with self._join_lock:
            self._join(node, flag, want, acl)

    def _join(self, node: Node, flag: int, want: str, acl: list) -> None:
        client = self._zk.client
        sid = (client.client_id or (0,))[0]
        keep = None
        for child in self._zk.children(self.paths.party):
            mine = child == self.own_entry
            if not mine and f"|{node.overlay}|" not in child:
                continue
            stat = self._zk.exists(f"{self.paths.party}/{child}")
            if stat is None or stat.ephemeralOwner != sid:
                continue
            if keep is None and child.endswith("-" + want):
                keep = child
            else:  # ours, with other addresses (or a second one): goes
                with contextlib.suppress(NoNodeError):
                    self._zk.wait(client.delete_async(f"{self.paths.party}/{child}"))
        if keep is not None:
            self.own_entry = keep
            return
        name = format_entry(node.public, node.private, node.overlay, flag)
        self._zk.wait(client.create_async(f"{self.paths.party}/{name}", b"", acl=acl, ephemeral=True))
        self.own_entry = name
        log.info("node %s: joined the old party as %s/%s", node.node_id, self.paths.party, name)

    def leave(self) -> None:
        """Remove this node's entry (stopping for good; never raises: the session's end removes
        it anyway)."""
        if self.own_entry is None or self._zk.client is None:
            return
        try:
            self._zk.wait(self._zk.client.delete_async(f"{self.paths.party}/{self.own_entry}"))
        except NoNodeError:
            pass
        except Exception as exc:
            log.debug("node %s: leaving the old party: %s", self.node_id, exc)
        self.own_entry = None

    def status(self, view) -> dict:
        """``/status`` ``registry.neti``."""
        return {"prefix": self.paths.prefix, "party_entry": self.own_entry,
                "peers": sum(1 for s in view.sources.values() if s == SOURCE),
                "rejected": sum(1 for k in view.rejected if k.startswith(KEY))}


def _owner(res: object) -> str | None:
    if res is None:
        return None
    if isinstance(res, Unreadable):
        return _UNREADABLE
    return res[0].decode("utf-8", "replace").strip()


def merge_into(v, bridge: NetiBridge, native_touched: Iterable[str], native_max: int | None) -> bool:
    """Lay the bridge's peers over a view state ``v`` (lock held) where the native records win:
    ``native_touched`` are the names whose native entry the caller just (re)wrote. Sets
    ``v.sources``, the ``neti:`` rejections and the guard threshold (native first). True if
    anything changed."""
    changed = False
    for name in native_touched:
        v.sources.pop(name, None)
    for name in [n for n, s in v.sources.items() if s == SOURCE and n not in bridge.nodes]:
        del v.sources[name]
        v.nodes.pop(name, None)
        v.order.pop(name, None)
        changed = True
    for name, node in bridge.nodes.items():
        if name in v.nodes and v.sources.get(name) != SOURCE:
            continue   # a native record: it wins
        if v.nodes.get(name) != node or v.sources.get(name) != SOURCE:
            v.nodes[name] = node
            v.sources[name] = SOURCE
            changed = True
        order = bridge.order.get(name)
        if order is not None and v.order.get(name) != order:
            v.order[name] = order
            changed = True
    for key in [k for k in v.rejected if k.startswith(KEY) and k not in bridge.rejected]:
        del v.rejected[key]
        changed = True
    for key, reason in bridge.rejected.items():
        if v.rejected.get(key) != reason:
            v.rejected[key] = reason
            changed = True
    threshold = native_max if native_max is not None else bridge.max_change
    if v.max_change != threshold:
        v.max_change = threshold
        changed = True
    return changed


class PartyMembers:
    """The controller's side of the bridge: one party entry for each node a replica holds
    (daemons behind it do not touch ZooKeeper), ephemeral under the replica's session, so a
    replica that dies takes its entries along and the replica that takes its nodes over
    writes them again. Worker thread of the controller's store only."""

    def __init__(self, session: Session, cfg: NetiConfig, acl: list, who: str):
        self._zk = session
        self.cfg = cfg
        self.paths = NetiPaths(cfg)
        self._acl = acl
        self._who = who
        self.entries: dict[str, str] = {}      # node id -> its party child
        self._verify = True
        self._unmapped: set[str] = set()

    def reset(self) -> None:
        """After a reconnection: what survives is found again before anything is created."""
        self._verify = True

    def _suffix(self, node: Node) -> str | None:
        flag = self.cfg.flag_of(node.network)
        if flag is None:
            if node.network not in self._unmapped:
                self._unmapped.add(node.network)
                log.warning("%s: network %r has no flag in registry.neti.vpcflag: its nodes do not join the old "
                            "party", self._who, node.network)
            return None
        return format_entry(node.public, node.private, node.overlay, flag, uid="x").split("-", 1)[1]

    def sync(self, nodes: dict[str, Node]) -> None:
        want = {nid: s for nid, node in nodes.items() if (s := self._suffix(node)) is not None}
        client = self._zk.client
        if self._verify:
            sid = (client.client_id or (0,))[0]
            self.entries = {}
            suffixes = {s: nid for nid, s in want.items()}
            for child in self._zk.children(self.paths.party):
                nid = suffixes.get(child.split("-", 1)[-1])
                if nid is None or nid in self.entries:
                    continue
                stat = self._zk.exists(f"{self.paths.party}/{child}")
                if stat is not None and stat.ephemeralOwner == sid:
                    self.entries[nid] = child
            self._verify = False
        for nid in [n for n, child in self.entries.items() if want.get(n) != child.split("-", 1)[1]]:
            with contextlib.suppress(NoNodeError):
                self._zk.wait(client.delete_async(f"{self.paths.party}/{self.entries.pop(nid)}"))
        for nid, suffix in want.items():
            if nid in self.entries:
                continue
            name = format_entry(*suffix.split("|")[:3], int(suffix.split("|")[3]))
            self._zk.wait(client.create_async(f"{self.paths.party}/{name}", b"", acl=self._acl, ephemeral=True,
                                              makepath=True))
            self.entries[nid] = name
            log.info("%s: node %s joined the old party as %s", self._who, nid, name)
