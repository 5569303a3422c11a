"""A small HTTP server for the daemon's local endpoints: bounded in connections and in time.

One request per connection (the response closes it), a cap on the connections being
served at once (:attr:`SmallServer.max_conns`; one more is answered ``503`` and closed at
once), and deadlines per connection: the request line and headers must arrive within
``header_timeout`` seconds, the body within ``body_timeout``, the response must be taken
within ``write_timeout``. Headers are at most ``max_header`` bytes, bodies ``max_body``.
So a client that sends slowly (slowloris) holds one slot for at most ``header_timeout``
(+ ``body_timeout``), and never more than ``max_conns`` slots are held.

The socket is given (TCP or unix); ``authorize(conn)`` may refuse a request (the control
socket checks the peer's uid) before it is handled. ``handle(method, path, body)``
returns ``(status, body, content type)``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus

log = logging.getLogger(__name__)

Handler = Callable[[str, str, bytes], tuple[int, bytes, str]]
Authorize = Callable[[socket.socket], str | None]   # None: allowed; else the reason for a 403

MAX_CONNS = 16
HEADER_TIMEOUT_S = 5.0
BODY_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 5.0
MAX_HEADER = 8192
MAX_BODY = 65536


class _Refuse(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class SmallServer:
    """Serve ``sock`` (bound and listening) with ``handle`` from a thread of its own."""

    def __init__(self, sock: socket.socket, handle: Handler, *, name: str = "http",
                 authorize: Authorize | None = None, max_conns: int = MAX_CONNS,
                 header_timeout: float = HEADER_TIMEOUT_S, body_timeout: float = BODY_TIMEOUT_S,
                 write_timeout: float = WRITE_TIMEOUT_S, max_header: int = MAX_HEADER, max_body: int = MAX_BODY):
        self.sock = sock
        self.handle = handle
        self.name = name
        self.authorize = authorize
        self.max_conns = max_conns
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.write_timeout = write_timeout
        self.max_header = max_header
        self.max_body = max_body
        self.active = 0            # connections being served now
        self.peak = 0              # the most served at once
        self.refused = 0           # connections turned away at the cap
        self.timed_out = 0         # connections closed at a deadline
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name=name, daemon=True)

    def start(self) -> None:
        self.sock.settimeout(0.5)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.sock.close()
        except OSError:
            pass

    # --- accepting ----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)   # EMFILE and the like: do not spin
                continue
            with self._lock:
                full = self.active >= self.max_conns
                if full:
                    self.refused += 1
                else:
                    self.active += 1
                    self.peak = max(self.peak, self.active)
            if full:
                _busy(conn)
                continue
            threading.Thread(target=self._serve, args=(conn,), name=f"{self.name}-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            status, body, ctype = self._one(conn)
            self._respond(conn, status, body, ctype)
        except _Refuse as exc:
            if exc.status == HTTPStatus.REQUEST_TIMEOUT:
                with self._lock:
                    self.timed_out += 1
            self._respond(conn, exc.status, f"{exc}\n".encode(), "text/plain")
        except OSError:
            pass
        except Exception:
            log.exception("%s: request failed", self.name)
            self._respond(conn, 500, b"internal error\n", "text/plain")
        finally:
            try:
                conn.close()
            finally:
                with self._lock:
                    self.active -= 1

    # --- one request --------------------------------------------------------------------------

    def _one(self, conn: socket.socket) -> tuple[int, bytes, str]:
        head, rest = self._read_head(conn)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _Refuse(HTTPStatus.BAD_REQUEST, "bad request line")
        method, target = parts[0], parts[1]
        length = 0
        for line in lines[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-length":
                if not value.strip().isdigit():
                    raise _Refuse(HTTPStatus.BAD_REQUEST, "bad Content-Length")
                length = int(value.strip())
            elif key.strip().lower() == "transfer-encoding":
                raise _Refuse(HTTPStatus.NOT_IMPLEMENTED, "no Transfer-Encoding; send Content-Length")
        if length > self.max_body:
            raise _Refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {self.max_body} bytes")
        body = self._read_body(conn, rest, length)
        if self.authorize is not None:   # after reading the request: the refusal reaches the client
            reason = self.authorize(conn)
            if reason is not None:
                raise _Refuse(HTTPStatus.FORBIDDEN, reason)
        return self.handle(method, target.split("?", 1)[0], body)

    def _read_head(self, conn: socket.socket) -> tuple[bytes, bytes]:
        deadline = time.monotonic() + self.header_timeout
        buf = b""
        while b"\r\n\r\n" not in buf:
            if len(buf) > self.max_header:
                raise _Refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"headers over {self.max_header} bytes")
            buf += self._recv(conn, deadline, "headers")
        head, _, rest = buf.partition(b"\r\n\r\n")
        if len(head) > self.max_header:
            raise _Refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"headers over {self.max_header} bytes")
        return head, rest

    def _read_body(self, conn: socket.socket, body: bytes, length: int) -> bytes:
        deadline = time.monotonic() + self.body_timeout
        while len(body) < length:
            body += self._recv(conn, deadline, "body")
        return body[:length]

    def _recv(self, conn: socket.socket, deadline: float, what: str) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Refuse(HTTPStatus.REQUEST_TIMEOUT, f"the {what} did not arrive in time")
        conn.settimeout(left)
        try:
            data = conn.recv(4096)
        except TimeoutError:
            raise _Refuse(HTTPStatus.REQUEST_TIMEOUT, f"the {what} did not arrive in time") from None
        if not data:
            raise OSError("the client went away")
        return data

    def _respond(self, conn: socket.socket, status: int, body: bytes, ctype: str) -> None:
        reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode("latin-1")
        try:
            conn.settimeout(self.write_timeout)
            conn.sendall(head + body)
        except OSError:
            pass


def _busy(conn: socket.socket) -> None:
    """Answer 503 without waiting (the reply fits any socket buffer) and close."""
    try:
        conn.setblocking(False)
        conn.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n")
    except OSError:
        pass
    finally:
        conn.close()


def tcp_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6 literal, or a name)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock
