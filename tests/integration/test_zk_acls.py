"""ZooKeeper ACLs with the controller and daemons running with credentials (issue 13, acceptance 1).

A real ZooKeeper, a controller (in this process) with the operator's digest credentials and
two node identities, two `overlay daemon` processes on the ZooKeeper backend with their own
digest credentials, a node registering through the controller, and entries left world-writable
by an older deployment. Then an unauthenticated client tries every write on every entry under
``alloc``, ``nodes``, ``groups``, ``policies``, ``config``, ``assignments`` (and the journal):
set, delete, set_acls, and creating a child. Each must be refused with NoAuth.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.request

import pytest
import yaml
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl_credential

from overlay.model import Endpoint, Policy
from tests.support import grpc as gs
from tests.support.paths import PYTHON
from tests.support.wait import free_port, wait_for

pytestmark = pytest.mark.zk
SUBNET = "192.168.0.0/24"
OPERATOR = {"user": "operator", "password": "op-secret"}
NODES = {"zk-1": "pw-1", "zk-2": "pw-2"}
OVERLAY = [PYTHON, "-m", "overlay.cli"]
AREAS = ("alloc", "nodes", "groups", "policies", "config", "assignments", "changes", "controllers")


@pytest.fixture(scope="module")
def certs():
    base = gs.tmpdir()
    try:
        ours = os.path.join(base, "certs")
        from overlay.controller import certs as c

        c.init(ours)
        c.issue(ours, "grpc-1")
        yield ours
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _client(zk_server, auth: tuple[str, str] | None = None) -> KazooClient:
    client = KazooClient(hosts=zk_server.address, timeout=10,
                         auth_data=[("digest", f"{auth[0]}:{auth[1]}")] if auth else None)
    client.start(timeout=15)
    return client


def _walk(client: KazooClient, path: str) -> list[str]:
    out = [path]
    for kid in sorted(client.get_children(path)):
        out += _walk(client, f"{path}/{kid}")
    return out


def _daemon_config(tmp_path, zk_server, prefix: str, node_id: str, index: int) -> tuple[str, int]:
    status = free_port()
    path = tmp_path / f"{node_id}.yaml"
    path.write_text(yaml.safe_dump({
        "node_id": node_id, "network": "ec2", "overlay_subnet": SUBNET, "groups": ["web"],
        "addresses": {"private": f"10.0.0.{index}", "public": f"198.18.1.{index}"},
        "registry": {"hosts": [zk_server.address], "prefix": prefix, "timeout_s": 5,
                     "auth": {"user": node_id, "password": NODES[node_id]}},
        "datapath": {"backend": "dryrun"},
        "status_listen": f"127.0.0.1:{status}",
        "control_socket": str(tmp_path / f"{node_id}.sock"),
    }))
    return str(path), status


def _status(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
            return json.loads(r.read())
    except OSError:
        return None


def test_unauthenticated_writes_are_refused_everywhere(zk_server, zk_prefix, certs, tmp_path):
    p = zk_prefix
    # an older deployment left world-writable entries (as the controller's allocations were)
    anon = _client(zk_server)
    for path, data in ((f"{p}/alloc/ip-to-id/192.168.0.250", b"legacy"), (f"{p}/alloc/id-to-ip/legacy", b"192.168.0.250"),
                       (f"{p}/policies/legacy", b'{"v": 1, "from": {"group": "a"}, "to": {"group": "b"}, "proto": "icmp"}'),
                       (f"{p}/nodes", b""), (f"{p}/groups/legacy", b"{}")):
        anon.create(path, data, acl=OPEN_ACL_UNSAFE, makepath=True)
    assert anon.set(f"{p}/alloc/ip-to-id/192.168.0.250", b"legacy")   # writable, for now

    ids = [make_digest_acl_credential(n, pw) for n, pw in NODES.items()]
    cfg = gs.controller_config(zk_server.address, p, certs, subnet=SUBNET,
                               registry={"operator": OPERATOR, "node_identities": ids})
    procs: list[subprocess.Popen] = []
    logs = open(tmp_path / "daemons.log", "w")
    try:
        with gs.controllers() as start:
            ctl = start(cfg)
            report = ctl.store.acl_report
            assert report is not None and report.fixed >= 4 and not report.refused, report   # the 4 legacy entries
            with gs.client(ctl.address, certs) as op, gs.client(ctl.address, certs, "grpc-1") as node:
                op.put_group("web", "web servers")
                op.put_policy(Policy(Endpoint(group="web"), Endpoint(group="web"), "tcp", ((80, 80),), "p"))
                for n in ("zk-1", "zk-2", "grpc-1"):
                    op.set_node_groups(n, ["web"])
                node.register(gs.node("grpc-1", node.allocate("grpc-1"), network="vpc", index=9))
            from overlay.registry.zookeeper import ZooKeeperRegistry

            admin = ZooKeeperRegistry(cfg.registry, cfg.overlay_subnet, "operator-tool")
            try:
                admin.set_max_change(15)
            finally:
                admin.close()
            # two daemons on the ZooKeeper backend, each with its own identity
            ports = {}
            for i, n in enumerate(NODES, start=1):
                conf, ports[n] = _daemon_config(tmp_path, zk_server, p, n, i)
                procs.append(subprocess.Popen([*OVERLAY, "daemon", "-c", conf], stdout=logs,
                                              stderr=subprocess.STDOUT, cwd=gs.REPO))
            for n, port in ports.items():
                want = {"grpc-1", *NODES} - {n}
                wait_for(lambda port=port, want=want: (s := _status(port)) and s["ready"]
                         and {x["node_id"] for x in s["peers"]} == want
                         and all(x["groups"] == ["web"] for x in s["peers"]),
                         timeout=60, what=f"{n} to apply its peers with their granted groups")

            admin_client = _client(zk_server, (OPERATOR["user"], OPERATOR["password"]))
            paths = [q for area in AREAS for q in _walk(admin_client, f"{p}/{area}")]
            admin_client.stop()
            admin_client.close()
            written_by = {
                "the controller": [f"{p}/nodes/grpc-1", f"{p}/alloc/id-to-ip/grpc-1", f"{p}/groups/web",
                                   f"{p}/policies/p", f"{p}/assignments/zk-1", f"{p}/config/max_change"],
                "daemons": [f"{p}/nodes/zk-1", f"{p}/nodes/zk-2", f"{p}/alloc/id-to-ip/zk-1", f"{p}/alloc/id-to-ip/zk-2"],
                "an older deployment": [f"{p}/alloc/ip-to-id/192.168.0.250", f"{p}/policies/legacy"],
            }
            for who, expected in written_by.items():
                assert set(expected) <= set(paths), (who, sorted(set(expected) - set(paths)))

            allowed = []
            for path in paths:
                for what, call in (("set", lambda q=path: anon.set(q, b"evil")),
                                   ("create under", lambda q=path: anon.create(f"{q}/evil", b"x")),
                                   ("set_acls", lambda q=path: anon.set_acls(q, OPEN_ACL_UNSAFE)),
                                   ("delete", lambda q=path: anon.delete(q))):
                    try:
                        call()
                        allowed.append(f"{what} {path}")
                    except NoAuthError:
                        pass
            assert allowed == [], allowed
            print(f"{len(paths)} entries, {4 * len(paths)} unauthenticated writes, all refused")

            # one node's identity cannot write another's record, nor grant itself groups
            as_zk1 = _client(zk_server, ("zk-1", NODES["zk-1"]))
            try:
                for call in (lambda: as_zk1.set(f"{p}/nodes/zk-2", b"{}"),
                             lambda: as_zk1.set(f"{p}/nodes/grpc-1", b"{}"),
                             lambda: as_zk1.create(f"{p}/assignments/zk-1-admin", b"{}"),
                             lambda: as_zk1.set(f"{p}/assignments/zk-1", b'{"v": 1, "groups": ["admin"]}'),
                             lambda: as_zk1.delete(f"{p}/alloc/id-to-ip/zk-2")):
                    with pytest.raises(NoAuthError):
                        call()
            finally:
                as_zk1.stop()
                as_zk1.close()

            # `overlay zk acl-repair`: an entry the operator made world-writable is brought back
            op_zk = _client(zk_server, (OPERATOR["user"], OPERATOR["password"]))
            try:
                op_zk.create(f"{p}/groups/open-again", b"{}", acl=OPEN_ACL_UNSAFE)
            finally:
                op_zk.stop()
                op_zk.close()
            anon.set(f"{p}/groups/open-again", b"{}")
            conf = tmp_path / "operator.yaml"
            conf.write_text(yaml.safe_dump({"network": "ops", "overlay_subnet": SUBNET, "registry": {
                "hosts": [zk_server.address], "prefix": p, "operator": OPERATOR, "node_identities": ids}}))
            res = subprocess.run([*OVERLAY, "zk", "acl-repair", "-c", str(conf)], capture_output=True, text=True,
                                 timeout=60, cwd=gs.REPO)
            assert res.returncode == 0 and "1 re-ACLed" in res.stdout, (res.stdout, res.stderr)
            with pytest.raises(NoAuthError):
                anon.set(f"{p}/groups/open-again", b"evil")
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        logs.close()
        anon.stop()
        anon.close()
