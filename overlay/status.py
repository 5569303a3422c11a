"""The daemon's local endpoints (DESIGN §4.1, §8): /healthz, /readyz, /status, /metrics, and actions.

Read-only endpoints are served on ``status_listen`` (loopback by default), ``/metrics``
alone on ``metrics_listen`` if set; actions (``POST /guard/release``) only on the unix
socket ``control_socket``, to root. The client half (``fetch_status``, ``post_action``)
is what ``overlay status`` and ``overlay guard release`` use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from overlay.errors import OverlayError
from overlay.httpd import SmallServer, tcp_socket

log = logging.getLogger(__name__)
DEFAULT_LISTEN = ("127.0.0.1", 9464)


class Metrics:
    """Prometheus metrics of one agent, refreshed from its status on each scrape."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ready = Gauge("overlay_ready", "1 when the datapath is in sync with the registry", registry=r)
        self.peers = Gauge("overlay_peers", "peers applied to the datapath", registry=r)
        self.excluded = Gauge("overlay_peers_excluded", "peers excluded by the planner", registry=r)
        self.rejected = Gauge("overlay_rejected_records", "registry records ignored as invalid", registry=r)
        self.conflicts = Gauge("overlay_conflicts", "peers excluded: an earlier registration holds their address",
                               registry=r)
        self.guard_tripped = Gauge("overlay_guard_tripped", "1 while the churn guard holds a change", registry=r)
        self.guard_held = Gauge("overlay_guard_held", "changes held by the churn guard", registry=r)
        self.guard_threshold = Gauge("overlay_guard_threshold", "churn guard threshold", registry=r)
        self.ops = Gauge("overlay_datapath_ops", "datapath ops applied since start", registry=r)
        self.packets = Gauge(
            "overlay_datapath_packets", "datapath verdict counters by reason", ["reason"], registry=r
        )
        self.drops = Gauge("overlay_drops", "packets dropped by reason", ["reason"], registry=r)
        self.map_entries = Gauge("overlay_map_entries", "entries in a datapath map", ["map"], registry=r)
        self.map_max = Gauge("overlay_map_max_entries", "capacity of a datapath map", ["map"], registry=r)
        self.scrapes = Counter("overlay_status_scrapes", "status endpoint scrapes", registry=r)

    def render(self, status: dict) -> bytes:
        self.scrapes.inc()
        self.ready.set(1 if status.get("ready") else 0)
        self.peers.set(len(status.get("peers", [])))
        self.excluded.set(len(status.get("excluded", [])))
        self.rejected.set(status.get("rejected", 0))
        self.conflicts.set(status.get("conflicts", 0))
        guard = status.get("guard", {})
        self.guard_tripped.set(1 if guard.get("tripped") else 0)
        self.guard_held.set(guard.get("size", 0))
        self.guard_threshold.set(guard.get("threshold", 0))
        self.ops.set(status.get("ops_total", 0))
        for reason, value in status.get("datapath", {}).get("counters", {}).items():
            self.packets.labels(reason=reason).set(value)
        for reason, value in status.get("drops", {}).items():
            self.drops.labels(reason=reason).set(value)
        for name, level in (status.get("fill") or {}).items():
            self.map_entries.labels(map=name).set(level.get("entries", 0))
            self.map_max.labels(map=name).set(level.get("max_entries", 0))
        return generate_latest(self.registry)


