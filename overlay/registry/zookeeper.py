"""``registry.backend: zookeeper``: the fleet map in ZooKeeper (DESIGN §4.2).

Layout under ``registry.prefix`` (contract)::

    alloc/id-to-ip/<node_id>   persistent, data = overlay address
    alloc/ip-to-id/<overlay>   persistent, data = node_id
    nodes/<node_id>            EPHEMERAL, data = node record (JSON)
    groups/<group>             persistent
    policies/<policy_id>       persistent, data = policy (JSON)
    config/max_change          persistent, data = guard threshold (integer)

Watching is incremental: ZooKeeper 3.6+ persistent recursive watches on
``nodes``, ``policies``, ``config/max_change`` and ``alloc/ip-to-id`` deliver
one event per changed znode, and only the znode an event names is read. A
full re-read happens only at start and after every reconnection.

kazoo 2.11 has no API for persistent watches, so this module adds the
``addWatch`` request (opcode 106) and routes the notifications itself through
a small subclass of kazoo's connection handler (see :class:`_WatchConnection`).
Because ZooKeeper 3.8 lets a one-shot watch on a path replace a persistent one
on the same path of the same connection (ZOOKEEPER-4466), this client never
sets one-shot watches.

Threads: kazoo's connection thread only queues events and flags
disconnection; one worker thread of this registry reads ZooKeeper, updates the
view and calls the listener. ``allocate`` and ``register`` run in the caller's
thread. The view does not include this node's own record.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import threading
import time
from collections import deque, namedtuple
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    AuthFailedError,
    ConnectionClosedError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    OperationTimeoutError,
    SessionExpiredError,
    UnimplementedError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.connection import ConnectionHandler
from kazoo.protocol.serialization import Watch, int_struct, write_string
from kazoo.retry import KazooRetry
from kazoo.security import OPEN_ACL_UNSAFE, make_acl, make_digest_acl

from overlay import addr
from overlay.config import Auth, RegistryConfig
from overlay.errors import (
    AllocationExhausted,
    AlreadyExists,
    InvalidRecord,
    RegistryError,
    Unavailable,
)
from overlay.model import (
    Node,
    Policy,
    parse_node_record,
    parse_policy_record,
    serialise_node,
    valid_name,
)
from overlay.registry import Listener, RegistryView, notify_listener

log = logging.getLogger(__name__)

# ZooKeeper wire constants (zookeeper.jute / ZooDefs): addWatch and its modes.
_OP_ADD_WATCH = 106
PERSISTENT = 0
PERSISTENT_RECURSIVE = 1
_EV_CREATED, _EV_DELETED, _EV_CHANGED = 1, 2, 3

_MAX_BATCH = 20000          # events handled per worker round
_MAX_ALLOC_ROUNDS = 8       # re-reads of id-to-ip when another process of this node races us
_MAX_MAX_CHANGE = 1_000_000


class _AddWatch(namedtuple("_AddWatch", "path mode")):
    """ZooKeeper ``AddWatchRequest {ustring path; int mode}``; the reply has no body we need."""

    type = _OP_ADD_WATCH

    def serialize(self) -> bytearray:
        b = bytearray()
        b.extend(write_string(self.path))
        b.extend(int_struct.pack(self.mode))
        return b

    @classmethod
    def deserialize(cls, buffer: bytes, offset: int) -> bool:
        return True


class _WatchConnection(ConnectionHandler):
    """kazoo's connection handler, also handing every watch notification to ``event_sink``.

    kazoo only dispatches notifications to one-shot watchers it registered;
    persistent-watch notifications would be dropped. ``event_sink(type, path)``
    is called in the connection thread and must only queue.
    """

    event_sink: Any = None

    def _read_watch_event(self, buffer: bytes, offset: int) -> None:
        watch, _ = Watch.deserialize(buffer, offset)
        sink = self.event_sink
        if sink is not None and watch.type in (_EV_CREATED, _EV_DELETED, _EV_CHANGED):
            if not self.client._stopped.is_set():
                sink(watch.type, self.client.unchroot(watch.path))
        super()._read_watch_event(buffer, offset)


def _new_client(config: RegistryConfig, extra_auth: tuple[Auth | None, ...] = ()) -> KazooClient:
    auth_data = [(a.scheme, f"{a.user}:{a.password}") for a in (config.auth, config.operator, *extra_auth) if a]
    client = KazooClient(
        hosts=",".join(config.hosts),
        timeout=config.timeout_s,
        auth_data=auth_data or None,
        connection_retry=KazooRetry(max_tries=-1, delay=0.2, backoff=1.5, max_delay=2.0, max_jitter=0.3),
    )
    conn = _WatchConnection(client, client._conn_retry.copy(), logger=client.logger)
    client._connection = conn
    return client


# --- ACLs (see docs/registry.md) ----------------------------------------------------------


def _world_read(create: bool = False) -> Any:
    return make_acl("world", "anyone", read=True, create=create)


def _digest(a: Auth, **perms: bool) -> Any:
    return make_digest_acl(a.user, a.password, **perms)


def layout_acls(operator: Auth) -> dict[str, list]:
    """ACL of each layout path (relative to the prefix; "" is the prefix itself)."""
    op = _digest(operator, all=True)
    ro = [op, _world_read()]
    rc = [op, _world_read(create=True)]  # nodes may add children, never delete them
    return {
        "": ro,
        "alloc": ro,
        "alloc/id-to-ip": rc,
        "alloc/ip-to-id": rc,
        "nodes": rc,
        "groups": ro,
        "policies": ro,
        "config": ro,
    }


def _record_acl(auth: Auth | None) -> list:
    """ACL of what a node creates: only its own identity may change it; everyone may read."""
    if auth is None:
        return list(OPEN_ACL_UNSAFE)
    return [_digest(auth, read=True, write=True), _world_read()]


@contextlib.contextmanager
def _translate(what: str, hosts: str) -> Iterator[None]:
    """Turn kazoo's exceptions into RegistryError with a message saying what failed."""
    try:
        yield
    except RegistryError:
        raise
    except NoAuthError:
        raise RegistryError(
            f"{what}: refused by the ZooKeeper ACL (check registry.auth; the layout is "
            "created by an operator with overlay.registry.zookeeper.bootstrap)"
        ) from None
    except AuthFailedError:
        raise RegistryError(f"{what}: ZooKeeper rejected the credentials in registry.auth") from None
    except (ConnectionLoss, ConnectionClosedError, SessionExpiredError, KazooTimeoutError,
            OperationTimeoutError) as exc:
        raise Unavailable(f"{what}: ZooKeeper at {hosts} is unreachable ({type(exc).__name__})") from None
    except KazooException as exc:
        raise RegistryError(f"{what}: ZooKeeper error {type(exc).__name__}: {exc}") from None


