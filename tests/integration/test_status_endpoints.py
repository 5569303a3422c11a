"""The daemon's local endpoints, against a real `overlay daemon` process (issue 13, acceptance 4).

A daemon with the static registry and the dry-run datapath (no root needed for the daemon
itself; the tests that switch users need root), its status listener, a metrics-only
listener and its control socket, all on loopback or in the test's temporary directory:

- actions are refused over TCP and accepted over the unix socket from root; another user
  is refused by the file's mode, and by SO_PEERCRED when the mode would let it in;
- a slowloris (many connections sending headers a byte at a time) holds at most the
  connection cap, the rest are turned away, and every held slot is freed within the header
  timeout (measured, printed; only a generous safety bound is asserted);
- the metrics-only listener serves /metrics and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import yaml

from overlay.httpd import HEADER_TIMEOUT_S, MAX_CONNS
from tests.support.paths import PYTHON, REPO
from tests.support.wait import free_port, stop_process, wait_for

OVERLAY = [PYTHON, "-m", "overlay.cli"]
SLOW_CLIENTS = 100


@pytest.fixture
def daemon(tmp_path):
    status, metrics = free_port(), free_port()
    base = tempfile.mkdtemp(prefix="overlay-ctl-")   # traversable by other users (pytest's tmp is 0700)
    os.chmod(base, 0o711)
    run = os.path.join(base, "run")
    sock = os.path.join(run, "control.sock")
    cfg = tmp_path / "overlay.yaml"
    cfg.write_text(yaml.safe_dump({
        "node_id": "self-1", "network": "ec2", "overlay_subnet": "192.168.0.0/24",
        "addresses": {"private": "10.9.0.1", "public": "198.19.0.1", "overlay": "192.168.0.1"},
        "registry": {"backend": "static", "peers": [
            {"node_id": "peer-1", "network": "ec2", "private": "10.9.0.2", "public": "198.19.0.2",
             "overlay": "192.168.0.2"}]},
        "datapath": {"backend": "dryrun"},
        "status_listen": f"127.0.0.1:{status}",
        "metrics_listen": f"127.0.0.1:{metrics}",
        "control_socket": str(sock),
    }))
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen([*OVERLAY, "daemon", "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_for(lambda: _get(status, "/readyz")[0] == 200, timeout=30, what="the daemon ready",
                 ignore=(OSError,))
        yield {"status": status, "metrics": metrics, "socket": str(sock), "run": str(run), "config": str(cfg)}
    finally:
        stop_process(proc, 15)
        log.close()
        gone = not os.path.exists(sock)
        shutil.rmtree(base, ignore_errors=True)
    assert gone, "the control socket is removed on exit"


def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"" if method == "POST" else None,
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _overlay(*args: str, user: str | None = None) -> subprocess.CompletedProcess:
    prefix = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if user else []
    return subprocess.run([*prefix, *OVERLAY, *args], capture_output=True, text=True, timeout=30, cwd=REPO)


def test_actions_only_over_the_control_socket(daemon):
    # TCP: read-only, whatever the path
    for path in ("/guard/release", "/status", "/anything"):
        code, body = _get(daemon["status"], path, method="POST")
        assert code == 405 and b"control socket" in body, (path, code, body)
    # the unix socket: 0600 in a 0700 directory; root is served
    assert os.stat(daemon["socket"]).st_mode & 0o777 == 0o600
    assert os.stat(daemon["run"]).st_mode & 0o777 == 0o700
    res = _overlay("guard", "release", "--socket", daemon["socket"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "the churn guard is not holding anything"     # the agent answered
    res = _overlay("guard", "release", "-c", daemon["config"])          # the path from the config
    assert res.returncode == 0, res.stderr


def test_another_user_is_refused(daemon):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to act as another user")
    res = _overlay("guard", "release", "--socket", daemon["socket"], user="nobody")
    assert res.returncode == 1 and "permission denied" in res.stderr, res.stderr     # the file mode
    # with the modes opened up, the daemon still checks who is calling (SO_PEERCRED)
    os.chmod(daemon["run"], 0o755)
    os.chmod(daemon["socket"], 0o666)
    res = _overlay("guard", "release", "--socket", daemon["socket"], user="nobody")
    assert res.returncode == 1 and "403" in res.stderr and "uid 65534" in res.stderr, res.stderr
    assert _overlay("guard", "release", "--socket", daemon["socket"]).returncode == 0   # root still is


def test_metrics_listener_serves_metrics_alone(daemon):
    code, body = _get(daemon["metrics"], "/metrics")
    assert code == 200 and b"overlay_ready 1.0" in body and b"overlay_conflicts" in body
    for path in ("/status", "/healthz", "/readyz", "/guard/release"):
        assert _get(daemon["metrics"], path)[0] == 404, path
    assert _get(daemon["metrics"], "/metrics", method="POST")[0] == 404
    # the full status stays on status_listen
    code, body = _get(daemon["status"], "/status")
    assert code == 200 and json.loads(body)["node_id"] == "self-1"


def test_slowloris_holds_at_most_the_cap_and_is_freed(daemon):
    port = daemon["status"]
    conns: list[socket.socket] = []
    t0 = time.monotonic()
    try:
        for _ in range(SLOW_CLIENTS):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")        # never finishes its headers
            conns.append(c)
        # the ones past the cap are answered 503 and closed at once; the others are held
        time.sleep(0.5)
        held, busy = [], 0
        for c in conns:
            c.setblocking(False)
            try:
                data = c.recv(4096)
            except BlockingIOError:
                held.append(c)
                continue
            assert data.startswith(b"HTTP/1.1 503"), data[:80]
            busy += 1
        print(f"{SLOW_CLIENTS} slow clients: {len(held)} held (cap {MAX_CONNS}), {busy} turned away")
        assert len(held) <= MAX_CONNS and busy == SLOW_CLIENTS - len(held)
        assert len(held) == MAX_CONNS            # the cap is used, not undercut
        # a byte every 0.5 s does not extend the deadline: every held slot is freed
        freed_at: dict[int, float] = {}
        deadline = t0 + HEADER_TIMEOUT_S + 20    # safety bound only
        while len(freed_at) < len(held) and time.monotonic() < deadline:
            for i, c in enumerate(held):
                if i in freed_at:
                    continue
                try:
                    c.send(b"X")
                    data = c.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                freed_at[i] = time.monotonic() - t0
                assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:80]
            time.sleep(0.5)
        assert len(freed_at) == len(held), "a slow client kept its slot"
        print(f"held slots freed {min(freed_at.values()):.2f}-{max(freed_at.values()):.2f} s after the first "
              f"connection (header timeout {HEADER_TIMEOUT_S:g} s)")
        # and the endpoint serves again
        assert _get(port, "/healthz")[0] == 200
    finally:
        for c in conns:
            c.close()
