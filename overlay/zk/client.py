"""The kazoo client both sides use: persistent recursive watches, connecting, errors.

Watching is incremental: ZooKeeper 3.6+ persistent recursive watches deliver one
event per changed znode below a path. kazoo 2.11 has no API for them, so this module
adds the ``addWatch`` request (opcode 106, :class:`AddWatch`) and routes the
notifications itself through a small subclass of kazoo's connection handler
(:class:`WatchConnection`): :func:`connect` hands every notification to an
``on_event(type, path)`` callback, called in kazoo's connection thread, which must
only queue. Because ZooKeeper 3.8 lets a one-shot watch on a path replace a
persistent one on the same path of the same connection (ZOOKEEPER-4466), clients
made here never set one-shot watches.

:data:`CONNECTION_ERRORS` is the one set of "the connection, not the request,
failed" errors; :func:`translate` turns kazoo's exceptions into the project's
error kinds (:mod:`overlay.errors`) at the boundary.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import (
    AuthFailedError,
    ConnectionClosedError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NoNodeError,
    OperationTimeoutError,
    SessionExpiredError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.connection import ConnectionHandler
from kazoo.protocol.serialization import Watch, int_struct, write_string
from kazoo.retry import KazooRetry

from overlay.config import Auth, RegistryConfig
from overlay.errors import FailedPrecondition, OverlayError, RegistryError, Unavailable, internal

log = logging.getLogger(__name__)

# ZooKeeper wire constants (zookeeper.jute / ZooDefs): addWatch, its modes, event types.
OP_ADD_WATCH = 106
PERSISTENT = 0
PERSISTENT_RECURSIVE = 1
EV_CREATED, EV_DELETED, EV_CHANGED = 1, 2, 3

# The connection (not the request) failed: callers re-raise these and resync later.
CONNECTION_ERRORS = (ConnectionLoss, ConnectionClosedError, SessionExpiredError, KazooTimeoutError,
                     OperationTimeoutError, AuthFailedError)

EventSink = Callable[[int, str], None]
StateListener = Callable[[str], None]


class AddWatch(namedtuple("AddWatch", "path mode")):
    """ZooKeeper ``AddWatchRequest {ustring path; int mode}``; the reply has no body we need."""

    type = OP_ADD_WATCH

    def serialize(self) -> bytearray:
        b = bytearray()
        b.extend(write_string(self.path))
        b.extend(int_struct.pack(self.mode))
        return b

    @classmethod
    def deserialize(cls, buffer: bytes, offset: int) -> bool:
        return True


class WatchConnection(ConnectionHandler):
    """kazoo's connection handler, also handing every watch notification to ``event_sink``.

    kazoo only dispatches notifications to one-shot watchers it registered;
    persistent-watch notifications would be dropped. ``event_sink(type, path)``
    is called in the connection thread and must only queue.
    """

    event_sink: EventSink | None = None

    def _read_watch_event(self, buffer: bytes, offset: int) -> None:
        watch, _ = Watch.deserialize(buffer, offset)
        sink = self.event_sink
        if sink is not None and watch.type in (EV_CREATED, EV_DELETED, EV_CHANGED):
            if not self.client._stopped.is_set():
                sink(watch.type, self.client.unchroot(watch.path))
        super()._read_watch_event(buffer, offset)


def new_client(config: RegistryConfig, extra_auth: Iterable[Auth | None] = (),
               client_id: tuple[int, bytes] | None = None) -> KazooClient:
    """A kazoo client of ``config.hosts`` with the config's credentials (not started) that
    retries its connection for ever; its notifications go nowhere until :func:`connect`.
    ``client_id`` (session id, password) resumes that session if it is still alive (else
    the client gets a new one)."""
    auth_data = [(a.scheme, f"{a.user}:{a.password}") for a in (config.auth, config.operator, *extra_auth) if a]
    client = KazooClient(
        hosts=",".join(config.hosts),
        timeout=config.timeout_s,
        auth_data=auth_data or None,
        client_id=client_id,
        connection_retry=KazooRetry(max_tries=-1, delay=0.2, backoff=1.5, max_delay=2.0, max_jitter=0.3),
    )
    client._connection = WatchConnection(client, client._conn_retry.copy(), logger=client.logger)
    return client


def connect(config: RegistryConfig, on_event: EventSink, on_state: StateListener,
            client_id: tuple[int, bytes] | None = None) -> KazooClient:
    """A started client whose watch notifications go to ``on_event`` and state changes to
    ``on_state``; nothing is left running if it cannot connect (kazoo's error is raised).
    ``client_id``: a session to resume (:func:`detach`)."""
    client = new_client(config, client_id=client_id)
    client._connection.event_sink = on_event
    client.add_listener(on_state)
    try:
        client.start(timeout=max(config.timeout_s, 1.0))
    except BaseException:
        close(client, on_state)
        raise
    return client


def close(client: KazooClient, on_state: StateListener | None = None) -> None:
    """Stop routing events, stop and close ``client``; never raises."""
    client._connection.event_sink = None
    if on_state is not None:
        client.remove_listener(on_state)
    try:
        client.stop()
        client.close()
    except Exception as exc:  # closing must never raise
        log.debug("closing a ZooKeeper client: %s", exc)


def detach(client: KazooClient, on_state: StateListener | None = None) -> tuple[int, bytes] | None:
    """Stop ``client`` without ending its session: no close request is sent, the connection is
    just dropped, so the session (and its ephemeral znodes) lives until it times out, or until
    a client resumes it with the returned ``(session id, password)`` (None if it had none).
    Never raises."""
    client._connection.event_sink = None
    if on_state is not None:
        client.remove_listener(on_state)
    cid = client.client_id if client.connected else None
    try:
        client._stopped.set()      # kazoo's loop ends at the next connection event ...
        sock = client._connection._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)     # ... which is this one: no CloseSession goes out
        with contextlib.suppress(OSError):
            client._connection._write_sock.send(b"\0")
        if client._connection.connection_stopped.wait(10):
            client.handler.stop()
            client.close()
    except Exception as exc:  # detaching must never raise
        log.debug("detaching a ZooKeeper client: %s", exc)
    return (cid[0], bytes(cid[1])) if cid else None


def add_watches(client: KazooClient, paths: Iterable[str], timeout: float) -> None:
    """A persistent recursive watch on each path (pipelined; raises what ZooKeeper refused,
    ``UnimplementedError`` before ZooKeeper 3.6)."""
    waits = []
    for path in paths:
        res = client.handler.async_result()
        client._call(AddWatch(path, PERSISTENT_RECURSIVE), res)
        waits.append(res)
    for res in waits:
        res.get(timeout=timeout)


def session_id(client: KazooClient | None) -> int | None:
    return client.client_id[0] if client is not None and client.client_id else None


@dataclass(frozen=True)
class Unreadable:
    """A znode that exists but could not be read (a hostile ACL, for instance)."""

    error: str


class Session:
    """One owner's kazoo client and its requests, each waited for at most ``op_timeout``.

    ``client`` is the owner's (None until it connects); ``reads`` counts every get,
    exists and get_children issued through here (what a change costs ZooKeeper).
    """

    def __init__(self, op_timeout: float):
        self.op_timeout = op_timeout
        self.client: KazooClient | None = None
        self.reads = 0
        self._reads_lock = threading.Lock()

    def wait(self, async_result: Any) -> Any:
        return async_result.get(timeout=self.op_timeout)

    def count(self, n: int = 1) -> None:
        with self._reads_lock:
            self.reads += n

    def get(self, path: str) -> tuple[bytes, Any]:
        self.count()
        return self.wait(self.client.get_async(path))

    def exists(self, path: str) -> Any:
        self.count()
        return self.wait(self.client.exists_async(path))

    def children(self, path: str) -> list[str]:
        """The children of ``path``; none if it does not exist."""
        self.count()
        try:
            return self.wait(self.client.get_children_async(path))
        except NoNodeError:
            return []

    def get_many(self, paths: list[str]) -> dict[str, Any]:
        """Pipelined gets: each path maps to ``(data, stat)``, None if it does not exist, or an
        :class:`Unreadable` (ACL refused it, or another per-znode error). Losing the
        connection raises: the caller's resync starts over."""
        client = self.client
        self.count(len(paths))
        pending = [(p, client.get_async(p)) for p in paths]
        out: dict[str, Any] = {}
        for p, res in pending:
            try:
                out[p] = self.wait(res)
            except NoNodeError:
                out[p] = None
            except CONNECTION_ERRORS:
                raise
            except KazooException as exc:
                out[p] = Unreadable(f"{type(exc).__name__}")
        return out


BOOTSTRAP_HINT = ("check registry.auth; the layout is created by an operator with "
                  "overlay.zk.layout.bootstrap")


@contextlib.contextmanager
def translate(what: str, hosts: str, no_auth_hint: str = BOOTSTRAP_HINT) -> Iterator[None]:
    """Turn kazoo's exceptions into the project's error kinds, with a message saying what
    failed: ACL refusals are FailedPrecondition, an unreachable ZooKeeper is Unavailable,
    anything else of kazoo's a RegistryError. The project's own errors pass through.
    The errors made here name hosts and paths: they are marked internal (a server's client
    gets only the kind and a request id)."""
    try:
        yield
    except OverlayError:
        raise
    except NoAuthError:
        raise internal(FailedPrecondition(f"{what}: refused by the ZooKeeper ACL ({no_auth_hint})")) from None
    except AuthFailedError:
        raise internal(RegistryError(f"{what}: ZooKeeper rejected the credentials in registry.auth")) from None
    except (*CONNECTION_ERRORS, ConnectionError) as exc:
        raise internal(Unavailable(f"{what}: ZooKeeper at {hosts} is unreachable ({type(exc).__name__})")) from None
    except KazooException as exc:
        raise internal(RegistryError(f"{what}: ZooKeeper error {type(exc).__name__}: {exc}")) from None