_CONNECTION_ERRORS = (ConnectionLoss, ConnectionClosedError, SessionExpiredError, KazooTimeoutError,
                      OperationTimeoutError, AuthFailedError)


@dataclass(frozen=True)
class _Unreadable:
    """A znode that exists but could not be read (a hostile ACL, for instance)."""

    error: str


@dataclass
class _Rec:
    """What the worker knows of one ``nodes/<name>`` znode."""

    mzxid: int
    node: Node | None      # parsed, before the ownership check
    reason: str | None     # why it does not parse


class ZooKeeperRegistry:
    """The Registry protocol over ZooKeeper (see the module docstring and docs/registry.md)."""

    name = "zookeeper"

    def __init__(self, config: RegistryConfig, subnet: ipaddress.IPv4Network, node_id: str, *,
                 rng: random.Random | None = None):
        self.config = config
        self.subnet = ipaddress.IPv4Network(subnet)
        self.node_id = valid_name(node_id, "node_id")
        self._rng = rng or random.SystemRandom()
        self._hosts = ",".join(config.hosts)
        p = config.prefix.rstrip("/")
        self._prefix = p
        self._nodes_path = f"{p}/nodes"
        self._policies_path = f"{p}/policies"
        self._config_path = f"{p}/config"
        self._max_change_path = f"{p}/config/max_change"
        self._id_to_ip = f"{p}/alloc/id-to-ip"
        self._ip_to_id = f"{p}/alloc/ip-to-id"
        self._op_timeout = max(5.0, 2.0 * config.timeout_s)
        self._record_acl = _record_acl(config.auth)

        self.reads = 0                 # every get / get_children / exists issued
        self.rejected_total = 0        # rejection log lines (once per record version)
        self._reads_lock = threading.Lock()

        self._lock = threading.Lock()  # guards the view state below
        self._nodes: dict[str, Node] = {}
        self._rejected: dict[str, str] = {}
        self._policies: dict[str, Policy] = {}
        self._max_change: int | None = None
        self._connected = False
        self._synced = False
        self._revision = 0

        # worker-private state
        self._records: dict[str, _Rec] = {}
        self._claims: dict[str, set[str]] = {}       # overlay -> names whose records claim it
        self._owners: dict[str, str | None] = {}     # cache of alloc/ip-to-id/<overlay>
        self._logged: dict[str, tuple[int, str]] = {}

        self._cond = threading.Condition()
        self._queue: deque[tuple] = deque()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._listener: Listener | None = None
        self._client: KazooClient | None = None
        self._client_lock = threading.Lock()
        self._own: Node | None = None
        self._own_data: bytes | None = None
        self._own_lock = threading.Lock()
        self._layout_ok = False
        self._closed = False

    # --- Registry protocol ----------------------------------------------------------------

    def start(self, listener: Listener) -> None:
        """Connect, add the watches, read everything once; then follow changes."""
        self._listener = listener
        with _translate("connecting to the registry", self._hosts):
            self._ensure_client()
            self._ensure_layout()
            try:
                self._add_watches()  # here too, so that an old server fails loudly, not in a loop
            except UnimplementedError:
                raise RegistryError(
                    f"ZooKeeper at {self._hosts} does not support persistent recursive watches; "
                    "the zookeeper registry needs ZooKeeper 3.6 or newer"
                ) from None
        if self._worker is None:
            self._stop.clear()
            self._worker = threading.Thread(target=self._run, name=f"zk-registry-{self.node_id}", daemon=True)
            self._worker.start()
        self._enqueue(("resync", "start"))

    def allocate(self, node_id: str, requested: str | None = None) -> str:
        valid_name(node_id, "node_id")
        with _translate(f"allocating an overlay address for {node_id}", self._hosts):
            self._ensure_client()
            self._ensure_layout()
            for _ in range(_MAX_ALLOC_ROUNDS):
                current = self._current_allocation(node_id)
                if current is not None:
                    return self._confirm_allocation(node_id, current, requested)
                got = self._claim_requested(node_id, requested) if requested else self._claim_random(node_id)
                if got is not None:
                    return got
                # another process of this node claimed an address first: read it again
            raise RegistryError(
                f"allocating an overlay address for {node_id}: alloc/id-to-ip/{node_id} kept "
                "changing; is another process running with the same node_id?"
            )

    def register(self, node: Node) -> None:
        if node.node_id != self.node_id:
            raise RegistryError(f"this registry serves node {self.node_id!r}, not {node.node_id!r}")
        data = serialise_node(node)
        with self._own_lock:
            self._own, self._own_data = node, data
        with _translate(f"registering node {node.node_id}", self._hosts):
            self._ensure_client()
            self._ensure_layout()
            self._ensure_own_record(replace_data=True)

    def view(self) -> RegistryView:
        with self._lock:  # fresh copies: a caller may keep or change what it gets
            return RegistryView(
                nodes=dict(self._nodes),
                rejected=dict(self._rejected),
                policies=dict(self._policies),
                max_change=self._max_change,
                connected=self._connected,
                synced=self._synced,
                revision=self._revision,
            )

    def release_guard(self) -> None:
        return None

    def close(self) -> None:
        self._closed = True
        self._stop.set()
        self._listener = None
        with self._cond:
            self._queue.append(("stop",))
            self._cond.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(self._op_timeout + 5)
        self._worker = None
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client._connection.event_sink = None
            client.remove_listener(self._on_state)
            try:
                client.stop()
                client.close()
            except Exception as exc:  # closing must never raise
                log.debug("node %s: closing the ZooKeeper client: %s", self.node_id, exc)
        with self._lock:
            self._connected = False
            self._synced = False
            self._bump()

    # --- operator helpers -----------------------------------------------------------------

    def set_max_change(self, n: int) -> None:
        """Operator: set ``config/max_change`` (needs ``registry.operator`` when ACLs are on)."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= _MAX_MAX_CHANGE:
            raise RegistryError(f"max_change must be an integer in 0..{_MAX_MAX_CHANGE}, got {n!r}")
        data = str(n).encode()
        acl = list(OPEN_ACL_UNSAFE) if self.config.operator is None else layout_acls(self.config.operator)[""]
        with _translate(f"setting {self._max_change_path} to {n}", self._hosts):
            client = self._ensure_client()
            try:
                self._wait(client.set_async(self._max_change_path, data))
            except NoNodeError:
                try:
                    self._wait(client.create_async(self._max_change_path, data, acl=acl, makepath=True))
                except NodeExistsError:
                    self._wait(client.set_async(self._max_change_path, data))

    @property
    def session_id(self) -> int | None:
        client = self._client
        return client.client_id[0] if client is not None and client.client_id else None

    # --- connection -----------------------------------------------------------------------

    def _ensure_client(self) -> KazooClient:
        with self._client_lock:
            if self._closed:
                raise RegistryError("the ZooKeeper registry is closed")
            if self._client is not None:
                return self._client
            client = _new_client(self.config)
            client._connection.event_sink = self._on_event
            client.add_listener(self._on_state)
            try:
                client.start(timeout=max(self.config.timeout_s, 1.0))
            except BaseException:
                client._connection.event_sink = None
                with contextlib.suppress(Exception):
                    client.stop()
                    client.close()
                raise
            self._client = client
            return client

    def _wait(self, async_result: Any) -> Any:
        return async_result.get(timeout=self._op_timeout)

    def _count(self, n: int = 1) -> None:
        with self._reads_lock:
            self.reads += n

    def _get(self, path: str) -> tuple[bytes, Any]:
        self._count()
        return self._wait(self._client.get_async(path))

    def _exists(self, path: str) -> Any:
        self._count()
        return self._wait(self._client.exists_async(path))

    def _children(self, path: str) -> list[str]:
        self._count()
        try:
            return self._wait(self._client.get_children_async(path))
        except NoNodeError:
            return []

    def _get_many(self, paths: list[str]) -> dict[str, Any]:
        """Pipelined gets: each path maps to ``(data, stat)``, None if it does not exist, or an
        :class:`_Unreadable` (ACL refused it, or another per-znode error). Losing the
        connection raises: the caller's resync starts over."""
        client = self._client
        self._count(len(paths))
        pending = [(p, client.get_async(p)) for p in paths]
        out: dict[str, Any] = {}
        for p, res in pending:
            try:
                out[p] = self._wait(res)
            except NoNodeError:
                out[p] = None
            except _CONNECTION_ERRORS:
                raise
            except KazooException as exc:
                out[p] = _Unreadable(f"{type(exc).__name__}")
        return out

    def _ensure_layout(self) -> None:
        """The layout's parent paths exist (created here when no ACLs are in use)."""
        if self._layout_ok:
            return
        client = self._client
        missing = [p for p in (self._nodes_path, self._policies_path, self._config_path,
                               self._id_to_ip, self._ip_to_id) if self._exists(p) is None]
        if missing:
            if self.config.auth is not None and self.config.operator is None:
                raise RegistryError(
                    f"the registry layout under {self._prefix} is missing {', '.join(missing)}; "
                    "with registry.auth set, an operator creates it once with "
                    "overlay.registry.zookeeper.bootstrap"
                )
            if self.config.operator is not None:
                _create_layout(client, self._prefix, self.config.operator)
            else:
                for p in missing:
                    with contextlib.suppress(NodeExistsError):
                        client.ensure_path(p)
        self._layout_ok = True

    def _on_state(self, state: str) -> None:
        """kazoo connection thread: flag disconnection at once, leave the reading to the worker."""
        if state == KazooState.CONNECTED:
            log.info("node %s: connected to ZooKeeper (session 0x%x)", self.node_id, self.session_id or 0)
            if self._worker is not None:
                self._enqueue(("resync", "reconnected"))
            return
        if state == KazooState.LOST:
            log.warning("node %s: ZooKeeper session lost; keeping the last view until it is re-established",
                        self.node_id)
        else:
            log.warning("node %s: ZooKeeper connection suspended; keeping the last view", self.node_id)
        with self._lock:
            changed = self._connected or self._synced
            self._connected = False
            self._synced = False
            if changed:
                self._bump()
        if changed:
            self._notify()

    def _on_event(self, etype: int, path: str) -> None:
        """kazoo connection thread: queue a watch notification."""
        self._enqueue(("event", etype, path))

    def _enqueue(self, item: tuple) -> None:
        with self._cond:
            self._queue.append(item)
            self._cond.notify()

    # --- allocation -----------------------------------------------------------------------

    def _current_allocation(self, node_id: str) -> str | None:
        try:
            data, _ = self._get(f"{self._id_to_ip}/{node_id}")
        except NoNodeError:
            return None
        text = data.decode("utf-8", "replace").strip()
        try:
            return addr.in_subnet_host(text, self.subnet)
        except ValueError as exc:
            raise RegistryError(
                f"alloc/id-to-ip/{node_id} holds {text!r}, which is not an address of the overlay "
                f"subnet {self.subnet} ({exc}); an operator must remove it"
            ) from None

    def _owner_of(self, ip: str) -> str | None:
        try:
            data, _ = self._get(f"{self._ip_to_id}/{ip}")
        except NoNodeError:
            return None
        return data.decode("utf-8", "replace")

    def _confirm_allocation(self, node_id: str, current: str, requested: str | None) -> str:
        owner = self._owner_of(current)
        if owner is None:
            # id-to-ip without ip-to-id: repair the reverse entry (both are written together,
            # so only an operator's partial clean-up leaves this)
            try:
                self._wait(self._client.create_async(f"{self._ip_to_id}/{current}", node_id.encode(),
                                                     acl=self._record_acl))
                log.warning("node %s: restored missing alloc/ip-to-id/%s", node_id, current)
                owner = node_id
            except NodeExistsError:
                owner = self._owner_of(current)
        if owner != node_id:
            raise RegistryError(
                f"alloc/id-to-ip/{node_id} says {current}, but alloc/ip-to-id/{current} belongs to "
                f"{owner!r}; an operator must resolve the conflict"
            )
        if requested and requested != current:
            return self._move(node_id, current, requested)
        return current

    def _move(self, node_id: str, current: str, requested: str) -> str:
        try:
            ip = addr.in_subnet_host(requested, self.subnet)
        except ValueError as exc:
            raise RegistryError(f"requested overlay address {requested!r}: {exc}") from None
        _, s1 = self._get(f"{self._id_to_ip}/{node_id}")
        _, s2 = self._get(f"{self._ip_to_id}/{current}")
        tx = self._client.transaction()
        tx.delete(f"{self._id_to_ip}/{node_id}", version=s1.version)
        tx.delete(f"{self._ip_to_id}/{current}", version=s2.version)
        tx.create(f"{self._ip_to_id}/{ip}", node_id.encode(), acl=self._record_acl)
        tx.create(f"{self._id_to_ip}/{node_id}", ip.encode(), acl=self._record_acl)
        results = self._wait(tx.commit_async())
        if isinstance(results[2], NodeExistsError):
            raise AlreadyExists(
                f"overlay address {ip} is already allocated to node {self._owner_of(ip)!r} "
                f"(alloc/ip-to-id/{ip}); {node_id} keeps {current}"
            )
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            first = next((e for e in errors if type(e).__name__ not in ("RolledBackError", "RuntimeInconsistency")),
                         errors[0])
            raise first
        log.warning("node %s: moved overlay address %s -> %s as configured", node_id, current, ip)
        return ip

    def _claim(self, node_id: str, ip: str) -> str:
        """One transaction creating both directions. Returns ok, ip-taken or id-taken."""
        tx = self._client.transaction()
        tx.create(f"{self._id_to_ip}/{node_id}", ip.encode(), acl=self._record_acl)
        tx.create(f"{self._ip_to_id}/{ip}", node_id.encode(), acl=self._record_acl)
        results = self._wait(tx.commit_async())
        if not any(isinstance(r, Exception) for r in results):
            return "ok"
        if isinstance(results[0], NodeExistsError):
            return "id-taken"
        if isinstance(results[1], NodeExistsError):
            return "ip-taken"
        real = [r for r in results if isinstance(r, Exception)
                and type(r).__name__ not in ("RolledBackError", "RuntimeInconsistency")]
        raise (real or [r for r in results if isinstance(r, Exception)])[0]

    def _claim_requested(self, node_id: str, requested: str) -> str | None:
        try:
            ip = addr.in_subnet_host(requested, self.subnet)
        except ValueError as exc:
            raise RegistryError(f"requested overlay address {requested!r}: {exc}") from None
        outcome = self._claim(node_id, ip)
        if outcome == "ok":
            log.info("node %s: claimed requested overlay address %s", node_id, ip)
            return ip
        if outcome == "id-taken":
            return None
        owner = self._owner_of(ip)
        if owner == node_id:  # ip-to-id is ours but id-to-ip is missing: repair it
            try:
                self._wait(self._client.create_async(f"{self._id_to_ip}/{node_id}", ip.encode(),
                                                     acl=self._record_acl))
            except NodeExistsError:
                return None
            return ip
        raise AlreadyExists(
            f"overlay address {ip} is already allocated to node {owner!r} (alloc/ip-to-id/{ip}); "
            "choose another addresses.overlay or have an operator release it"
        )

    def _claim_random(self, node_id: str) -> str | None:
        net = self.subnet
        lo, hi = int(net.network_address) + 1, int(net.broadcast_address) - 1
        total = hi - lo + 1

        def listed() -> set[int]:
            taken = set()
            for name in self._children(self._ip_to_id):
                try:
                    ip = int(ipaddress.IPv4Address(name))
                except ValueError:
                    continue
                if lo <= ip <= hi:
                    taken.add(ip)
            return taken

        taken = listed()
        relisted = False
        for _ in range(2 * total + 16):
            if len(taken) >= total:
                if relisted:
                    raise AllocationExhausted(
                        f"overlay subnet {net} is exhausted: all {total} addresses are allocated"
                    )
                taken, relisted = listed(), True
                continue
            ip = str(ipaddress.IPv4Address(self._pick(lo, hi, taken)))
            outcome = self._claim(node_id, ip)
            if outcome == "ok":
                log.info("node %s: allocated overlay address %s", node_id, ip)
                return ip
            if outcome == "id-taken":
                return None
            log.debug("node %s: %s was taken meanwhile, trying another", node_id, ip)
            taken.add(int(ipaddress.IPv4Address(ip)))
        raise RegistryError(f"allocating in {net}: too many collisions, giving up")

    def _pick(self, lo: int, hi: int, taken: set[int]) -> int:
        total = hi - lo + 1
        if len(taken) * 2 < total:
            for _ in range(64):
                ip = self._rng.randint(lo, hi)
                if ip not in taken:
                    return ip
        free = [i for i in range(lo, hi + 1) if i not in taken]
        return self._rng.choice(free)

    # --- own record -----------------------------------------------------------------------

    def _ensure_own_record(self, replace_data: bool = False) -> None:
        """Create ``nodes/<self>`` (ephemeral) or bring its data up to date."""
        with self._own_lock:
            node, data = self._own, self._own_data
        if node is None or data is None:
            return
        client = self._client
        path = f"{self._nodes_path}/{node.node_id}"
        for _ in range(3):  # create, or read what is there (it may vanish in between)
            try:
                self._wait(client.create_async(path, data, acl=self._record_acl, ephemeral=True))
                log.info("node %s: registered at %s (overlay %s)", node.node_id, path, node.overlay)
                return
            except NodeExistsError:
                pass
            try:
                current, stat = self._get(path)
                break
            except NoNodeError:
                continue
        else:
            return
        ours = stat.ephemeralOwner == (client.client_id or (0,))[0]
        if current != data and (ours or replace_data):
            with contextlib.suppress(NoNodeError, NoAuthError):
                self._wait(client.set_async(path, data, version=stat.version))
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
        except _CONNECTION_ERRORS:
            raise
        except KazooException as exc:
            log.error("node %s: cannot (re-)register %s/%s: %s", self.node_id, self._nodes_path,
                      self.node_id, type(exc).__name__)

    # --- the worker -----------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            with self._cond:
                if not self._queue:
                    self._cond.wait(1.0)
                batch = []
                while self._queue and len(batch) < _MAX_BATCH:
                    batch.append(self._queue.popleft())
            if not batch:
                continue
            if any(item[0] == "stop" for item in batch):
                return
            try:
                self._process(batch)
                backoff = 0.5
            except Exception as exc:  # never let the worker die; resync once we can
                if self._stop.is_set():
                    return
                if isinstance(exc, KazooException | KazooTimeoutError):
                    log.warning("node %s: registry read failed (%s: %s); will resync",
                                self.node_id, type(exc).__name__, exc)
                else:
                    log.exception("node %s: unexpected error in the registry worker; will resync", self.node_id)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                client = self._client
                if client is not None and client.state == KazooState.CONNECTED:
                    self._enqueue(("resync", "after error"))

    def _process(self, batch: list[tuple]) -> None:
        last_resync = max((i for i, item in enumerate(batch) if item[0] == "resync"), default=-1)
        if last_resync >= 0:
            self._resync(batch[last_resync][1])
            events = batch[last_resync + 1:]
        else:
            events = batch
        if events:
            self._apply_events([e for e in events if e[0] == "event"])

    def _add_watches(self) -> None:
        client = self._client
        waits = []
        for path in (self._nodes_path, self._policies_path, self._max_change_path, self._ip_to_id):
            res = client.handler.async_result()
            client._call(_AddWatch(path, PERSISTENT_RECURSIVE), res)
            waits.append(res)
        for res in waits:
            self._wait(res)

    def _resync(self, reason: str) -> None:
        """Re-read everything and rebuild the view by difference (start, reconnection)."""
        t0 = time.monotonic()
        self._add_watches()
        self._keep_own_record()
        names = [n for n in self._children(self._nodes_path) if n != self.node_id]
        policy_ids = self._children(self._policies_path)
        paths = [f"{self._nodes_path}/{n}" for n in names]
        paths += [f"{self._policies_path}/{p}" for p in policy_ids]
        paths.append(self._max_change_path)
        got = self._get_many(paths)
        self._owners.clear()
        self._records.clear()
        self._claims.clear()
        keep = set(names) | {f"policy:{p}" for p in policy_ids} | {"config:max_change"}
        self._logged = {k: v for k, v in self._logged.items() if k in keep}
        for n in names:
            res = got[f"{self._nodes_path}/{n}"]
            if res is not None:
                self._store_result(n, res)
        self._fetch_owners({r.node.overlay for r in self._records.values() if r.node is not None})
        nodes, rejected = {}, {}
        for n in self._records:
            node, reason = self._evaluate(n)
            if node is not None:
                nodes[n] = node
            else:
                rejected[n] = reason
        policies = {}
        for pid in policy_ids:
            res = got[f"{self._policies_path}/{pid}"]
            if res is None:
                continue
            pol, reason = self._parse_policy(pid, res)
            if pol is not None:
                policies[pid] = pol
            else:
                rejected[f"policy:{pid}"] = reason
        max_change = self._parse_max_change(got[self._max_change_path])
        with self._lock:
            self._nodes, self._policies, self._rejected = nodes, policies, rejected
            self._max_change = max_change
            self._connected = True
            self._synced = True
            self._bump()
        log.info("node %s: registry resync (%s): %d peers, %d rejected, %d policies in %.2f s",
                 self.node_id, reason, len(nodes), len(rejected), len(policies), time.monotonic() - t0)
        self._notify()

    def _apply_events(self, events: list[tuple]) -> None:
        node_last: dict[str, int] = {}
        policy_last: dict[str, int] = {}
        max_change_event = False
        ips: set[str] = set()
        own_event: int | None = None
        np, pp, ap = self._nodes_path + "/", self._policies_path + "/", self._ip_to_id + "/"
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
            elif path == self._max_change_path:
                max_change_event = True
            elif path.startswith(ap):
                ip = path[len(ap):]
                if "/" not in ip:
                    ips.add(ip)

        if own_event is not None and self._own is not None:
            self._keep_own_record()

        # alloc/ip-to-id changed: forget cached owners, re-check the records that claim them
        recheck: set[str] = set()
        for ip in ips:
            self._owners.pop(ip, None)
            recheck |= self._claims.get(ip, set())

        to_read = [n for n, et in node_last.items() if et != _EV_DELETED]
        pol_read = [p for p, et in policy_last.items() if et != _EV_DELETED]
        paths = [f"{self._nodes_path}/{n}" for n in to_read] + [f"{self._policies_path}/{p}" for p in pol_read]
        if max_change_event:
            paths.append(self._max_change_path)
        got = self._get_many(paths) if paths else {}

        touched = set(recheck)
        for name, etype in node_last.items():
            touched.add(name)
            res = got.get(f"{self._nodes_path}/{name}") if etype != _EV_DELETED else None
            if res is None:
                self._forget_record(name, deleted=True)
            else:
                self._store_result(name, res)
        need = {r.node.overlay for n in touched if (r := self._records.get(n)) is not None and r.node is not None}
        self._fetch_owners({ip for ip in need if ip not in self._owners})

        node_changes: dict[str, tuple[Node | None, str | None]] = {}
        for name in touched:
            node_changes[name] = self._evaluate(name) if name in self._records else (None, None)
        policy_changes: dict[str, tuple[Policy | None, str | None]] = {}
        for pid, etype in policy_last.items():
            res = got.get(f"{self._policies_path}/{pid}") if etype != _EV_DELETED else None
            if res is None:
                self._logged.pop(f"policy:{pid}", None)
                policy_changes[pid] = (None, None)
            else:
                policy_changes[pid] = self._parse_policy(pid, res)
        new_max = self._parse_max_change(got.get(self._max_change_path)) if max_change_event else None

        changed = False
        with self._lock:
            nodes, rejected, policies = self._nodes, self._rejected, self._policies
            for name, (node, reason) in node_changes.items():
                changed |= _put(nodes, name, node)
                changed |= _put(rejected, name, reason)
            for pid, (pol, reason) in policy_changes.items():
                changed |= _put(policies, pid, pol)
                changed |= _put(rejected, f"policy:{pid}", reason)
            if max_change_event and new_max != self._max_change:
                self._max_change = new_max
                changed = True
            if changed:
                self._bump()
        if changed:
            self._notify()

    # --- validation -----------------------------------------------------------------------

    def _store_result(self, name: str, res: Any) -> None:
        if isinstance(res, _Unreadable):
            self._forget_record(name, keep_owner=True)
            self._records[name] = _Rec(-1, None, f"nodes/{name} cannot be read ({res.error})")
        else:
            self._store_record(name, res[0], res[1].mzxid)

    def _store_record(self, name: str, data: bytes, mzxid: int) -> None:
        old = self._records.get(name)
        if old is not None and old.mzxid == mzxid:
            return
        self._forget_record(name, keep_owner=True)
        try:
            valid_name(name, "znode name")
            node = parse_node_record(data, self.subnet)
            if node.node_id != name:
                raise InvalidRecord(f"node record names node_id {node.node_id!r} but lives at nodes/{name}")
            rec = _Rec(mzxid, node, None)
            self._claims.setdefault(node.overlay, set()).add(name)
        except (InvalidRecord, ValueError) as exc:
            rec = _Rec(mzxid, None, str(exc))
        self._records[name] = rec

    def _forget_record(self, name: str, deleted: bool = False, keep_owner: bool = False) -> None:
        """Drop what is known of ``nodes/<name>``; the cached owner of its overlay goes
        too once nobody claims it (unless the record is about to be replaced)."""
        if deleted:
            self._logged.pop(name, None)
        rec = self._records.pop(name, None)
        if rec is not None and rec.node is not None:
            claimants = self._claims.get(rec.node.overlay)
            if claimants is not None:
                claimants.discard(name)
                if not claimants:
                    del self._claims[rec.node.overlay]
                    if not keep_owner:
                        self._owners.pop(rec.node.overlay, None)

    def _fetch_owners(self, ips: set[str]) -> None:
        if not ips:
            return
        got = self._get_many([f"{self._ip_to_id}/{ip}" for ip in sorted(ips)])
        for ip in ips:
            res = got[f"{self._ip_to_id}/{ip}"]
            if isinstance(res, _Unreadable):
                self._owners[ip] = ""  # never a node name: claimants are rejected
            else:
                self._owners[ip] = None if res is None else res[0].decode("utf-8", "replace")

    def _evaluate(self, name: str) -> tuple[Node | None, str | None]:
        rec = self._records[name]
        if rec.node is None:
            reason = rec.reason or "invalid"
        else:
            owner = self._owners.get(rec.node.overlay)
            if owner == name:
                return rec.node, None
            if owner == "":
                reason = f"alloc/ip-to-id/{rec.node.overlay} cannot be read, so {name}'s overlay is unproven"
            elif owner is None:
                reason = f"overlay {rec.node.overlay} is not allocated to {name} (no alloc/ip-to-id/{rec.node.overlay})"
            else:
                reason = f"overlay {rec.node.overlay} is allocated to {owner!r}, not {name!r}"
        self._log_rejection(name, rec.mzxid, reason)
        return None, reason

    def _parse_policy(self, pid: str, res: Any) -> tuple[Policy | None, str | None]:
        if isinstance(res, _Unreadable):
            reason, mzxid = f"policies/{pid} cannot be read ({res.error})", -1
        else:
            data, stat = res
            mzxid = stat.mzxid
            try:
                return parse_policy_record(data, pid), None
            except (InvalidRecord, ValueError) as exc:
                reason = str(exc)
        self._log_rejection(f"policy:{pid}", mzxid, reason)
        return None, reason

    def _parse_max_change(self, res: Any) -> int | None:
        if res is None:
            return None
        if isinstance(res, _Unreadable):
            self._log_rejection("config:max_change", -1, f"{self._max_change_path} cannot be read ({res.error})")
            return None
        data, stat = res
        text = data.decode("utf-8", "replace").strip()
        if text.isdigit() and int(text) <= _MAX_MAX_CHANGE:
            return int(text)
        self._log_rejection("config:max_change", stat.mzxid,
                            f"{self._max_change_path} holds {text[:40]!r}, not an integer in 0..{_MAX_MAX_CHANGE}")
        return None

    def _log_rejection(self, key: str, mzxid: int, reason: str) -> None:
        if self._logged.get(key) == (mzxid, reason):
            return
        self._logged[key] = (mzxid, reason)
        self.rejected_total += 1
        log.warning("node %s: ignoring registry record %s: %s", self.node_id, key, reason)

    # --- view bookkeeping -----------------------------------------------------------------

    def _bump(self) -> None:
        """Caller holds self._lock."""
        self._revision += 1

    def _notify(self) -> None:
        notify_listener(self._listener, self.node_id)


