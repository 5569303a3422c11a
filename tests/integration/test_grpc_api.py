"""The controller's gRPC API over real sockets and a real ZooKeeper (DESIGN §4.2a).

Every method's success and error paths (status codes, INVALID_ARGUMENT naming the
field), the authorisation matrix of mutual TLS, health and reflection, and a client
in another process built only from proto/overlay.proto.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap

import grpc
import pytest

from overlay.errors import (
    AllocationExhausted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from overlay.model import Endpoint, Policy
from overlay.rpc.proto import modules
from tests.support import grpc as gs
from tests.support.paths import PYTHON
from tests.support.wait import wait_for

pytestmark = pytest.mark.zk


@pytest.fixture(scope="module")
def certs():
    base = gs.tmpdir()
    try:
        yield gs.make_certs(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def ctl(zk_server, zk_prefix, certs):
    with gs.controllers() as start:
        yield start(gs.controller_config(zk_server.address, zk_prefix, certs[0]))


@pytest.fixture
def clients(ctl, certs):
    made = {}

    def get(name: str = "operator"):
        if name not in made:
            made[name] = gs.client(ctl.address, certs[0], name)
        return made[name]

    yield get
    for c in made.values():
        c.close()


def _register(c, node_id: str, index: int):
    ip = c.allocate(node_id)
    n = gs.node(node_id, ip, index=index)
    c.register(n)
    return n


def test_allocate_register_get_list_deregister(clients, ctl):
    clients().set_node_groups("web-1", ["canary", "web"])   # groups are granted (docs/grpc.md, "Trust")
    web1 = clients("web-1")
    ip = web1.allocate("web-1")
    assert ip.startswith("192.168.0.")
    assert web1.allocate("web-1") == ip  # kept
    n = gs.node("web-1", ip)
    rev = web1.register(n)
    assert rev > 0  # the response says when Watch shows it
    op = clients()
    assert op.get_node("web-1") == n
    nodes, rejected, head = op.list_nodes()
    assert nodes == [n] and rejected == {} and head >= rev
    # a changed record replaces the old one
    n2 = gs.node("web-1", ip, groups=("canary", "web"))
    assert web1.register(n2) > rev
    assert op.get_node("web-1") == n2
    assert web1.deregister("web-1") > 0
    with pytest.raises(NotFound, match="web-1"):
        op.get_node("web-1")


def test_allocate_errors(clients, ctl, zk_server, zk_prefix, certs):
    op = clients()
    ip = op.allocate("web-1")
    with pytest.raises(AlreadyExists, match="allocated to node 'web-1'"):
        op.allocate("web-2", requested=ip)
    assert op.allocate("web-2", requested="192.168.0.200") == "192.168.0.200"
    with pytest.raises(InvalidArgument) as info:
        op.allocate("web/3")
    assert info.value.field == "node_id"
    with pytest.raises(InvalidArgument) as info:
        op.allocate("web-3", requested="10.9.9.9")
    assert info.value.field == "requested" and "outside the overlay subnet" in info.value.reason
    with pytest.raises(InvalidArgument) as info:
        op.allocate("")
    assert info.value.field == "node_id" and "required" in info.value.reason


def test_allocate_full_subnet_is_resource_exhausted(zk_server, zk_prefix, certs):
    cfg = gs.controller_config(zk_server.address, f"{zk_prefix}/small", certs[0], subnet="10.99.0.0/29")
    with gs.controllers() as start:
        c = start(cfg)
        with gs.client(c.address, certs[0]) as op:
            got = {op.allocate(f"n{i}") for i in range(6)}
            assert len(got) == 6
            with pytest.raises(AllocationExhausted, match="exhausted"):
                op.allocate("n6")
            pb2, _ = modules()
            assert gs.code_of(lambda: op.stub.Allocate(pb2.AllocateRequest(node_id="n7"), timeout=10)) \
                == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_register_errors_name_the_field(clients, ctl):
    op = clients()
    pb2 = op.pb2
    ip = op.allocate("web-1")
    other = op.allocate("web-2")

    def reg(**fields):
        base = {"node_id": "web-1", "network": "ec2", "private": "10.0.0.1", "public": "198.18.1.1",
                "overlay": ip, "groups": ["web"], "open_ports": ["80"]}
        base.update(fields)
        return op.stub.RegisterNode(pb2.RegisterNodeRequest(node=pb2.Node(**base)), timeout=10)

    cases = {
        "node.private": dict(private="10.0.0.0/24"),
        "node.public": dict(public="banana"),
        "node.overlay": dict(overlay="10.1.2.3"),
        "node.network": dict(network=""),
        "node.groups[1]": dict(groups=["web", "a b"]),
        "node.open_ports[0]": dict(open_ports=["0"]),
        "node.node_id": dict(node_id="../x"),
    }
    for field, change in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            reg(**change)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert info.value.details().startswith(f"{field}: "), (field, info.value.details())
    assert gs.code_of(lambda: op.stub.RegisterNode(pb2.RegisterNodeRequest(), timeout=10)) \
        == grpc.StatusCode.INVALID_ARGUMENT
    # an overlay address that belongs to another node, or to nobody
    with pytest.raises(AlreadyExists, match="allocated to node 'web-2'"):
        op.register(gs.node("web-1", other))
    with pytest.raises(FailedPrecondition, match="not allocated"):
        op.register(gs.node("web-1", "192.168.0.250"))
    assert op.list_nodes()[0] == []


def test_deregister_and_get_errors(clients, ctl):
    op = clients()
    with pytest.raises(NotFound):
        op.deregister("nobody")
    with pytest.raises(NotFound):
        op.get_node("nobody")
    with pytest.raises(InvalidArgument) as info:
        op.get_node("a b")
    assert info.value.field == "node_id"


def test_rejected_records_are_listed_not_served(clients, ctl, zk_client, zk_prefix):
    op = clients()
    _register(op, "web-1", 1)
    # records written straight into ZooKeeper by someone else: invalid ones are reported
    zk_client.create(f"{zk_prefix}/nodes/bad-json", b"{nope", makepath=True)
    zk_client.create(f"{zk_prefix}/nodes/thief", json.dumps({
        "v": 1, "node_id": "thief", "network": "ec2", "private": "10.0.0.9", "public": "198.18.1.9",
        "overlay": op.get_node("web-1").overlay}).encode())
    zk_client.create(f"{zk_prefix}/policies/broken", b'{"v": 1, "proto": "sctp"}')
    nodes, rejected = wait_for(lambda: (lambda r: r if len(r[1]) == 2 else None)(op.list_nodes()[:2]),
                                  what="rejected records")
    assert [n.node_id for n in nodes] == ["web-1"]
    assert "not JSON" in rejected["bad-json"]
    assert "allocated to 'web-1'" in rejected["thief"]
    with pytest.raises(NotFound, match="ignored"):
        op.get_node("thief")
    _, prej, _ = wait_for(lambda: (lambda r: r if r[1] else None)(op.list_policies()), what="policy rejected")
    assert "broken" in prej


def test_groups(clients, ctl):
    op = clients()
    assert op.list_groups()[0] == {}
    r1 = op.put_group("web", "web servers")
    assert r1 > 0
    r2 = op.put_group("db", "databases", create_only=True)
    groups, head = op.list_groups()
    assert groups == {"web": "web servers", "db": "databases"} and head >= r2
    with pytest.raises(AlreadyExists, match="group 'db' already exists"):
        op.put_group("db", "again", create_only=True)
    op.put_group("db", "updated")
    assert op.list_groups()[0]["db"] == "updated"
    with pytest.raises(InvalidArgument) as info:
        op.put_group("no way", "")
    assert info.value.field == "group.name"
    assert op.delete_group("web") > 0
    with pytest.raises(NotFound, match="'web'"):
        op.delete_group("web")
    assert list(op.list_groups()[0]) == ["db"]


def test_policies(clients, ctl):
    op = clients()
    pb2 = op.pb2
    p1 = Policy(Endpoint(group="web"), Endpoint(group="db"), "tcp", ((5432, 5432), (8000, 8100)), "web-to-db")
    p2 = Policy(Endpoint(cidr="198.18.0.0/15"), Endpoint(group="web"), "icmp", (), "ping")
    assert op.put_policy(p1) > 0
    assert op.put_policy(p2, create_only=True) > 0
    with pytest.raises(AlreadyExists):
        op.put_policy(p2, create_only=True)
    policies, rejected, _ = op.list_policies()
    assert [p.policy_id for p in policies] == ["ping", "web-to-db"] and rejected == {}
    assert list(policies[1].ports) == ["5432", "8000-8100"] and policies[0].from_cidr == "198.18.0.0/15"

    cases = {
        "policy.from_cidr": pb2.Policy(policy_id="x", from_cidr="10.0.0.1/8", to_group="db", proto="tcp"),
        "policy.from_group": pb2.Policy(policy_id="x", to_group="db", proto="tcp"),
        "policy.to_group": pb2.Policy(policy_id="x", from_group="web", proto="tcp"),
        "policy.proto": pb2.Policy(policy_id="x", from_group="web", to_group="db", proto="sctp"),
        "policy.ports[1]": pb2.Policy(policy_id="x", from_group="web", to_group="db", proto="tcp",
                                      ports=["80", "90-70"]),
        "policy.ports": pb2.Policy(policy_id="x", from_group="web", to_group="db", proto="icmp", ports=["1"]),
        "policy.policy_id": pb2.Policy(policy_id="a/b", from_group="web", to_group="db", proto="tcp"),
    }
    for field, msg in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            op.stub.PutPolicy(pb2.PutPolicyRequest(policy=msg), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert info.value.details().startswith(f"{field}: "), (field, info.value.details())
    assert op.delete_policy("ping") > 0
    with pytest.raises(NotFound):
        op.delete_policy("ping")
    assert [p.policy_id for p in op.list_policies()[0]] == ["web-to-db"]


def test_watch_snapshot_then_deltas(clients, ctl):
    op = clients()
    pb2 = op.pb2
    op.put_group("web", "w")
    call = op.watch(0, timeout=20)
    first = next(call)
    assert first.kind == pb2.WatchResponse.SNAPSHOT and first.last and not first.reset
    assert [(c.kind, c.id) for c in first.changes] == [(pb2.Change.GROUP, "web")]
    start = first.revision
    _register(op, "web-1", 1)
    op.put_group("web", "w2")
    op.delete_group("web")
    seen, rev = [], start
    while len(seen) < 3:
        m = next(call)
        assert m.kind == pb2.WatchResponse.DELTA and m.epoch == first.epoch and not m.coalesced
        assert m.base_revision == rev
        rev = m.revision
        seen.extend((c.revision, c.kind, c.id, c.deleted, c.WhichOneof("value")) for c in m.changes)
        assert seen[-1][0] == rev
    call.cancel()
    assert [s[1:] for s in seen] == [(pb2.Change.NODE, "web-1", False, "node"),
                                     (pb2.Change.GROUP, "web", False, "group"),
                                     (pb2.Change.GROUP, "web", True, None)]
    assert [s[0] for s in seen] == [start + 1, start + 2, start + 3]


def test_health_and_reflection(ctl, certs):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with gs.client(ctl.address, certs[0]) as op:
        health = health_pb2_grpc.HealthStub(op.channel)
        for service in ("", "overlay.v1.Registry"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(op.channel)
        services = set(db.get_services())
        assert {"overlay.v1.Registry", "grpc.health.v1.Health"} <= services
        desc = db.FindFileContainingSymbol("overlay.v1.Registry")
        methods = {m.name for m in desc.service[0].method}
        assert methods == {"Allocate", "RegisterNode", "DeregisterNode", "GetNode", "ListNodes", "PutGroup",
                           "DeleteGroup", "ListGroups", "PutPolicy", "DeletePolicy", "ListPolicies", "Watch",
                           "Heartbeat", "SetNodeGroups", "GetNodeGroups", "ListNodeGroups"}


# --- authorisation ----------------------------------------------------------------------------


def test_authorisation_matrix(clients, ctl, certs):
    ours, other = certs
    op, web1 = clients(), clients("web-1")
    pb2 = op.pb2
    ip2 = op.allocate("web-2")
    web2_node = gs.node("web-2", ip2, index=2)
    op.set_node_groups("web-2", ["web"])
    op.register(web2_node)
    op.put_group("web", "w")
    op.put_policy(Policy(Endpoint(group="web"), Endpoint(group="web"), "tcp", ((80, 80),), "p"))

    # node web-1 acting on node web-2, or on groups and policies: PERMISSION_DENIED
    denied = {
        "Allocate": lambda: web1.allocate("web-2"),
        "RegisterNode": lambda: web1.register(web2_node),
        "DeregisterNode": lambda: web1.deregister("web-2"),
        "Heartbeat": lambda: web1.heartbeat("web-2"),
        "PutGroup": lambda: web1.put_group("db", ""),
        "DeleteGroup": lambda: web1.delete_group("web"),
        "PutPolicy": lambda: web1.put_policy(Policy(Endpoint(group="a"), Endpoint(group="b"), "udp", (), "q")),
        "DeletePolicy": lambda: web1.delete_policy("p"),
        "SetNodeGroups": lambda: web1.set_node_groups("web-1", ["admin"]),
    }
    for method, call in denied.items():
        with pytest.raises(PermissionDenied) as info:
            call()
        assert "web-1" in str(info.value), method
    assert op.get_node("web-2") == web2_node  # untouched
    # web-1 on itself, and reads: allowed
    ip1 = web1.allocate("web-1")
    web1.register(gs.node("web-1", ip1))
    assert web1.heartbeat("web-1") > 0
    assert {n.node_id for n in web1.list_nodes()[0]} == {"web-1", "web-2"}
    assert web1.list_groups()[0] == {"web": "w"} and len(web1.list_policies()[0]) == 1
    assert web1.get_node("web-2") == web2_node
    assert web1.get_node_groups("web-2")[0] == ("web",) and web1.get_node_groups("web-1")[0] is None
    assert web1.deregister("web-1") >= 0
    # the operator may do everything
    assert op.deregister("web-2") >= 0 and op.delete_group("web") >= 0 and op.delete_policy("p") >= 0

    # the controller's own certificate is no client identity, for reads and Watch too
    with gs.client(ctl.address, ours, "controller") as c:
        for call in (c.list_nodes, c.list_groups, c.list_policies, lambda: c.get_node("web-2"),
                     lambda: c.allocate("web-9")):
            with pytest.raises(PermissionDenied):
                call()
        with pytest.raises(grpc.RpcError) as info:
            next(c.watch(0, timeout=5))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # refused at the handshake: no client certificate; certificates of another CA
    with open(os.path.join(ours, "ca.crt"), "rb") as fh:
        ca = fh.read()
    _, pb2_grpc = modules()
    with grpc.secure_channel(ctl.address, grpc.ssl_channel_credentials(root_certificates=ca)) as ch:
        stub = pb2_grpc.RegistryStub(ch)
        assert gs.code_of(lambda: stub.ListNodes(pb2.ListNodesRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE
    for name in ("operator", "web-1"):
        with open(os.path.join(other, f"{name}.crt"), "rb") as fh:
            cert = fh.read()
        with open(os.path.join(other, f"{name}.key"), "rb") as fh:
            key = fh.read()
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        with grpc.secure_channel(ctl.address, creds) as ch:
            stub = pb2_grpc.RegistryStub(ch)
            assert gs.code_of(lambda s=stub: s.ListNodes(pb2.ListNodesRequest(), timeout=5)) \
                == grpc.StatusCode.UNAVAILABLE
            assert gs.code_of(lambda s=stub: s.Allocate(pb2.AllocateRequest(node_id="web-1"), timeout=5)) \
                == grpc.StatusCode.UNAVAILABLE
    # and a client that does not trust our controller refuses it
    with gs.client(ctl.address, other, "operator", timeout=5) as c:
        with pytest.raises(Unavailable):
            c.list_nodes()


# --- a client in another process, from the .proto alone --------------------------------------

STANDALONE = textwrap.dedent('''
    import json, sys
    sys.modules["overlay"] = None          # this client must not use the overlay package
    gen, target, certs = sys.argv[1:4]
    import grpc
    import overlay_pb2 as pb2, overlay_pb2_grpc as pb2_grpc

    def creds(name):
        read = lambda f: open(f"{certs}/{f}", "rb").read()
        return grpc.ssl_channel_credentials(read("ca.crt"), read(f"{name}.key"), read(f"{name}.crt"))

    out = {}
    with grpc.secure_channel(target, creds("web-3")) as ch:
        s = pb2_grpc.RegistryStub(ch)
        ip = s.Allocate(pb2.AllocateRequest(node_id="web-3"), timeout=10).overlay
        out["overlay"] = ip
        node = pb2.Node(node_id="web-3", network="vpc", private="10.0.0.3", public="198.18.2.3",
                        overlay=ip, groups=["web"], open_ports=["80", "8000-8100"])
        resp = s.RegisterNode(pb2.RegisterNodeRequest(node=node), timeout=10)
        out["registered_at"], out["ungranted"] = resp.revision, list(resp.ungranted)
        got = s.GetNode(pb2.GetNodeRequest(node_id="web-3"), timeout=10).node
        del node.groups[:]                 # not granted (no assignment): served without
        out["same"] = got == node
        try:
            s.PutGroup(pb2.PutGroupRequest(group=pb2.Group(name="x")), timeout=10)
        except grpc.RpcError as e:
            out["put_group_as_node"] = e.code().name
    with grpc.secure_channel(target, creds("operator")) as ch:
        s = pb2_grpc.RegistryStub(ch)
        pol = pb2.Policy(policy_id="p", from_cidr="198.18.0.0/15", to_group="web", proto="tcp", ports=["22"])
        s.PutPolicy(pb2.PutPolicyRequest(policy=pol), timeout=10)
        out["policies"] = [p.policy_id for p in s.ListPolicies(pb2.ListPoliciesRequest(), timeout=10).policies]
        out["nodes"] = [n.node_id for n in s.ListNodes(pb2.ListNodesRequest(), timeout=10).nodes]
        try:
            s.GetNode(pb2.GetNodeRequest(node_id="nobody"), timeout=10)
        except grpc.RpcError as e:
            out["get_unknown"] = e.code().name
        try:
            s.RegisterNode(pb2.RegisterNodeRequest(node=pb2.Node(node_id="web-3")), timeout=10)
        except grpc.RpcError as e:
            out["bad_register"] = [e.code().name, e.details().split(":")[0]]
        call = s.Watch(pb2.WatchRequest(), timeout=10)
        m = next(call)
        out["watch"] = [m.kind == pb2.WatchResponse.SNAPSHOT, m.last, sorted(c.id for c in m.changes)]
        call.cancel()
    out["overlay_imported"] = bool(sys.modules.get("overlay"))
    print(json.dumps(out))
''')


def test_client_in_another_process_from_the_proto_alone(ctl, certs):
    work = gs.tmpdir()
    try:
        os.makedirs(os.path.join(work, "gen"))
        gen = gs.generate_standalone(os.path.join(work, "gen"))
        script = os.path.join(gen, "client.py")  # beside the generated code: imported from there
        with open(script, "w") as fh:
            fh.write(STANDALONE)
        proc = subprocess.run([PYTHON, script, gen, ctl.address, certs[0]], capture_output=True, text=True,
                              timeout=60, cwd=work, env=gs.standalone_env())
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert out["overlay"].startswith("192.168.0.") and out["registered_at"] > 0 and out["same"]
    assert out["ungranted"] == ["web"]
    assert out["put_group_as_node"] == "PERMISSION_DENIED"
    assert out["policies"] == ["p"] and out["nodes"] == ["web-3"]
    assert out["get_unknown"] == "NOT_FOUND"
    assert out["bad_register"] == ["INVALID_ARGUMENT", "node.network"]
    assert out["watch"] == [True, True, ["p", "web-3"]]
    assert out["overlay_imported"] is False


def test_zookeeper_unreachable_is_unavailable_and_reads_keep_serving(clients, ctl, zk_server):
    op = clients()
    ip = op.allocate("web-1")
    op.register(gs.node("web-1", ip))
    zk_server.pause()
    try:
        slow = gs.client(ctl.address, gs_certs(ctl), timeout=2)
        with pytest.raises(Unavailable):
            slow.put_group("web", "while ZooKeeper is away")
        with pytest.raises(Unavailable):
            slow.allocate("web-2")
        # reads come from the replica's journal: the last state, still served
        assert slow.get_node("web-1").overlay == ip
        call = slow.watch(0, timeout=5)
        first = next(call)
        call.cancel()
        assert first.last and [c.id for c in first.changes] == ["web-1"]
        slow.close()
    finally:
        zk_server.resume()
    wait_for(lambda: _writes_again(op), timeout=30, what="writes after ZooKeeper is back")


def gs_certs(ctl) -> str:
    return os.path.dirname(ctl.ctl.tls.ca)


def _writes_again(op) -> bool:
    try:
        return op.put_group("web", "back") > 0
    except (Unavailable, FailedPrecondition):
        return False
