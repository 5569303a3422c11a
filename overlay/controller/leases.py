"""Node records written through the controller, and their leases (docs/grpc.md,
"Registrations and leases").

A record written through the controller is PERSISTENT: no replica's ZooKeeper session
owns it, so no replica's death removes it. A node's own registration (node certificate)
is **leased**: ``leases/<node_id>`` (persistent) marks it. An operator's registration has
no marker and lasts until DeregisterNode.

Leases are kept alive without a ZooKeeper write per node and renewal: each replica holds
the nodes that have a Watch stream open on it, or called RegisterNode or Heartbeat on it
within ``lease_s``, and publishes that set in ``holders/<replica>``, EPHEMERAL in its own
session (so it goes when the replica does). The **leader** removes a leased record, with
its marker, once no replica has held the node for ``lease_s``: counted on the leader's
clock from the moment it first saw the node held by no replica. A new leader starts
counting afresh, so a record never goes early (at worst ``lease_s`` late). The removal is
a transaction fenced on the marker's version: a RegisterNode meanwhile (which rewrites the
marker) wins.

Upgrade: an older controller made records EPHEMERAL in its own session. Every replica of
this version, when it starts and every minute, makes every such record (its owner is the
session of a ``controllers/n-*`` member) persistent and leased, so that stopping the old
replica no longer removes it.

Registration calls come from RPC threads; :meth:`Leases.maintain` and the leader's
:meth:`Leases.lead` from the store's worker. Callers translate kazoo's errors
(``overlay.zk.client.translate``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError

from overlay.errors import Contended, NotFound
from overlay.zk import client as zkc
from overlay.zk.layout import Layout

log = logging.getLogger(__name__)

LEAD_EVERY_S = 2.0          # the leader looks for expired leases at most this often
MIGRATE_EVERY_S = 60.0      # every replica looks for ephemeral records of older controllers


@dataclass
class Leases:
    """The registrations written through this replica (``session``, under ``layout``):
    records get ``record_acl``, markers and the holders znode ``item_acl``; ``clock``
    times the leases (monotonic seconds)."""

    session: zkc.Session
    layout: Layout
    record_acl: list
    item_acl: list
    replica: str
    lease_s: float
    clock: Callable[[], float]
    _streams: dict[str, int] = field(default_factory=dict, init=False)
    _touched: dict[str, float] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    # worker-private
    _published: list[str] | None = field(default=None, init=False)
    _unheld: dict[str, tuple[float, int]] = field(default_factory=dict, init=False)
    _last_lead: float = field(default=float("-inf"), init=False)
    _last_migrate: float = field(default=float("-inf"), init=False)
    expired_total: int = field(default=0, init=False)
    migrated_total: int = field(default=0, init=False)

    # --- RPC threads ----------------------------------------------------------------------

    def register(self, node_id: str, data: bytes, leased: bool) -> None:
        """Write ``nodes/<node_id>`` (persistent; an ephemeral one, of a ZooKeeper daemon or
        an older controller, is taken over) and its lease marker, in one transaction."""
        path, mark = self._path(node_id), self._mark(node_id)
        client = self.session.client
        for _ in range(5):
            current = self._get(path)
            marker = self._stat(mark)
            tx = client.transaction()
            if current is None:
                tx.create(path, data, acl=self.record_acl)
            elif current[1].ephemeralOwner:
                tx.delete(path, version=current[1].version)
                tx.create(path, data, acl=self.record_acl)
            elif current[0] != data:
                tx.set_data(path, data, version=current[1].version)
            else:
                tx.check(path, current[1].version)
            if leased:
                mdata = json.dumps({"v": 1, "replica": self.replica}).encode()
                if marker is None:
                    tx.create(mark, mdata, acl=self.item_acl)
                else:
                    tx.set_data(mark, mdata, version=marker.version)   # a new version: fences the leader
            elif marker is not None:
                tx.delete(mark, version=marker.version)
            results = self.session.wait(tx.commit_async())
            if not any(isinstance(r, Exception) for r in results):
                if current is not None and current[1].ephemeralOwner:
                    log.info("controller %s: %s was ephemeral (session 0x%x); now persistent%s", self.replica,
                             node_id, current[1].ephemeralOwner, " and leased" if leased else "")
                break
        else:
            raise Contended(f"nodes/{node_id} keeps changing; try again")
        if leased:
            self.touch(node_id)

    def deregister(self, node_id: str) -> None:
        """Remove the record and its lease marker."""
        with self._lock:
            self._touched.pop(node_id, None)
        client = self.session.client
        for _ in range(5):
            rec, marker = self._stat(self._path(node_id)), self._stat(self._mark(node_id))
            if rec is None and marker is None:
                raise NotFound(f"node_id: node {node_id!r} is not registered")
            tx = client.transaction()
            if rec is not None:
                tx.delete(self._path(node_id), version=rec.version)
            if marker is not None:
                tx.delete(self._mark(node_id), version=marker.version)
            if not any(isinstance(r, Exception) for r in self.session.wait(tx.commit_async())):
                return
        raise Contended(f"nodes/{node_id} keeps changing; try again")

    def touch(self, node_id: str) -> None:
        """The node spoke to this replica (RegisterNode, Heartbeat, a stream closing)."""
        with self._lock:
            self._touched[node_id] = self.clock()

    def stream_opened(self, node_id: str) -> None:
        with self._lock:
            self._streams[node_id] = self._streams.get(node_id, 0) + 1

    def stream_closed(self, node_id: str) -> None:
        with self._lock:
            n = self._streams.get(node_id, 0) - 1
            if n > 0:
                self._streams[node_id] = n
            else:
                self._streams.pop(node_id, None)
            self._touched[node_id] = self.clock()

    def held(self) -> list[str]:
        """The nodes this replica holds now, sorted (forgets touches older than ``lease_s``)."""
        now = self.clock()
        with self._lock:
            for node_id in [n for n, t in self._touched.items() if now - t >= self.lease_s]:
                del self._touched[node_id]
            return sorted(set(self._streams) | set(self._touched))

    # --- the worker -----------------------------------------------------------------------

    def restart(self) -> None:
        """After (re)connecting: publish the holdings again (a new session needs a new znode),
        and look for older controllers' records at once."""
        self._published = None
        self._last_migrate = float("-inf")

    def new_leader(self) -> None:
        """This replica now leads: count every unheld lease from now."""
        self._unheld.clear()
        self._last_lead = float("-inf")

    def maintain(self) -> None:
        """Every replica, every round: publish the holdings; now and then, make older
        controllers' ephemeral records persistent and leased."""
        self.publish()
        now = self.clock()
        if now - self._last_migrate >= MIGRATE_EVERY_S:
            self._last_migrate = now
            self._migrate()

    def publish(self) -> None:
        """Keep ``holders/<replica>`` equal to :meth:`held` (written only when it changed)."""
        held = self.held()
        if held == self._published:
            return
        path = f"{self.layout.holders}/{self.replica}"
        data = json.dumps({"v": 1, "nodes": held}, separators=(",", ":")).encode()
        client = self.session.client
        if self._published is None:
            stat = self._stat(path)
            if stat is not None and stat.ephemeralOwner != zkc.session_id(client):
                with contextlib.suppress(NoNodeError):
                    self.session.wait(client.delete_async(path))   # our previous session's
                stat = None
            if stat is None:
                try:
                    self.session.wait(client.create_async(path, data, acl=self.item_acl, ephemeral=True))
                    self._published = held
                    return
                except NodeExistsError:
                    pass
        self.session.wait(client.set_async(path, data))
        self._published = held

    def lead(self) -> None:
        """Leader: remove the leased records no replica has held for ``lease_s``."""
        now = self.clock()
        if now - self._last_lead < min(LEAD_EVERY_S, max(self.lease_s / 4, 0.1)):
            return
        self._last_lead = now
        held: set[str] = set()
        holders = self.session.children(self.layout.holders)
        got = self.session.get_many([f"{self.layout.holders}/{h}" for h in holders])
        for res in got.values():
            if isinstance(res, tuple):
                with contextlib.suppress(ValueError, KeyError, TypeError, UnicodeDecodeError):
                    held.update(str(n) for n in json.loads(res[0].decode("utf-8"))["nodes"])
        unheld = set(self.session.children(self.layout.leases)) - held
        for node_id in [n for n in self._unheld if n not in unheld]:
            del self._unheld[node_id]
        for node_id in sorted(unheld - set(self._unheld)):
            marker = self._stat(self._mark(node_id))
            if marker is not None:
                self._unheld[node_id] = (now, marker.version)
        for node_id, (since, version) in sorted(self._unheld.items()):
            if now - since >= self.lease_s:
                del self._unheld[node_id]
                self._expire(node_id, version, now - since)

    def unheld(self) -> dict[str, float]:
        """Leader: node -> seconds it has been held by no replica (tests, debugging)."""
        now = self.clock()
        return {n: now - since for n, (since, _v) in self._unheld.items()}

    # --- helpers --------------------------------------------------------------------------

    def _path(self, node_id: str) -> str:
        return f"{self.layout.nodes}/{node_id}"

    def _mark(self, node_id: str) -> str:
        return f"{self.layout.leases}/{node_id}"

    def _get(self, path: str):
        try:
            return self.session.get(path)
        except NoNodeError:
            return None

    def _stat(self, path: str):
        return self.session.exists(path)

    def _expire(self, node_id: str, version: int, silent_s: float) -> None:
        client = self.session.client
        rec = self._stat(self._path(node_id))
        tx = client.transaction()
        tx.delete(self._mark(node_id), version=version)
        if rec is not None and not rec.ephemeralOwner:
            tx.delete(self._path(node_id), version=rec.version)
        results = self.session.wait(tx.commit_async())
        if any(isinstance(r, Exception) for r in results):
            log.info("controller %s: lease of %s renewed meanwhile; kept", self.replica, node_id)
            return
        self.expired_total += 1
        log.info("controller %s: lease of %s expired (held by no replica for %.0f s); record removed",
                 self.replica, node_id, silent_s)

    def _migrate(self) -> None:
        """Make the ephemeral records of controller sessions persistent and leased."""
        members = self.session.children(self.layout.controllers)
        sessions = {s.ephemeralOwner for s in (self._stat(f"{self.layout.controllers}/{m}") for m in members)
                    if s is not None and s.ephemeralOwner}
        if not sessions:
            return
        names = self.session.children(self.layout.nodes)
        got = self.session.get_many([self._path(n) for n in names])
        client = self.session.client
        moved = 0
        for node_id in names:
            res = got[self._path(node_id)]
            if not isinstance(res, tuple) or res[1].ephemeralOwner not in sessions:
                continue
            data, stat = res
            tx = client.transaction()
            tx.delete(self._path(node_id), version=stat.version)
            tx.create(self._path(node_id), data, acl=self.record_acl)
            if self._stat(self._mark(node_id)) is None:
                tx.create(self._mark(node_id), json.dumps({"v": 1, "replica": self.replica}).encode(),
                          acl=self.item_acl)
            with contextlib.suppress(BadVersionError, NoNodeError, NodeExistsError):
                if not any(isinstance(r, Exception) for r in self.session.wait(tx.commit_async())):
                    moved += 1
        if moved:
            self.migrated_total += moved
            log.info("controller %s: %d records made ephemeral by a controller session are now persistent "
                     "and leased", self.replica, moved)
