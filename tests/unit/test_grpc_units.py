"""Unit tests of the controller's parts that need no server: the proto contract, conversions
(INVALID_ARGUMENT names the field), journal planning (snapshot, delta, coalesced, too old),
certificates and identities, status-code mapping, and the grpc backend's stream handling."""

from __future__ import annotations

import ipaddress
import os

import grpc
import pytest

from overlay.config import RegistryConfig, TlsConfig
from overlay.controller import certs
from overlay.controller.journal import Journal, coalesce, desired_items
from overlay.errors import (
    AllocationExhausted,
    AlreadyExists,
    Contended,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OverlayError,
    PermissionDenied,
    Throttled,
    Unavailable,
)
from overlay.model import Endpoint, Node, Policy
from overlay.registry import RegistryView
from overlay.rpc import convert
from overlay.rpc.proto import modules
from overlay.rpc.status import raise_for, status_of

SUBNET = ipaddress.IPv4Network("192.168.0.0/24")
pb2, pb2_grpc = modules()


# --- the proto contract ------------------------------------------------------------------------


def test_service_and_methods_are_the_contract():
    svc = pb2.DESCRIPTOR.services_by_name["Registry"]
    assert svc.full_name == "overlay.v1.Registry"
    methods = {m.name: m for m in svc.methods}
    # the contract's methods (DESIGN §4.2a), and the assignments added by issue 13 (additive)
    assert set(methods) == {"Allocate", "RegisterNode", "DeregisterNode", "GetNode", "ListNodes", "PutGroup",
                            "DeleteGroup", "ListGroups", "PutPolicy", "DeletePolicy", "ListPolicies", "Watch",
                            "Heartbeat",  # added by issue 16 (leases), additive
                            "SetNodeGroups", "GetNodeGroups", "ListNodeGroups"}  # issue 13, additive
    assert methods["Watch"].server_streaming and not methods["Watch"].client_streaming
    assert not any(m.server_streaming for n, m in methods.items() if n != "Watch")
    assert [f.name for f in pb2.Node.DESCRIPTOR.fields] == [
        "node_id", "network", "private", "public", "overlay", "groups", "open_ports", "private6", "public6"]
    assert [f.number for f in pb2.Node.DESCRIPTOR.fields] == [1, 2, 3, 4, 5, 6, 7, 8, 9]  # additive
    assert "from_revision" in pb2.WatchRequest.DESCRIPTOR.fields_by_name
    # errors are status codes: no response carries a success flag
    for msg in pb2.DESCRIPTOR.message_types_by_name.values():
        assert not {"ok", "success", "error"} & set(msg.fields_by_name), msg.name


# --- conversions --------------------------------------------------------------------------------

GOOD = dict(node_id="web-1", network="ec2", private="10.0.0.1", public="198.18.1.1", overlay="192.168.0.7",
            groups=["web", "canary"], open_ports=["80", "8000-8100"])


@pytest.mark.parametrize("field,change,fragment", [
    ("node.node_id", dict(node_id=""), "is required"),
    ("node.node_id", dict(node_id="a/b"), "must be 1-253 characters"),
    ("node.network", dict(network="my net"), "must be 1-253 characters"),
    ("node.private", dict(private="10.0.0.0/24"), "is a network"),
    ("node.private", dict(private=""), "is required"),
    ("node.public", dict(public="127.0.0.1"), "loopback"),
    ("node.overlay", dict(overlay="10.0.0.7"), "outside the overlay subnet"),
    ("node.overlay", dict(overlay="192.168.0.255"), "network or broadcast"),
    ("node.overlay", dict(overlay=""), "Allocate"),
    ("node.groups[1]", dict(groups=["web", "no way"]), "must be 1-253 characters"),
    ("node.groups", dict(groups=[f"g{i}" for i in range(65)]), "more than 64"),
    ("node.open_ports[1]", dict(open_ports=["80", "70000"]), "outside 1..65535"),
    ("node.open_ports[0]", dict(open_ports=["http"]), "not a port"),
    ("node.private6", dict(private6="fe80::1"), "link-local"),
    ("node.public6", dict(public6="10.0.0.1"), "not an IPv6 address"),
])
def test_node_from_pb_names_the_field(field, change, fragment):
    with pytest.raises(InvalidArgument) as info:
        convert.node_from_pb(pb2.Node(**{**GOOD, **change}), SUBNET)
    assert info.value.field == field
    assert fragment in info.value.reason
    assert str(info.value).startswith(f"{field}: ")


