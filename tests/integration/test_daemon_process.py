"""The daemon as a real process: static registry, dry-run datapath, status endpoint over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.wait import free_port, wait_for

OVERLAY = [sys.executable, "-m", "overlay.cli"]


def peers(n: int) -> list[dict]:
    return [
        {"node_id": f"p{i}", "network": "ec2" if i % 2 else "vpc", "private": f"10.0.1.{i + 1}",
         "public": f"198.18.1.{i + 1}", "overlay": f"192.168.1.{i + 1}", "groups": ["web"]}
        for i in range(n)
    ]


def write_config(path: Path, port: int, n: int) -> None:
    path.write_text(yaml.safe_dump({
        "node_id": "self-1",
        "network": "ec2",
        "addresses": {"private": "10.0.0.1", "public": "198.18.0.1", "overlay": "192.168.0.1"},
        "registry": {"backend": "static", "peers": peers(n)},
        "datapath": {"backend": "dryrun"},
        "filter": {"reject_all": True, "open_ports": [80], "ssh_whitelist": ["198.18.0.0/15"]},
        "status_listen": f"127.0.0.1:{port}",
        "control_socket": str(path.parent / "run" / "control.sock"),
    }))


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def daemon(tmp_path):
    port = free_port()
    cfg = tmp_path / "overlay.yaml"
    write_config(cfg, port, 3)
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen([*OVERLAY, "daemon", "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc, port, cfg, tmp_path / "daemon.log"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        log.close()


def test_daemon_serves_status_reloads_on_hup_and_stops_on_term(daemon):
    proc, port, cfg, logfile = daemon
    wait_for(lambda: get(port, "/readyz")[0] == 200, 15.0, "the daemon ready", 0.1, ignore=(OSError,))
    assert get(port, "/healthz")[0] == 200
    status = json.loads(get(port, "/status")[1])
    for key in ("node_id", "overlay", "ready", "peers", "drops", "rejected", "guard"):
        assert key in status
    assert status["node_id"] == "self-1" and status["overlay"] == "192.168.0.1" and status["ready"]
    assert {p["node_id"] for p in status["peers"]} == {"p0", "p1", "p2"}
    by_id = {p["node_id"]: p for p in status["peers"]}
    assert by_id["p1"]["real"] == "10.0.1.2"      # same network: private
    assert by_id["p0"]["real"] == "198.18.1.1"    # other network: public
    assert set(status["guard"]) >= {"tripped", "threshold", "held"}

    metrics = get(port, "/metrics")[1].decode()
    assert "overlay_peers 3.0" in metrics and "overlay_ready 1.0" in metrics

    # overlay status (the CLI) reads the same endpoint
    out = subprocess.run([*OVERLAY, "status", "--json", "--listen", f"127.0.0.1:{port}"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["node_id"] == "self-1"

    write_config(cfg, port, 5)
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(json.loads(get(port, "/status")[1])["peers"]) == 5, 15.0, "5 peers", 0.1, ignore=(OSError,))

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert "Traceback" not in logfile.read_text()


def test_dry_run_prints_the_ops_and_exits(tmp_path):
    cfg = tmp_path / "overlay.yaml"
    write_config(cfg, free_port(), 2)
    out = subprocess.run([*OVERLAY, "daemon", "-c", str(cfg), "--dry-run"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "put nat 192.168.1.1 -> 198.18.1.1" in lines
    assert "put nat 192.168.1.2 -> 10.0.1.2" in lines
    assert "put config reject_all -> 1" in lines
    assert lines[-1].startswith("# ") and "2 peers" in lines[-1]


def test_status_without_a_daemon_is_one_clear_line(tmp_path):
    out = subprocess.run([*OVERLAY, "status", "--listen", f"127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 1
    assert "cannot reach" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists(), reason="needs root to drop to nobody")
def test_ebpf_daemon_refuses_without_root(tmp_path):
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="overlay-nonroot-"))
    try:
        d.chmod(0o755)
        cfg = d / "overlay.yaml"
        write_config(cfg, free_port(), 1)
        data = yaml.safe_load(cfg.read_text())
        data["datapath"] = {"backend": "ebpf", "interface": "lo"}
        cfg.write_text(yaml.safe_dump(data))
        cfg.chmod(0o644)
        out = subprocess.run(
            ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *OVERLAY,
             "daemon", "-c", str(cfg)],
            capture_output=True, text=True, timeout=30, cwd="/",
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        assert out.returncode == 1, out.stderr
        assert "needs root" in out.stderr and "Traceback" not in out.stderr
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


def test_daemon_refuses_a_missing_interface(tmp_path):
    cfg = tmp_path / "overlay.yaml"
    write_config(cfg, free_port(), 1)
    data = yaml.safe_load(cfg.read_text())
    data["datapath"] = {"backend": "ebpf", "interface": "nosuchif0"}
    cfg.write_text(yaml.safe_dump(data))
    out = subprocess.run([*OVERLAY, "daemon", "-c", str(cfg)], capture_output=True, text=True, timeout=30)
    assert out.returncode in (1, 2)
    assert "nosuchif0" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="the bcc check comes after the root check")
def test_ebpf_daemon_refuses_without_bcc(tmp_path):
    cfg = tmp_path / "overlay.yaml"
    write_config(cfg, free_port(), 1)
    data = yaml.safe_load(cfg.read_text())
    data["datapath"] = {"backend": "ebpf", "interface": "lo"}
    cfg.write_text(yaml.safe_dump(data))
    # a Python on which `import bcc` fails, as on a host without python3-bpfcc
    code = "import sys; sys.modules['bcc'] = None; from overlay.cli import main; sys.exit(main())"
    out = subprocess.run([sys.executable, "-c", code, "daemon", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out.stderr
    assert "needs bcc" in out.stderr and "python3-bpfcc" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
