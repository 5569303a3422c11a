"""The controller's store: one replica's link to ZooKeeper, and the change journal.

Everything lives in the ZooKeeper layout of DESIGN §4.2, so replicas keep no
state of their own that matters. Two paths are added under the prefix
(docs/grpc.md):

    changes                  data = {"epoch": <random id>, "floor": <revision>}
    changes/r-<revision>     one journal entry: {"k": "node/web-1", "v": <value> | null}
    controllers/n-<seq>      EPHEMERAL_SEQUENTIAL, one per replica: the lowest is the leader

**Reading and validating** is the daemon's own code: an ``_Observer`` is a
:class:`~overlay.registry.zookeeper.ZooKeeperRegistry` that keeps no record of
its own, so its view holds every valid node and policy, every rejected record
with its reason, and ``config/max_change``; groups are followed here.

**The journal** gives Watch its revisions. The leader diffs what the observer sees
(plus groups) against the journal's state and appends one entry per changed
item, numbered ``head + 1, head + 2, ...`` in a transaction fenced by its own
election znode (a replica that lost its session cannot append). Every replica
follows ``changes/`` with a persistent recursive watch and applies entries in
order, so all replicas agree on every revision. The leader compacts: an entry
superseded by a later one for the same item (or a deletion) is removed once it
is more than ``window`` revisions old; ``floor`` records the highest removed
revision. A replica starting up folds all live entries into the current state.

**Registrations**: a node record is EPHEMERAL, created in this replica's ZooKeeper
session. A node's own registration is leased: kept while the node has a Watch
stream open on this replica, and ``lease_s`` seconds after its last one closed
(the daemon re-registers on every reconnection). An operator's registration
lasts until DeregisterNode or until this replica stops. Both are re-created
after this replica's ZooKeeper session is replaced.

Threads: RPC handlers call the public methods from any thread; one worker thread
follows ZooKeeper (journal, groups, election), leads, compacts and expires
leases. Listeners added with :meth:`Store.add_listener` are called from the
worker after the journal advanced or readiness changed; they must be cheap.
"""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    ConnectionClosedError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    OperationTimeoutError,
    SessionExpiredError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.security import OPEN_ACL_UNSAFE

from overlay.config import RegistryConfig
from overlay.errors import (
    AllocationExhausted,
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    RegistryError,
    Unavailable,
)
from overlay.model import Node, Policy, serialise_node, serialise_policy
from overlay.registry import RegistryView
from overlay.registry.zookeeper import (
    PERSISTENT_RECURSIVE,
    ZooKeeperRegistry,
    _AddWatch,
    _digest,
    _new_client,
    _record_acl,
    _world_read,
)
from overlay.rpc.convert import Key, key_parse, key_text

log = logging.getLogger(__name__)

OBSERVER_ID = "@controller"   # not a valid node name: the observer's view leaves no record out
ENTRY_PREFIX = "r-"
MAX_ITEMS_PER_APPEND = 100
MAX_BYTES_PER_APPEND = 512 * 1024
CATCH_UP_BATCH = 64
COMPACT_BATCH = 500
META_CHECK_S = 2.0            # idle replicas re-read the journal's metadata this often
LEAD_PERIOD_S = 10.0          # the leader re-diffs at least this often, even without events
VISIBLE_WAIT_S = 5.0          # writes wait this long for their change to reach the journal

_CONNECTION_ERRORS = (ConnectionLoss, ConnectionClosedError, SessionExpiredError, KazooTimeoutError,
                      OperationTimeoutError)


def entry_name(revision: int) -> str:
    return f"{ENTRY_PREFIX}{revision:020d}"


class _Observer(ZooKeeperRegistry):
    """The daemon's ZooKeeper registry, observing every record (it has no node of its own)."""

    def __init__(self, config: RegistryConfig, subnet: ipaddress.IPv4Network):
        super().__init__(config, subnet, "controller")
        self.node_id = OBSERVER_ID
        self._resync_wanted = 0
        self._resync_done = 0
        self._resync_lock = threading.Lock()

    def force_resync(self) -> int:
        """Ask for a full re-read; returns a ticket for :meth:`resynced_since`."""
        with self._resync_lock:
            self._resync_wanted += 1
            ticket = self._resync_wanted
        self._enqueue(("resync", "controller leadership"))
        return ticket

    def resynced_since(self, ticket: int) -> bool:
        return self._resync_done >= ticket

    def _resync(self, reason: str) -> None:
        with self._resync_lock:
            ticket = self._resync_wanted
        super()._resync(reason)
        self._resync_done = max(self._resync_done, ticket)