def test_node_round_trip_is_canonical():
    node = convert.node_from_pb(pb2.Node(**GOOD), SUBNET)
    assert node.groups == ("canary", "web") and node.open_ports == ((80, 80), (8000, 8100))
    back = convert.node_to_pb(pb2, node)
    assert list(back.open_ports) == ["80", "8000-8100"]
    assert convert.node_from_pb(back, SUBNET) == node
    assert (back.private6, back.public6) == ("", "")


def test_node_ipv6_fields_round_trip_as_a_v2_record():
    node = convert.node_from_pb(pb2.Node(**GOOD, private6="2001:db8::7", public6="2001:db8:1::7"), SUBNET)
    assert (node.private6, node.public6) == ("2001:db8::7", "2001:db8:1::7")
    assert node.to_dict()["v"] == 2
    back = convert.node_to_pb(pb2, node)
    assert (back.private6, back.public6) == ("2001:db8::7", "2001:db8:1::7")
    assert convert.node_from_pb(back, SUBNET) == node


@pytest.mark.parametrize("field,msg", [
    ("policy.policy_id", pb2.Policy(from_group="a", to_group="b", proto="tcp")),
    ("policy.from_group", pb2.Policy(policy_id="p", to_group="b", proto="tcp")),
    ("policy.from_cidr", pb2.Policy(policy_id="p", from_cidr="10.0.0.1/8", to_group="b", proto="tcp")),
    ("policy.to_group", pb2.Policy(policy_id="p", from_group="a", proto="tcp")),
    ("policy.proto", pb2.Policy(policy_id="p", from_group="a", to_group="b", proto="TCP")),
    ("policy.ports[0]", pb2.Policy(policy_id="p", from_group="a", to_group="b", proto="udp", ports=["0"])),
    ("policy.ports", pb2.Policy(policy_id="p", from_group="a", to_group="b", proto="icmp", ports=["1"])),
])
def test_policy_from_pb_names_the_field(field, msg):
    with pytest.raises(InvalidArgument) as info:
        convert.policy_from_pb(msg)
    assert info.value.field == field


def test_group_from_pb():
    assert convert.group_from_pb(pb2.Group(name="web", description="d")) == ("web", "d")
    with pytest.raises(InvalidArgument) as info:
        convert.group_from_pb(pb2.Group(name="web", description="x" * 2000))
    assert info.value.field == "group.description"


NODE = Node("web-1", "ec2", "10.0.0.1", "198.18.1.1", "192.168.0.7", ("web",), ((80, 80),))
POLICY = Policy(Endpoint(cidr="198.18.0.0/15"), Endpoint(group="db"), "tcp", ((5432, 5432), (8000, 8100)), "p")


@pytest.mark.parametrize("key,value", [
    (("node", "web-1"), {"node": NODE.to_dict(), "order": 4711}),
    (("node", "bad"), {"rejected": "not JSON"}),
    (("assignment", "web-1"), {"assignment": {"groups": ["db", "web"]}}),
    (("assignment", "web-2"), {"assignment": {"groups": []}}),
    (("assignment", "bad"), {"rejected": "not JSON"}),
    (("node", "gone"), None),
    (("policy", "p"), {"policy": POLICY.to_dict()}),
    (("policy", "q"), {"rejected": "proto sctp"}),
    (("group", "web"), {"group": {"description": "web servers"}}),
    (("config", "max_change"), {"max_change": 0}),
    (("config", "max_change"), {"max_change": 25}),
])
def test_journal_values_round_trip_through_change(key, value):
    ch = convert.change_to_pb(pb2, 42, key, value)
    assert ch.revision == 42
    again = pb2.Change.FromString(ch.SerializeToString())
    assert convert.change_from_pb(again) == (key, value)


