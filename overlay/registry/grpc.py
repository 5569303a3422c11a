"""``registry.backend: grpc``: the fleet map from an ``overlay controller`` over one outbound stream.

For daemons on networks that cannot reach ZooKeeper. ``registry.controller`` lists one
or more replicas of the controller; the daemon talks to one at a time (the current one)
and fails over to the next when it fails. ``allocate`` and ``register`` are unary calls
to the current replica (each with a deadline; on UNAVAILABLE the next replica is tried,
and after a whole round of them a backoff, up to ``registry.timeout_s``); the view
follows the current replica's ``Watch`` stream: a snapshot, then ordered deltas, each
applied on top of the revision it names.

When the stream fails, the next replica is tried at once (a connection that is not ready
within a few seconds counts as failed), resuming from the last applied revision: the
journal's revisions are the same on every replica, so a failover costs no snapshot. Only
when a whole round of replicas failed does the view say ``connected=False`` (the agent
then keeps the datapath as it is: fail static, not ready), and the next round waits an
exponential backoff with full jitter. After every reconnection (and whenever the stream
shows this node's record gone or different) the node registers again through the
replica it reached: a node's record is leased, kept while the node has a stream open on
any replica and ``lease_s`` after (docs/grpc.md). ``close`` leaves the record in place
(a daemon that stops or restarts is not removed; ``deregister`` removes it for good).

Records are validated again here against this node's ``overlay_subnet``; the view
does not include this node's own record, and ``rejected`` uses the ZooKeeper
backend's keys (``<node_id>``, ``policy:<id>``).
"""

from __future__ import annotations

import ipaddress
import logging
import random
import threading
import time
from collections.abc import Callable

import grpc

from overlay.config import Config, RegistryConfig
from overlay.errors import InvalidRecord, OverlayError, RegistryError, Throttled, Unavailable
from overlay.model import Node, node_from_dict, policy_from_dict, valid_name
from overlay.registry import Listener, ViewBacked, ViewState, notify_listener
from overlay.rpc.client import CLIENT_OPTIONS, Client
from overlay.rpc.convert import change_from_pb
from overlay.rpc.status import raise_for

log = logging.getLogger(__name__)

WATCH_DEADLINE_S = 300.0     # a Watch call ends after this; the next one resumes at once
REREGISTER_MIN_S = 1.0       # at most one re-registration per this many seconds
CONNECT_TIMEOUT_S = 3.0      # a replica whose connection is not ready by then is skipped


class _Desync(Exception):
    """The stream sent something that does not apply to our revision: reconnect and resume."""


class _Unreachable(Exception):
    """A replica's connection did not become ready: try the next one."""