class StatusServer:
    """The daemon's local endpoints (docs/daemon.md, "Local endpoints"):

    - ``status_listen`` (TCP): GET ``/healthz``, ``/readyz``, ``/status``, ``/metrics``; read-only;
    - ``metrics_listen`` (TCP, optional): GET ``/metrics`` alone (no fleet addresses);
    - ``control_socket`` (unix, optional): POST ``/guard/release``; the socket file is 0600 in a
      0700 directory and a connection is served only if the peer's uid (SO_PEERCRED) is root's
      (or the daemon's own, when it does not run as root).

    Each is a :class:`~overlay.httpd.SmallServer`: a connection cap and per-connection deadlines.
    """

    def __init__(self, agent, listen: tuple[str, int], live: Callable[[], bool] = lambda: True, *,
                 metrics_listen: tuple[str, int] | None = None, control_socket: str | None = None,
                 limits: dict | None = None):
        self.agent = agent
        self.metrics = Metrics()
        self.live = live
        self._metrics_lock = threading.Lock()
        limits = limits or {}
        self.servers: dict[str, SmallServer] = {}
        try:
            self.servers["status"] = SmallServer(_listen_tcp(listen, "status_listen"), self._status, name="status",
                                                 **limits)
            if metrics_listen is not None:
                self.servers["metrics"] = SmallServer(_listen_tcp(metrics_listen, "metrics_listen"), self._metrics,
                                                      name="metrics", **limits)
        except BaseException:
            for srv in self.servers.values():
                srv.sock.close()
            raise
        self.control_socket: str | None = None
        if control_socket is not None:
            try:
                self.servers["control"] = SmallServer(control_listener(control_socket), self._control,
                                                      name="control", authorize=_root_only, **limits)
                self.control_socket = control_socket
            except OverlayError as exc:   # the daemon still serves; only actions are unavailable
                log.error("%s; `overlay guard release` cannot reach this daemon", exc)

    @property
    def address(self) -> tuple[str, int]:
        return self.servers["status"].sock.getsockname()[:2]

    def address_of(self, name: str):
        return self.servers[name].sock.getsockname()

    def start(self) -> None:
        for srv in self.servers.values():
            srv.start()

    def stop(self) -> None:
        for srv in self.servers.values():
            srv.stop()
        if self.control_socket is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.control_socket)

    # --- handlers -------------------------------------------------------------------------

    def _render_metrics(self) -> tuple[int, bytes, str]:
        with self._metrics_lock:
            return 200, self.metrics.render(self.agent.status()), CONTENT_TYPE_LATEST

    def _status(self, method: str, path: str, _body: bytes) -> tuple[int, bytes, str]:
        if method != "GET":
            return _json(405, {"error": f"{method} is not served here: actions go over the daemon's "
                                        "control socket (control_socket; `overlay guard release`)"})
        if path == "/healthz":
            ok = self.live()
            return (200 if ok else 503), (b"ok\n" if ok else b"stalled\n"), "text/plain"
        if path == "/readyz":
            ok = self.agent.ready
            return (200 if ok else 503), (b"ready\n" if ok else b"not ready\n"), "text/plain"
        if path == "/status":
            return _json(200, self.agent.status())
        if path == "/metrics":
            return self._render_metrics()
        return _json(404, {"error": f"no such path {path[:100]}"})

    def _metrics(self, method: str, path: str, _body: bytes) -> tuple[int, bytes, str]:
        if method == "GET" and path == "/metrics":
            return self._render_metrics()
        return _json(404, {"error": "only GET /metrics is served here"})

    def _control(self, method: str, path: str, _body: bytes) -> tuple[int, bytes, str]:
        if method != "POST":
            return _json(405, {"error": "actions are POSTed"})
        if path == "/guard/release":
            return _json(200, {"message": self.agent.request_release()})
        return _json(404, {"error": f"no such action {path[:100]}"})


def _json(code: int, obj) -> tuple[int, bytes, str]:
    return code, (json.dumps(obj, sort_keys=True) + "\n").encode(), "application/json"


def _listen_tcp(listen: tuple[str, int], key: str) -> socket.socket:
    try:
        return tcp_socket(*listen)
    except OSError as exc:
        raise OverlayError(f"cannot listen on {key} {listen[0]}:{listen[1]}: {exc.strerror or exc}") from None


def control_listener(path: str) -> socket.socket:
    """A unix socket at ``path``, 0600, in a directory that is 0700 and this user's (made if
    missing). A live socket there (another daemon's) is an error; a stale one is replaced."""
    try:
        return _control_listener(path)
    except OSError as exc:
        raise OverlayError(f"control_socket: cannot listen on {path}: {exc.strerror or exc}") from None


def _control_listener(path: str) -> socket.socket:
    directory = os.path.dirname(path) or "."
    if not os.path.lexists(directory):
        os.makedirs(directory, mode=0o700)
        os.chmod(directory, 0o700)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise OverlayError(f"control_socket: {directory} must be a directory of this user's with mode 0700 "
                           "(the daemon makes it when it is missing)")
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OverlayError(f"control_socket: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
            raise OverlayError(f"control_socket: another process serves {path} (a second daemon?)")
        except OSError:
            os.unlink(path)   # stale: nobody listens
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    return sock


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _root_only(conn: socket.socket) -> str | None:
    uid = peer_uid(conn)
    if uid in (0, os.geteuid()):
        return None
    return f"uid {uid} may not act on this daemon (root only)"


# --- client side ---------------------------------------------------------------------------


def _listen_from(listen: str | None, config: str | None) -> tuple[str, int]:
    if listen:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit():
            from overlay.errors import InvalidConfigError

            raise InvalidConfigError("--listen", f"expected host:port, got {listen!r}")
        return host, int(port)
    if config:
        from overlay.config import load_config

        return load_config(config).status_listen
    return DEFAULT_LISTEN


def _url(listen, config, path: str) -> str:
    host, port = _listen_from(listen, config)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port}{path}"