def test_journal_keys():
    assert convert.key_parse(convert.key_text(("node", "web-1"))) == ("node", "web-1")
    for bad in ("web-1", "nodes/web-1", "node/", "/x"):
        with pytest.raises(ValueError):
            convert.key_parse(bad)


# --- journal planning ------------------------------------------------------------------------


def _store(window: int = 16) -> Journal:
    journal = Journal(window)
    journal.load([], "e1", 0)
    return journal


def _fill(journal: Journal, changes: list[tuple]) -> None:
    journal.extend([(journal.head + 1 + i, key, value) for i, (key, value) in enumerate(changes)])


def test_read_since_plans():
    store = _store(window=16)
    _fill(store, [(("group", "a"), {"group": {"description": str(i)}}) for i in range(10)])
    _fill(store, [(("group", "b"), {"group": {"description": "b"}}), (("group", "a"), None)])
    assert store.head == 12
    snap = store.read_since(0, "", 100, fresh=True)
    assert snap.kind == "snapshot" and not snap.reset and snap.revision == 12
    assert [(r, k) for r, k, _ in snap.items] == [(11, ("group", "b"))]
    d = store.read_since(8, "e1", 100)
    assert d.kind == "delta" and d.base == 8 and d.revision == 12 and not d.coalesced
    assert [r for r, _, _ in d.items] == [9, 10, 11, 12]
    c = store.read_since(2, "e1", 3)
    assert c.kind == "delta" and c.coalesced and [(r, k) for r, k, _ in c.items] == [(11, ("group", "b")),
                                                                                     (12, ("group", "a"))]
    assert store.read_since(12, "e1", 100).kind == "current"
    assert store.read_since(13, "e1", 100).kind == "ahead"
    other = store.read_since(8, "e2", 100)
    assert other.kind == "snapshot" and other.reset
    assert store.read_since(8, "", 100).kind == "delta"  # no epoch given: taken as this one
    # beyond the window the log is trimmed: old revisions get a fresh snapshot
    _fill(store, [(("group", "c"), {"group": {"description": str(i)}}) for i in range(40)])
    old = store.read_since(8, "e1", 100)
    assert old.kind == "snapshot" and old.reset and old.revision == store.head
    assert store.read_since(store.head - 10, "e1", 100).kind == "delta"
    # every superseded revision (and the deletion) is known as dead, for compaction
    assert store.take_dead(store.head, 11) == [*range(1, 11), 12]  # 11 (group b) is live


def test_coalesce_keeps_the_last_change_per_item_in_order():
    entries = [(1, ("node", "a"), {"x": 1}), (2, ("node", "b"), {"x": 2}), (3, ("node", "a"), None),
               (4, None, None), (5, ("node", "c"), {"x": 3}), (6, ("node", "b"), {"x": 4})]
    assert coalesce(entries) == [(3, ("node", "a"), None), (5, ("node", "c"), {"x": 3}),
                                 (6, ("node", "b"), {"x": 4})]


