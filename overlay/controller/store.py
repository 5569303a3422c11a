"""The controller's store: one replica's link to ZooKeeper, and the change journal.

Everything lives in the ZooKeeper layout of DESIGN §4.2, so replicas keep no
state of their own that matters. Two paths are added under the prefix
(docs/grpc.md):

    changes                  data = {"epoch": <random id>, "floor": <revision>}
    changes/r-<revision>     one journal entry: {"k": "node/web-1", "v": <value> | null}
    controllers/n-<seq>      EPHEMERAL_SEQUENTIAL, one per replica: the lowest is the leader
    leases/<node_id>         persistent: the record nodes/<node_id> is leased
    holders/<replica>        EPHEMERAL, one per replica: the nodes it holds

**Reading and validating** is the daemon's own code: the store's ``observer`` is a
:class:`~overlay.registry.zookeeper.ZooKeeperRegistry` without a record of its own,
so its view holds every valid node and policy, every rejected record with its
reason, and ``config/max_change``; groups are followed here.

**The journal** (:mod:`overlay.controller.journal`, kept in step with ZooKeeper by
:mod:`overlay.controller.journal_sync`) gives Watch its revisions. The
leader (:mod:`overlay.controller.election`) diffs what the observer sees (plus groups)
against the journal's state and appends one entry per changed item, numbered
``head + 1, head + 2, ...`` in a transaction fenced by its own election znode (a
replica that lost its session cannot append). Every replica follows ``changes/`` with
a persistent recursive watch and applies entries in order, so all replicas agree on
every revision. The leader compacts: an entry superseded by a later one for the same
item (or a deletion) is removed once it is more than ``window`` revisions old;
``floor`` records the highest removed revision. A replica starting up folds all live
entries into the current state.

**Registrations** are :mod:`overlay.controller.leases`' (persistent records, leases held
by any replica, expired by the leader).

Threads: RPC handlers call the public methods from any thread; one worker thread
follows ZooKeeper (journal, groups, election), leads, compacts, publishes this
replica's holdings and (leader) expires leases. Listeners added with :meth:`Store.add_listener` are called from the
worker after the journal advanced or readiness changed; they must be cheap.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from kazoo.client import KazooState
from kazoo.exceptions import KazooException, NoAuthError, NodeExistsError, NoNodeError

from overlay.config import RegistryConfig
from overlay.controller.election import Election
from overlay.controller.journal import (
    Journal,
    Plan,
    desired_items,
)
from overlay.controller.journal_sync import JournalSync
from overlay.controller.leases import Leases
from overlay.errors import (
    AllocationExhausted,
    AlreadyExists,
    Contended,
    FailedPrecondition,
    NotFound,
    RegistryError,
    Unavailable,
    clip,
    internal,
)
from overlay.model import Node, Policy, serialise_node, serialise_policy
from overlay.ownership import granted, holders, serialise_assignment
from overlay.registry.zookeeper import ZooKeeperRegistry
from overlay.rpc.convert import Key
from overlay.zk import acl as zk_acl
from overlay.zk import client as zkc
from overlay.zk.acl import operator_acl
from overlay.zk.layout import Layout
from overlay.zk.neti import PartyMembers
from overlay.zk.worker import WatchWorker

log = logging.getLogger(__name__)

LEAD_PERIOD_S = 10.0          # the leader re-diffs at least this often, even without events
ACL_REPAIR_LIMIT = 20_000     # entries whose ACL a replica checks (and fixes) when it starts
VISIBLE_WAIT_S = 5.0          # writes wait this long for their change to reach the journal
NO_AUTH_HINT = "the controller's registry config needs the operator credentials"


class Store:
    def __init__(self, config: RegistryConfig, subnet: ipaddress.IPv4Network, *, lease_s: float = 60.0,
                 window: int = 10000, replica: str | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.subnet = ipaddress.IPv4Network(subnet)
        self.window = window
        self.replica = replica or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._layout = Layout(config.prefix)
        self._hosts = ",".join(config.hosts)
        self._zk = zkc.Session(max(5.0, 2.0 * config.timeout_s))
        self._item_acl = operator_acl(config.operator)

        self.observer = ZooKeeperRegistry(config, self.subnet, None)
        self._journal = Journal(window)
        self._connected = False
        # records published for nodes are the controller's: operator_acl, like everything it writes
        self.leases = Leases(self._zk, self._layout, self._item_acl, self._item_acl, self.replica,
                             lease_s, clock)
        # registry.neti: the nodes this replica holds join the old system's party (overlay.zk.neti)
        self._party = None if config.neti is None else PartyMembers(self._zk, config.neti, self._item_acl,
                                                                    f"controller {self.replica}")
        self._election = Election(self._zk, self._layout, self._item_acl, self.replica, self._became_leader)
        self._sync = JournalSync(self._zk, self._layout, self._journal, self._item_acl, self.replica, self._notify)

        # worker-private
        self._groups: dict[str, str] = {}
        self._groups_synced = False
        self._leader_ticket: int | None = None
        self._dirty = True
        self._last_lead = 0.0

        self._worker = WatchWorker("controller-store", self._round, who=f"controller {self.replica}",
                                   backoff=(0.2, 5.0), every_round=True)
        self._listeners: list[Callable[[], None]] = []
        self._closed = False
        self.ungranted_total = 0      # group claims dropped at RegisterNode (no assignment grants them)
        self.acl_report: zk_acl.RepairReport | None = None   # the re-ACL at start (with registry.operator)

    # --- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Connect, load the journal, join the leader election; wait until ready (or raise)."""
        self.observer.start(self._kick)
        with self._translate("connecting the controller to ZooKeeper"):
            self._zk.client = zkc.connect(self.config, self._on_event, self._on_state)
        self._worker.start()
        self._worker.resync("start")
        if not self._journal.wait_loaded(timeout):
            raise Unavailable(f"the controller could not load its journal from ZooKeeper at {self._hosts} "
                              f"in {timeout:g} s")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._worker.stop(10)
        self.observer.close()
        if self._zk.client is not None:
            zkc.close(self._zk.client)

    def add_listener(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    @property
    def ready(self) -> bool:
        return self._journal.loaded and self._connected

    @property
    def is_leader(self) -> bool:
        return self._election.leader

    @property
    def epoch(self) -> str:
        return self._journal.epoch

    @property
    def head(self) -> int:
        return self._journal.head

    @property
    def session_id(self) -> int:
        return zkc.session_id(self._zk.client) or 0

    # --- reads (from the journal's state) ------------------------------------------------

    def get(self, key: Key) -> tuple[int, dict] | None:
        return self._journal.get(key)

    def items(self, kind: str) -> tuple[int, list[tuple[str, dict]]]:
        """``(head, [(id, value)])`` of one kind, sorted by id."""
        return self._journal.items(kind)

    def values(self) -> dict[Key, dict]:
        """Every live item's value (tests, debugging)."""
        return self._journal.values()

    def journal(self) -> list[tuple]:
        """The entries held in memory, ``(revision, key, value)``, oldest first (tests, debugging)."""
        return self._journal.entries()

    def position(self) -> tuple[str, int] | None:
        """``(epoch, head)`` of the journal, lock-free (:meth:`Journal.position`)."""
        return self._journal.position()

    def read_since(self, revision: int, epoch: str, coalesce_after: int, fresh: bool = False) -> Plan | None:
        """What a Watch client at ``revision`` (of ``epoch``) needs next (:meth:`Journal.read_since`)."""
        return self._journal.read_since(revision, epoch, coalesce_after, fresh)

    def wait_visible(self, key: Key, check: Callable[[dict | None], bool], timeout: float = VISIBLE_WAIT_S) -> int:
        """The revision at which ``check(value of key)`` holds, waiting up to ``timeout``; 0 if not yet."""
        return self._journal.wait_visible(key, check, timeout, lambda: self._closed)

    # --- writes --------------------------------------------------------------------------

    def allocate(self, node_id: str, requested: str | None = None) -> str:
        if requested:
            owner = self._owner_of(requested)
            if owner is not None and owner != node_id:
                raise AlreadyExists(f"requested: overlay address {requested} is allocated to node {owner!r}")
        try:
            return self.observer.allocate(node_id, requested or None)
        except (AllocationExhausted, AlreadyExists, Unavailable):
            raise
        except RegistryError as exc:
            if not self._zk_connected():
                raise internal(Unavailable(str(exc))) from None
            raise internal(FailedPrecondition(str(exc))) from None

    def register(self, node: Node, leased: bool) -> tuple[Node, tuple[str, ...]]:
        """Publish ``node`` (persistent; leased when ``leased``). Like every write here it
        returns once ZooKeeper has it; :meth:`wait_visible` waits for the journal.

        Refused when another live node holds one of its addresses (overlay.ownership).
        Returns the record as Watch serves it (its groups narrowed to the node's
        assignment) and the claimed groups that were dropped (counted in ``ungranted_total``)."""
        view = self.observer.view()
        held = holders(node, view.nodes.values())
        if held:
            c = held[0]
            raise FailedPrecondition(f"node.{c.kind}: {c.kind} address {c.address} is held by the live node {c.holder!r}")
        shown, ungranted = granted(node, view.grants or {})
        if ungranted:
            self.ungranted_total += len(ungranted)
            log.warning("controller %s: node %s claims groups %s that its assignment does not grant; "
                        "they are dropped", self.replica, node.node_id, clip(", ".join(ungranted), 200))
        owner = self._owner_of(node.overlay)
        if owner is None:
            raise FailedPrecondition(f"node.overlay: {node.overlay} is not allocated to {node.node_id!r}; call Allocate first")
        if owner != node.node_id:
            raise AlreadyExists(f"node.overlay: {node.overlay} is allocated to node {owner!r}, not {node.node_id!r}")
        with self._translate(f"registering node {node.node_id}"):
            self.leases.register(node.node_id, serialise_node(node), leased)
        return shown, ungranted

    def set_assignment(self, node_id: str, groups: tuple[str, ...]) -> None:
        """Operator: the groups ``node_id`` may hold (``assignments/<node_id>``)."""
        with self._translate(f"writing the assignment of {node_id}"):
            self._put_persistent(f"{self._layout.assignments}/{node_id}", serialise_assignment(groups), False,
                                 f"node_id: the assignment of {node_id!r}")

    def deregister(self, node_id: str) -> None:
        with self._translate(f"deregistering node {node_id}"):
            self.leases.deregister(node_id)

    def put_group(self, name: str, description: str, create_only: bool) -> None:
        data = json.dumps({"description": description}, sort_keys=True).encode()
        with self._translate(f"writing group {name}"):
            self._put_persistent(f"{self._layout.groups}/{name}", data, create_only, f"group.name: group {name!r}")

    def delete_group(self, name: str) -> None:
        with self._translate(f"deleting group {name}"):
            self._delete(f"{self._layout.groups}/{name}", f"name: group {name!r} does not exist")

    def put_policy(self, policy: Policy, create_only: bool) -> None:
        data = serialise_policy(policy)
        pid = policy.policy_id
        with self._translate(f"writing policy {pid}"):
            self._put_persistent(f"{self._layout.policies}/{pid}", data, create_only,
                                 f"policy.policy_id: policy {pid!r}")

    def delete_policy(self, policy_id: str) -> None:
        with self._translate(f"deleting policy {policy_id}"):
            self._delete(f"{self._layout.policies}/{policy_id}", f"policy_id: policy {policy_id!r} does not exist")

    # --- Watch streams and leases ----------------------------------------------------------

    def stream_opened(self, node_id: str) -> None:
        self.leases.stream_opened(node_id)

    def stream_closed(self, node_id: str) -> None:
        self.leases.stream_closed(node_id)

    def heartbeat(self, node_id: str) -> None:
        """Renew ``node_id``'s lease on this replica (NotFound if it is not registered)."""
        cur = self._journal.get(("node", node_id))
        if cur is None or "node" not in cur[1]:
            raise NotFound(f"node_id: node {node_id!r} is not registered (register it, then send heartbeats)")
        self.leases.touch(node_id)

    def held(self) -> list[str]:
        """The nodes this replica holds (open streams, recent registrations and heartbeats)."""
        return self.leases.held()

    # --- ZooKeeper helpers -----------------------------------------------------------------

    def _translate(self, what: str):
        return zkc.translate(what, self._hosts, NO_AUTH_HINT)

    def _zk_connected(self) -> bool:
        client = self._zk.client
        return client is not None and client.state == KazooState.CONNECTED

    def _owner_of(self, ip: str) -> str | None:
        if self._zk.client is None:
            raise Unavailable("the controller is not connected to ZooKeeper")
        with self._translate(f"reading the owner of {ip}"):
            try:
                data, _ = self._zk.wait(self._zk.client.get_async(f"{self._layout.ip_to_id}/{ip}"))
            except NoNodeError:
                return None
        return data.decode("utf-8", "replace")

    def _put_persistent(self, path: str, data: bytes, create_only: bool, what: str) -> None:
        client = self._zk.client
        for _ in range(5):
            try:
                self._zk.wait(client.create_async(path, data, acl=self._item_acl))
                return
            except NodeExistsError:
                if create_only:
                    raise AlreadyExists(f"{what} already exists") from None
            try:
                self._zk.wait(client.set_async(path, data))
                return
            except NoNodeError:
                continue
        raise Contended(f"{what}: kept appearing and disappearing; try again")

    def _delete(self, path: str, missing: str) -> None:
        try:
            self._zk.wait(self._zk.client.delete_async(path))
        except NoNodeError:
            raise NotFound(missing) from None

    # --- the worker ------------------------------------------------------------------------

    def _kick(self) -> None:
        """Observer listener: ZooKeeper changed (the leader re-diffs)."""
        self._worker.enqueue(("kick",))

    def _on_event(self, etype: int, path: str) -> None:
        self._worker.enqueue(("event", etype, path))

    def _on_state(self, state: str) -> None:
        if self._closed:
            return
        if state == KazooState.CONNECTED:
            self._worker.resync("reconnected")
            return
        if state == KazooState.LOST:
            self._election.lost()
        with self._journal.cond:
            self._connected = False
        log.warning("controller %s: ZooKeeper connection %s; Watch streams keep the last state",
                    self.replica, state.lower())
        self._notify()

    def _notify(self) -> None:
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:
                log.exception("controller store listener failed")

    def _round(self, resync: str | None, events: list[tuple], batch: list[tuple]) -> None:
        if resync is not None:
            self._resync()
        else:
            self._handle_events(events)
        if any(item[0] == "kick" for item in batch):
            self._dirty = True
        self._sync.catch_up(self._sync.hint(batch))
        self._lead()
        if not self._election.leader:
            self._journal.forget_dead(self._journal.floor)
        if self._connected:
            self.leases.maintain()
            if self._election.leader and self._journal.loaded:
                self.leases.lead()
            if self._party is not None:
                self._sync_party()

    def _sync_party(self) -> None:
        """The old party holds an entry for each node this replica holds (registry.neti); a
        refusal (its ACL) is logged and never stops the store's own work."""
        view = self.observer.view()
        try:
            self._party.sync({n: view.nodes[n] for n in self.held() if n in view.nodes and view.source_of(n) == "native"})
        except zkc.CONNECTION_ERRORS:
            raise
        except KazooException as exc:
            log.error("controller %s: cannot write the old party %s: %s", self.replica, self._party.paths.party,
                      type(exc).__name__)

    def _resync(self) -> None:
        t0 = time.monotonic()
        self._sync.ensure_paths()
        if self._party is not None:
            self._party.reset()
        if self.config.operator is not None and self.acl_report is None:
            self._repair_acls()
        zkc.add_watches(self._zk.client, (self._layout.changes, self._layout.controllers, self._layout.groups),
                        self._zk.op_timeout)
        self._read_groups(None)
        self._election.join()
        self._sync.check_meta()
        self.leases.restart()
        with self._journal.cond:
            self._connected = True
            self._journal.cond.notify_all()
        self._dirty = True
        log.info("controller %s: synced with ZooKeeper (journal at %d, epoch %s, %s) in %.2f s", self.replica,
                 self._journal.head, self._journal.epoch[:8], "leader" if self._election.leader else "follower",
                 time.monotonic() - t0)
        self._notify()

    def _repair_acls(self) -> None:
        """Once per start: bring existing entries to the ACL policy (overlay.zk.acl), bounded."""
        t0 = time.monotonic()
        report = zk_acl.repair(self._zk.client, self._layout.prefix, self.config.operator,
                               self.config.node_identities, limit=ACL_REPAIR_LIMIT, timeout=self._zk.op_timeout)
        self.acl_report = report
        level = logging.WARNING if (report.refused or report.truncated) else logging.INFO
        log.log(level, "controller %s: ACLs under %s: %s (%.2f s)", self.replica, self._layout.prefix,
                report.summary(), time.monotonic() - t0)

    def _handle_events(self, events: list[tuple]) -> None:
        groups: set[str] = set()
        election = meta = False
        gp, cp = self._layout.groups + "/", self._layout.controllers + "/"
        for _, _, path in events:
            if path.startswith(gp):
                name = path[len(gp):]
                if "/" not in name:
                    groups.add(name)
            elif path.startswith(cp) or path == self._layout.controllers:
                election = True
            elif path == self._layout.changes:
                meta = True
        if groups:
            self._read_groups(groups)
        if election:
            self._election.elect()
        if meta:
            self._sync.check_meta()

    # --- groups ----------------------------------------------------------------------------

    def _read_groups(self, names: set[str] | None) -> None:
        client = self._zk.client
        if names is None:
            try:
                names_list = self._zk.wait(client.get_children_async(self._layout.groups))
            except NoNodeError:
                names_list = []
            fresh: dict[str, str] = {}
            pending = [(n, client.get_async(f"{self._layout.groups}/{n}")) for n in names_list]
        else:
            fresh = dict(self._groups)
            pending = [(n, client.get_async(f"{self._layout.groups}/{n}")) for n in names]
        for name, res in pending:
            try:
                data, _ = self._zk.wait(res)
            except NoNodeError:
                fresh.pop(name, None)
                continue
            except NoAuthError:
                data = b""
            fresh[name] = _description(name, data)
        if fresh != self._groups or not self._groups_synced:
            self._groups = fresh
            self._groups_synced = True
            self._dirty = True

    # --- the journal in ZooKeeper ----------------------------------------------------------

    def _became_leader(self) -> None:
        self.leases.new_leader()
        self._leader_ticket = self.observer.request_resync("controller leadership")
        self._dirty = True

    def _lead(self) -> None:
        if not (self._election.leader and self._journal.loaded and self._election.member is not None):
            return
        if self._leader_ticket is not None:
            if not self.observer.resynced_since(self._leader_ticket):
                return  # wait for a fresh read: never journal older values than the last leader did
            self._leader_ticket = None
        view = self.observer.view()
        if not (view.connected and view.synced and self._groups_synced):
            return
        now = time.monotonic()
        if not self._dirty and now - self._last_lead < LEAD_PERIOD_S:
            return
        self._dirty = False
        self._last_lead = now
        desired = desired_items(view, self._groups)
        current = self._journal.values()
        changes = [(k, desired.get(k)) for k in sorted(set(desired) | set(current)) if desired.get(k) != current.get(k)]
        member = self._election.member
        outcome = self._sync.append(changes, member) if changes else None
        if outcome == "lost":
            self._election.lost()
            self._worker.resync("lost leadership")
            return
        if outcome == "refused":
            self._dirty = True
            return
        self._sync.compact(member)


def _description(name: str, data: bytes) -> str:
    if not data:
        return ""
    try:
        obj: Any = json.loads(data.decode("utf-8"))
        desc = obj.get("description", "") if isinstance(obj, dict) else ""
        return desc if isinstance(desc, str) else ""
    except (ValueError, UnicodeDecodeError):
        log.warning("group %s: data is not JSON; description ignored", name)
        return ""
