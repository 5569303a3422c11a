"""The status endpoint (DESIGN §4.1): /healthz, /readyz, /status, /metrics.

Served by the daemon on ``status_listen`` (loopback by default). ``POST
/guard/release`` is the operator's way to let a held change through; it is
accepted only from loopback clients. The client half (``fetch_status``,
``post_action``) is what ``overlay status`` and ``overlay guard release`` use.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from overlay.errors import OverlayError

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
    def __init__(self, agent, listen: tuple[str, int], live: callable = lambda: True):
        self.agent = agent
        self.metrics = Metrics()
        self.live = live
        handler = self._handler()
        try:
            self.httpd = ThreadingHTTPServer(listen, handler)
        except OSError as exc:
            raise OverlayError(f"cannot listen on status_listen {listen[0]}:{listen[1]}: {exc.strerror}") from None
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="status", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # quiet; debug only
                log.debug("status %s - %s", self.address_string(), fmt % args)

            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, code: int, obj) -> None:
                self._send(code, (json.dumps(obj, sort_keys=True) + "\n").encode())

            def do_GET(self):  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    ok = server.live()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"stalled\n", "text/plain")
                elif path == "/readyz":
                    ok = server.agent.ready
                    self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n", "text/plain")
                elif path == "/status":
                    self._json(200, server.agent.status())
                elif path == "/metrics":
                    self._send(200, server.metrics.render(server.agent.status()), CONTENT_TYPE_LATEST)
                else:
                    self._json(404, {"error": f"no such path {path}"})

            def do_POST(self):  # noqa: N802
                if not ipaddress.ip_address(self.client_address[0]).is_loopback:
                    self._json(403, {"error": "actions are accepted from loopback only"})
                    return
                if self.path == "/guard/release":
                    self._json(200, {"message": server.agent.request_release()})
                else:
                    self._json(404, {"error": f"no such action {self.path}"})

        return Handler


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


def post_action(action: str, listen: str | None = None, config: str | None = None, timeout: float = 5.0) -> dict:
    url = _url(listen, config, f"/{action}")
    req = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise OverlayError(f"{url}: {exc.code} {exc.read().decode(errors='replace').strip()}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise OverlayError(f"cannot reach the daemon at {url}: {getattr(exc, 'reason', exc)}") from None


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
        f"rejected  {s.get('rejected', 0)} records",
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
    return "\n".join(lines)