def test_desired_items_from_the_observers_view():
    claims = Node("web-2", "ec2", "10.0.0.2", "198.18.1.2", "192.168.0.8", ("admin", "web"), ())
    view = RegistryView(nodes={"web-1": NODE, "web-2": claims},
                        rejected={"bad": "why", "policy:q": "proto", "assignment:x": "not JSON"},
                        policies={"p": POLICY}, max_change=5, order={"web-1": 9, "web-2": 12},
                        grants={"web-1": ("web",), "web-2": ("web",), "db-1": ("db",)})
    got = desired_items(view, {"web": "w"})
    granted_only = Node("web-2", "ec2", "10.0.0.2", "198.18.1.2", "192.168.0.8", ("web",), ())
    assert got == {
        ("node", "web-1"): {"node": NODE.to_dict(), "order": 9},
        ("node", "web-2"): {"node": granted_only.to_dict(), "order": 12},   # admin was not granted
        ("assignment", "web-1"): {"assignment": {"groups": ["web"]}},
        ("assignment", "web-2"): {"assignment": {"groups": ["web"]}},
        ("assignment", "db-1"): {"assignment": {"groups": ["db"]}},
        ("assignment", "x"): {"rejected": "not JSON"},
        ("node", "bad"): {"rejected": "why"},
        ("policy", "q"): {"rejected": "proto"},
        ("policy", "p"): {"policy": POLICY.to_dict()},
        ("config", "max_change"): {"max_change": 5},
        ("group", "web"): {"group": {"description": "w"}},
    }


# --- errors and status codes ------------------------------------------------------------------


