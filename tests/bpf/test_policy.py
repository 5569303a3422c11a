"""Group policies in the ingress program (issue 6), through BPF_PROG_TEST_RUN.

The maps are written the way the daemon writes them: ``plan`` (with policies)
-> ``diff`` against what the maps hold -> ``MapSet.apply`` on the maps that
build.py compiled. Two parts:

* tables of cases (DESIGN §7.10): member identity, multi-group identity, CIDR
  sources (nested), port range edges, ICMP, default-deny (members, open ports
  and reject_all no longer apply), the policy index in the drop event, audit,
  failsafe before policy, an established reply under default-deny, martians,
  a node that no policy selects;
* a differential test (acceptance 1): hypothesis draws groups, peers,
  policies, the node's own groups, filter settings and packets; the program's
  verdict and counter slot must equal those of :func:`reference`, a small
  model of DESIGN §4.2/§5 written from the semantics, not from the planner.
"""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from overlay import abi
from overlay.abi import Reason
from overlay.config import config_from_dict
from overlay.datapath.ebpf.maps import MapSet
from overlay.diff import diff
from overlay.model import Endpoint, Node, Policy
from overlay.plan import plan
from overlay.policy import policy_indexes
from tests.support.bpfmaps import mapset_of

OK, SHOT = 0, 2
TCP_P, UDP_P, ICMP_P = 6, 17, 1
HOST = "10.0.0.1"
OWN = (HOST, "198.18.0.1", "192.168.0.1")  # this node's private, public, overlay (program())


