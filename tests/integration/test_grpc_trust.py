"""A node speaks only for itself, over real gRPC sockets and a real ZooKeeper (issue 13).

Address ownership (RegisterNode refused when a live node holds the address; conflicts of
records written around the controller listed, earlier registration kept), attestation on
loopback (the refusal; the acceptance needs another address: test_trust_netns.py), per-
identity limits with their retry hints, and generic errors with a request id.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time

import grpc
import pytest

from overlay.errors import FailedPrecondition, PermissionDenied, Throttled, Unavailable
from overlay.model import Node
from overlay.rpc.status import REQUEST_ID, RETRY_PUSHBACK, trailing
from tests.support import grpc as gs
from tests.support.paths import PYTHON, REPO
from tests.support.wait import wait_for

pytestmark = pytest.mark.zk


@pytest.fixture(scope="module")
def certs():
    base = gs.tmpdir()
    try:
        yield gs.make_certs(base)[0]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _ctl(start, zk_server, prefix, certs, **controller):
    return start(gs.controller_config(zk_server.address, prefix, certs, controller=controller or None))


def test_an_address_held_by_a_live_node_is_refused(zk_server, zk_prefix, certs, zk_client):
    with gs.controllers() as start:
        ctl = _ctl(start, zk_server, zk_prefix, certs)
        with gs.client(ctl.address, certs) as op, gs.client(ctl.address, certs, "web-1") as a, \
                gs.client(ctl.address, certs, "web-2") as b:
            op.set_node_groups("web-2", ["web"])
            victim = Node("web-2", "ec2", "10.0.0.2", "198.18.1.2", b.allocate("web-2"), ("web",), ())
            b.register(victim)
            ip_a = a.allocate("web-1")
            attempts = {
                "private": Node("web-1", "ec2", "10.0.0.2", "198.18.1.9", ip_a),       # same network
                "public": Node("web-1", "vpc", "10.0.9.9", "198.18.1.2", ip_a),        # fleet-wide
                "overlay": Node("web-1", "vpc", "10.0.9.9", "198.18.1.9", victim.overlay),
            }
            for kind, node in attempts.items():
                with pytest.raises(FailedPrecondition) as info:
                    a.register(node)
                assert f"node.{kind}: {kind} address" in str(info.value) and "live node 'web-2'" in str(info.value)
            # the overlap: the same private address in another network is no conflict
            assert a.register(Node("web-1", "vpc", "10.0.0.2", "198.18.1.9", ip_a)) > 0
            assert op.get_node("web-2") == victim                   # untouched
            # once web-2 is gone its addresses are free
            b.deregister("web-2")
            wait_for(lambda: "web-2" not in {n.node_id for n in op.list_nodes()[0]}, what="web-2 gone")
            assert a.register(Node("web-1", "ec2", "10.0.0.2", "198.18.1.2", ip_a)) > 0

            # a record written around the controller (straight into ZooKeeper) copying web-1's public
            # address: listed as a conflict, the earlier registration (web-1) keeps the address
            ip_x = op.allocate("copycat")
            zk_client.create(f"{zk_prefix}/nodes/copycat", json.dumps({
                "v": 1, "node_id": "copycat", "network": "dc1", "private": "10.7.0.1", "public": "198.18.1.2",
                "overlay": ip_x}).encode(), ephemeral=True)
            nodes, _, conflicts, _ = wait_for(
                lambda: (lambda r: r if r[2] else None)(op.list_nodes_detail()), what="the conflict listed")
            assert {n.node_id for n in nodes} == {"web-1", "copycat"}
            assert conflicts == {"copycat": "public address 198.18.1.2 is held by the earlier registration web-1"}
            res = subprocess.run([PYTHON, "-m", "overlay.cli", "nodes", "list", "--controller", ctl.address,
                                  "--certs", certs], capture_output=True, text=True, timeout=60, cwd=REPO)
            row = next(line for line in res.stdout.splitlines() if line.startswith("copycat"))
            assert row.endswith("public address 198.18.1.2 is held by the earlier registration web-1")
            assert "1 excluded by an address conflict" in res.stdout


def test_attestation_refuses_a_public_address_that_is_not_the_connections(zk_server, zk_prefix, certs):
    with gs.controllers() as start:
        ctl = _ctl(start, zk_server, zk_prefix, certs, attest_public=["lan"])
        with gs.client(ctl.address, certs, "web-1") as a, gs.client(ctl.address, certs) as op:
            ip = a.allocate("web-1")
            with pytest.raises(PermissionDenied, match=r"198.18.1.1 is not the address this connection comes from "
                                                        r"\(127.0.0.1\)"):
                a.register(Node("web-1", "lan", "10.0.0.1", "198.18.1.1", ip))
            assert a.register(Node("web-1", "ec2", "10.0.0.1", "198.18.1.1", ip)) > 0   # not an attested network
            # an operator publishing a host speaks for the fleet: not attested
            assert op.register(Node("web-3", "lan", "10.0.0.3", "198.18.1.3", op.allocate("web-3"))) > 0


def test_watch_streams_and_registrations_are_limited_per_identity(zk_server, zk_prefix, certs):
    with gs.controllers() as start:
        ctl = _ctl(start, zk_server, zk_prefix, certs,
                   limits={"watch_streams": 2, "register_rate": 1, "register_burst": 3})
        with gs.client(ctl.address, certs, "web-1") as a, gs.client(ctl.address, certs, "web-2") as b, \
                gs.client(ctl.address, certs) as op:
            streams = [a.watch(0, timeout=30) for _ in range(2)]
            for s in streams:
                next(s)
            extra = a.watch(0, timeout=30)
            with pytest.raises(grpc.RpcError) as info:
                next(extra)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "controller.limits.watch_streams" in info.value.details()
            assert trailing(info.value, RETRY_PUSHBACK) == "5000"
            other = b.watch(0, timeout=30)          # another identity has its own allowance
            assert next(other).last
            streams[0].cancel()
            wait_for(lambda: ctl.servicer._watches.count("node web-1") == 1, what="the stream released")
            again = a.watch(0, timeout=30)
            assert next(again).last
            for s in (streams[1], other, again):
                s.cancel()

            node = Node("web-1", "ec2", "10.0.0.1", "198.18.1.1", a.allocate("web-1"))
            for _ in range(3):                       # the burst
                a.register(node)
            with pytest.raises(Throttled) as info:
                a.register(node)
            assert 0 < info.value.retry_after_s <= 1.0 and "retry in" in str(info.value)
            time.sleep(info.value.retry_after_s + 0.05)
            assert a.register(node) > 0              # after the hint
            for i in range(5):                       # the operator is not rate-limited
                op.register(Node(f"inv-{i}", "ec2", f"10.0.1.{i + 1}", f"198.18.2.{i + 1}", op.allocate(f"inv-{i}")))
            assert ctl.servicer.refused == {"watch": 1, "register": 1}


def test_internal_failures_reach_the_client_as_a_kind_and_a_request_id(zk_server, zk_prefix, certs, zk_client,
                                                                       caplog):
    caplog.set_level(logging.WARNING, logger="overlay.controller.servicer")
    with gs.controllers() as start:
        ctl = _ctl(start, zk_server, zk_prefix, certs)
        with gs.client(ctl.address, certs, timeout=3) as op:
            pb2 = op.pb2
            # ZooKeeper away: UNAVAILABLE, without its hosts or the prefix
            zk_server.pause()
            try:
                with pytest.raises(grpc.RpcError) as info:
                    op.stub.PutGroup(pb2.PutGroupRequest(group=pb2.Group(name="web")), timeout=10)
            finally:
                zk_server.resume()
            err = info.value
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            rid = trailing(err, REQUEST_ID)
            assert rid and err.details() == f"the controller cannot reach its store now; retry with backoff " \
                                            f"(request id {rid})"
            for secret in (zk_server.address, str(zk_server.port), zk_prefix):
                assert secret not in err.details()
            logged = [r.getMessage() for r in caplog.records if rid in r.getMessage()]
            assert logged and zk_server.address in logged[0]          # the detail is in the log, under the id
            wait_for(lambda: _writes(op), timeout=30, what="writes again")

            # an allocation an operator must repair: the detail names paths; the client gets the kind
            zk_client.create(f"{zk_prefix}/alloc/id-to-ip/broken", b"192.168.0.77")
            zk_client.create(f"{zk_prefix}/alloc/ip-to-id/192.168.0.77", b"someone-else")
            with pytest.raises(grpc.RpcError) as info:
                op.stub.Allocate(pb2.AllocateRequest(node_id="broken"), timeout=10)
            err = info.value
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "alloc/" not in err.details() and zk_prefix not in err.details()
            assert "request id" in err.details() and trailing(err, REQUEST_ID) in err.details()
            # refusals we mean keep their message (they name fields and holders, not the store)
            with pytest.raises(grpc.RpcError) as info:
                op.stub.GetNode(pb2.GetNodeRequest(node_id="nobody"), timeout=10)
            assert info.value.details() == "node_id: node 'nobody' is not registered"
            assert trailing(info.value, REQUEST_ID) is None


def _writes(op) -> bool:
    try:
        return op.put_group("web", "back") > 0
    except (Unavailable, FailedPrecondition):
        return False


def test_assignments_through_the_cli(zk_server, zk_prefix, certs):
    with gs.controllers() as start:
        ctl = _ctl(start, zk_server, zk_prefix, certs)
        conn = ["--controller", ctl.address, "--certs", certs]

        def run(*args):
            return subprocess.run([PYTHON, "-m", "overlay.cli", "nodes", "groups", *args, *conn],
                                  capture_output=True, text=True, timeout=60, cwd=REPO)

        assert run("web-1").stdout.strip() == "web-1: no assignment (it holds no group)"
        res = run("web-1", "web", "db", "web")
        assert res.returncode == 0 and res.stdout.startswith("web-1 may hold db, web (revision ")
        assert run("web-1").stdout.strip() == "web-1: db, web"
        assert run("web-2", "--none").returncode == 0
        listing = json.loads(run("--json").stdout)
        assert listing["assignments"] == {"web-1": ["db", "web"], "web-2": []}
        res = run("web-1", "a b")
        assert res.returncode == 2 and "groups[0]" in res.stderr and "Traceback" not in res.stderr
        res = run("web-1", "x", "--none")
        assert res.returncode == 2 and "not both" in res.stderr
        res = subprocess.run([PYTHON, "-m", "overlay.cli", "nodes", "groups", "web-1", "admin", *conn,
                              "--as", "web-1"], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert res.returncode == 1 and "operator certificate" in res.stderr