@pytest.mark.parametrize("exc,code", [
    (InvalidArgument("node.private", "bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound("x"), grpc.StatusCode.NOT_FOUND),
    (AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
    (PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
    (AllocationExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
    (Contended("x"), grpc.StatusCode.ABORTED),
    (OverlayError("x"), grpc.StatusCode.INTERNAL),
    (ValueError("x"), None),
])
def test_status_codes_and_back(exc, code):
    assert status_of(exc) == code
    if code is None or code == grpc.StatusCode.INTERNAL:
        return

    class _Err(grpc.RpcError):
        def code(self):
            return code

        def details(self):
            return str(exc)

    back = raise_for(_Err())
    assert type(back) is type(exc)
    if isinstance(exc, InvalidArgument):
        assert back.field == "node.private" and back.reason == "bad"


def test_resource_exhausted_with_a_retry_hint_is_throttled():
    class _Err(grpc.RpcError):
        def __init__(self, metadata):
            self.metadata = metadata

        def code(self):
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self):
            return "too many"

        def trailing_metadata(self):
            return self.metadata

    back = raise_for(_Err((("grpc-retry-pushback-ms", "1500"),)))
    assert isinstance(back, Throttled) and isinstance(back, Unavailable) and back.retry_after_s == 1.5
    assert status_of(back) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert type(raise_for(_Err(()))) is AllocationExhausted     # no hint: the subnet is full


# --- certificates --------------------------------------------------------------------------------


def _pem(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def test_certs_init_issue_and_identities(tmp_path):
    d = str(tmp_path / "c")
    written = certs.init(d, ("ctl.example", "198.18.0.3"))
    assert sorted(written) == ["ca.crt", "ca.key", "controller.crt", "controller.key", "operator.crt", "operator.key"]
    assert certs.init(d) == []  # idempotent
    certs.issue(d, "web-1")
    assert certs.identity_of(_pem(f"{d}/web-1.crt")) == certs.Identity("node", "web-1")
    assert certs.identity_of(_pem(f"{d}/operator.crt")) == certs.Identity("operator", "operator")
    assert certs.identity_of(_pem(f"{d}/controller.crt")).role == "controller"
    assert certs.identity_of(_pem(f"{d}/ca.crt")) is None
    assert certs.identity_of(b"not a certificate") is None
    for f in ("ca.key", "controller.key", "operator.key", "web-1.key"):
        assert os.stat(f"{d}/{f}").st_mode & 0o777 == 0o600
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(_pem(f"{d}/controller.crt"))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "ctl.example"} <= set(san.get_values_for_type(x509.DNSName))
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "198.18.0.3"}
    with pytest.raises(OverlayError, match="already exists"):
        certs.issue(d, "web-1")
    with pytest.raises(OverlayError, match="would overwrite"):
        certs.issue(d, "operator")
    with pytest.raises(OverlayError, match="--node"):
        certs.issue(d, "a/b")
    with pytest.raises(OverlayError, match="certs init"):
        certs.issue(str(tmp_path / "none"), "web-1")
    with pytest.raises(OverlayError, match="neither an IP address nor a DNS name"):
        certs.init(d, ("bad name",))
    old = _pem(f"{d}/ca.crt")
    certs.init(d, force=True)
    assert _pem(f"{d}/ca.crt") != old


# --- the grpc backend's handling of the stream ------------------------------------------------


@pytest.fixture
def backend(tmp_path):
    from overlay.registry.grpc import GrpcRegistry

    d = str(tmp_path / "c")
    certs.init(d)
    certs.issue(d, "web-1")
    cfg = RegistryConfig(backend="grpc", controller=("127.0.0.1:9",), tls=TlsConfig(f"{d}/ca.crt", f"{d}/web-1.crt",
                                                                               f"{d}/web-1.key"))
    reg = GrpcRegistry(cfg, SUBNET, "web-1")
    yield reg
    reg._client.close()


def _snap(rev, changes, last=True, reset=False):
    return pb2.WatchResponse(kind=pb2.WatchResponse.SNAPSHOT, epoch="e", revision=rev, last=last, reset=reset,
                             changes=changes)


def _delta(base, rev, changes, epoch="e"):
    return pb2.WatchResponse(kind=pb2.WatchResponse.DELTA, epoch=epoch, base_revision=base, revision=rev,
                             changes=changes)


def test_backend_applies_snapshots_and_deltas(backend):
    from overlay.registry.grpc import _Desync

    peer = Node("web-2", "vpc", "10.0.0.2", "198.18.2.2", "192.168.0.8", ("web",), ())
    outside = {"v": 1, "node_id": "far", "network": "x", "private": "10.0.0.3", "public": "198.18.2.3",
               "overlay": "192.168.9.9"}  # valid for the controller's subnet, not for ours
    ch = convert.change_to_pb
    assert backend._on_message(_snap(5, [ch(pb2, 1, ("node", "web-1"), {"node": NODE.to_dict()})], last=False)) is False
    assert backend.view().nodes == {}
    assert backend._on_message(_snap(5, [ch(pb2, 2, ("node", "web-2"), {"node": peer.to_dict()}),
                                         ch(pb2, 3, ("node", "far"), {"node": outside}),
                                         ch(pb2, 4, ("policy", "q"), {"rejected": "proto"}),
                                         ch(pb2, 5, ("config", "max_change"), {"max_change": 3})]))
    v = backend.view()
    assert v.nodes == {"web-2": peer}  # its own record is not a peer
    assert "outside the overlay subnet" in v.rejected["far"] and v.rejected["policy:q"] == "proto"
    assert v.max_change == 3 and backend.controller_revision == 5 and backend.snapshots == 1
    assert backend._own_value == {"node": NODE.to_dict(), "order": 0}
    assert backend._on_message(_delta(5, 7, [ch(pb2, 6, ("node", "web-2"), None),
                                             ch(pb2, 7, ("policy", "p"), {"policy": POLICY.to_dict()})]))
    v = backend.view()
    assert v.nodes == {} and v.policies == {"p": POLICY} and "policy:q" in v.rejected
    assert backend._on_message(_delta(7, 7, [])) is False  # "you are current"
    with pytest.raises(_Desync):
        backend._on_message(_delta(6, 8, []))
    with pytest.raises(_Desync):
        backend._on_message(_delta(7, 8, [], epoch="other"))
    backend._own = NODE
    assert not backend._own_changed()
    # the controller serves the granted groups only: that is no reason to register again
    narrowed = dict(NODE.to_dict(), groups=[])
    backend._on_message(_delta(7, 8, [ch(pb2, 8, ("node", "web-1"), {"node": narrowed, "order": 3})]))
    assert not backend._own_changed()
    backend._on_message(_delta(8, 9, [ch(pb2, 9, ("node", "web-1"), {"node": dict(narrowed, public="198.18.9.9")})]))
    assert backend._own_changed()
    backend._on_message(_delta(9, 10, [ch(pb2, 10, ("node", "web-1"), None)]))
    assert backend._own_changed()
