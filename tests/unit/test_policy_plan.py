"""The policy planner (overlay.policy, through overlay.plan): identities, CIDR
identities, port prefixes, policy selection, names, and acceptance 5 (a change
among 1,000 policies and 10,000 peers touches only the affected entries)."""

from __future__ import annotations

import hashlib
import ipaddress
import time
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.abi import IDENTITY_CIDR, IDENTITY_MEMBER
from overlay.config import config_from_dict
from overlay.diff import diff
from overlay.model import Endpoint, Node, Policy, policy_from_dict
from overlay.ops import PeerEntry
from overlay.plan import plan
from overlay.policy import (
    MASK31,
    assign_numbers,
    cidr_identities,
    cut,
    describe,
    hash31,
    identities,
    plan_policies,
    policy_indexes,
    port_prefixes,
)


def covers(start: int, bits: int, port: int) -> bool:
    """The ports a policy key (first port, fixed bits) stands for, as a range (the reference:
    the kernel's LPM match on the port's leading bits)."""
    return start <= port < start + (1 << (16 - bits))

CFG = config_from_dict({"node_id": "self", "network": "ec2", "registry": {"hosts": ["zk.example:2181"]}})
SELF = Node("self", "ec2", "10.0.0.1", "198.18.0.1", "192.168.0.1", ("db",))


# sha256 of each text, its first 31 bits, computed with coreutils' sha256sum when these tests
# were written (`printf %s TEXT | sha256sum`): the identity and index numbers the product must give
SHA31 = {
    "web": 0x4b5e57f6, "db,web": 0x61102ad8, "app": 0x2172cedc, "app,web": 0x5e260ba5,
    "g12,g8,newgroup": 0x1bf8637e, "10.0.0.0/8": 0x13997fe8, "web-db": 0x43383982, "aa": 0x161b6dd3,
    "zz": 0x4a60bf7d, "all": 0x5ef5ef03, "ping": 0x758d61f2, "apart": 0x1d40973e, "mid": 0x10ac1678,
    "narrow": 0x5eda958e, "wide": 0x0abaa40b, "all4": 0x5d58c916, "all6": 0x398c0a4f, "doc6": 0x686ea167,
    "lab6": 0x45f6ea34, "a": 0x4a978112, "b": 0x3e23e816, "zz-new": 0x020173ac,
}


def sha31(text: str) -> int:
    """The reference hash, independent of overlay.policy: the table above, or hashlib's hex digest."""
    value = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF
    assert SHA31.get(text, value) == value
    return value


def ref_indexes(policy_ids) -> dict[str, int]:
    """A second model of the policy index rule (docs/policies.md): in sorted order of the ids,
    sha31(id), stepping up (wrapping at 2**31) past 0 and the numbers already given."""
    out: dict[str, int] = {}
    for pid in sorted(set(policy_ids)):
        n = sha31(pid)
        while n == 0 or n in out.values():
            n = (n + 1) % (1 << 31)
        out[pid] = n
    return out


def pol(pid: str, src: str, dst: str, proto: str = "tcp", ports=()) -> Policy:
    endpoint = {"cidr": src} if "/" in src else {"group": src}
    return policy_from_dict({"v": 1, "from": endpoint, "to": {"group": dst}, "proto": proto,
                             "ports": list(ports)}, pid)


def node(i: int, groups=(), network="ec2") -> Node:
    """Node ``i`` (i >= 0): 10.x.y.(i+2) privately, never this node's 10.0.0.1."""
    j = i + 2
    return Node(f"n{i}", network, f"10.{j >> 16 & 255}.{j >> 8 & 255}.{j & 255}",
                f"198.19.{j >> 8 & 255}.{j & 255}", str(ipaddress.IPv4Address(0xC0A80000 + j)),
                tuple(sorted(groups)))


# --- identities ---------------------------------------------------------------------------


def test_identity_is_a_stateless_31_bit_hash_of_the_group_set():
    ids = identities([["web"], ["db", "web"], ["web", "db"], []])
    assert ids == {"web": sha31("web"), "db,web": sha31("db,web"), "": IDENTITY_MEMBER}
    assert all(0 < v <= MASK31 for v in ids.values())
    # the same set gets the same number whoever else is there (minimal diffs, stable restarts)
    assert identities([["web"]])["web"] == identities([["app"], ["web"], ["x", "y"]])["web"]
    assert hash31("web") == SHA31["web"] and hash31("db,web") == SHA31["db,web"]