def fetch_status(listen: str | None = None, config: str | None = None, timeout: float = 5.0) -> dict:
    url = _url(listen, config, "/status")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise OverlayError(f"cannot reach the daemon's status endpoint at {url}: {reason} (is `overlay daemon` running?)") from None


DEFAULT_CONTROL_SOCKET = "/run/overlay/control.sock"


def post_action(action: str, socket_path: str | None = None, config: str | None = None,
                timeout: float = 5.0) -> dict:
    """POST ``/<action>`` to the daemon's control socket (``--socket``, else the config's
    ``control_socket``, else the default) and return its JSON answer."""
    if socket_path is None:
        if config:
            from overlay.config import load_config

            socket_path = load_config(config).control_socket
        else:
            socket_path = DEFAULT_CONTROL_SOCKET
    where = f"the daemon's control socket {socket_path}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(socket_path)
        sock.sendall(f"POST /{action} HTTP/1.1\r\nHost: overlay\r\nContent-Length: 0\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if len(data) > 1 << 20:
                break
    except PermissionError:
        raise OverlayError(f"cannot use {where}: permission denied (run as root)") from None
    except OSError as exc:
        raise OverlayError(f"cannot reach {where}: {exc.strerror or exc} (is `overlay daemon` running?)") from None
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    code = status_line.split(" ")[1] if status_line.count(" ") >= 1 else "?"
    if code != "200":
        raise OverlayError(f"{where}: {code} {body.decode(errors='replace').strip()[:300]}")
    try:
        return json.loads(body)
    except ValueError:
        raise OverlayError(f"{where}: not a JSON answer") from None


def format_status(s: dict) -> str:
    g = s.get("guard", {})
    lines = [
        f"node      {s.get('node_id')} ({s.get('network')})",
        f"overlay   {s.get('overlay')}   private {s.get('private')}   public {s.get('public')}",
        f"ready     {'yes' if s.get('ready') else 'NO'}   registry {s.get('registry', {}).get('backend')}"
        f" ({'connected' if s.get('registry', {}).get('connected') else 'DISCONNECTED'})"
        f"   datapath {s.get('datapath', {}).get('backend')}",
        f"guard     {'TRIPPED, holding ' + str(g.get('size')) if g.get('tripped') else 'ok'}"
        f" (threshold {g.get('threshold')})",
        f"rejected  {s.get('rejected', 0)} records   conflicts {s.get('conflicts', 0)}",
        f"drops     {', '.join(f'{k}={v}' for k, v in sorted(s.get('drops', {}).items())) or 'none'}",
        f"peers     {len(s.get('peers', []))}",
    ]
    pol = s.get("policy") or {}
    if pol.get("enforced"):
        lines.insert(-1, f"policy    default-deny (selected by {', '.join(pol.get('selected_by', []))})"
                         f"{'   AUDIT: would-be drops pass' if pol.get('mode') == 'audit' else ''}")
    fill = s.get("fill") or {}
    busy = [f"{k}={v['entries']}/{v['max_entries']}" for k, v in sorted(fill.items()) if v.get("entries")]
    if busy:
        lines.insert(-1, f"maps      {', '.join(busy)}")
    for p in s.get("peers", [])[:50]:
        lines.append(f"  {p['node_id']:<24} {p['overlay']:<16} -> {p['real']:<16} {p['network']}")
    if len(s.get("peers", [])) > 50:
        lines.append(f"  ... {len(s['peers']) - 50} more (use --json)")
    for e in s.get("excluded", []):
        lines.append(f"  excluded {e['node_id']}: {e['reason']}")
    for node_id, groups in sorted((s.get("ungranted") or {}).items()):
        lines.append(f"  not granted to {node_id}: {', '.join(groups)}")
    return "\n".join(lines)