@dataclass
class _Reg:
    node: Node
    data: bytes
    leased: bool
    expires: float


@dataclass(frozen=True)
class Plan:
    """What a Watch stream at some revision is sent next (see :meth:`Store.read_since`)."""

    kind: str                      # snapshot | delta | current | ahead
    epoch: str
    revision: int                  # where the client is after this
    base: int = 0                  # delta: applies on top of this
    items: tuple = ()              # (revision, key, value) in order; snapshot: sorted by key
    reset: bool = False
    coalesced: bool = False


def desired_items(view: RegistryView, groups: dict[str, str]) -> dict[Key, dict]:
    """The journal's items for what ZooKeeper holds now (validated by the observer)."""
    out: dict[Key, dict] = {}
    for node_id, node in view.nodes.items():
        out[("node", node_id)] = {"node": node.to_dict()}
    for key, reason in view.rejected.items():
        if key.startswith("policy:"):
            out[("policy", key[len("policy:"):])] = {"rejected": reason}
        elif not key.startswith("config:"):
            out[("node", key)] = {"rejected": reason}
    for pid, pol in view.policies.items():
        out[("policy", pid)] = {"policy": pol.to_dict()}
    if view.max_change is not None:
        out[("config", "max_change")] = {"max_change": view.max_change}
    for name, description in groups.items():
        out[("group", name)] = {"group": {"description": description}}
    return out


def coalesce(entries: list[tuple]) -> list[tuple]:
    """The last entry per item, in revision order."""
    last: dict[Any, tuple] = {}
    for e in entries:
        if e[1] is not None:
            last[e[1]] = e
    return sorted(last.values(), key=lambda e: e[0])