def packet(src: str, proto: str, dport: int = 0, sport: int = 40000, dst: str = HOST) -> bytes:
    ip = IP(src=src, dst=dst)
    if proto == "tcp":
        l4 = TCP(sport=sport, dport=dport, flags="S")
    elif proto == "udp":
        l4 = UDP(sport=sport, dport=dport)
    else:
        l4 = ICMP(type=8, id=sport & 0xFFFF, seq=1)
    return bytes(Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b") / ip / l4 / b"x")


def pol(pid: str, src: str, dst: str, proto: str, ports=()) -> Policy:
    """``src``: a group name, or a CIDR (contains '/')."""
    spec = []
    for p in ports:
        lo, _, hi = str(p).partition("-")
        spec.append((int(lo), int(hi or lo)))
    endpoint = Endpoint(cidr=src) if "/" in src else Endpoint(group=src)
    return Policy(endpoint, Endpoint(group=dst), proto, tuple(sorted(set(spec))), pid)


def peer(i: int, real: str, groups=()) -> Node:
    return Node(f"peer-{i}", "n1", real, f"198.18.9.{i}", f"192.168.0.{10 + i}", tuple(sorted(groups)))


def program(maps: MapSet, groups, peers, policies, **filt):
    """Plan for this node (HOST, in ``groups``) and write the maps by diff."""
    registry = filt.pop("registry", "zk.example")
    cfg = config_from_dict({
        "node_id": "self", "network": "n1", "groups": list(groups),
        "registry": {"hosts": [f"{registry}:2181"]}, "filter": filt,
    })
    me = Node("self", "n1", HOST, "198.18.0.1", "192.168.0.1", tuple(sorted(set(groups))))
    desired = plan(me, peers, cfg, policies=policies)
    maps.apply(diff(desired.tables, maps.read_all()))
    return desired


# --------------------------------------------------------------- the table

WEB, APP, WEBAPP, BARE = "10.0.0.12", "10.0.0.13", "198.18.2.12", "10.0.0.14"
PEERS = [peer(1, WEB, ["web"]), peer(2, APP, ["app"]), peer(3, WEBAPP, ["app", "web"]), peer(4, BARE)]
POLICIES = [
    pol("web-db", "web", "db", "tcp", [5432]),
    pol("range", "app", "db", "udp", ["8000-8100"]),
    pol("ping", "web", "db", "icmp"),
    pol("ops-cidr", "198.51.100.0/24", "db", "tcp", [9000]),
    pol("wide-cidr", "198.51.0.0/16", "db", "tcp", [443]),
    pol("cache", "web", "cache", "tcp", [6379]),  # selects other nodes only
]
# the index reported with a default-deny drop: the first policy (by id) selecting the node
DEFAULT_INDEX = policy_indexes(["ops-cidr", "ping", "range", "web-db", "wide-cidr"])["ops-cidr"]


@dataclasses.dataclass
class Case:
    id: str
    src: str
    proto: str
    dport: int
    verdict: int
    reason: Reason
    filt: dict = dataclasses.field(default_factory=dict)
    groups: tuple = ("db",)
    audit: int = 0


def allow(id_, src, proto, dport, reason=Reason.PASS_POLICY, **kw):
    return Case(id_, src, proto, dport, OK, reason, **kw)


def deny(id_, src, proto, dport, **kw):
    return Case(id_, src, proto, dport, SHOT, Reason.DROP_POLICY, **kw)


CASES = [
    allow("member-identity", WEB, "tcp", 5432),
    deny("member-other-port", WEB, "tcp", 5433),
    deny("member-other-proto", WEB, "udp", 5432),
    deny("other-group", APP, "tcp", 5432),
    allow("multi-group-identity-web-policy", WEBAPP, "tcp", 5432),
    allow("multi-group-identity-app-policy", WEBAPP, "udp", 8050),
    deny("range-below", APP, "udp", 7999),
    allow("range-first", APP, "udp", 8000),
    allow("range-middle-aligned", APP, "udp", 8064),
    allow("range-last", APP, "udp", 8100),
    deny("range-above", APP, "udp", 8101),
    allow("icmp-allowed", WEB, "icmp", 0),
    deny("icmp-other-group", APP, "icmp", 0),
    allow("cidr-source", "198.51.100.7", "tcp", 9000),
    allow("cidr-source-through-containing-cidr", "198.51.100.7", "tcp", 443),
    allow("wider-cidr-only", "198.51.7.7", "tcp", 443),
    deny("narrower-cidr-not-holding-source", "198.51.7.7", "tcp", 9000),
    deny("outside-every-cidr", "198.52.0.1", "tcp", 443),
    deny("member-without-groups", BARE, "tcp", 5432),
    deny("members-no-longer-pass", APP, "tcp", 7000),
    deny("open-ports-no-longer-apply", "203.0.113.9", "tcp", 80, filt={"open_ports": [80]}),
    deny("default-deny-without-reject-all", "203.0.113.9", "udp", 53, filt={"reject_all": False}),
    Case("audit-passes-and-reports", APP, "tcp", 5432, OK, Reason.DROP_POLICY, filt={"mode": "audit"}, audit=1),
    allow("audit-allowed-still-policy", WEB, "tcp", 5432, filt={"mode": "audit"}),
    allow("failsafe-ssh-beats-policy", "203.0.113.5", "tcp", 22, Reason.PASS_FAILSAFE,
          filt={"ssh_whitelist": ["203.0.113.0/24"]}),
    deny("failsafe-ssh-only-port-22", "203.0.113.5", "tcp", 23, filt={"ssh_whitelist": ["203.0.113.0/24"]}),
    allow("registry-address-beats-policy", "198.18.0.10", "udp", 2181, Reason.PASS_FAILSAFE,
          filt={"registry": "198.18.0.10"}),
    Case("loopback-is-martian-under-default-deny", "127.0.0.1", "tcp", 1, SHOT, Reason.DROP_MARTIAN),
    Case("own-public-address-is-martian", "198.18.0.1", "tcp", 5432, SHOT, Reason.DROP_MARTIAN),
    # a node no policy selects keeps the members / reject_all behaviour
    allow("not-selected-member", APP, "tcp", 5432, Reason.PASS_MEMBER, groups=("cache2",)),
    allow("not-selected-default", "203.0.113.9", "tcp", 5432, Reason.PASS_DEFAULT, groups=()),
    Case("not-selected-reject-all", "203.0.113.9", "tcp", 5432, SHOT, Reason.DROP_NOT_ALLOWED,
         filt={"reject_all": True}, groups=()),
    allow("selected-only-by-another-group", WEB, "tcp", 6379, Reason.PASS_MEMBER, groups=("web",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_policy_table(dp, maps, case):
    desired = program(maps, case.groups, PEERS, POLICIES, **case.filt)
    verdict, out = dp.run("ingress", packet(case.src, case.proto, case.dport))
    assert verdict == case.verdict
    assert out == packet(case.src, case.proto, case.dport)  # never altered
    assert dp.counters() == {case.reason: 1}
    events = dp.drain_events()
    if case.reason in (Reason.DROP_POLICY, Reason.DROP_NOT_ALLOWED, Reason.DROP_MARTIAN):
        assert len(events) == 1
        ev = events[0]
        assert (ev.reason, ev.audit, ev.direction) == (case.reason, case.audit, 0)
        assert abi.words_to_ip(ev.saddr, ev.family) == case.src and abi.be16_to_port(ev.dport) == case.dport
        if case.reason == Reason.DROP_POLICY:
            assert ev.policy == DEFAULT_INDEX
            assert maps.read_table("names")[("policy", ev.policy)] == "ops-cidr"
            assert desired.selected_by[0] == "ops-cidr"
        else:
            assert ev.policy == 0
    else:
        assert events == []


def test_established_reply_passes_under_default_deny(dp, maps):
    program(maps, ["db"], PEERS, POLICIES)
    # this host (HOST:40000) opened a TCP flow to 203.0.113.9:443: its uplink
    # egress tracked it; the reply passes although no policy allows it
    request = bytes(Ether() / IP(src=HOST, dst="203.0.113.9") / TCP(sport=40000, dport=443, flags="S"))
    assert dp.run("egress", request)[0] == OK
    reply = bytes(Ether() / IP(src="203.0.113.9", dst=HOST) / TCP(sport=443, dport=40000, flags="SA"))
    assert dp.run("ingress", reply)[0] == OK
    assert dp.counters() == {Reason.PASS_ESTABLISHED: 1}
    # the same source opening a new flow is dropped
    assert dp.run("ingress", packet("203.0.113.9", "tcp", 40001, sport=443))[0] == SHOT


def test_policy_change_and_removal_take_effect(dp, maps):
    program(maps, ["db"], PEERS, POLICIES)
    assert dp.run("ingress", packet(APP, "tcp", 5432))[0] == SHOT
    program(maps, ["db"], PEERS, POLICIES + [pol("app-db", "app", "db", "tcp", [5432])])
    assert dp.run("ingress", packet(APP, "tcp", 5432))[0] == OK
    # no policy selects the node any more: back to members / reject_all
    program(maps, ["db"], PEERS, [], reject_all=True)
    assert maps.read_table("policy") == {} and maps.read_table("cidr_ident") == {}
    assert maps.read_table("config") == {"reject_all": 1, "mode": 0}
    assert dp.run("ingress", packet(APP, "tcp", 7000))[0] == OK
    assert dp.run("ingress", packet("203.0.113.9", "tcp", 7000))[0] == SHOT
    assert dp.counters()[Reason.DROP_NOT_ALLOWED] == 1


def test_maps_read_back_as_planned(dp, maps):
    desired = program(maps, ["db"], PEERS, POLICIES)
    state = maps.read_all()
    for table in ("peers", "policy", "cidr_ident", "names", "config"):
        assert state[table] == desired.tables[table], table
    assert diff(desired.tables, state) == []


# --------------------------------------------------------------- differential (acceptance 1)

GROUPS = ("a", "b", "c", "d")
PEER_ADDRS = [f"10.0.0.{i}" for i in range(2, 10)]
OTHER_ADDRS = ["10.0.0.10", "10.0.1.5", "172.16.3.4", "192.0.2.200", "203.0.113.9", "8.8.8.8"]
CIDRS = ["0.0.0.0/0", "10.0.0.0/8", "10.0.0.0/24", "10.0.0.0/29", "10.0.0.8/30", "10.0.0.9/32",
         "172.16.0.0/12", "203.0.113.0/24", "192.0.2.0/25"]
PORT_EDGES = [1, 2, 22, 63, 64, 65, 127, 128, 1000, 1023, 1024, 5432, 32768, 65534, 65535]


@dataclasses.dataclass(frozen=True)
class World:
    node_groups: frozenset
    peers: dict          # real address -> frozenset of groups
    policies: tuple      # of Policy
    reject_all: bool
    audit: bool
    open_ports: tuple    # of (lo, hi)
    ssh_whitelist: tuple
    registry: str


def reference(world: World, src: str, proto: str, dport: int) -> tuple[int, Reason]:
    """DESIGN §4.2 and §5 for a new inbound packet (no conntrack entry):
    (verdict, the counter it lands in)."""
    addr = ipaddress.IPv4Address(src)
    drop = OK if world.audit else SHOT
    if addr in ipaddress.IPv4Network("127.0.0.0/8") or src in OWN:
        return drop, Reason.DROP_MARTIAN
    selecting = [p for p in world.policies if p.dst.group in world.node_groups]
    if not selecting and src in world.peers:
        # a member passes whatever the failsafe says: counted as a member (decided by
        # the peers hash before the failsafe trie, docs/datapath.md "Ingress filter order")
        return OK, Reason.PASS_MEMBER
    if src == world.registry:
        return OK, Reason.PASS_FAILSAFE
    if proto == "tcp" and dport == 22 and any(addr in ipaddress.IPv4Network(c) for c in world.ssh_whitelist):
        return OK, Reason.PASS_FAILSAFE
    if selecting:
        for p in selecting:
            if p.proto != proto:
                continue
            if p.src.group is not None:
                if p.src.group not in world.peers.get(src, ()):
                    continue
            elif addr not in ipaddress.IPv4Network(p.src.cidr):
                continue
            if proto == "icmp" or not p.ports or any(lo <= dport <= hi for lo, hi in p.ports):
                return OK, Reason.PASS_POLICY
        return drop, Reason.DROP_POLICY
    if src in world.peers:
        return OK, Reason.PASS_MEMBER
    if proto in ("tcp", "udp") and any(lo <= dport <= hi for lo, hi in world.open_ports):
        return OK, Reason.PASS_OPEN_PORT
    if world.reject_all:
        return drop, Reason.DROP_NOT_ALLOWED
    return OK, Reason.PASS_DEFAULT


_port_spec = st.one_of(
    st.sampled_from(PORT_EDGES).map(lambda p: (p, p)),
    st.tuples(st.sampled_from(PORT_EDGES), st.integers(0, 2000)).map(lambda t: (t[0], min(65535, t[0] + t[1]))),
    st.tuples(st.integers(1, 65535), st.integers(1, 65535)).map(lambda t: (min(t), max(t))),
)


@st.composite
def policies_st(draw):
    n = draw(st.integers(0, 7))
    out = []
    for i in range(n):
        src = draw(st.one_of(st.sampled_from(GROUPS), st.sampled_from(CIDRS)))
        proto = draw(st.sampled_from(["tcp", "udp", "icmp"]))
        ports = () if proto == "icmp" else tuple(sorted(set(draw(st.lists(_port_spec, max_size=3)))))
        endpoint = Endpoint(cidr=src) if "/" in src else Endpoint(group=src)
        out.append(Policy(endpoint, Endpoint(group=draw(st.sampled_from(GROUPS))), proto, ports, f"p{i}"))
    return tuple(out)


@st.composite
def worlds(draw):
    addrs = draw(st.lists(st.sampled_from(PEER_ADDRS), unique=True, max_size=6))
    peers = {a: frozenset(draw(st.sets(st.sampled_from(GROUPS), max_size=3))) for a in addrs}
    return World(
        node_groups=frozenset(draw(st.sets(st.sampled_from(GROUPS), max_size=3))),
        peers=peers,
        policies=draw(policies_st()),
        reject_all=draw(st.booleans()),
        audit=draw(st.integers(0, 4)) == 0,
        open_ports=tuple(draw(st.lists(_port_spec, max_size=2))),
        ssh_whitelist=tuple(draw(st.lists(st.sampled_from(CIDRS[1:]), max_size=1))),
        registry=draw(st.sampled_from(OTHER_ADDRS + PEER_ADDRS)),
    )


def packets_st(world: World):
    ports = {22, 0, 65535}
    for p in world.policies:
        for lo, hi in p.ports:
            ports |= {lo - 1, lo, hi, hi + 1, (lo + hi) // 2}
    ports = sorted(x for x in ports if 0 <= x <= 65535)
    one = st.tuples(
        st.sampled_from(PEER_ADDRS + OTHER_ADDRS),
        st.sampled_from(["tcp", "udp", "icmp"]),
        st.one_of(st.sampled_from(ports), st.integers(0, 65535)),
    )
    return st.lists(one, min_size=12, max_size=16)


def test_differential_against_reference_model(compiled, record_property):
    """Acceptance 1: at least 2,000 (world, packet) cases, each through plan ->
    diff -> MapSet.apply -> BPF_PROG_TEST_RUN, equal to the reference model."""
    compiled.reset()
    maps = mapset_of(compiled.bpf)
    cases = [0]

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(world=worlds(), data=st.data())
    def run(world, data):
        peers = [peer(i, a, g) for i, (a, g) in enumerate(sorted(world.peers.items()))]
        filt = {
            "reject_all": world.reject_all, "mode": "audit" if world.audit else "enforce",
            "open_ports": [f"{lo}-{hi}" for lo, hi in world.open_ports],
            "ssh_whitelist": list(world.ssh_whitelist), "registry": world.registry,
        }
        desired = program(maps, world.node_groups, peers, world.policies, **filt)
        compiled.drain_events()
        for src, proto, dport in data.draw(packets_st(world)):
            dport = 0 if proto == "icmp" else dport
            compiled.bpf[b"ovl_ct_in"].clear()  # every packet starts a new flow (the model's premise)
            before = compiled.counters()
            verdict, _ = compiled.run("ingress", packet(src, proto, dport))
            after = compiled.counters()
            moved = {r for r in after if after[r] != before.get(r, 0)}
            want = reference(world, src, proto, dport)
            assert (verdict, moved) == (want[0], {want[1]}), (src, proto, dport, world)
            events = compiled.drain_events()
            if want[1] == Reason.DROP_POLICY:
                assert len(events) == 1 and events[0].audit == int(world.audit)
                assert events[0].policy == desired.tables["config"]["policy_default"]
            cases[0] += 1

    try:
        run()
    finally:
        maps.close()
        compiled.reset()
    record_property("differential_cases", cases[0])
    print(f"differential cases: {cases[0]}")
    assert cases[0] >= 2000