def _put(d: dict, key: str, value: Any) -> bool:
    """Set or (value None) remove ``d[key]``; True if that changed ``d``."""
    if value is None:
        return d.pop(key, None) is not None
    if d.get(key) == value:
        return False
    d[key] = value
    return True


def _create_layout(client: KazooClient, prefix: str, operator: Auth) -> None:
    acls = layout_acls(operator)
    for rel in ("", "alloc", "alloc/id-to-ip", "alloc/ip-to-id", "nodes", "groups", "policies", "config"):
        path = f"{prefix}/{rel}" if rel else prefix
        acl = acls[rel]
        if client.exists(path) is None:
            try:
                client.create(path, b"", acl=acl, makepath=True)
                continue
            except NodeExistsError:
                pass
        client.set_acls(path, acl)


def bootstrap(config: RegistryConfig, operator_auth: Auth, *, max_change: int | None = None) -> None:
    """Operator, once: create the layout under ``config.prefix`` with its ACLs (idempotent).

    Parents are readable by everyone; ``nodes`` and ``alloc/*`` let everyone add
    children (a node's own record and allocation, which it creates with an ACL
    naming only itself as writer) but only the operator delete them;
    ``policies``, ``groups`` and ``config`` are written by the operator only.
    """
    client = _new_client(config, (operator_auth,))
    with _translate(f"bootstrapping the registry layout under {config.prefix}", ",".join(config.hosts)):
        client.start(timeout=max(config.timeout_s, 1.0))
        try:
            _create_layout(client, config.prefix.rstrip("/"), operator_auth)
            if max_change is not None:
                path = f"{config.prefix.rstrip('/')}/config/max_change"
                acl = layout_acls(operator_auth)[""]
                if client.exists(path) is None:
                    client.create(path, str(int(max_change)).encode(), acl=acl)
                else:
                    client.set(path, str(int(max_change)).encode())
                    client.set_acls(path, acl)
        finally:
            client.stop()
            client.close()