class Store:
    def __init__(self, config: RegistryConfig, subnet: ipaddress.IPv4Network, *, lease_s: float = 30.0,
                 window: int = 10000, replica: str | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.subnet = ipaddress.IPv4Network(subnet)
        self.lease_s = lease_s
        self.window = window
        self.replica = replica or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._clock = clock
        p = config.prefix.rstrip("/")
        self._prefix = p
        self._changes = f"{p}/changes"
        self._controllers = f"{p}/controllers"
        self._groups_path = f"{p}/groups"
        self._policies_path = f"{p}/policies"
        self._nodes_path = f"{p}/nodes"
        self._ip_to_id = f"{p}/alloc/ip-to-id"
        self._hosts = ",".join(config.hosts)
        self._op_timeout = max(5.0, 2.0 * config.timeout_s)
        writer = config.auth or config.operator
        self._record_acl = _record_acl(writer)
        self._item_acl = ([_digest(config.operator, all=True), _world_read()] if config.operator
                          else list(OPEN_ACL_UNSAFE))

        self.observer = _Observer(config, self.subnet)
        self._zk: KazooClient | None = None

        # journal state (guarded by _lock; _cond signals every advance)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._state: dict[Key, tuple[int, dict]] = {}
        self._log: list[tuple] = []     # (revision, key, value): revisions log_base+1 .. head
        self._log_base = 0
        self._head = 0
        self._epoch = ""
        self._floor = 0
        self._dead: list[int] = []      # heap of superseded revisions (and deletions)
        self._loaded = False
        self._connected = False

        # worker-private
        self._groups: dict[str, str] = {}
        self._groups_synced = False
        self._member: str | None = None
        self._leader = False
        self._leader_ticket: int | None = None
        self._dirty = True
        self._last_lead = 0.0
        self._meta_checked = 0.0

        self._regs: dict[str, _Reg] = {}
        self._streams: dict[str, int] = {}
        self._reg_lock = threading.Lock()

        self._queue: deque[tuple] = deque()
        self._qcond = threading.Condition()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._listeners: list[Callable[[], None]] = []
        self._closed = False

    # --- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Connect, load the journal, join the leader election; wait until ready (or raise)."""
        self.observer.start(self._kick)
        client = _new_client(self.config)
        client._connection.event_sink = self._on_event
        client.add_listener(self._on_state)
        with self._translate("connecting the controller to ZooKeeper"):
            client.start(timeout=max(self.config.timeout_s, 1.0))
        self._zk = client
        self._worker = threading.Thread(target=self._run, name="controller-store", daemon=True)
        self._worker.start()
        self._enqueue(("resync", "start"))
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._loaded:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable(f"the controller could not load its journal from ZooKeeper at {self._hosts} in {timeout:g} s")
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._enqueue(("stop",))
        if self._worker is not None:
            self._worker.join(10)
        self.observer.close()
        client = self._zk
        if client is not None:
            client._connection.event_sink = None
            with contextlib.suppress(Exception):
                client.stop()
                client.close()

    def add_listener(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    @property
    def ready(self) -> bool:
        return self._loaded and self._connected

    @property
    def is_leader(self) -> bool:
        return self._leader

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def head(self) -> int:
        return self._head

    @property
    def session_id(self) -> int:
        client = self._zk
        return (client.client_id or (0,))[0] if client is not None else 0

    # --- reads (from the journal's state) ------------------------------------------------

    def get(self, key: Key) -> tuple[int, dict] | None:
        with self._lock:
            return self._state.get(key)

    def items(self, kind: str) -> tuple[int, list[tuple[str, dict]]]:
        """``(head, [(id, value)])`` of one kind, sorted by id."""
        with self._lock:
            got = sorted((k[1], v) for k, (_, v) in self._state.items() if k[0] == kind)
            return self._head, got

    def journal(self) -> list[tuple]:
        """The entries held in memory, ``(revision, key, value)``, oldest first (tests, debugging)."""
        with self._lock:
            return list(self._log)

    def read_since(self, revision: int, epoch: str, coalesce_after: int, fresh: bool = False) -> Plan | None:
        """What a Watch client at ``revision`` (of ``epoch``) needs next; None before the journal is loaded.

        snapshot: for a ``fresh`` client (no state yet), or at a revision this replica cannot
        resume (``reset``);
        delta: the entries after ``revision`` (coalesced per item beyond ``coalesce_after``);
        current: nothing new; ahead: the client has seen more than this replica (wait).
        """
        with self._lock:
            if not self._loaded:
                return None
            same = not epoch or epoch == self._epoch
            if fresh or not same or revision < self._log_base:
                items = tuple(sorted(((r, k, v) for k, (r, v) in self._state.items()), key=lambda e: e[1]))
                return Plan("snapshot", self._epoch, self._head, items=items, reset=not fresh)
            if revision > self._head:
                return Plan("ahead", self._epoch, self._head)
            if revision == self._head:
                return Plan("current", self._epoch, self._head, base=self._head)
            entries = self._log[revision - self._log_base:]
            head = self._head
        if len(entries) > coalesce_after:
            return Plan("delta", self._epoch, head, base=revision, items=tuple(coalesce(entries)), coalesced=True)
        return Plan("delta", self._epoch, head, base=revision, items=tuple(e for e in entries if e[1] is not None))

    def wait_visible(self, key: Key, check: Callable[[dict | None], bool], timeout: float = VISIBLE_WAIT_S) -> int:
        """The revision at which ``check(value of key)`` holds, waiting up to ``timeout``; 0 if not yet."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                cur = self._state.get(key)
                if check(cur[1] if cur else None):
                    return cur[0] if cur else self._head
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return 0
                self._cond.wait(min(left, 0.5))

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
                raise Unavailable(str(exc)) from None
            raise FailedPrecondition(str(exc)) from None

    def register(self, node: Node, leased: bool) -> None:
        """Publish ``node`` (ephemeral, in this replica's session). Like every write here it
        returns once ZooKeeper has it; :meth:`wait_visible` waits for the journal."""
        owner = self._owner_of(node.overlay)
        if owner is None:
            raise FailedPrecondition(f"node.overlay: {node.overlay} is not allocated to {node.node_id!r}; call Allocate first")
        if owner != node.node_id:
            raise AlreadyExists(f"node.overlay: {node.overlay} is allocated to node {owner!r}, not {node.node_id!r}")
        data = serialise_node(node)
        with self._reg_lock:
            self._regs[node.node_id] = _Reg(node, data, leased, self._clock() + self.lease_s)
        with self._translate(f"registering node {node.node_id}"):
            self._put_ephemeral(node.node_id, data, takeover=True)

    def deregister(self, node_id: str) -> None:
        with self._reg_lock:
            reg = self._regs.pop(node_id, None)
        with self._translate(f"deregistering node {node_id}"):
            try:
                self._wait(self._zk.delete_async(f"{self._nodes_path}/{node_id}"))
            except NoNodeError:
                if reg is None:
                    raise NotFound(f"node_id: node {node_id!r} is not registered") from None

    def put_group(self, name: str, description: str, create_only: bool) -> None:
        data = json.dumps({"description": description}, sort_keys=True).encode()
        with self._translate(f"writing group {name}"):
            self._put_persistent(f"{self._groups_path}/{name}", data, create_only, f"group.name: group {name!r}")

    def delete_group(self, name: str) -> None:
        with self._translate(f"deleting group {name}"):
            try:
                self._wait(self._zk.delete_async(f"{self._groups_path}/{name}"))
            except NoNodeError:
                raise NotFound(f"name: group {name!r} does not exist") from None

    def put_policy(self, policy: Policy, create_only: bool) -> None:
        data = serialise_policy(policy)
        pid = policy.policy_id
        with self._translate(f"writing policy {pid}"):
            self._put_persistent(f"{self._policies_path}/{pid}", data, create_only, f"policy.policy_id: policy {pid!r}")

    def delete_policy(self, policy_id: str) -> None:
        with self._translate(f"deleting policy {policy_id}"):
            try:
                self._wait(self._zk.delete_async(f"{self._policies_path}/{policy_id}"))
            except NoNodeError:
                raise NotFound(f"policy_id: policy {policy_id!r} does not exist") from None

    # --- Watch streams and leases ----------------------------------------------------------

    def stream_opened(self, node_id: str) -> None:
        with self._reg_lock:
            self._streams[node_id] = self._streams.get(node_id, 0) + 1

    def stream_closed(self, node_id: str) -> None:
        with self._reg_lock:
            n = self._streams.get(node_id, 0) - 1
            if n > 0:
                self._streams[node_id] = n
            else:
                self._streams.pop(node_id, None)
                reg = self._regs.get(node_id)
                if reg is not None:
                    reg.expires = self._clock() + self.lease_s

    def registrations(self) -> dict[str, bool]:
        """node_id -> leased, for the registrations this replica holds."""
        with self._reg_lock:
            return {k: r.leased for k, r in self._regs.items()}

    # --- ZooKeeper helpers -----------------------------------------------------------------

    @contextlib.contextmanager
    def _translate(self, what: str):
        try:
            yield
        except (RegistryError, NotFound, AlreadyExists):
            raise
        except NoAuthError:
            raise FailedPrecondition(f"{what}: refused by the ZooKeeper ACL (the controller's registry "
                                     "config needs the operator credentials)") from None
        except (*_CONNECTION_ERRORS, ConnectionError) as exc:
            raise Unavailable(f"{what}: ZooKeeper at {self._hosts} is unreachable ({type(exc).__name__})") from None
        except KazooException as exc:
            raise RegistryError(f"{what}: ZooKeeper error {type(exc).__name__}: {exc}") from None

    def _zk_connected(self) -> bool:
        client = self._zk
        return client is not None and client.state == KazooState.CONNECTED

    def _wait(self, res: Any) -> Any:
        return res.get(timeout=self._op_timeout)

    def _owner_of(self, ip: str) -> str | None:
        if self._zk is None:
            raise Unavailable("the controller is not connected to ZooKeeper")
        with self._translate(f"reading the owner of {ip}"):
            try:
                data, _ = self._wait(self._zk.get_async(f"{self._ip_to_id}/{ip}"))
            except NoNodeError:
                return None
        return data.decode("utf-8", "replace")

    def _put_persistent(self, path: str, data: bytes, create_only: bool, what: str) -> None:
        for _ in range(5):
            try:
                self._wait(self._zk.create_async(path, data, acl=self._item_acl))
                return
            except NodeExistsError:
                if create_only:
                    raise AlreadyExists(f"{what} already exists") from None
            try:
                self._wait(self._zk.set_async(path, data))
                return
            except NoNodeError:
                continue
        raise Unavailable(f"{what}: kept appearing and disappearing; try again")

    def _put_ephemeral(self, node_id: str, data: bytes, takeover: bool) -> bool:
        """Create ``nodes/<node_id>`` in this session, or bring it up to date. A record held by
        another session is replaced in one transaction if ``takeover`` (the node moved here),
        else left alone (returns False)."""
        path = f"{self._nodes_path}/{node_id}"
        client = self._zk
        for _ in range(5):
            try:
                self._wait(client.create_async(path, data, acl=self._record_acl, ephemeral=True))
                return True
            except NodeExistsError:
                pass
            try:
                current, stat = self._wait(client.get_async(path))
            except NoNodeError:
                continue
            if stat.ephemeralOwner == self.session_id:
                if current != data:
                    try:
                        self._wait(client.set_async(path, data, version=stat.version))
                    except (BadVersionError, NoNodeError):
                        continue
                return True
            if not takeover:
                return False
            tx = client.transaction()
            tx.delete(path, version=stat.version)
            tx.create(path, data, acl=self._record_acl, ephemeral=True)
            results = self._wait(tx.commit_async())
            if not any(isinstance(r, Exception) for r in results):
                log.info("controller %s: took over the registration of %s from session 0x%x",
                         self.replica, node_id, stat.ephemeralOwner)
                return True
        raise Unavailable(f"nodes/{node_id} keeps changing; try again")

    def _release(self, node_id: str, reg: _Reg) -> None:
        path = f"{self._nodes_path}/{node_id}"
        try:
            current, stat = self._wait(self._zk.get_async(path))
        except NoNodeError:
            return
        if stat.ephemeralOwner == self.session_id:
            with contextlib.suppress(NoNodeError, BadVersionError):
                self._wait(self._zk.delete_async(path, version=stat.version))
                log.info("controller %s: lease of %s expired; record removed", self.replica, node_id)

    # --- the worker ------------------------------------------------------------------------

    def _enqueue(self, item: tuple) -> None:
        with self._qcond:
            self._queue.append(item)
            self._qcond.notify()

    def _kick(self) -> None:
        """Observer listener: ZooKeeper changed (the leader re-diffs)."""
        self._enqueue(("kick",))

    def _on_event(self, etype: int, path: str) -> None:
        self._enqueue(("event", etype, path))

    def _on_state(self, state: str) -> None:
        if self._closed:
            return
        if state == KazooState.CONNECTED:
            self._enqueue(("resync", "reconnected"))
            return
        if state == KazooState.LOST:
            self._member = None
            self._leader = False
        with self._cond:
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

    def _run(self) -> None:
        backoff = 0.2
        need_resync = False
        while not self._stop.is_set():
            with self._qcond:
                if not self._queue:
                    self._qcond.wait(1.0)
                batch = list(self._queue)
                self._queue.clear()
            if any(item[0] == "stop" for item in batch) or self._stop.is_set():
                return
            try:
                if need_resync or any(item[0] == "resync" for item in batch):
                    need_resync = True
                    self._resync()
                    need_resync = False
                else:
                    self._handle_events([item for item in batch if item[0] == "event"])
                if any(item[0] == "kick" for item in batch):
                    self._dirty = True
                self._catch_up(self._hint(batch))
                self._lead()
                self._forget_compacted()
                self._expire_leases()
                backoff = 0.2
            except Exception as exc:
                if self._stop.is_set():
                    return
                if isinstance(exc, KazooException | KazooTimeoutError | RegistryError):
                    log.warning("controller %s: ZooKeeper work failed (%s: %s); will resync",
                                self.replica, type(exc).__name__, exc)
                else:
                    log.exception("controller %s: unexpected error in the store worker; will resync", self.replica)
                need_resync = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _hint(self, batch: list[tuple]) -> int:
        """The highest journal revision that the creation events of ``batch`` name."""
        prefix = f"{self._changes}/{ENTRY_PREFIX}"
        best = 0
        for item in batch:
            if item[0] == "event" and item[2].startswith(prefix):
                digits = item[2][len(prefix):]
                if digits.isdigit():
                    best = max(best, int(digits))
        return best

    def _add_watches(self) -> None:
        client = self._zk
        waits = []
        for path in (self._changes, self._controllers, self._groups_path):
            res = client.handler.async_result()
            client._call(_AddWatch(path, PERSISTENT_RECURSIVE), res)
            waits.append(res)
        for res in waits:
            self._wait(res)

    def _ensure_paths(self) -> None:
        client = self._zk
        acl = self._item_acl
        for path in (self._controllers, self._groups_path):
            if self._wait(client.exists_async(path)) is None:
                with contextlib.suppress(NodeExistsError):
                    self._wait(client.create_async(path, b"", acl=acl, makepath=True))
        meta = json.dumps({"epoch": uuid.uuid4().hex, "floor": 0}).encode()
        with contextlib.suppress(NodeExistsError):
            self._wait(client.create_async(self._changes, meta, acl=acl, makepath=True))

    def _read_meta(self) -> tuple[str, int]:
        data, stat = self._wait(self._zk.get_async(self._changes))
        try:
            obj = json.loads(data.decode("utf-8"))
            epoch, floor = str(obj["epoch"]), int(obj["floor"])
            if not epoch:
                raise ValueError("empty epoch")
            return epoch, floor
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            # made by someone else (ensure_path): give the journal an epoch
            meta = json.dumps({"epoch": uuid.uuid4().hex, "floor": 0}).encode()
            with contextlib.suppress(BadVersionError):
                self._wait(self._zk.set_async(self._changes, meta, version=stat.version))
            raise RegistryError(f"{self._changes} had no journal metadata; initialised it") from None

    def _resync(self) -> None:
        t0 = time.monotonic()
        self._ensure_paths()
        self._add_watches()
        self._read_groups(None)
        self._join_election()
        epoch, floor = self._read_meta()
        if not self._loaded or epoch != self._epoch or floor > self._head:
            self._load_journal(epoch, floor)
        self._restore_registrations()
        with self._cond:
            self._connected = True
            self._cond.notify_all()
        self._dirty = True
        log.info("controller %s: synced with ZooKeeper (journal at %d, epoch %s, %s) in %.2f s", self.replica,
                 self._head, self._epoch[:8], "leader" if self._leader else "follower", time.monotonic() - t0)
        self._notify()

    def _handle_events(self, events: list[tuple]) -> None:
        groups: set[str] = set()
        election = meta = False
        gp, cp = self._groups_path + "/", self._controllers + "/"
        for _, _, path in events:
            if path.startswith(gp):
                name = path[len(gp):]
                if "/" not in name:
                    groups.add(name)
            elif path.startswith(cp) or path == self._controllers:
                election = True
            elif path == self._changes:
                meta = True
        if groups:
            self._read_groups(groups)
        if election:
            self._elect()
        if meta:
            epoch, floor = self._read_meta()
            self._floor = max(self._floor, floor)
            if epoch != self._epoch or floor > self._head:
                self._load_journal(epoch, floor)

    # --- groups ----------------------------------------------------------------------------

    def _read_groups(self, names: set[str] | None) -> None:
        client = self._zk
        if names is None:
            try:
                names_list = self._wait(client.get_children_async(self._groups_path))
            except NoNodeError:
                names_list = []
            fresh: dict[str, str] = {}
            pending = [(n, client.get_async(f"{self._groups_path}/{n}")) for n in names_list]
        else:
            fresh = dict(self._groups)
            pending = [(n, client.get_async(f"{self._groups_path}/{n}")) for n in names]
        for name, res in pending:
            try:
                data, _ = self._wait(res)
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

    # --- election --------------------------------------------------------------------------

    def _join_election(self) -> None:
        client = self._zk
        if self._member is not None and self._wait(client.exists_async(self._member)) is None:
            self._member = None
        if self._member is None:
            self._member = self._wait(client.create_async(
                f"{self._controllers}/n-", self.replica.encode(), acl=self._item_acl,
                ephemeral=True, sequence=True))
        self._elect()

    def _elect(self) -> None:
        if self._member is None:
            self._leader = False
            return
        children = sorted(c for c in self._wait(self._zk.get_children_async(self._controllers)) if c.startswith("n-"))
        mine = self._member.rsplit("/", 1)[-1]
        if mine not in children:
            self._member = None
            self._leader = False
            self._join_election()
            return
        leader = children[0] == mine
        if leader and not self._leader:
            log.info("controller %s: leading the journal (%d replicas)", self.replica, len(children))
            self._leader_ticket = self.observer.force_resync()
            self._dirty = True
        elif not leader and self._leader:
            log.info("controller %s: following the journal", self.replica)
        self._leader = leader

    # --- the journal -----------------------------------------------------------------------

    def _apply(self, revision: int, key: Key | None, value: dict | None) -> None:
        """Caller holds _lock."""
        if key is not None:
            prev = self._state.get(key)
            if prev is not None:
                heapq.heappush(self._dead, prev[0])
            if value is None:
                self._state.pop(key, None)
                heapq.heappush(self._dead, revision)
            else:
                self._state[key] = (revision, value)
        self._log.append((revision, key, value))
        self._head = revision
        if len(self._log) > self.window + self.window // 4 + 16:
            cut = len(self._log) - self.window
            del self._log[:cut]
            self._log_base = self._log[0][0] - 1

    def _parse_entry(self, revision: int, data: bytes) -> tuple[Key | None, dict | None]:
        try:
            obj = json.loads(data.decode("utf-8"))
            key = key_parse(obj["k"])
            value = obj["v"]
            if value is not None and not isinstance(value, dict):
                raise ValueError("value is not an object")
            return key, value
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            log.error("controller %s: journal entry %d is unreadable (%s); skipped", self.replica, revision, exc)
            return None, None

    def _load_journal(self, epoch: str, floor: int) -> None:
        """Fold every live entry into the state (start, a new epoch, or fallen behind compaction)."""
        client = self._zk
        names = self._wait(client.get_children_async(self._changes))
        revs = sorted(int(n[len(ENTRY_PREFIX):]) for n in names
                      if n.startswith(ENTRY_PREFIX) and n[len(ENTRY_PREFIX):].isdigit())
        entries: list[tuple] = []
        for i in range(0, len(revs), 2000):
            pending = [(r, client.get_async(f"{self._changes}/{entry_name(r)}")) for r in revs[i:i + 2000]]
            for r, res in pending:
                try:
                    data, _ = self._wait(res)
                except NoNodeError:
                    continue  # compacted meanwhile: superseded, so nothing is lost
                entries.append((r, *self._parse_entry(r, data)))
        with self._cond:
            self._state, self._log, self._dead = {}, [], []
            self._head = max(floor, 0)
            for r, key, value in entries:
                self._apply(r, key, value)
            # resumable only from where the log is unbroken up to head: keep that tail
            start = len(self._log) - 1
            while start > 0 and self._log[start - 1][0] == self._log[start][0] - 1:
                start -= 1
            self._log = self._log[max(start, 0):]
            self._log_base = self._log[0][0] - 1 if self._log else self._head
            self._epoch, self._floor = epoch, floor
            self._loaded = True
            self._cond.notify_all()
        log.info("controller %s: journal loaded: %d entries, %d items, head %d, resumable from %d",
                 self.replica, len(entries), len(self._state), self._head, self._log_base)
        self._notify()

    def _catch_up(self, hint: int = 0) -> None:
        """Apply the entries after head, in order, up to the first missing one. ``hint`` is the
        highest revision that creation events named; without one a single get probes for more,
        and every ``META_CHECK_S`` the metadata is read (a new epoch, or compaction overtook us)."""
        if not self._loaded:
            return
        client = self._zk
        advanced = False
        batch = max(1, min(hint - self._head, CATCH_UP_BATCH))
        while True:
            base = self._head
            pending = [(r, client.get_async(f"{self._changes}/{entry_name(r)}"))
                       for r in range(base + 1, base + 1 + batch)]
            got: list[tuple] = []
            for r, res in pending:
                try:
                    data, _ = self._wait(res)
                except NoNodeError:
                    break
                got.append((r, *self._parse_entry(r, data)))
            for _, res in pending[len(got) + 1:]:
                with contextlib.suppress(NoNodeError):
                    self._wait(res)  # drain the rest of the pipeline
            if got:
                with self._cond:
                    for r, key, value in got:
                        if r == self._head + 1:
                            self._apply(r, key, value)
                    self._cond.notify_all()
                advanced = True
            if len(got) < batch:
                break
            batch = CATCH_UP_BATCH
        if advanced:
            self._notify()
        now = time.monotonic()
        if not advanced and now - self._meta_checked >= META_CHECK_S:
            self._meta_checked = now
            epoch, floor = self._read_meta()
            self._floor = max(self._floor, floor)
            if epoch != self._epoch or floor > self._head:
                self._load_journal(epoch, floor)

    def _lead(self) -> None:
        if not (self._leader and self._loaded and self._member is not None):
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
        with self._lock:
            current = {k: v for k, (_, v) in self._state.items()}
        changes = [(k, desired.get(k)) for k in sorted(set(desired) | set(current)) if desired.get(k) != current.get(k)]
        if changes:
            self._append(changes)
        self._compact()

    def _append(self, changes: list[tuple[Key, dict | None]]) -> None:
        client = self._zk
        i = 0
        while i < len(changes):
            chunk: list[tuple[Key, dict | None, bytes]] = []
            size = 0
            while i < len(changes) and len(chunk) < MAX_ITEMS_PER_APPEND:
                key, value = changes[i]
                data = json.dumps({"k": key_text(key), "v": value}, sort_keys=True, separators=(",", ":")).encode()
                if chunk and size + len(data) > MAX_BYTES_PER_APPEND:
                    break
                chunk.append((key, value, data))
                size += len(data)
                i += 1
            base = self._head
            tx = client.transaction()
            tx.check(self._member, -1)
            for n, (_, _, data) in enumerate(chunk):
                tx.create(f"{self._changes}/{entry_name(base + 1 + n)}", data, acl=self._item_acl)
            results = self._wait(tx.commit_async())
            failed = [r for r in results if isinstance(r, Exception)]
            if failed:
                if isinstance(results[0], Exception):
                    log.warning("controller %s: no longer the leader (election znode gone); not appending", self.replica)
                    self._leader = False
                    self._member = None
                    self._enqueue(("resync", "lost leadership"))
                else:
                    log.warning("controller %s: journal append at %d refused (%s); catching up",
                                self.replica, base + 1, type(failed[0]).__name__)
                    self._dirty = True
                return
            with self._cond:
                for n, (key, value, _) in enumerate(chunk):
                    self._apply(base + 1 + n, key, value)
                self._cond.notify_all()
            self._notify()

    def _forget_compacted(self) -> None:
        """Followers: drop what the leader has compacted (at or below the floor) from the
        dead-revision heap, which otherwise grows with every update."""
        if self._leader:
            return
        with self._lock:
            while self._dead and self._dead[0] <= self._floor:
                heapq.heappop(self._dead)

    def _compact(self) -> None:
        limit = self._head - self.window
        with self._lock:
            revs: list[int] = []
            while self._dead and self._dead[0] <= limit and len(revs) < 20 * COMPACT_BATCH:
                revs.append(heapq.heappop(self._dead))
        if not revs:
            return
        client = self._zk
        new_floor = max(max(revs), self._floor)
        if new_floor > self._floor:
            meta = json.dumps({"epoch": self._epoch, "floor": new_floor}).encode()
            tx = client.transaction()
            tx.check(self._member, -1)
            tx.set_data(self._changes, meta)
            results = self._wait(tx.commit_async())
            if any(isinstance(r, Exception) for r in results):
                with self._lock:
                    for r in revs:
                        heapq.heappush(self._dead, r)
                return
            self._floor = new_floor
        for j in range(0, len(revs), COMPACT_BATCH):
            pending = [client.delete_async(f"{self._changes}/{entry_name(r)}") for r in revs[j:j + COMPACT_BATCH]]
            for res in pending:
                with contextlib.suppress(NoNodeError):
                    self._wait(res)

    # --- registrations ---------------------------------------------------------------------

    def _restore_registrations(self) -> None:
        with self._reg_lock:
            regs = list(self._regs.items())
        for node_id, reg in regs:
            if not self._put_ephemeral(node_id, reg.data, takeover=False):
                log.info("controller %s: %s is now registered through another session; dropping ours",
                         self.replica, node_id)
                with self._reg_lock:
                    if self._regs.get(node_id) is reg:
                        del self._regs[node_id]

    def _expire_leases(self) -> None:
        now = self._clock()
        expired = []
        with self._reg_lock:
            for node_id, reg in list(self._regs.items()):
                if reg.leased and self._streams.get(node_id, 0) == 0 and now >= reg.expires:
                    expired.append((node_id, reg))
                    del self._regs[node_id]
        for node_id, reg in expired:
            self._release(node_id, reg)


def _description(name: str, data: bytes) -> str:
    if not data:
        return ""
    try:
        obj = json.loads(data.decode("utf-8"))
        desc = obj.get("description", "") if isinstance(obj, dict) else ""
        return desc if isinstance(desc, str) else ""
    except (ValueError, UnicodeDecodeError):
        log.warning("group %s: data is not JSON; description ignored", name)
        return ""
