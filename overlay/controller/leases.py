"""The node records a controller replica publishes, and their leases (docs/grpc.md).

A node record is EPHEMERAL, created in this replica's ZooKeeper session. A node's own
registration is leased: kept while the node has a Watch stream open on this replica,
and ``lease_s`` seconds after its last one closed (the daemon re-registers on every
reconnection). An operator's registration lasts until DeregisterNode or until this
replica stops. Both are re-created after this replica's session is replaced
(:meth:`Leases.restore`), unless the node registered through another session since.

Registration calls come from RPC threads; :meth:`restore` and :meth:`expire` from the
store's worker. Callers translate kazoo's errors (``overlay.zk.client.translate``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError

from overlay.errors import NotFound, Unavailable
from overlay.model import Node
from overlay.zk import client as zkc
from overlay.zk.layout import Layout

log = logging.getLogger(__name__)


@dataclass
class Registration:
    node: Node
    data: bytes
    leased: bool
    expires: float


@dataclass
class Leases:
    """The registrations of one replica, published through ``session`` under ``layout`` with
    ``record_acl``; ``clock`` times the leases."""

    session: zkc.Session
    layout: Layout
    record_acl: list
    replica: str
    lease_s: float
    clock: Callable[[], float]
    _regs: dict[str, Registration] = field(default_factory=dict, init=False)
    _streams: dict[str, int] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def register(self, node: Node, data: bytes, leased: bool) -> None:
        """Publish ``node`` in this session (taking it over from another session)."""
        with self._lock:
            self._regs[node.node_id] = Registration(node, data, leased, self.clock() + self.lease_s)
        self._put_ephemeral(node.node_id, data, takeover=True)

    def deregister(self, node_id: str) -> None:
        with self._lock:
            reg = self._regs.pop(node_id, None)
        try:
            self.session.wait(self.session.client.delete_async(self._path(node_id)))
        except NoNodeError:
            if reg is None:
                raise NotFound(f"node_id: node {node_id!r} is not registered") from None

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
                reg = self._regs.get(node_id)
                if reg is not None:
                    reg.expires = self.clock() + self.lease_s

    def registrations(self) -> dict[str, bool]:
        """node_id -> leased, for the registrations this replica holds."""
        with self._lock:
            return {k: r.leased for k, r in self._regs.items()}

    def restore(self) -> None:
        """Worker, after (re)connecting: publish every registration again in this session."""
        with self._lock:
            regs = list(self._regs.items())
        for node_id, reg in regs:
            if not self._put_ephemeral(node_id, reg.data, takeover=False):
                log.info("controller %s: %s is now registered through another session; dropping ours",
                         self.replica, node_id)
                with self._lock:
                    if self._regs.get(node_id) is reg:
                        del self._regs[node_id]

    def expire(self) -> None:
        """Worker: remove the records whose lease ran out (no stream for ``lease_s``)."""
        now = self.clock()
        expired = []
        with self._lock:
            for node_id, reg in list(self._regs.items()):
                if reg.leased and self._streams.get(node_id, 0) == 0 and now >= reg.expires:
                    expired.append(node_id)
                    del self._regs[node_id]
        for node_id in expired:
            self._release(node_id)

    def _path(self, node_id: str) -> str:
        return f"{self.layout.nodes}/{node_id}"

    def _session_id(self) -> int:
        return zkc.session_id(self.session.client) or 0

    def _put_ephemeral(self, node_id: str, data: bytes, takeover: bool) -> bool:
        """Create ``nodes/<node_id>`` in this session, or bring it up to date. A record held by
        another session is replaced in one transaction if ``takeover`` (the node moved here),
        else left alone (returns False)."""
        path = self._path(node_id)
        client = self.session.client
        for _ in range(5):
            try:
                self.session.wait(client.create_async(path, data, acl=self.record_acl, ephemeral=True))
                return True
            except NodeExistsError:
                pass
            try:
                current, stat = self.session.wait(client.get_async(path))
            except NoNodeError:
                continue
            if stat.ephemeralOwner == self._session_id():
                if current != data:
                    try:
                        self.session.wait(client.set_async(path, data, version=stat.version))
                    except (BadVersionError, NoNodeError):
                        continue
                return True
            if not takeover:
                return False
            tx = client.transaction()
            tx.delete(path, version=stat.version)
            tx.create(path, data, acl=self.record_acl, ephemeral=True)
            results = self.session.wait(tx.commit_async())
            if not any(isinstance(r, Exception) for r in results):
                log.info("controller %s: took over the registration of %s from session 0x%x",
                         self.replica, node_id, stat.ephemeralOwner)
                return True
        raise Unavailable(f"nodes/{node_id} keeps changing; try again")

    def _release(self, node_id: str) -> None:
        path = self._path(node_id)
        client = self.session.client
        try:
            _, stat = self.session.wait(client.get_async(path))
        except NoNodeError:
            return
        if stat.ephemeralOwner == self._session_id():
            with contextlib.suppress(NoNodeError, BadVersionError):
                self.session.wait(client.delete_async(path, version=stat.version))
                log.info("controller %s: lease of %s expired; record removed", self.replica, node_id)
