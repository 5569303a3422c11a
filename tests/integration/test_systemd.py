"""Shipping to a host: the packaged systemd units, ``overlay install-unit``, and sd_notify.

The units are rendered for this checkout's virtualenv by the real ``overlay
install-unit --root`` and checked by ``systemd-analyze verify`` (which needs the
ExecStart binary to exist: it is .venv/bin/overlay); none is started. Readiness is
checked against the real daemon and controller processes, each given a
``NOTIFY_SOCKET`` that the test listens on, as systemd would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from overlay import sdnotify
from tests.support import grpc as gs
from tests.support.wait import free_port

REPO = Path(__file__).resolve().parents[2]
OVERLAY_BIN = Path(sys.executable).parent / "overlay"
UNITS = ("overlay.service", "overlay-controller.service")


def overlay(*argv: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(OVERLAY_BIN), *argv], capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture
def installed(tmp_path) -> Path:
    assert OVERLAY_BIN.exists(), f"{OVERLAY_BIN} is missing (make setup)"
    res = overlay("install-unit", "--root", str(tmp_path))
    assert res.returncode == 0, res.stderr
    return tmp_path


def test_install_unit_renders_the_units_for_this_installation(installed):
    for unit in UNITS:
        text = (installed / "etc/systemd/system" / unit).read_text()
        exec_lines = [ln for ln in text.splitlines() if ln.startswith(("ExecStart=", "ExecStartPre="))]
        assert len(exec_lines) == 2
        assert all(ln.split("=", 1)[1].startswith(f"{OVERLAY_BIN} ") for ln in exec_lines)
    daemon = dict(ln.split("=", 1) for ln in (installed / "etc/systemd/system/overlay.service").read_text().splitlines()
                  if "=" in ln and not ln.startswith("#"))
    assert daemon["Type"] == "notify" and daemon["Restart"] == "on-failure"
    assert daemon["StateDirectory"] == "overlay"
    assert daemon["ExecStartPre"].endswith(" check-config /etc/overlay/overlay.yaml")
    assert set(daemon["CapabilityBoundingSet"].split()) == {"CAP_BPF", "CAP_NET_ADMIN", "CAP_NET_RAW"}
    sample = installed / "etc/overlay/overlay.yaml"
    assert stat.S_IMODE(sample.stat().st_mode) == 0o600  # it may hold ZooKeeper credentials


def test_systemd_analyze_verify_passes_on_both_units(installed):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: scripts/setup.sh installs Debian's systemd package"
    for unit in UNITS:
        path = installed / "etc/systemd/system" / unit
        res = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        # verify only warns about unknown keys or bad values: none may name our unit
        mentions = [ln for ln in (res.stdout + res.stderr).splitlines() if unit in ln]
        assert mentions == [], mentions


def test_systemd_analyze_verify_catches_a_bad_unit(installed):
    """The check above can fail: a unit with a missing binary and an unknown key is refused."""
    path = installed / "etc/systemd/system/overlay.service"
    bad = path.read_text().replace(f"ExecStart={OVERLAY_BIN} ", "ExecStart=/nonexistent/overlay ")
    bad += "\n[Service]\nRestartt=always\n"
    path.write_text(bad)
    res = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "/nonexistent/overlay" in out
    assert "Restartt" in out


def test_install_unit_never_overwrites_a_config(installed):
    cfg = installed / "etc/overlay/overlay.yaml"
    cfg.write_text("network: mine\n")
    res = overlay("install-unit", "--root", str(installed))
    assert res.returncode == 0, res.stderr
    assert cfg.read_text() == "network: mine\n"
    assert f"kept {cfg}" in res.stdout


def test_install_unit_reports_an_unwritable_target(tmp_path):
    blocker = tmp_path / "etc"
    blocker.write_text("a file where a directory should be\n")
    res = overlay("install-unit", "--root", str(tmp_path))
    assert res.returncode == 1
    assert "cannot write" in res.stderr and "Traceback" not in res.stderr


def test_the_sample_config_needs_a_network_then_passes(installed):
    sample = installed / "etc/overlay/overlay.yaml"
    res = overlay("check-config", str(sample))
    assert res.returncode == 2
    assert res.stderr.startswith("overlay: invalid config: network: is required")
    sample.write_text(sample.read_text().replace("# network: dc1", "network: dc1", 1))
    res = overlay("check-config", str(sample))
    assert res.returncode == 0, res.stderr
    assert "network dc1" in res.stdout


# --- sd_notify ----------------------------------------------------------------------------


class NotifySocket:
    """A unix datagram socket standing in for systemd's notification socket."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address if not address.startswith("@") else "\0" + address[1:])
        self.env = address
        self.messages: list[str] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if m.startswith(prefix):
                    return m
            time.sleep(0.05)
        pytest.fail(f"no {prefix!r} notification in {timeout} s; got {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


def test_notify_is_silent_without_systemd(monkeypatch):
    monkeypatch.delenv(sdnotify.ENV, raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv(sdnotify.ENV, "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False  # not a unix socket: not sent, not raised


def test_daemon_notifies_ready_and_stopping(tmp_path):
    port = free_port()
    cfg = tmp_path / "overlay.yaml"
    cfg.write_text(yaml.safe_dump({
        "node_id": "notify-1", "network": "ec2",
        "addresses": {"private": "10.0.0.1", "public": "198.18.0.1", "overlay": "192.168.0.1"},
        "registry": {"backend": "static", "peers": []},
        "datapath": {"backend": "dryrun"},
        "status_listen": f"127.0.0.1:{port}",
        "control_socket": str(tmp_path / "run" / "control.sock"),
    }))
    ns = NotifySocket(str(tmp_path / "notify.sock"))
    proc = subprocess.Popen([str(OVERLAY_BIN), "daemon", "-c", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, sdnotify.ENV: ns.env})
    try:
        ready = ns.wait_for("READY=1", timeout=30)
        assert "STATUS=in sync with the registry" in ready.splitlines()
        # READY=1 only after the first apply: /readyz agrees at that moment
        res = overlay("status", "--json", "--listen", f"127.0.0.1:{port}")
        assert res.returncode == 0 and json.loads(res.stdout)["ready"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        ns.wait_for("STOPPING=1", timeout=5)
        assert [m.split("\n")[0] for m in ns.messages] == ["READY=1", "STOPPING=1"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        ns.close()


class _NeverReady:
    ready = False


def test_daemon_announces_readiness_when_the_registry_stays_silent(tmp_path, monkeypatch):
    """Fail static: READY=1 after the grace period anyway, saying why (a real socket)."""
    from overlay.daemon import _announce_ready

    ns = NotifySocket(str(tmp_path / "notify.sock"))
    monkeypatch.setenv(sdnotify.ENV, ns.env)
    try:
        t0 = time.monotonic()
        _announce_ready(_NeverReady(), threading.Event(), 0.3)
        assert time.monotonic() - t0 >= 0.3
        msg = ns.wait_for("READY=1", timeout=5)
        assert "STATUS=the registry did not answer within 0.3 s: serving the last applied state" in msg
    finally:
        ns.close()


@pytest.mark.zk
def test_controller_notifies_ready_on_an_abstract_socket(zk_server, zk_prefix, tmp_path):
    base = gs.tmpdir()
    ns = NotifySocket(f"@overlay-test-{os.getpid()}-{time.monotonic_ns()}")
    proc = None
    try:
        certs, _ = gs.make_certs(base)
        port = free_port()
        cfg = tmp_path / "controller.yaml"
        cfg.write_text(yaml.safe_dump({
            "node_id": "ctl-1",
            "registry": {"backend": "zookeeper", "hosts": [zk_server.address], "prefix": zk_prefix},
            "controller": {"listen": f"127.0.0.1:{port}", "tls": {
                "ca": f"{certs}/ca.crt", "cert": f"{certs}/controller.crt", "key": f"{certs}/controller.key"}},
        }))
        proc = subprocess.Popen([str(OVERLAY_BIN), "--log-format", "json", "controller", "-c", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, sdnotify.ENV: ns.env})
        msg = ns.wait_for("READY=1", timeout=60)
        assert f"STATUS=serving on 127.0.0.1:{port}" in msg
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it listens when it says so
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        ns.wait_for("STOPPING=1", timeout=5)
        logs = [json.loads(line) for line in proc.stderr.read().splitlines()]
        assert logs and all(rec["node_id"] == "ctl-1" for rec in logs)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        ns.close()
        shutil.rmtree(base, ignore_errors=True)