class GrpcRegistry(ViewBacked):
    """The Registry protocol over the controller's gRPC API (see the module docstring)."""

    name = "grpc"

    @classmethod
    def from_config(cls, config: Config) -> GrpcRegistry:
        return cls(config.registry, config.overlay_subnet, config.node_id)

    def __init__(self, config: RegistryConfig, subnet: ipaddress.IPv4Network, node_id: str, *,
                 rng: random.Random | None = None, backoff: tuple[float, float] = (0.2, 5.0),
                 watch_deadline_s: float = WATCH_DEADLINE_S, options: tuple = CLIENT_OPTIONS,
                 sleep: Callable[[float], None] | None = None):
        if config.controller is None or config.tls is None:
            raise RegistryError("registry.backend grpc needs registry.controller and registry.tls")
        self.config = config
        self.subnet = ipaddress.IPv4Network(subnet)
        self.node_id = valid_name(node_id, "node_id")
        self._rng = rng or random.SystemRandom()
        self._backoff = backoff
        self._watch_deadline = watch_deadline_s
        self._timeout = max(1.0, config.timeout_s)
        self._options = options
        ctl = config.controller
        self.targets: tuple[str, ...] = (ctl,) if isinstance(ctl, str) else tuple(ctl)
        self._clients: list[Client | None] = [None] * len(self.targets)
        self._current = 0            # the replica in use (index into targets)
        self._pick_lock = threading.Lock()
        self.failovers = 0           # moves to another replica
        self.pb2 = self._client_at(0).pb2

        self._v = ViewState()          # the view (changed under self._v.lock)
        self._groups: dict[str, str] = {}
        self._assignments: dict[str, tuple[str, ...]] = {}   # informational: the controller narrows groups

        self._rev = 0               # the controller's revision applied last
        self._epoch = ""
        self._own_value: dict | None = None
        self._pending: dict | None = None   # snapshot chunks being received
        self._pending_rev = 0
        self.snapshots = 0          # snapshots applied (resets included)
        self.resets = 0             # snapshots sent because a resume was impossible
        self.reconnects = 0

        self._own: Node | None = None
        self._last_register = 0.0
        self._force_register = False
        self._reg_wake = threading.Event()
        self._keeper: threading.Thread | None = None
        self._listener: Listener | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._sleep = sleep
        self._call = None
        self._call_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # --- Registry protocol ------------------------------------------------------------------

    def start(self, listener: Listener) -> None:
        self._listener = listener
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"grpc-registry-{self.node_id}", daemon=True)
            self._thread.start()
            self._keeper = threading.Thread(target=self._keep_registered, name=f"grpc-register-{self.node_id}",
                                            daemon=True)
            self._keeper.start()

    def allocate(self, node_id: str, requested: str | None = None) -> str:
        valid_name(node_id, "node_id")
        return self._retrying(lambda c: c.allocate(node_id, requested),
                              f"allocating an overlay address for {node_id}")

    def register(self, node: Node) -> None:
        if node.node_id != self.node_id:
            raise RegistryError(f"this registry serves node {self.node_id!r}, not {node.node_id!r}")
        self._own = node
        _, ungranted = self._retrying(lambda c: c.register_node(node), f"registering node {node.node_id}")
        self._last_register = time.monotonic()
        if ungranted:
            log.warning("node %s: the controller dropped groups %s: this node's assignment does not grant them "
                        "(`overlay nodes groups %s ...`)", node.node_id, ", ".join(ungranted), node.node_id)

    def deregister(self) -> None:
        """Remove this node's record for good (a stopping daemon does not: its lease keeps it)."""
        self._retrying(lambda c: c.deregister(self.node_id), f"deregistering node {self.node_id}")

    def release_guard(self) -> None:
        return None

    def close(self) -> None:
        """Stop following. The record stays: the controller keeps it ``lease_s`` after this node's
        last contact, so a restart does not remove this node from its peers (``deregister``
        removes it for good)."""
        self._stop.set()
        self._wake.set()
        self._reg_wake.set()
        self._cancel_call()
        for t in (self._thread, self._keeper):
            if t is not None:
                t.join(10)
        with self._pick_lock:
            for i, c in enumerate(self._clients):
                if c is not None:
                    c.close()
                    self._clients[i] = None

    # --- extras -----------------------------------------------------------------------------

    @property
    def controller_revision(self) -> int:
        return self._rev

    @property
    def controller(self) -> str:
        """The replica in use now."""
        return self.targets[self._current]

    def status_extra(self) -> dict:
        """For ``/status`` ``registry``: the replica in use, the failovers, the revision."""
        return {"controller": self.controller, "controllers": list(self.targets), "failovers": self.failovers,
                "revision": self._rev}

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def groups(self) -> dict[str, str]:
        with self._v.lock:
            return dict(self._groups)

    @property
    def assignments(self) -> dict[str, tuple[str, ...]]:
        """node id -> granted groups, as the controller streams them."""
        with self._v.lock:
            return dict(self._assignments)

    # --- calls ------------------------------------------------------------------------------

    # --- replicas -----------------------------------------------------------------------

    def _client_at(self, i: int) -> Client:
        with self._pick_lock:
            client = self._clients[i]
            if client is None:
                client = self._clients[i] = Client(self.targets[i], self.config.tls, timeout=self._timeout,
                                                   options=self._options)
            return client

    @property
    def _client(self) -> Client:
        return self._client_at(self._current)

    def _current_client(self) -> tuple[int, Client]:
        i = self._current
        return i, self._client_at(i)

    def _fail_over(self, failed: int, why: str) -> None:
        """Move on from replica ``failed`` (if still current), with a fresh channel for it next
        time (no reconnection backoff inherited from the failed one)."""
        with self._pick_lock:
            client, self._clients[failed] = self._clients[failed], None
            if self._current != failed:
                nxt = None
            else:
                nxt = self._current = (failed + 1) % len(self.targets)
        if client is not None:
            client.close()
        if nxt is not None and len(self.targets) > 1:
            self.failovers += 1
            log.warning("node %s: controller %s failed (%s); trying %s", self.node_id, self.targets[failed], why,
                        self.targets[nxt])

    def _connect(self, client: Client, timeout: float) -> str | None:
        """None once ``client``'s channel is ready; why not, as soon as it fails or after ``timeout``."""
        done = threading.Event()
        state: list = []

        def seen(s) -> None:
            if s in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                     grpc.ChannelConnectivity.SHUTDOWN):
                state.append(s)
                done.set()

        client.channel.subscribe(seen, try_to_connect=True)
        try:
            done.wait(timeout)
        finally:
            client.channel.unsubscribe(seen)
        if not state:
            return f"no connection within {timeout:g} s"
        return None if state[0] == grpc.ChannelConnectivity.READY else "cannot connect"

    def _retrying(self, call: Callable, what: str):
        """``call(client)`` on the current replica; on UNAVAILABLE the next one, a backoff after
        each whole round, until ``registry.timeout_s``."""
        deadline = time.monotonic() + self._timeout
        delay = self._backoff[0]
        tried = 0
        while True:
            i, client = self._current_client()
            try:
                return call(client)
            except Throttled as exc:   # the replica answers but asks to wait: no failover
                wait = max(delay, exc.retry_after_s)
                if time.monotonic() + wait > deadline or self._stop.is_set():
                    raise RegistryError(f"{what}: the controller at {self.targets[i]} is throttling "
                                        f"this node ({exc})") from None
                self._pause(wait)
            except Unavailable as exc:
                self._fail_over(i, str(exc))
                tried += 1
                if tried < len(self.targets):
                    continue
                tried = 0
                if time.monotonic() + delay > deadline or self._stop.is_set():
                    where = ", ".join(self.targets)
                    raise RegistryError(f"{what}: every controller is unavailable ({where}; last: {exc})") from None
                self._pause(delay)
                delay = min(delay * 2, self._backoff[1])

    def _pause(self, seconds: float) -> None:
        if self._sleep is not None:
            self._sleep(seconds)
        else:
            self._wake.wait(seconds)

    def _jittered(self, backoff: float) -> float:
        return self._rng.uniform(backoff / 2, backoff)

    def _cancel_call(self) -> None:
        with self._call_lock:
            call = self._call
        if call is not None:
            call.cancel()

    # --- the Watch thread -------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self._backoff[0]
        failed = 0      # replicas that failed in a row since the last live stream (or pause)
        while not self._stop.is_set():
            live = False
            resume_here = False
            reason = "the stream ended before it was live"
            i, client = self._current_client()
            try:
                why = self._connect(client, min(CONNECT_TIMEOUT_S, self._timeout))
                if why is not None:
                    raise _Unreachable(why)
                call = client.watch(self._rev, self._epoch, timeout=self._watch_deadline)
                with self._call_lock:
                    self._call = call
                if self._stop.is_set():
                    call.cancel()
                    break
                for msg in call:
                    changed = self._on_message(msg)
                    if not live and self._pending is None:
                        live = True
                        failed, backoff = 0, self._backoff[0]
                        changed |= self._set_connected(True)
                        self._force_register = True   # register through the replica we reached
                        self._reg_wake.set()
                    elif self._own_changed():
                        self._reg_wake.set()
                    if changed:
                        self._notify()
                log.info("node %s: the controller at %s ended the Watch stream; resuming", self.node_id,
                         self.targets[i])
                resume_here = live
            except _Unreachable as exc:
                reason = str(exc)
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    break
                code = exc.code() if hasattr(exc, "code") else None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and live:
                    resume_here = True   # the call's deadline: resume at once
                else:
                    err = raise_for(exc)
                    reason = f"{type(err).__name__}: {err}"
            except ValueError as exc:    # the channel was closed meanwhile (a call failed over)
                reason = f"channel closed ({exc})"
            except _Desync as exc:
                log.warning("node %s: Watch stream out of step (%s); resuming from revision %d",
                            self.node_id, exc, self._rev)
                self._cancel_call()
                resume_here = True
            except Exception:
                log.exception("node %s: unexpected error following the controller; reconnecting", self.node_id)
                reason = "unexpected error"
            finally:
                with self._call_lock:
                    self._call = None
                self._pending = None
            if self._stop.is_set():
                break
            self.reconnects += 1
            if resume_here:
                continue
            log.warning("node %s: Watch stream from %s failed (%s); keeping the last view", self.node_id,
                        self.targets[i], reason)
            self._fail_over(i, reason)
            failed += 1
            if failed < len(self.targets):
                continue       # the next replica, at once
            failed = 0         # a whole round failed: fail static, back off
            if self._set_connected(False):
                self._notify()
            self._pause(self._jittered(backoff))
            backoff = min(backoff * 2, self._backoff[1])

    def _set_connected(self, up: bool) -> bool:
        with self._v.lock:
            if up:
                changed = not (self._v.connected and self._v.synced)
                self._v.connected = self._v.synced = True
            else:
                changed = self._v.connected or self._v.synced
                self._v.connected = self._v.synced = False
            if changed:
                self._v.revision += 1
        return changed

    def _own_changed(self) -> bool:
        """The stream shows this node's record gone or different from what it registered
        (its groups aside: the controller serves the granted ones)."""
        own = self._own
        if own is None:
            return False
        shown = (self._own_value or {}).get("node")
        if not isinstance(shown, dict):
            return True
        mine = own.to_dict()
        return {k: v for k, v in shown.items() if k != "groups"} != {k: v for k, v in mine.items() if k != "groups"}

    def _keep_registered(self) -> None:
        """Register again after every reconnection, and when the stream shows this node's
        record gone or different (at most once per REREGISTER_MIN_S)."""
        while not self._stop.is_set():
            self._reg_wake.wait(REREGISTER_MIN_S)
            self._reg_wake.clear()
            own = self._own
            if self._stop.is_set():
                return
            if own is None or not self._v.connected or not (self._force_register or self._own_changed()):
                continue
            wait = self._last_register + REREGISTER_MIN_S - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            self._last_register = time.monotonic()
            i, client = self._current_client()
            try:
                client.register(own)
                self._force_register = False
                log.info("node %s: registered with the controller at %s", self.node_id, self.targets[i])
            except OverlayError as exc:
                log.warning("node %s: registration with the controller failed (%s); will retry", self.node_id, exc)

    def _on_message(self, msg) -> bool:
        """Apply one Watch message; True if the view changed."""
        pb2 = self.pb2
        if msg.kind == pb2.WatchResponse.SNAPSHOT:
            if self._pending is None or self._pending_rev != msg.revision:
                self._pending, self._pending_rev = {}, msg.revision
            for ch in msg.changes:
                item = self._decode(ch)
                if item is not None:
                    self._pending[item[0]] = item[1]
            if not msg.last:
                return False
            items, self._pending = self._pending, None
            with self._v.lock:
                self._v.nodes, self._v.rejected, self._v.policies, self._groups = {}, {}, {}, {}
                self._v.order, self._assignments, self._v.sources = {}, {}, {}
                self._v.max_change = None
                self._own_value = None
                for key, value in items.items():
                    self._apply(key, value)
                self._rev, self._epoch = msg.revision, msg.epoch
                self._v.revision += 1
            self.snapshots += 1
            if msg.reset:
                self.resets += 1
                log.info("node %s: the controller could not resume the stream; took a fresh snapshot at %d",
                         self.node_id, msg.revision)
            return True
        if msg.kind != pb2.WatchResponse.DELTA or self._pending is not None:
            raise _Desync(f"unexpected message kind {msg.kind}")
        if msg.epoch != self._epoch or msg.base_revision != self._rev:
            raise _Desync(f"delta {msg.base_revision}->{msg.revision} (epoch {msg.epoch[:8]}) "
                          f"does not follow {self._rev} (epoch {self._epoch[:8]})")
        items = [i for i in (self._decode(ch) for ch in msg.changes) if i is not None]
        with self._v.lock:
            for key, value in items:
                self._apply(key, value)
            self._rev = msg.revision
            if items:
                self._v.revision += 1
        return bool(items)

    def _decode(self, ch):
        try:
            return change_from_pb(ch)
        except ValueError as exc:
            log.warning("node %s: ignoring a malformed change from the controller: %s", self.node_id, exc)
            return None

    def _apply(self, key: tuple[str, str], value: dict | None) -> None:
        """Caller holds _lock."""
        kind, ident = key
        if kind == "node":
            if ident == self.node_id:
                self._own_value = value
                return
            self._v.nodes.pop(ident, None)
            self._v.rejected.pop(ident, None)
            self._v.order.pop(ident, None)
            self._v.sources.pop(ident, None)
            if value is None:
                return
            if "rejected" in value:
                self._v.rejected[ident] = str(value["rejected"])
                return
            try:
                node = node_from_dict(value.get("node"), self.subnet)
                if node.node_id != ident:
                    raise InvalidRecord(f"node record names node_id {node.node_id!r} but is listed as {ident!r}")
                self._v.nodes[ident] = node
                if isinstance(value.get("order"), int) and value["order"] > 0:
                    self._v.order[ident] = value["order"]
                if value.get("source") == "neti":
                    self._v.sources[ident] = "neti"
            except InvalidRecord as exc:
                self._v.rejected[ident] = str(exc)
        elif kind == "policy":
            self._v.policies.pop(ident, None)
            self._v.rejected.pop(f"policy:{ident}", None)
            if value is None:
                return
            if "rejected" in value:
                self._v.rejected[f"policy:{ident}"] = str(value["rejected"])
                return
            try:
                self._v.policies[ident] = policy_from_dict(value.get("policy"), ident)
            except InvalidRecord as exc:
                self._v.rejected[f"policy:{ident}"] = str(exc)
        elif kind == "group":
            if value is None:
                self._groups.pop(ident, None)
            else:
                self._groups[ident] = str(value.get("group", {}).get("description", ""))
        elif kind == "config" and ident == "max_change":
            self._v.max_change = int(value["max_change"]) if value is not None else None
        elif kind == "assignment":
            groups = (value or {}).get("assignment", {}).get("groups")
            if isinstance(groups, list):
                self._assignments[ident] = tuple(str(g) for g in groups)
            else:
                self._assignments.pop(ident, None)

    def _notify(self) -> None:
        notify_listener(self._listener, self.node_id)