def test_identity_collisions_probe_in_sorted_order():
    tiny = lambda _text: 5  # noqa: E731 - every set collides
    assert identities([["c"], ["a"], ["b"]], hash_fn=tiny) == {"a": 5, "b": 6, "c": 7}
    # 0 and 1 are reserved: a hash landing there probes past them, wrapping at 2**31
    assert identities([["a"], ["b"]], hash_fn=lambda _t: MASK31) == {"a": MASK31, "b": 2}
    assert identities([["a"]], hash_fn=lambda _t: 1) == {"a": 2}
    assert identities([["a"]], hash_fn=lambda _t: 0) == {"a": 2}


def test_collision_in_the_plan_gives_distinct_identities_and_entries():
    policies = [pol("p-a", "a", "db", ports=[1]), pol("p-b", "b", "db", ports=[2])]
    t = plan_policies(["db"], [["a"], ["b"]], policies, hash_fn=lambda _t: 9)
    assert t.identity_of == {"a": 9, "b": 10}
    assert t.index_of == {"p-a": 9, "p-b": 10}
    assert t.policy == {(9, 6, 1, 16): 9, (10, 6, 2, 16): 10}
    assert t.names[("identity", 9)] == "a" and t.names[("identity", 10)] == "b"


def test_cidr_identities_have_bit_31_and_probe():
    ids = cidr_identities(["10.0.0.0/8", "10.1.0.0/16"])
    assert all(v & IDENTITY_CIDR for v in ids.values()) and len(set(ids.values())) == 2
    assert ids["10.0.0.0/8"] == IDENTITY_CIDR | sha31("10.0.0.0/8")
    assert cidr_identities(["b/1", "a/1"], hash_fn=lambda _t: 0) == {"a/1": IDENTITY_CIDR | 1,
                                                                     "b/1": IDENTITY_CIDR | 2}


def test_policy_indexes_never_zero():
    assert policy_indexes(["x", "y"], hash_fn=lambda _t: 0) == {"x": 1, "y": 2}
    assert assign_numbers([], hash_fn=hash31) == {}


# --- ports --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (0, 65535, [(0, 0)]),
        (5432, 5432, [(5432, 16)]),
        (8000, 8100, [(8000, 10), (8064, 11), (8096, 14), (8100, 16)]),
        (1, 65535, [(1, 16), (2, 15), (4, 14), (8, 13), (16, 12), (32, 11), (64, 10), (128, 9),
                    (256, 8), (512, 7), (1024, 6), (2048, 5), (4096, 4), (8192, 3), (16384, 2),
                    (32768, 1)]),
    ],
)
def test_port_prefixes_examples(lo, hi, expected):
    assert port_prefixes(lo, hi) == expected


def test_port_prefixes_worst_case_is_30():
    assert len(port_prefixes(1, 65534)) == 30


