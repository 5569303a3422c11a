"""The daemon against a real ZooKeeper: fail-static outages and the live churn guard.

The daemon runs as a process with the ZooKeeper registry and the dry-run
datapath, so what it applied is visible in /status (peers, ops_total) without
a kernel; the eBPF datapath under the same agent is covered by the lab test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

from tests.support.wait import free_port, wait_for

pytestmark = pytest.mark.zk
OVERLAY = [sys.executable, "-m", "overlay.cli"]
SUBNET = "192.168.0.0/18"


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def status(port: int) -> dict:
    return json.loads(get(port, "/status")[1])


def record(i: int) -> bytes:
    return json.dumps({"v": 1, "node_id": f"p{i}", "network": "ec2", "private": f"10.0.{i // 200}.{i % 200 + 1}",
                       "public": f"198.18.{i // 200}.{i % 200 + 1}", "overlay": f"192.168.{i // 200 + 1}.{i % 200 + 1}",
                       "groups": [], "open_ports": []}).encode()


def claim_and_register(client, prefix: str, i: int) -> None:
    ip = f"192.168.{i // 200 + 1}.{i % 200 + 1}"
    tx = client.transaction()
    tx.create(f"{prefix}/alloc/id-to-ip/p{i}", ip.encode())
    tx.create(f"{prefix}/alloc/ip-to-id/{ip}", f"p{i}".encode())
    tx.create(f"{prefix}/nodes/p{i}", record(i), ephemeral=True)
    res = tx.commit()
    assert not any(isinstance(r, Exception) for r in res), res


@pytest.fixture
def zk_daemon(zk_server, zk_prefix, zk_client, tmp_path):
    for path in ("alloc/id-to-ip", "alloc/ip-to-id", "nodes", "config"):
        zk_client.ensure_path(f"{zk_prefix}/{path}")
    for i in range(30):
        claim_and_register(zk_client, zk_prefix, i)
    port = free_port()
    cfg = tmp_path / "overlay.yaml"
    cfg.write_text(yaml.safe_dump({
        "node_id": "self-1", "network": "ec2", "overlay_subnet": SUBNET,
        "addresses": {"private": "10.9.0.1", "public": "198.19.0.1"},
        "registry": {"backend": "zookeeper", "hosts": [zk_server.address], "prefix": zk_prefix, "timeout_s": 6},
        "datapath": {"backend": "dryrun"},
        "guard": {"max_change": 20},
        "status_listen": f"127.0.0.1:{port}",
        "state_dir": str(tmp_path / "state"),
        "control_socket": str(tmp_path / "run" / "control.sock"),
    }))
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen([*OVERLAY, "daemon", "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _ready_with(port, 30), timeout=30, what="daemon ready with 30 peers")
        yield proc, port, zk_prefix
    finally:
        zk_server.resume()
        if not zk_server.running():
            zk_server.start(timeout=60)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        text = (tmp_path / "daemon.log").read_text()
        assert "Traceback" not in text, text[-3000:]


def _ready_with(port: int, n: int) -> bool:
    try:
        s = status(port)
    except OSError:
        return False
    return s["ready"] and len(s["peers"]) == n


def test_own_record_and_allocation_are_published(zk_daemon, zk_client):
    proc, port, prefix = zk_daemon
    s = status(port)
    data, _ = zk_client.get(f"{prefix}/nodes/self-1")
    rec = json.loads(data)
    assert rec["overlay"] == s["overlay"] and rec["private"] == "10.9.0.1"
    assert zk_client.get(f"{prefix}/alloc/ip-to-id/{s['overlay']}")[0] == b"self-1"


def test_sigterm_leaves_the_record_and_deregister_removes_it(zk_daemon, zk_client, tmp_path):
    """A stopping daemon keeps its registration (its session is left for the next start,
    saved in state_dir); `overlay deregister` removes it for good."""
    import signal

    proc, port, prefix = zk_daemon
    path = f"{prefix}/nodes/self-1"
    owner = zk_client.exists(path).ephemeralOwner
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    time.sleep(1.0)
    assert zk_client.exists(path).ephemeralOwner == owner          # still there, same session
    assert (tmp_path / "state" / "zk-session-self-1.json").exists()
    res = subprocess.run([*OVERLAY, "deregister", "-c", str(tmp_path / "overlay.yaml")], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and "deregistered self-1" in res.stdout, res.stderr
    assert zk_client.exists(path) is None
    res = subprocess.run([*OVERLAY, "deregister", "-c", str(tmp_path / "overlay.yaml")], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 1 and "not registered" in res.stderr and "Traceback" not in res.stderr


def _hold_still(port: int, seconds: float, before: dict) -> None:
    """For ``seconds``: live, not ready, and nothing applied or removed."""
    deadline = time.monotonic() + seconds
    saw_not_ready = False
    while time.monotonic() < deadline:
        assert get(port, "/healthz")[0] == 200
        code = get(port, "/readyz")[0]
        saw_not_ready |= code == 503
        s = status(port)
        assert s["peers"] == before["peers"], "the datapath changed while the registry was away"
        assert s["ops_total"] == before["ops_total"]
        time.sleep(1.0)
    assert saw_not_ready, "/readyz never reported not-ready during the outage"


def test_suspended_30s_then_stopped_60s_removes_nothing(zk_daemon, zk_server):
    proc, port, prefix = zk_daemon
    before = status(port)

    zk_server.pause()  # SIGSTOP: the client goes SUSPENDED
    _hold_still(port, 30, before)
    zk_server.resume()
    wait_for(lambda: get(port, "/readyz")[0] == 200, timeout=30, what="ready after resume")

    zk_server.stop()  # the server is gone for 60 s
    _hold_still(port, 60, before)
    zk_server.start(timeout=60)
    wait_for(lambda: get(port, "/readyz")[0] == 200, timeout=60, what="ready after restart")
    # in sync: a change made now (by a fresh client) is applied
    from kazoo.client import KazooClient

    fresh = KazooClient(hosts=zk_server.address, timeout=10)
    fresh.start(timeout=30)
    try:
        claim_and_register(fresh, prefix, 77)  # ephemeral: lives as long as this session
        wait_for(lambda: any(p["node_id"] == "p77" for p in status(port)["peers"]), timeout=30, what="p77 applied")
    finally:
        fresh.stop()
        fresh.close()
    assert proc.poll() is None


def test_live_threshold_holds_and_releases_a_mass_removal(zk_daemon, zk_client):
    proc, port, prefix = zk_daemon
    for i in range(25):
        zk_client.delete(f"{prefix}/nodes/p{i}")
    wait_for(lambda: status(port)["guard"]["tripped"], timeout=20, what="guard tripped")
    s = status(port)
    assert len(s["peers"]) == 30 and s["guard"]["size"] == 25
    metrics = get(port, "/metrics")[1].decode()
    assert "overlay_guard_tripped 1.0" in metrics
    zk_client.set(f"{prefix}/config/max_change", b"30") if zk_client.exists(f"{prefix}/config/max_change") \
        else zk_client.create(f"{prefix}/config/max_change", b"30")
    wait_for(lambda: not status(port)["guard"]["tripped"], timeout=20, what="guard released by the threshold")
    assert len(status(port)["peers"]) == 5


def test_guard_release_command(zk_daemon, zk_client):
    proc, port, prefix = zk_daemon
    for i in range(22):
        zk_client.delete(f"{prefix}/nodes/p{i}")
    wait_for(lambda: status(port)["guard"]["tripped"], timeout=20, what="guard tripped")
    # not over the TCP status listener: it serves reads only
    req = urllib.request.Request(f"http://127.0.0.1:{port}/guard/release", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=3)
    assert info.value.code == 405 and b"control socket" in info.value.read()
    assert status(port)["guard"]["tripped"]
    # over the control socket (its path from the daemon's config), as root
    out = subprocess.run([*OVERLAY, "guard", "release", "-c", proc.args[-1]], capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 0, out.stderr
    assert "22" in out.stdout
    wait_for(lambda: len(status(port)["peers"]) == 8, timeout=20, what="held removals applied")
    assert not status(port)["guard"]["tripped"]


def test_daemon_without_network_takes_the_vpc_id_from_imds(zk_server, zk_prefix, zk_client, tmp_path):
    """A config with no network and aws-imds discovery (a local fake IMDS): the daemon takes
    the VPC id as its network, so the dry run reaches the peer in the same VPC at its
    private address and the other at its public one."""
    from overlay.discovery import aws_imds
    from tests.support.imds import FakeIMDS

    for path in ("alloc/id-to-ip", "alloc/ip-to-id", "nodes"):
        zk_client.ensure_path(f"{zk_prefix}/{path}")
    peers = {"same": ("vpc-0a1b2c3d", "10.0.0.12", "198.18.1.12", "192.168.0.12"),
             "other": ("ec2", "10.0.0.13", "198.18.2.13", "192.168.0.13")}
    for node_id, (network, private, public, overlay) in peers.items():
        tx = zk_client.transaction()
        tx.create(f"{zk_prefix}/alloc/id-to-ip/{node_id}", overlay.encode())
        tx.create(f"{zk_prefix}/alloc/ip-to-id/{overlay}", node_id.encode())
        tx.create(f"{zk_prefix}/nodes/{node_id}", json.dumps({
            "v": 1, "node_id": node_id, "network": network, "private": private, "public": public,
            "overlay": overlay, "groups": [], "open_ports": []}).encode(), ephemeral=True)
        assert not any(isinstance(r, Exception) for r in tx.commit())
    mac = "0e:49:61:0f:c3:99"
    meta = {
        aws_imds.LOCAL_IPV4: "10.0.0.11", aws_imds.PUBLIC_IPV4: "198.18.1.11", aws_imds.MAC: mac,
        f"/latest/meta-data/network/interfaces/macs/{mac}/vpc-id": "vpc-0a1b2c3d",
    }
    with FakeIMDS(meta) as fake:
        cfg = tmp_path / "overlay.yaml"
        cfg.write_text(yaml.safe_dump({
            "node_id": "web-1", "overlay_subnet": SUBNET,
            "discovery": {"provider": "aws-imds", "endpoint": fake.endpoint},
            "registry": {"backend": "zookeeper", "hosts": [zk_server.address], "prefix": zk_prefix, "timeout_s": 6},
            "datapath": {"backend": "dryrun"},
        }))
        res = subprocess.run([*OVERLAY, "daemon", "-c", str(cfg), "--dry-run"], capture_output=True, text=True,
                             timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "put nat 192.168.0.12 -> 10.0.0.12" in lines      # same VPC: private
    assert "put nat 192.168.0.13 -> 198.18.2.13" in lines    # ec2: public
    assert "network vpc-0a1b2c3d" in res.stderr
