"""``registry.backend: zookeeper``: the fleet map in ZooKeeper (DESIGN §4.2).

The layout under ``registry.prefix`` is :mod:`overlay.zk.layout`'s (contract);
allocation is :mod:`overlay.zk.alloc`'s, the client and its watches
:mod:`overlay.zk.client`'s.

Watching is incremental: persistent recursive watches on ``nodes``, ``policies``,
``config/max_change``, ``alloc/ip-to-id`` and ``assignments`` deliver one event per changed znode,
and only the znode an event names is read. A full re-read happens only at start,
after every reconnection, and when asked (:meth:`ZooKeeperRegistry.request_resync`).

Restarts: :meth:`ZooKeeperRegistry.detach` (what the daemon does on SIGTERM) stops without
ending the ZooKeeper session, so this node's EPHEMERAL record stays while the session lives
(``registry.timeout_s``), and writes the session's id and password to
``<state_dir>/zk-session-<node_id>.json`` (mode 0600); the next start resumes that session
(the file is read once and removed): the record is never deleted, peers see nothing. A
session that expired meanwhile is replaced by a new one, and the record re-created.

Threads: kazoo's connection thread only queues events and flags disconnection; one
worker thread of this registry (:class:`~overlay.zk.worker.WatchWorker`) reads
ZooKeeper, updates the view and calls the listener. ``allocate`` and ``register``
run in the caller's thread. The view does not include this node's own record; an
observer (``node_id=None``: the controller's) has none, so its view leaves no valid
record out.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import random
import threading
import time
from typing import Any

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    UnimplementedError,
)

from overlay.config import Config, RegistryConfig
from overlay.errors import NotFound, RegistryError
from overlay.model import (
    Node,
    serialise_node,
    valid_name,
)
from overlay.registry import Listener, ViewBacked, ViewState, notify_listener
from overlay.registry.zk_records import Records
from overlay.registry.zk_records import put as _put
from overlay.zk import client as zkc
from overlay.zk.acl import ADMINS, operator_acl, owned_acl, parse_admins
from overlay.zk.alloc import Allocator
from overlay.zk.client import CONNECTION_ERRORS, EV_CHANGED, EV_DELETED, Session
from overlay.zk.layout import Layout, create_layout, set_max_change
from overlay.zk.neti import NetiBridge, NetiPaths, merge_into
from overlay.zk.pending import PendingWatch
from overlay.zk.session import load_session, save_session
from overlay.zk.worker import WatchWorker

log = logging.getLogger(__name__)

OBSERVER_ID = "@controller"   # not a valid node name: an observer's view leaves no record out
_MAX_BATCH = 20000            # events handled per worker round


class ZooKeeperRegistry(ViewBacked):
    """The Registry protocol over ZooKeeper (see the module docstring and docs/registry.md)."""

    name = "zookeeper"

    @classmethod
    def from_config(cls, config: Config) -> ZooKeeperRegistry:
        return cls(config.registry, config.overlay_subnet, config.node_id,
                   session_file=os.path.join(config.state_dir, f"zk-session-{config.node_id}.json"))

    def __init__(self, config: RegistryConfig, subnet: ipaddress.IPv4Network, node_id: str | None, *,
                 rng: random.Random | None = None, session_file: str | None = None):
        """``node_id`` is this node's; None makes an observer (no record of its own).
        ``session_file``: where :meth:`detach` leaves the session for the next start."""
        self._session_file = session_file
        self.config = config
        self.subnet = ipaddress.IPv4Network(subnet)
        self.node_id = OBSERVER_ID if node_id is None else valid_name(node_id, "node_id")
        self._hosts = ",".join(config.hosts)
        self._layout = Layout(config.prefix)
        self._zk = Session(max(5.0, 2.0 * config.timeout_s))
        # what this registry writes: a daemon's own entries, or (an observer: the controller's) the operator's
        self._record_acl = operator_acl(config.operator) if node_id is None else owned_acl(config.auth)
        self._alloc = Allocator(self._zk, self._layout, self.subnet, self._record_acl, rng,
                                neti=None if config.neti is None else NetiPaths(config.neti))

        self._v = ViewState(grants={})   # the view (changed under self._v.lock)

        self._book = Records(self._zk, self._layout, self.subnet, self.node_id)   # worker-private
        # registry.neti: the old system's layout (overlay.zk.neti), worker-private too
        self._neti = None if config.neti is None else NetiBridge(
            self._zk, config.neti, self._layout, self.subnet, self.node_id, self._book.log_rejection)
        self._native_max: int | None = None   # config/max_change (the view's threshold unless absent)
        self._pending = PendingWatch(self._layout, f"node {self.node_id}", lambda: self._worker.enqueue(
            ("event", EV_CHANGED, self._pending.path)))   # a policy change on probation (overlay.pending)

        self._worker = WatchWorker(f"zk-registry-{self.node_id}", self._round, who=f"node {self.node_id}",
                                   max_batch=_MAX_BATCH, can_resync=self._zk_connected)
        self._resync_lock = threading.Lock()
        self._resync_wanted = 0
        self._resync_done = 0
        self._listener: Listener | None = None
        self._client_lock = threading.Lock()
        self._own: Node | None = None
        self._own_data: bytes | None = None
        self._own_lock = threading.Lock()
        self._layout_ok = False
        self._closed = False

    @property
    def rejected_total(self) -> int:
        """Rejection log lines (once per record version)."""
        return self._book.rejected_total

    @property
    def reads(self) -> int:
        """Every get / get_children / exists issued (what following the registry costs)."""
        return self._zk.reads

    # --- Registry protocol ----------------------------------------------------------------

    def start(self, listener: Listener) -> None:
        """Connect, add the watches, read everything once; then follow changes."""
        self._listener = listener
        with zkc.translate("connecting to the registry", self._hosts):
            self._ensure_client()
            self._ensure_layout()
            try:
                self._add_watches()  # here too, so that an old server fails loudly, not in a loop
            except UnimplementedError:
                raise RegistryError(
                    f"ZooKeeper at {self._hosts} does not support persistent recursive watches; "
                    "the zookeeper registry needs ZooKeeper 3.6 or newer"
                ) from None
        self._worker.start()
        self._worker.resync("start")

    def allocate(self, node_id: str, requested: str | None = None) -> str:
        with zkc.translate(f"allocating an overlay address for {node_id}", self._hosts):
            self._ensure_client()
            self._ensure_layout()
            return self._alloc.allocate(node_id, requested)

    def register(self, node: Node) -> None:
        if node.node_id != self.node_id:
            raise RegistryError(f"this registry serves node {self.node_id!r}, not {node.node_id!r}")
        data = serialise_node(node)
        with self._own_lock:
            self._own, self._own_data = node, data
        with zkc.translate(f"registering node {node.node_id}", self._hosts):
            self._ensure_client()
            self._ensure_layout()
            self._ensure_own_record(replace_data=True)

    def release_guard(self) -> None:
        return None

    def close(self) -> None:
        """Stop, and end the session: this node's record goes at once."""
        self._stop(keep_session=False)

    def detach(self) -> None:
        """Stop without ending the session (a daemon stopping or restarting): this node's record
        stays while the session lives (``registry.timeout_s``), and the next start of this node
        resumes it from ``session_file``."""
        self._stop(keep_session=True)

    def deregister(self) -> None:
        """Remove this node's record for good (``overlay deregister``; resumes a saved session
        first, so a record still held by it goes too)."""
        path = f"{self._layout.nodes}/{self.node_id}"
        with zkc.translate(f"deregistering node {self.node_id}", self._hosts):
            client = self._ensure_client()
            try:
                self._zk.wait(client.delete_async(path))
            except NoNodeError:
                raise NotFound(f"node {self.node_id} is not registered at {path}") from None

    def status_extra(self) -> dict:
        """``/status`` ``registry``: the old layout's part, when ``registry.neti`` is on."""
        extra = {} if self._neti is None else {"neti": self._neti.status(self.view())}
        return extra | ({"pending_policies": p} if (p := self._pending.status()) else {})

    def _stop(self, keep_session: bool) -> None:
        self._closed = True
        self._listener = None
        self._worker.stop(self._zk.op_timeout + 5)
        self._pending.stop()
        if not keep_session and self._neti is not None:
            self._neti.leave()
        with self._client_lock:
            client, self._zk.client = self._zk.client, None
        if client is not None:
            if keep_session and self._own is not None:
                save_session(self._session_file, self._session_key(), zkc.detach(client, self._on_state),
                             self.node_id, self.config.timeout_s)
            else:
                zkc.close(client, self._on_state)
        with self._v.lock:
            self._v.connected = False
            self._v.synced = False
            self._bump()

    # --- full re-reads on request -----------------------------------------------------------

    def request_resync(self, reason: str) -> int:
        """Ask for a full re-read of the registry (the worker does it next); returns a ticket
        for :meth:`resynced_since`. The controller asks when it becomes the journal's leader,
        so that it never journals older values than the previous leader did."""
        with self._resync_lock:
            self._resync_wanted += 1
            ticket = self._resync_wanted
        self._worker.resync(reason)
        return ticket

    def resynced_since(self, ticket: int) -> bool:
        """True once a full re-read asked for with ``ticket`` (or later) has completed."""
        return self._resync_done >= ticket

    # --- operator helpers -----------------------------------------------------------------

    def set_max_change(self, n: int) -> None:
        """Operator: set ``config/max_change`` (needs ``registry.operator`` when ACLs are on)."""
        with zkc.translate(f"setting {self._layout.max_change} to {n}", self._hosts):
            set_max_change(self._zk, self._ensure_client(), self._layout, operator_acl(self.config.operator), n)

    @property
    def session_id(self) -> int | None:
        return zkc.session_id(self._zk.client)

    # --- connection -----------------------------------------------------------------------

    def _ensure_client(self) -> KazooClient:
        with self._client_lock:
            if self._closed:
                raise RegistryError("the ZooKeeper registry is closed")
            if self._zk.client is None:
                saved = load_session(self._session_file, self._session_key(), self.node_id)
                self._zk.client = zkc.connect(self.config, self._on_event, self._on_state, client_id=saved)
                if saved is not None:
                    now = zkc.session_id(self._zk.client)
                    if now == saved[0]:
                        log.info("node %s: resumed ZooKeeper session 0x%x of the previous run: its record was "
                                 "kept", self.node_id, now)
                    else:
                        log.info("node %s: the previous run's ZooKeeper session 0x%x had expired; new session "
                                 "0x%x", self.node_id, saved[0], now or 0)
            return self._zk.client

    def _session_key(self) -> dict:
        return {"node_id": self.node_id, "hosts": self._hosts, "prefix": self._layout.prefix}

    def _zk_connected(self) -> bool:
        client = self._zk.client
        return client is not None and client.state == KazooState.CONNECTED

    def _add_watches(self) -> None:
        zkc.add_watches(self._zk.client, (self._layout.nodes, self._layout.policies, self._layout.max_change,
                                          self._layout.ip_to_id, self._layout.assignments, self._pending.path,
                                          *(self._neti.watch_paths() if self._neti else ())), self._zk.op_timeout)

    def _ensure_layout(self) -> None:
        """The layout's parent paths exist (created here when no ACLs are in use)."""
        if self._layout_ok:
            return
        lay = self._layout
        missing = [p for p in (lay.nodes, lay.policies, lay.config, lay.id_to_ip, lay.ip_to_id)
                   if self._zk.exists(p) is None]
        if self.config.auth is None and self._zk.exists(lay.assignments) is None:
            missing.append(lay.assignments)   # an older layout: made here unless ACLs are on
        if missing:
            if self.config.auth is not None and self.config.operator is None:
                raise RegistryError(
                    f"the registry layout under {lay.prefix} is missing {', '.join(missing)}; "
                    "with registry.auth set, an operator creates it once with "
                    "overlay.zk.layout.bootstrap"
                )
            if self.config.operator is not None:
                create_layout(self._zk.client, lay, self.config.operator, self.config.node_identities)
            else:
                for p in missing:
                    with contextlib.suppress(NodeExistsError):
                        self._zk.client.ensure_path(p)
        if self.config.auth is not None and self.node_id != OBSERVER_ID:
            # the operator (config/admins) may also change and re-ACL what this node writes
            try:
                data, _ = self._zk.get(lay.path(ADMINS))
                admins = parse_admins(data)
            except (NoNodeError, NoAuthError):
                admins = []
            if not admins:
                log.warning("node %s: %s/%s is missing or unreadable: the operator cannot re-ACL what this "
                            "node writes (is its identity in registry.node_identities?)", self.node_id,
                            lay.prefix, ADMINS)
            self._record_acl = owned_acl(self.config.auth, admins)
            self._alloc.record_acl = self._record_acl
        if self._neti is not None:
            self._neti.ensure_layout()
        self._layout_ok = True

    def _on_state(self, state: str) -> None:
        """kazoo connection thread: flag disconnection at once, leave the reading to the worker."""
        if state == KazooState.CONNECTED:
            log.info("node %s: connected to ZooKeeper (session 0x%x)", self.node_id, self.session_id or 0)
            if self._worker.running:
                self._worker.resync("reconnected")
            return
        if state == KazooState.LOST:
            log.warning("node %s: ZooKeeper session lost; keeping the last view until it is re-established",
                        self.node_id)
        else:
            log.warning("node %s: ZooKeeper connection suspended; keeping the last view", self.node_id)
        with self._v.lock:
            changed = self._v.connected or self._v.synced
            self._v.connected = False
            self._v.synced = False
            if changed:
                self._bump()
        if changed:
            self._notify()

    def _on_event(self, etype: int, path: str) -> None:
        """kazoo connection thread: queue a watch notification."""
        self._worker.enqueue(("event", etype, path))

    # --- own record -----------------------------------------------------------------------

    def _ensure_own_record(self, replace_data: bool = False) -> None:
        """Create ``nodes/<self>`` (ephemeral) or bring its data up to date; with ``registry.neti``,
        also this node's entry in the old party."""
        self._ensure_native_record(replace_data)
        with self._own_lock:
            node = self._own
        if self._neti is not None and node is not None:
            self._neti.join(node, self._record_acl)

    def _ensure_native_record(self, replace_data: bool) -> None:
        with self._own_lock:
            node, data = self._own, self._own_data
        if node is None or data is None:
            return
        client = self._zk.client
        path = f"{self._layout.nodes}/{node.node_id}"
        for _ in range(3):  # create, or read what is there (it may vanish in between)
            try:
                self._zk.wait(client.create_async(path, data, acl=self._record_acl, ephemeral=True))
                log.info("node %s: registered at %s (overlay %s)", node.node_id, path, node.overlay)
                return
            except NodeExistsError:
                pass
            try:
                current, stat = self._zk.get(path)
                break
            except NoNodeError:
                continue
        else:
            return
        ours = stat.ephemeralOwner == (client.client_id or (0,))[0]
        if current != data and (ours or replace_data):
            with contextlib.suppress(NoNodeError, NoAuthError):
                self._zk.wait(client.set_async(path, data, version=stat.version))
        if not ours:
            log.warning(
                "node %s: %s is held by another ZooKeeper session (0x%x), probably this node's "
                "previous run; it is re-created under this session when that one ends",
                node.node_id, path, stat.ephemeralOwner,
            )

    def _keep_own_record(self) -> None:
        """Worker: re-register; a record we cannot touch (someone squats our name with a
        hostile ACL) is logged and must not stop the view from following the registry."""
        try:
            self._ensure_own_record()
        except CONNECTION_ERRORS:
            raise
        except KazooException as exc:
            log.error("node %s: cannot (re-)register %s/%s: %s", self.node_id, self._layout.nodes,
                      self.node_id, type(exc).__name__)

    # --- the worker -----------------------------------------------------------------------

    def _round(self, resync: str | None, events: list[tuple], _batch: list[tuple]) -> None:
        if resync is not None:
            with self._resync_lock:
                ticket = self._resync_wanted
            self._resync(resync)
            self._resync_done = max(self._resync_done, ticket)
        if events:
            self._apply_events(events)

    def _resync(self, reason: str) -> None:
        """Re-read everything and rebuild the view by difference (start, reconnection)."""
        t0 = time.monotonic()
        self._add_watches()
        self._keep_own_record()
        names = [n for n in self._zk.children(self._layout.nodes) if n != self.node_id]
        policy_ids = self._zk.children(self._layout.policies)
        assigned = self._zk.children(self._layout.assignments)
        paths = [f"{self._layout.nodes}/{n}" for n in names]
        paths += [f"{self._layout.policies}/{p}" for p in policy_ids]
        paths += [f"{self._layout.assignments}/{a}" for a in assigned]
        paths += [self._layout.max_change, self._pending.path]
        got = self._zk.get_many(paths)
        self._pending.update(got[self._pending.path])
        self._book.reset(set(names) | {f"policy:{p}" for p in policy_ids} | {f"assignment:{a}" for a in assigned}
                         | {"config:max_change"} | (self._neti.log_keys() if self._neti else set()))
        for n in names:
            res = got[f"{self._layout.nodes}/{n}"]
            if res is not None:
                self._book.store_result(n, res)
        self._book.fetch_owners({r.node.overlay for r in self._book.records.values() if r.node is not None})
        nodes, rejected, order, grants = {}, {}, {}, {}
        for n in self._book.records:
            node, reason = self._book.evaluate(n)
            if node is not None:
                nodes[n] = node
                order[n] = self._book.order_of(node)
            else:
                rejected[n] = reason
        for a in assigned:
            res = got[f"{self._layout.assignments}/{a}"]
            if res is not None:
                groups, reason = self._book.parse_assignment(a, res)
                _put(grants, a, groups)
                _put(rejected, f"assignment:{a}", reason)
        policies = {}
        for pid in policy_ids:
            res = got[f"{self._layout.policies}/{pid}"]
            if res is None:
                continue
            pol, reason = self._book.parse_policy(pid, res)
            if pol is not None:
                policies[pid] = pol
            else:
                rejected[f"policy:{pid}"] = reason
        max_change = self._book.parse_max_change(got[self._layout.max_change])
        if self._neti is not None:
            self._neti.resync()
        with self._v.lock:
            self._v.nodes, self._v.policies, self._v.rejected = nodes, policies, rejected
            self._v.order, self._v.grants = order, grants
            self._v.max_change = self._native_max = max_change
            self._v.sources = {}
            if self._neti is not None:
                merge_into(self._v, self._neti, (), max_change)
            self._pending.lay_over(self._v, self._v.policies)
            self._v.connected = True
            self._v.synced = True
            self._bump()
        log.info("node %s: registry resync (%s): %d peers, %d rejected, %d policies, %d assignments in %.2f s",
                 self.node_id, reason, len(nodes), len(rejected), len(policies), len(grants), time.monotonic() - t0)
        self._notify()

    def _apply_events(self, events: list[tuple]) -> None:
        node_last: dict[str, int] = {}
        policy_last: dict[str, int] = {}
        assign_last: dict[str, int] = {}
        max_change_event = pending_event = False
        ips: set[str] = set()
        own_event: int | None = None
        np, pp, ap = self._layout.nodes + "/", self._layout.policies + "/", self._layout.ip_to_id + "/"
        gp = self._layout.assignments + "/"
        for _, etype, path in events:
            if path.startswith(np):
                name = path[len(np):]
                if "/" in name:
                    continue
                if name == self.node_id:
                    own_event = etype
                else:
                    node_last[name] = etype
            elif path.startswith(pp):
                pid = path[len(pp):]
                if "/" not in pid:
                    policy_last[pid] = etype
            elif path == self._layout.max_change:
                max_change_event = True
            elif path == self._pending.path:
                pending_event = True
            elif path.startswith(ap):
                ip = path[len(ap):]
                if "/" not in ip:
                    ips.add(ip)
            elif path.startswith(gp):
                name = path[len(gp):]
                if "/" not in name:
                    assign_last[name] = etype

        if own_event is not None and self._own is not None:
            self._keep_own_record()

        # alloc/ip-to-id changed: forget cached owners, re-check the records that claim them
        recheck: set[str] = set()
        for ip in ips:
            self._book.owners.pop(ip, None)
            self._book.alloc_order.pop(ip, None)
            recheck |= self._book.claims.get(ip, set())

        to_read = [n for n, et in node_last.items() if et != EV_DELETED]
        pol_read = [p for p, et in policy_last.items() if et != EV_DELETED]
        paths = [f"{self._layout.nodes}/{n}" for n in to_read] + [f"{self._layout.policies}/{p}" for p in pol_read]
        paths += [f"{gp}{a}" for a, et in assign_last.items() if et != EV_DELETED]
        paths += [self._layout.max_change] * max_change_event + [self._pending.path] * pending_event
        got = self._zk.get_many(paths) if paths else {}
        if pending_event:
            self._pending.update(got.get(self._pending.path))
        neti_events = [e for e in events if self._neti.owns(e[2])] if self._neti else []
        if neti_events or (ips and self._neti is not None):
            self._neti.apply(neti_events, ips)

        touched = set(recheck)
        for name, etype in node_last.items():
            touched.add(name)
            res = got.get(f"{self._layout.nodes}/{name}") if etype != EV_DELETED else None
            if res is None:
                self._book.forget(name, deleted=True)
            else:
                self._book.store_result(name, res)
        need = {r.node.overlay for n in touched if (r := self._book.records.get(n)) is not None and r.node is not None}
        self._book.fetch_owners({ip for ip in need if ip not in self._book.owners})

        node_changes: dict[str, tuple[Node | None, str | None]] = {}
        for name in touched:
            node_changes[name] = self._book.evaluate(name) if name in self._book.records else (None, None)
        policy_changes = self._read_changes(policy_last, pp, got, "policy", self._book.parse_policy)
        new_max = self._book.parse_max_change(got.get(self._layout.max_change)) if max_change_event else None
        assign_changes = self._read_changes(assign_last, gp, got, "assignment", self._book.parse_assignment)

        changed = False
        with self._v.lock:
            nodes, rejected, policies = self._v.nodes, self._v.rejected, self._v.policies
            for name, (node, reason) in node_changes.items():
                changed |= _put(nodes, name, node)
                changed |= _put(rejected, name, reason)
                changed |= _put(self._v.order, name, None if node is None else self._book.order_of(node))
            for name, (groups, reason) in assign_changes.items():
                changed |= _put(self._v.grants, name, groups)
                changed |= _put(rejected, f"assignment:{name}", reason)
            for pid, (pol, reason) in policy_changes.items():
                changed |= _put(policies, pid, pol)
                changed |= _put(rejected, f"policy:{pid}", reason)
            if max_change_event:
                self._native_max = new_max
            if self._neti is not None:
                changed |= merge_into(self._v, self._neti, node_changes, self._native_max)
            elif max_change_event and new_max != self._v.max_change:
                self._v.max_change = new_max
                changed = True
            changed |= self._pending.lay_over(self._v, policies)
            if changed:
                self._bump()
        if changed:
            self._notify()

    def _read_changes(self, last: dict[str, int], prefix: str, got: dict, kind: str,
                      parse: Any) -> dict[str, tuple[Any, str | None]]:
        """``{id: (value, reason)}`` for the znodes under ``prefix`` whose last event is in
        ``last``: deleted ones are ``(None, None)``, the others parsed from ``got``."""
        out: dict[str, tuple[Any, str | None]] = {}
        for ident, etype in last.items():
            res = got.get(f"{prefix}{ident}") if etype != EV_DELETED else None
            if res is None:
                self._book.logged.pop(f"{kind}:{ident}", None)
                out[ident] = (None, None)
            else:
                out[ident] = parse(ident, res)
        return out

    # --- view bookkeeping -----------------------------------------------------------------

    def _bump(self) -> None:
        """Caller holds self._v.lock."""
        self._v.revision += 1

    def _notify(self) -> None:
        notify_listener(self._listener, self.node_id)