@given(st.integers(0, 65535), st.integers(0, 65535), st.lists(st.integers(0, 65535), max_size=20))
def test_port_prefixes_cover_exactly_the_range(a, b, probes):
    lo, hi = min(a, b), max(a, b)
    prefixes = port_prefixes(lo, hi)
    assert len(prefixes) <= 30
    blocks = sorted((s, s + (1 << (16 - bits)) - 1) for s, bits in prefixes)
    # aligned, inside the range, disjoint and adjacent, from lo to hi: an exact cover
    for s, bits in prefixes:
        assert s % (1 << (16 - bits)) == 0
    assert blocks[0][0] == lo and blocks[-1][1] == hi
    assert all(blocks[i][1] + 1 == blocks[i + 1][0] for i in range(len(blocks) - 1))
    # and the lookup rule agrees: a port is covered iff it is in the range
    for p in {lo - 1, lo, hi, hi + 1, (lo + hi) // 2, *probes}:
        if 0 <= p <= 65535:
            assert any(covers(s, bits, p) for s, bits in prefixes) == (lo <= p <= hi), p


def test_bad_range_refused():
    with pytest.raises(ValueError):
        port_prefixes(10, 9)


# --- selection, tables, names ------------------------------------------------------------


def test_only_policies_selecting_this_node_make_entries():
    peers = [node(2, ["web"]), node(3, ["app"])]
    policies = [pol("web-db", "web", "db", "tcp", [5432]), pol("web-cache", "web", "cache", "tcp", [6379])]
    d = plan(SELF, peers, CFG, policies=policies)
    web = sha31("web")
    idx = ref_indexes(["web-db"])["web-db"]
    assert d.tables["policy"] == {(web, 6, 5432, 16): idx}
    assert d.tables["config"] == {"reject_all": 0, "mode": 0, "policy_enforced": 1, "policy_default": idx}
    assert d.selected_by == ("web-db",)
    assert d.tables["peers"] == {"10.0.0.4": PeerEntry(web), "10.0.0.5": PeerEntry(sha31("app"))}
    assert d.tables["names"] == {
        ("policy", idx): "web-db",
        ("rule", idx): "tcp 5432 from group web to group db",
        ("identity", web): "web",
        ("identity", sha31("app")): "app",
    }
    # a node that no policy selects: no entries, no policy config (members / reject_all)
    other = plan(replace(SELF, groups=("web",)), peers, CFG, policies=policies)
    assert other.tables["policy"] == {} and other.tables["cidr_ident"] == {}
    assert other.tables["config"] == {"reject_all": 0, "mode": 0}
    assert other.selected_by == ()


def test_policies_as_a_mapping_take_their_ids():
    p = replace(pol("", "web", "db", "udp", [53]), policy_id="")
    d = plan(SELF, [node(2, ["web"])], CFG, policies={"dns": p})
    assert d.selected_by == ("dns",)


def test_default_is_the_first_selecting_policy_by_id():
    policies = [pol("zz", "web", "db"), pol("aa", "app", "db"), pol("00", "web", "other")]
    d = plan(SELF, [node(2, ["web"])], CFG, policies=policies)
    assert d.tables["config"]["policy_default"] == ref_indexes(["aa", "zz"])["aa"]
    assert d.selected_by == ("aa", "zz")


def test_all_ports_icmp_and_multi_group_identity():
    policies = [pol("all", "web", "db", "udp"), pol("ping", "app", "db", "icmp")]
    d = plan(SELF, [node(2, ["app", "web"])], CFG, policies=policies)
    ident = sha31("app,web")
    idx = ref_indexes(["all", "ping"])
    assert d.tables["policy"] == {(ident, 17, 0, 0): idx["all"], (ident, 1, 0, 16): idx["ping"]}
    assert d.tables["names"][("rule", idx["all"])] == "udp (all ports) from group web to group db"


def test_cidr_identity_covers_every_containing_policy_cidr():
    policies = [
        pol("wide", "10.0.0.0/8", "db", "tcp", [443]),
        pol("mid", "10.1.0.0/16", "db", "tcp", [80]),
        pol("narrow", "10.1.2.0/24", "db", "udp", [53]),
        pol("apart", "192.0.2.0/24", "db", "tcp", [22]),
    ]
    d = plan(SELF, [], CFG, policies=policies)
    ci = d.tables["cidr_ident"]
    assert set(ci) == {"10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "192.0.2.0/24"}
    assert all(v & IDENTITY_CIDR for v in ci.values())
    idx = ref_indexes(["apart", "mid", "narrow", "wide"])
    want = {
        (ci["10.0.0.0/8"], 6, 443, 16): idx["wide"],
        (ci["10.1.0.0/16"], 6, 443, 16): idx["wide"],
        (ci["10.1.0.0/16"], 6, 80, 16): idx["mid"],
        (ci["10.1.2.0/24"], 6, 443, 16): idx["wide"],
        (ci["10.1.2.0/24"], 6, 80, 16): idx["mid"],
        (ci["10.1.2.0/24"], 17, 53, 16): idx["narrow"],
        (ci["192.0.2.0/24"], 6, 22, 16): idx["apart"],
    }
    assert d.tables["policy"] == want
    assert d.tables["names"][("cidr", ci["10.1.0.0/16"])] == "10.1.0.0/16"


def test_ipv6_cidrs_get_identities_and_never_mix_with_ipv4():
    policies = [
        pol("all4", "0.0.0.0/0", "db", "tcp", [443]),
        pol("doc6", "2001:db8::/32", "db", "udp", [53]),
        pol("lab6", "2001:db8:1::/48", "db", "icmp"),
        pol("all6", "::/0", "db", "tcp", [22]),
    ]
    d = plan(SELF, [], CFG, policies=policies)
    ci = d.tables["cidr_ident"]
    assert set(ci) == {"0.0.0.0/0", "2001:db8::/32", "2001:db8:1::/48", "::/0"}
    idx = ref_indexes(["all4", "all6", "doc6", "lab6"])
    assert d.tables["policy"] == {
        (ci["0.0.0.0/0"], 6, 443, 16): idx["all4"],                 # ::/0 is not inside 0.0.0.0/0
        (ci["::/0"], 6, 22, 16): idx["all6"],
        (ci["2001:db8::/32"], 6, 22, 16): idx["all6"],
        (ci["2001:db8::/32"], 17, 53, 16): idx["doc6"],
        (ci["2001:db8:1::/48"], 6, 22, 16): idx["all6"],
        (ci["2001:db8:1::/48"], 17, 53, 16): idx["doc6"],
        (ci["2001:db8:1::/48"], 1, 0, 16): idx["lab6"],
    }


def test_member_ipv6_address_has_the_identity_of_its_groups():
    peer = replace(node(3, ["web"]), private6="2001:db8::33")
    d = plan(SELF, [peer], CFG, policies=[pol("web-db", "web", "db", "tcp", [5432])])
    assert d.tables["peers"]["2001:db8::33"] == d.tables["peers"][peer.private] != PeerEntry()


def test_same_entry_from_two_policies_is_named_by_the_first_id():
    policies = [pol("b", "web", "db", "tcp", [5432]), pol("a", "web", "db", "tcp", ["5000-6000"])]
    d = plan(SELF, [node(2, ["web"])], CFG, policies=policies)
    idx = ref_indexes(["a", "b"])
    assert d.tables["policy"][(sha31("web"), 6, 5432, 16)] == idx["b"]  # only b has the exact port
    policies = [pol("b", "web", "db", "tcp", [5432]), pol("a", "web", "db", "tcp", [5432])]
    d = plan(SELF, [node(2, ["web"])], CFG, policies=policies)
    assert d.tables["policy"] == {(sha31("web"), 6, 5432, 16): idx["a"]}


def test_names_are_cut_to_the_map_value():
    assert cut("x" * 300) == "x" * 252 + "..."
    assert len(cut("é" * 200).encode()) <= 255
    groups = [f"group-{i:03d}-" + "x" * 40 for i in range(10)]
    d = plan(SELF, [node(2, groups)], CFG, policies=[])
    (text,) = d.tables["names"].values()
    assert len(text.encode()) <= 255 and text.endswith("...")


def test_describe():
    assert describe(pol("p", "198.18.0.0/15", "db", "tcp", [22, "8000-8100"])) == \
        "tcp 22,8000-8100 from 198.18.0.0/15 to group db"
    assert describe(pol("p", "web", "db", "icmp")) == "icmp from group web to group db"


def test_plan_is_deterministic_with_policies():
    peers = [node(i, [f"g{i % 3}"]) for i in range(2, 12)]
    policies = [pol(f"p{i}", f"g{i % 3}", "db", "tcp", [1000 + i]) for i in range(6)]
    a = plan(SELF, peers, CFG, policies=policies)
    b = plan(SELF, list(reversed(peers)), CFG, policies=list(reversed(policies)))
    assert a.tables == b.tables


# --- acceptance 5 -------------------------------------------------------------------------

N_POLICIES, N_PEERS, N_GROUPS = 1000, 10_000, 50


def _fleet():
    peers = [node(i, {f"g{i % N_GROUPS}", f"g{(i // N_GROUPS) % N_GROUPS}"}) for i in range(N_PEERS)]
    policies = {}
    for i in range(N_POLICIES):
        src = f"10.{i % 200}.0.0/16" if i % 10 == 0 else f"g{i % N_GROUPS}"
        dst = "db" if i % 2 == 0 else f"other{i % 7}"
        pid = f"p{i:04d}"
        policies[pid] = pol(pid, src, dst, "tcp" if i % 3 else "udp", [1000 + i])
    return peers, policies


@pytest.fixture(scope="module")
def fleet():
    peers, policies = _fleet()
    t0 = time.monotonic()
    base = plan(SELF, peers, CFG, policies=policies)
    return peers, policies, base, time.monotonic() - t0


def _ops_by_table(ops):
    out = {}
    for op in ops:
        out.setdefault(op.table, []).append(op)
    return out


def test_fleet_plan_is_big_and_fast_enough(fleet):
    _peers, _policies, base, seconds = fleet
    assert len(base.tables["peers"]) == N_PEERS
    assert len(base.selected_by) == N_POLICIES // 2
    assert len(base.tables["policy"]) > 10_000
    assert seconds < 20, seconds


def test_one_policy_change_touches_only_its_entries(fleet):
    peers, policies, base, _ = fleet
    pid = "p0102"  # from g2 to db, tcp 1102
    idx = ref_indexes(base.selected_by)[pid]
    changed = dict(policies)
    changed[pid] = pol(pid, "g2", "db", "tcp", ["2100-2101"])
    after = plan(SELF, peers, CFG, policies=changed)
    ops = diff(after.tables, base.tables)
    by = _ops_by_table(ops)
    assert set(by) == {"policy", "names"}
    idents_with_g2 = {k[1] for k, v in after.tables["names"].items()
                      if k[0] == "identity" and "g2" in v.split(",")}
    for op in by["policy"]:
        identity, proto, port, bits = op.key
        if op.is_delete:
            assert base.tables["policy"][op.key] == idx and (port, bits) == (1102, 16)
        else:
            assert op.value == idx and (port, bits) == (2100, 15)
    # one delete and one put per identity holding g2, nothing else
    assert {op.key[0] for op in by["policy"]} == idents_with_g2
    assert len(by["policy"]) == 2 * len(idents_with_g2)
    assert [op.key for op in by["names"]] == [("rule", idx)]
    assert by["names"][0].value == "tcp 2100-2101 from group g2 to group db"
    # the other 499 policies, 10,000 peers and every other entry: untouched
    assert len(ops) == len(by["policy"]) + 1 < 200


def test_adding_and_deleting_a_policy(fleet):
    peers, policies, base, _ = fleet
    added = dict(policies)
    added["zz-new"] = pol("zz-new", "g7", "db", "tcp", [7777])  # sorts last: the default stays
    after = plan(SELF, peers, CFG, policies=added)
    ops = diff(after.tables, base.tables)
    idx = ref_indexes([*base.selected_by, "zz-new"])["zz-new"]
    assert {op.table for op in ops} == {"policy", "names"}
    assert all(not op.is_delete and op.value == idx for op in ops if op.table == "policy")
    assert {op.key for op in ops if op.table == "names"} == {("policy", idx), ("rule", idx)}
    # and deleting it again is the exact inverse
    back = diff(base.tables, after.tables)
    assert sorted((op.table, op.key) for op in back) == sorted((op.table, op.key) for op in ops)
    assert all(op.is_delete for op in back)


def test_one_peer_group_change_touches_only_that_peer(fleet):
    peers, policies, base, _ = fleet
    i = 5
    old = peers[i]
    moved = list(peers)
    moved[i] = replace(old, groups=("g12", "g8", "newgroup"))
    after = plan(SELF, moved, CFG, policies=policies)
    ops = diff(after.tables, base.tables)
    by = _ops_by_table(ops)
    assert set(by) <= {"peers", "policy", "names"}
    assert [op.key for op in by["peers"]] == [old.private]
    new_ident = sha31("g12,g8,newgroup")
    assert by["peers"][0].value == PeerEntry(new_ident)
    old_ident = base.tables["peers"][old.private].identity
    # the new identity's entries (and name) appear; the old one's go only if no peer keeps it
    still_used = any(e.identity == old_ident for e in after.tables["peers"].values())
    for op in by.get("policy", []):
        assert op.key[0] == (old_ident if op.is_delete else new_ident)
        assert not (op.is_delete and still_used)
    assert any(op.key[0] == new_ident for op in by["policy"])  # g8 and g12 have policies to db
    assert {op.key for op in by["names"]} <= {("identity", new_ident), ("identity", old_ident)}
    assert len(ops) < 100


def test_unknown_ids_raise_nothing_for_empty_inputs():
    t = plan_policies([], [], [])
    assert (t.policy, t.cidr_ident, t.names, t.config, t.selected_by) == ({}, {}, {}, {}, ())
    assert Endpoint(group="x").to_dict() == {"group": "x"}
