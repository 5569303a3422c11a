"""The pure planner (DESIGN §5, §7.4): tables in, tables out, asserted exactly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.abi import FS_ALL, FS_SSH, bitmap_ports, ports_bitmap
from overlay.config import config_from_dict
from overlay.model import Node
from overlay.ops import TABLES, NatEntry, PeerEntry
from overlay.plan import AppliedPeer, plan
from tests.unit.test_policy_plan import sha31

MODE_ENFORCE, MODE_AUDIT = 0, 1  # ovl_filter_mode (hand values: the header's enum)


def entry(groups=()) -> PeerEntry:
    """The peers value of a member in ``groups``: its identity (overlay.policy)."""
    return PeerEntry(identity=sha31(",".join(sorted(groups))) if groups else 1)

SELF = Node("self", "ec2", "10.0.0.1", "198.18.0.1", "192.168.0.1", ("web",))


def cfg(**over):
    base = {"node_id": "self", "network": "ec2", "registry": {"hosts": ["zk.example:2181"]}}
    base.update(over)
    return config_from_dict(base)


def node(node_id, network, private, public, overlay, groups=()):
    return Node(node_id, network, private, public, overlay, tuple(groups))


EC2_B = node("ec2-b", "ec2", "10.0.0.2", "198.18.0.2", "192.168.0.2", ["web"])
VPC_A = node("vpc-a", "vpc", "10.0.0.2", "198.19.0.2", "192.168.1.2", ["db"])


# --- real address selection --------------------------------------------------------------

REAL_CASES = [
    ("same network -> private", EC2_B, "10.0.0.2"),
    ("other network -> public", VPC_A, "198.19.0.2"),
    (
        "overlapping private range in the other network -> public",
        node("vpc-x", "vpc", "10.0.0.1", "198.19.0.1", "192.168.1.1"),
        "198.19.0.1",
    ),
]


@pytest.mark.parametrize(("desc", "peer", "real"), REAL_CASES, ids=[c[0] for c in REAL_CASES])
def test_real_address(desc, peer, real):
    d = plan(SELF, [peer], cfg())
    assert d.tables["nat"] == {peer.overlay: NatEntry(real)}
    assert d.tables["peers"] == {real: entry(peer.groups)}
    assert d.peers == (AppliedPeer(peer.node_id, peer.network, peer.overlay, real, peer.groups),)
    assert d.excluded == ()


def test_tables_present_and_peers_sorted():
    d = plan(SELF, [VPC_A, EC2_B], cfg())
    assert set(d.tables) == set(TABLES)
    assert [p.node_id for p in d.peers] == ["ec2-b", "vpc-a"]


def test_nat_and_peers_tables():
    peers = [EC2_B, VPC_A, node("vpc-b", "vpc", "10.0.0.3", "198.19.0.3", "192.168.1.3")]
    d = plan(SELF, peers, cfg())
    assert d.tables["nat"] == {
        "192.168.0.2": NatEntry("10.0.0.2"),
        "192.168.1.2": NatEntry("198.19.0.2"),
        "192.168.1.3": NatEntry("198.19.0.3"),
    }
    assert d.tables["peers"] == {
        "10.0.0.2": entry(["web"]), "198.19.0.2": entry(["db"]), "198.19.0.3": entry(),
    }
    # no reverse table (ABI 4): a reply's source is restored from conntrack
    assert "rnat" not in d.tables


def test_plan_is_deterministic_and_order_independent():
    peers = [EC2_B, VPC_A, node("vpc-b", "vpc", "10.0.0.3", "198.19.0.3", "192.168.1.3")]
    assert plan(SELF, peers, cfg()) == plan(SELF, list(reversed(peers)), cfg())


# --- nat_overrides ------------------------------------------------------------------------


def test_nat_override_takes_precedence_over_the_peer_mapping():
    d = plan(SELF, [EC2_B, VPC_A], cfg(nat_overrides={"192.168.1.2": "10.9.9.9"}))
    assert d.tables["nat"]["192.168.1.2"] == NatEntry("10.9.9.9", override=True)
    assert d.tables["nat"]["192.168.0.2"] == NatEntry("10.0.0.2")
    # the peer is still a member at its own real address
    assert d.tables["peers"]["198.19.0.2"] == entry(["db"])


def test_nat_override_without_a_peer():
    d = plan(SELF, [], cfg(nat_overrides={"192.168.63.1": "10.0.0.250"}))
    assert d.tables["nat"] == {"192.168.63.1": NatEntry("10.0.0.250", override=True)}
    assert d.tables["peers"] == {}


def test_nat_override_to_a_peers_real_address_keeps_both_translations():
    d = plan(SELF, [EC2_B], cfg(nat_overrides={"192.168.63.1": "10.0.0.2"}))
    assert d.tables["nat"]["192.168.0.2"] == NatEntry("10.0.0.2")
    assert d.tables["nat"]["192.168.63.1"] == NatEntry("10.0.0.2", override=True)
    assert d.tables["peers"] == {"10.0.0.2": entry(["web"])}


def test_nat_override_of_own_overlay_is_ignored():
    d = plan(SELF, [], cfg(nat_overrides={"192.168.0.1": "10.0.0.250"}))
    assert d.tables["nat"] == {}


# --- exclusions ---------------------------------------------------------------------------

EXCLUDE_CASES = [
    (
        "self is neither applied nor excluded",
        [SELF, EC2_B],
        {},
        ["ec2-b"],
    ),
    (
        "overlay outside the subnet",
        [EC2_B, node("far", "vpc", "10.0.0.9", "198.19.0.9", "10.200.0.9")],
        {"far": "outside the overlay subnet 192.168.0.0/18"},
        ["ec2-b"],
    ),
    (
        "overlay is the subnet's network address",
        [node("net", "vpc", "10.0.0.9", "198.19.0.9", "192.168.0.0")],
        {"net": "outside the overlay subnet"},
        [],
    ),
    (
        "overlay is the subnet's broadcast address",
        [node("bcast", "vpc", "10.0.0.9", "198.19.0.9", "192.168.63.255")],
        {"bcast": "outside the overlay subnet"},
        [],
    ),
    (
        "overlay is not an address at all",
        [node("junk", "vpc", "10.0.0.9", "198.19.0.9", "not-an-ip")],
        {"junk": "is not an IPv4 address"},
        [],
    ),
    (
        "overlay claims this node's own",
        [node("thief", "vpc", "10.0.0.9", "198.19.0.9", "192.168.0.1")],
        {"thief": "this node's own"},
        [],
    ),
    (
        "two records claim one overlay, no order given: the first node id keeps it",
        [
            EC2_B,
            node("dup-b", "vpc", "10.0.0.6", "198.19.0.6", "192.168.1.5"),
            node("dup-a", "vpc", "10.0.0.5", "198.19.0.5", "192.168.1.5"),
        ],
        {"dup-b": "overlay address 192.168.1.5 is held by the earlier registration dup-a"},
        ["dup-a", "ec2-b"],
    ),
    (
        "three claimants: the later two name the holder",
        [
            node("t1", "vpc", "10.0.0.5", "198.19.0.5", "192.168.1.5"),
            node("t2", "vpc", "10.0.0.6", "198.19.0.6", "192.168.1.5"),
            node("t3", "vpc", "10.0.0.7", "198.19.0.7", "192.168.1.5"),
        ],
        {"t2": "held by the earlier registration t1", "t3": "held by the earlier registration t1"},
        ["t1"],
    ),
    (
        "two peers share a real address: the first node id keeps it",
        [
            VPC_A,
            node("same-1", "ec2", "10.0.0.7", "198.18.0.7", "192.168.0.7"),
            node("same-2", "ec2", "10.0.0.7", "198.18.0.8", "192.168.0.8"),
        ],
        {"same-2": "real address 10.0.0.7 is held by the earlier registration same-1"},
        ["same-1", "vpc-a"],
    ),
    (
        "same private in different networks is no conflict (the overlap)",
        [EC2_B, VPC_A],
        {},
        ["ec2-b", "vpc-a"],
    ),
    (
        "a same-network peer at this node's own private address",
        [node("ghost", "ec2", "10.0.0.1", "198.18.0.99", "192.168.0.99")],
        {"ghost": "real address 10.0.0.1 is this node's own"},
        [],
    ),
]


@pytest.mark.parametrize(
    ("desc", "peers", "excluded", "applied"), EXCLUDE_CASES, ids=[c[0] for c in EXCLUDE_CASES]
)
def test_exclusions(desc, peers, excluded, applied):
    d = plan(SELF, peers, cfg())
    got = dict(d.excluded)
    assert set(got) == set(excluded)
    for node_id, fragment in excluded.items():
        assert fragment in got[node_id], got[node_id]
    assert [p.node_id for p in d.peers] == applied
    # nothing excluded leaks into a table
    assert set(d.tables["nat"]) == {p.overlay for p in d.peers}
    assert set(d.tables["peers"]) == {p.real for p in d.peers}


def test_excluded_is_sorted_by_node_id():
    peers = [
        node("z", "vpc", "10.0.0.5", "198.19.0.5", "10.0.0.5"),
        node("a", "vpc", "10.0.0.6", "198.19.0.6", "10.0.0.6"),
    ]
    assert [k for k, _ in plan(SELF, peers, cfg()).excluded] == ["a", "z"]


def test_other_subnet_from_config():
    peers = [node("p", "vpc", "10.0.0.5", "198.19.0.5", "172.16.0.5"), VPC_A]
    me = node("self", "ec2", "10.0.0.1", "198.18.0.1", "172.16.0.1")
    d = plan(me, peers, cfg(overlay_subnet="172.16.0.0/16"))
    assert [p.node_id for p in d.peers] == ["p"]
    assert "vpc-a" in dict(d.excluded)


# --- open ports ---------------------------------------------------------------------------


def test_open_ports_bitmap_single_and_range():
    d = plan(SELF, [], cfg(filter={"open_ports": [80, "8000-8100"]}))
    words = d.tables["ports"]
    # port 80: word 1, bit 16, for both tcp (slot 0) and udp (slot 1)
    assert words[(0, 1)] == 1 << 16
    assert words[(1, 1)] == 1 << 16
    expected = [80, *range(8000, 8101)]
    assert bitmap_ports(words, 0) == expected
    assert bitmap_ports(words, 1) == expected
    # 8000..8100 spans words 125 (bits 0..63) and 126 (bits 0..36)
    assert words[(0, 125)] == (1 << 64) - 1
    assert words[(0, 126)] == (1 << 37) - 1
    assert set(words) == {(s, w) for s in (0, 1) for w in (1, 125, 126)}


def test_no_open_ports_is_an_empty_bitmap():
    assert plan(SELF, [], cfg()).tables["ports"] == {}


def test_ports_bitmap_edges():
    words = ports_bitmap([(1, 1), (63, 64), (65535, 65535)], protos=("tcp",))
    assert words == {(0, 0): (1 << 1) | (1 << 63), (0, 1): 1, (0, 1023): 1 << 63}
    assert bitmap_ports(words, 0) == [1, 63, 64, 65535]
    assert bitmap_ports(words, 1) == []


_specs = st.lists(
    st.tuples(st.integers(1, 65535), st.integers(0, 300)).map(lambda t: (t[0], min(65535, t[0] + t[1]))),
    max_size=8,
)


@given(_specs)
def test_bitmap_ports_inverts_ports_bitmap(specs):
    words = ports_bitmap(specs)
    expected = sorted({p for lo, hi in specs for p in range(lo, hi + 1)})
    assert bitmap_ports(words, 0) == expected
    assert bitmap_ports(words, 1) == expected
    assert all(bits for bits in words.values())
    assert all(0 <= w < 1024 and 0 < bits < (1 << 64) for (_, w), bits in words.items())


# --- failsafe and config ------------------------------------------------------------------


def test_failsafe_ssh_whitelist_and_registry_hosts():
    c = cfg(
        filter={"ssh_whitelist": ["198.18.0.0/15", "203.0.113.0/24"]},
        registry={"hosts": ["198.51.100.2:2181", "zk.example:2181", "198.51.100.3:2181"]},
    )
    d = plan(SELF, [], c, extra_failsafe=["192.0.2.7"])
    assert d.tables["failsafe"] == {
        "198.18.0.0/15": FS_SSH,
        "203.0.113.0/24": FS_SSH,
        "198.51.100.2/32": FS_ALL,
        "198.51.100.3/32": FS_ALL,
        "192.0.2.7/32": FS_ALL,
    }


def test_failsafe_flags_combine_on_one_cidr():
    c = cfg(filter={"ssh_whitelist": ["198.51.100.2/32"]}, registry={"hosts": ["198.51.100.2:2181"]})
    assert plan(SELF, [], c).tables["failsafe"] == {"198.51.100.2/32": FS_SSH | FS_ALL}


_TLS = {"ca": "/c/ca.crt", "cert": "/c/n.crt", "key": "/c/n.key"}


@pytest.mark.parametrize(
    ("registry", "expected"),
    [
        # backend grpc: the controller's address, not the (unused) ZooKeeper hosts
        ({"backend": "grpc", "controller": "198.18.0.10:9470", "tls": _TLS}, {"198.18.0.10/32": FS_ALL}),
        ({"backend": "grpc", "controller": "198.18.0.10:9470", "tls": _TLS, "hosts": ["198.51.100.2:2181"]},
         {"198.18.0.10/32": FS_ALL}),
        # a name: resolved addresses come in as extra_failsafe
        ({"backend": "grpc", "controller": "ctl.example:9470", "tls": _TLS}, {}),
        ({"backend": "zookeeper", "hosts": ["198.51.100.2:2181"]}, {"198.51.100.2/32": FS_ALL}),
    ],
    ids=["grpc-controller", "grpc-ignores-hosts", "grpc-controller-name", "zookeeper-hosts"],
)
def test_failsafe_registry_address_by_backend(registry, expected):
    assert plan(SELF, [], cfg(registry=registry)).tables["failsafe"] == expected


def test_failsafe_empty_when_nothing_configured():
    assert plan(SELF, [], cfg()).tables["failsafe"] == {}


@pytest.mark.parametrize(
    ("filt", "expected"),
    [
        ({}, {"reject_all": 0, "mode": MODE_ENFORCE}),
        ({"reject_all": True}, {"reject_all": 1, "mode": MODE_ENFORCE}),
        ({"mode": "audit"}, {"reject_all": 0, "mode": MODE_AUDIT}),
        ({"reject_all": True, "mode": "audit"}, {"reject_all": 1, "mode": MODE_AUDIT}),
    ],
)
def test_config_table(filt, expected):
    assert plan(SELF, [], cfg(filter=filt)).tables["config"] == expected


def test_conntrack_lifetimes_written_only_when_not_the_default():
    """0 (absent) means the default in the datapath, so defaults write nothing."""
    assert plan(SELF, [], cfg(datapath={"conntrack": {"tcp_syn_s": 120}})).tables["config"] == {
        "reject_all": 0, "mode": MODE_ENFORCE}
    got = plan(SELF, [], cfg(datapath={"conntrack": {"tcp_syn_s": 30, "udp_s": 60, "frag_s": 2,
                                                     "tcp_established_s": 86400}})).tables["config"]
    assert got == {"reject_all": 0, "mode": MODE_ENFORCE, "ct_tcp_syn_s": 30, "ct_udp_s": 60, "frag_s": 2,
                   "ct_tcp_established_s": 86400}


# --- this node's own addresses (martians) and IPv6 -------------------------------------------

SELF6 = Node("self", "ec2", "10.0.0.1", "198.18.0.1", "192.168.0.1", ("web",),
             private6="2001:db8::1", public6="2001:db8:1::1")


def test_self_table_lists_every_own_address():
    assert plan(SELF, [], cfg()).tables["self"] == {"10.0.0.1": 1, "198.18.0.1": 1, "192.168.0.1": 1}
    assert plan(SELF6, [], cfg()).tables["self"] == {
        "10.0.0.1": 1, "198.18.0.1": 1, "192.168.0.1": 1, "2001:db8::1": 1, "2001:db8:1::1": 1}


def test_peer_ipv6_real_address_private6_same_network_public6_across():
    same = Node("b", "ec2", "10.0.0.2", "198.18.0.2", "192.168.0.2", ("db",), private6="2001:db8::2",
                public6="2001:db8:1::2")
    other = Node("c", "vpc", "10.0.0.3", "198.19.0.3", "192.168.1.3", (), private6="fd00::3",
                 public6="2001:db8:2::3")
    only_private6 = Node("d", "vpc", "10.0.0.4", "198.19.0.4", "192.168.1.4", (), private6="fd00::4")
    d = plan(SELF6, [same, other, only_private6], cfg())
    assert d.tables["peers"] == {
        "10.0.0.2": entry(("db",)), "2001:db8::2": entry(("db",)),
        "198.19.0.3": entry(), "2001:db8:2::3": entry(),
        "198.19.0.4": entry(),  # its private6 is not reachable from another network
    }
    by_id = {p.node_id: p for p in d.peers}
    assert by_id["b"].real6 == "2001:db8::2" and by_id["d"].real6 is None
    assert by_id["c"].to_dict()["real6"] == "2001:db8:2::3"
    # no IPv6 NAT: nat stays IPv4
    assert all(":" not in k for k in d.tables["nat"])


def test_ipv6_address_claimed_twice_or_own_admits_nobody():
    a = Node("a", "ec2", "10.0.0.2", "198.18.0.2", "192.168.0.2", private6="2001:db8::9")
    b = Node("b", "ec2", "10.0.0.3", "198.18.0.3", "192.168.0.3", private6="2001:db8::9")
    c = Node("c", "ec2", "10.0.0.4", "198.18.0.4", "192.168.0.4", private6="2001:db8::1")  # ours
    peers = plan(SELF6, [a, b, c], cfg()).tables["peers"]
    assert set(peers) == {"10.0.0.2", "10.0.0.3", "10.0.0.4"}


def test_ipv6_failsafe_from_whitelist_and_registry():
    d = plan(SELF, [], cfg(filter={"ssh_whitelist": ["2001:db8::/32", "198.18.0.0/15"]},
                           registry={"hosts": ["[2001:db8::2]:2181", "198.18.0.2:2181", "zk:2181"]}))
    assert d.tables["failsafe"] == {"2001:db8::/32": FS_SSH, "198.18.0.0/15": FS_SSH,
                                    "2001:db8::2/128": FS_ALL, "198.18.0.2/32": FS_ALL}
