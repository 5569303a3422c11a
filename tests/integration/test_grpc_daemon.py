"""``registry.backend: grpc``: the daemon's registry over the controller (real sockets, real ZooKeeper).

The backend follows Watch into a RegistryView like the ZooKeeper backend's, holds the
last view while the controller is away (fail static), resumes from its revision when
it is back, and registers again. The second test runs the real processes: the
controller and a daemon from the CLI, and the operator commands.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest
import yaml

from overlay.config import RegistryConfig, TlsConfig
from overlay.model import Endpoint, Policy
from overlay.registry import Registry
from overlay.registry.grpc import GrpcRegistry
from tests.support import grpc as gs
from tests.support.paths import PYTHON
from tests.support.wait import free_port, port_open, wait_for

pytestmark = pytest.mark.zk
SUBNET = "192.168.0.0/24"


@pytest.fixture(scope="module")
def certs():
    base = gs.tmpdir()
    try:
        yield gs.make_certs(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _backend(address: str | tuple[str, ...], certs_dir: str, node_id: str = "web-1", timeout_s: float = 5,
             **kw) -> GrpcRegistry:
    import ipaddress

    targets = (address,) if isinstance(address, str) else address
    cfg = RegistryConfig(backend="grpc", controller=targets, timeout_s=timeout_s,
                         tls=TlsConfig(f"{certs_dir}/ca.crt", f"{certs_dir}/{node_id}.crt", f"{certs_dir}/{node_id}.key"))
    return GrpcRegistry(cfg, ipaddress.IPv4Network(SUBNET), node_id, backoff=(0.05, 0.5),
                        options=gs.FAST_CLIENT_OPTIONS, **kw)


def test_backend_follows_holds_and_resumes(zk_server, zk_prefix, certs, zk_client):
    port = free_port()
    cfg = gs.controller_config(zk_server.address, zk_prefix, certs[0], subnet=SUBNET, listen=f"127.0.0.1:{port}")
    with gs.controllers() as start:
        ctl = start(cfg)
        with gs.client(ctl.address, certs[0]) as op:     # the groups the nodes claim are granted
            op.set_node_groups("web-1", ["web"])
            op.set_node_groups("web-2", ["web"])
        reg = _backend(ctl.address, certs[0])
        assert isinstance(reg, Registry)
        calls: list[int] = []
        reg.start(lambda: calls.append(1))
        try:
            ip = reg.allocate("web-1")
            assert reg.allocate("web-1") == ip
            me = gs.node("web-1", ip)
            reg.register(me)
            with gs.client(ctl.address, certs[0]) as op:
                web2 = gs.node("web-2", op.allocate("web-2"), network="vpc", index=2)
                op.register(web2)
                pol = Policy(Endpoint(group="web"), Endpoint(group="web"), "tcp", ((80, 80),), "p")
                op.put_policy(pol)
                op.put_group("web", "web servers")
                assert op.get_node("web-1") == me
            zk_client.create(f"{zk_prefix}/config/max_change", b"7")
            zk_client.create(f"{zk_prefix}/nodes/bad", b"junk")

            def settled():
                v = reg.view()
                return v if (v.connected and v.synced and "web-2" in v.nodes and v.max_change == 7
                             and "bad" in v.rejected and "p" in v.policies) else None

            v = wait_for(settled, what="the view")
            assert v.nodes == {"web-2": web2}  # not its own record
            assert v.policies["p"] == pol and reg.groups == {"web": "web servers"}
            assert "not JSON" in v.rejected["bad"]
            assert calls and reg.snapshots == 1
            rev_before = v.revision

            # the controller goes away: fail static, the view keeps every record
            ctl.stop()
            v = wait_for(lambda: (lambda x: x if not x.connected else None)(reg.view()), what="disconnection")
            assert v.nodes == {"web-2": web2} and v.max_change == 7 and not v.synced
            assert v.revision > rev_before
            zk_client.set(f"{zk_prefix}/config/max_change", b"9")
            time.sleep(1.0)   # reconnection attempts back off meanwhile
            assert reg.view().nodes == {"web-2": web2}

            # back on the same address: resumed from its revision (no snapshot), registered again
            ctl2 = start(cfg)
            wait_for(lambda: reg.view().connected and reg.view().max_change == 9, timeout=15,
                        what="reconnection")
            assert reg.snapshots == 1 and reg.resets == 0
            with gs.client(ctl2.address, certs[0]) as op:
                wait_for(lambda: sorted(n.node_id for n in op.list_nodes()[0]) == ["web-1", "web-2"], timeout=10,
                         what="re-registration")
                # web-2 (an operator's registration) and web-1 (leased) outlived the controller
                assert reg.view().nodes == {"web-2": web2}
                assert reg.status_extra()["controller"] == ctl2.address
        finally:
            reg.close()
        with gs.client(ctl2.address, certs[0]) as op:
            # a closing registry (a daemon stopping or restarting) leaves its record to its lease
            time.sleep(1.0)
            assert sorted(n.node_id for n in op.list_nodes()[0]) == ["web-1", "web-2"]


def test_backend_fails_over_between_replicas_and_resumes(zk_server, zk_prefix, certs, zk_client):
    """registry.controller lists two replicas: when the one in use goes, the backend moves to
    the other at once, resumes its Watch from its revision (no snapshot), registers there, and
    its record is never removed; with both gone it fails static; one back: it converges."""
    with gs.controllers() as start:
        cfg = gs.controller_config(zk_server.address, zk_prefix, certs[0], subnet=SUBNET, lease_s=3.0)
        a = start(cfg, replica="replica-a")
        b = start(cfg, replica="replica-b")
        reg = _backend((a.address, b.address), certs[0])
        reg.start(lambda: None)
        try:
            me = gs.node("web-1", reg.allocate("web-1"))
            reg.register(me)
            with gs.client(b.address, certs[0]) as op:
                op.set_node_groups("web-2", ("web",))      # its groups are granted (issue 13)
                web2 = gs.node("web-2", op.allocate("web-2"), network="vpc", index=2)
                op.register(web2)
                wait_for(lambda: reg.view().connected and "web-2" in reg.view().nodes, what="the view")
                assert reg.controller == a.address and reg.snapshots == 1
                path = f"{zk_prefix}/nodes/web-1"
                created = zk_client.exists(path).czxid
                a.stop()
                wait_for(lambda: reg.controller == b.address and reg.view().connected, timeout=5,
                         what="failover to B")
                assert reg.failovers == 1 and reg.snapshots == 1 and reg.resets == 0    # resumed, no snapshot
                wait_for(lambda: b.store.held() == ["web-1"], what="B holds web-1 (its stream is there)")
                # a change through B reaches the backend as a delta
                op.put_policy(Policy(Endpoint(group="web"), Endpoint(group="db"), "tcp", ((5432, 5432),), "pg"))
                wait_for(lambda: "pg" in reg.view().policies, what="the delta")
                time.sleep(4.0)       # more than a lease: still registered, never re-created
                assert zk_client.exists(path).czxid == created
                # every replica gone: fail static, the view keeps every record
                b.stop()
                wait_for(lambda: not reg.view().connected, timeout=15, what="fail static")
                assert reg.view().nodes == {"web-2": web2}
            # one replica back (a new one, on A's address): it converges, again without a snapshot
            a2 = start(gs.controller_config(zk_server.address, zk_prefix, certs[0], subnet=SUBNET, lease_s=3.0,
                                            listen=a.address))
            wait_for(lambda: reg.view().connected, timeout=15, what="reconnection")
            assert reg.controller == a2.address and reg.snapshots == 1 and reg.resets == 0
            assert zk_client.exists(path).czxid == created and reg.view().nodes == {"web-2": web2}
        finally:
            reg.close()


def test_backend_reregisters_when_its_record_is_removed(zk_server, zk_prefix, certs):
    with gs.controllers() as start:
        ctl = start(gs.controller_config(zk_server.address, zk_prefix, certs[0], subnet=SUBNET))
        reg = _backend(ctl.address, certs[0])
        reg.start(lambda: None)
        try:
            me = gs.node("web-1", reg.allocate("web-1"), groups=())
            reg.register(me)
            with gs.client(ctl.address, certs[0]) as op:
                op.deregister("web-1")
                wait_for(lambda: op.list_nodes()[0] == [me], timeout=10, what="the record back")
        finally:
            reg.close()


def test_backend_backs_off_with_jitter_while_the_controller_is_unreachable(certs):
    delays: list[float] = []
    reg = _backend(f"127.0.0.1:{free_port()}", certs[0], sleep=delays.append)
    reg.start(lambda: None)
    try:
        wait_for(lambda: len(delays) >= 8, timeout=20, what="retries")
    finally:
        reg.close()
    lo, hi = reg._backoff
    caps = [min(lo * 2 ** i, hi) for i in range(8)]
    for d, cap in zip(delays, caps, strict=False):
        assert cap / 2 <= d <= cap
    assert len(set(delays[:8])) > 1 and max(delays) <= hi
    assert not reg.view().connected and not reg.view().synced
    with pytest.raises(Exception, match="unavailable"):
        _backend(f"127.0.0.1:{free_port()}", certs[0], timeout_s=1).allocate("web-1")


# --- the processes: controller, daemon and operator commands from the CLI ---------------------

OVERLAY = [PYTHON, "-m", "overlay.cli"]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*OVERLAY, *args], capture_output=True, text=True, timeout=timeout, cwd=gs.REPO)


def _get(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
        return json.loads(r.read())


def test_controller_daemon_and_operator_commands(zk_server, zk_prefix, tmp_path):
    d = str(tmp_path / "certs")
    res = _run("certs", "init", "--dir", d, "--name", "ctl.example")
    assert res.returncode == 0 and "ca.crt" in res.stdout, res.stderr
    assert _run("certs", "issue", "--dir", d, "--node", "web-1").returncode == 0
    res = _run("certs", "issue", "--dir", d, "--node", "web-1")
    assert res.returncode == 1 and "already exists" in res.stderr
    assert oct(os.stat(f"{d}/web-1.key").st_mode & 0o777) == "0o600"

    port, status_port = free_port(), free_port()
    ctl_cfg = tmp_path / "controller.yaml"
    ctl_cfg.write_text(yaml.safe_dump({
        "overlay_subnet": SUBNET,
        "registry": {"hosts": [zk_server.address], "prefix": zk_prefix},
        "controller": {"listen": f"127.0.0.1:{port}",
                       "tls": {"ca": f"{d}/ca.crt", "cert": f"{d}/controller.crt", "key": f"{d}/controller.key"}},
    }))
    node_cfg = tmp_path / "node.yaml"
    node_cfg.write_text(yaml.safe_dump({
        "node_id": "web-1", "network": "ec2", "overlay_subnet": SUBNET, "groups": ["web"],
        "addresses": {"private": "10.0.0.1", "public": "198.18.1.1"},
        "registry": {"backend": "grpc", "controller": f"127.0.0.1:{port}", "timeout_s": 20,
                     "tls": {"ca": f"{d}/ca.crt", "cert": f"{d}/web-1.crt", "key": f"{d}/web-1.key"}},
        "datapath": {"backend": "dryrun"},
        "status_listen": f"127.0.0.1:{status_port}",
        "control_socket": str(tmp_path / "run" / "control.sock"),
    }))
    logs = open(tmp_path / "procs.log", "w")
    procs = []
    try:
        ctl = subprocess.Popen([*OVERLAY, "controller", "-c", str(ctl_cfg)], stdout=logs, stderr=subprocess.STDOUT,
                               cwd=gs.REPO)
        procs.append(ctl)
        daemon = subprocess.Popen([*OVERLAY, "daemon", "-c", str(node_cfg)], stdout=logs, stderr=subprocess.STDOUT,
                                  cwd=gs.REPO)
        procs.append(daemon)
        conn = ["--controller", f"127.0.0.1:{port}", "--certs", d]
        # a peer registered by the operator, seen by the daemon
        wait_for(lambda: port_open(port), timeout=60, what=f"the controller to listen on {port}", interval=0.1)
        with gs.client(f"127.0.0.1:{port}", d) as op:
            web2 = gs.node("web-2", op.allocate("web-2"), network="vpc", index=2)
            op.register(web2)

            def ready():
                try:
                    s = _get(status_port, "/status")
                except OSError:
                    return None
                return s if s["ready"] and [p["node_id"] for p in s["peers"]] == ["web-2"] else None

            status = wait_for(ready, timeout=30, what="the daemon to apply its peer")
            assert status["registry"] == {"backend": "grpc", "connected": True, "controller": f"127.0.0.1:{port}",
                                          "controllers": [f"127.0.0.1:{port}"], "failovers": 0,
                                          "revision": status["registry"]["revision"]}

            res = _run("nodes", "list", "--json", *conn)
            assert res.returncode == 0, res.stderr
            assert sorted(n["node_id"] for n in json.loads(res.stdout)["nodes"]) == ["web-1", "web-2"]
            assert _run("groups", "put", "web", "--description", "web servers", *conn).returncode == 0
            res = _run("groups", "list", *conn)
            assert res.returncode == 0 and "web servers" in res.stdout
            res = _run("policies", "put", "web-to-db", "--from-group", "web", "--to-group", "db", "--proto", "tcp",
                       "--ports", "5432", "8000-8100", *conn)
            assert res.returncode == 0, res.stderr
            res = _run("policies", "list", "--json", *conn)
            assert json.loads(res.stdout)["policies"] == [
                {"policy_id": "web-to-db", "from": "group:web", "to": "group:db", "proto": "tcp",
                 "ports": ["5432", "8000-8100"]}]
            # refusals: exit 2 for an invalid argument, 1 for the rest; one line, no traceback
            res = _run("policies", "put", "x", "--from-cidr", "10.0.0.1/8", "--to-group", "db", "--proto", "tcp", *conn)
            assert res.returncode == 2 and "policy.from_cidr" in res.stderr
            res = _run("groups", "delete", "nope", *conn)
            assert res.returncode == 1 and "'nope' does not exist" in res.stderr
            res = _run("groups", "put", "x", "--as", "web-1", *conn)
            assert res.returncode == 1 and "operator certificate" in res.stderr
            res = _run("nodes", "list", "--controller", f"127.0.0.1:{free_port()}", "--certs", d, "--timeout", "2")
            assert res.returncode == 1
            res = _run("nodes", "list", "--controller", f"127.0.0.1:{port}", "--certs", str(tmp_path / "nope"))
            assert res.returncode == 2 and "--certs" in res.stderr and "Traceback" not in res.stderr
            assert _run("policies", "delete", "web-to-db", *conn).returncode == 0
            assert _run("groups", "delete", "web", *conn).returncode == 0

            # the daemon stops (or restarts): its record stays, leased (docs/grpc.md)
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(20) == 0
            time.sleep(1.0)
            assert sorted(n.node_id for n in op.list_nodes()[0]) == ["web-1", "web-2"]
            # deregistering for good: the node itself (overlay deregister), or the operator
            res = _run("deregister", "-c", str(node_cfg))
            assert res.returncode == 0 and "deregistered web-1" in res.stdout, res.stderr
            assert [n.node_id for n in op.list_nodes()[0]] == ["web-2"]
            res = _run("nodes", "deregister", "web-2", *conn)
            assert res.returncode == 0 and "web-2" in res.stdout, res.stderr
            assert op.list_nodes()[0] == []
            res = _run("nodes", "deregister", "web-2", *conn)
            assert res.returncode == 1 and "not registered" in res.stderr
        ctl.send_signal(signal.SIGTERM)
        assert ctl.wait(20) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        logs.close()
    # a daemon whose TLS files are missing: a config error naming the key
    bad = yaml.safe_load(node_cfg.read_text())
    bad["registry"]["tls"]["ca"] = str(tmp_path / "missing.crt")
    node_cfg.write_text(yaml.safe_dump(bad))
    res = _run("daemon", "-c", str(node_cfg))
    assert res.returncode == 2 and "registry.tls.ca: cannot read" in res.stderr and "Traceback" not in res.stderr
