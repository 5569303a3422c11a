"""overlay/policy.py rule by rule, from hand tables (docs/policies.md).

The numbers come from an injected hash (a table written here), so every identity, index
and entry below is worked out by hand from the rules of docs/policies.md; the sha256 values
of the real hash are checked in test_policy_plan.py against coreutils.
"""

from __future__ import annotations

import pytest

from overlay.model import Endpoint, Policy
from overlay.policy import (
    MASK31,
    PORT_BITS,
    PolicyTables,
    assign_numbers,
    cidr_identities,
    cut,
    describe,
    group_set_key,
    hash31,
    identities,
    plan_policies,
    policy_indexes,
    policy_prefixes,
    port_prefixes,
)

CIDR = 0x80000000   # bit 31: a CIDR identity


def pol(pid: str, src: str, dst: str, proto: str = "tcp", ports=()) -> Policy:
    s = Endpoint(cidr=src) if "/" in src else Endpoint(group=src)
    return Policy(s, Endpoint(group=dst), proto, tuple(ports), pid)


def table_hash(table: dict[str, int]):
    return lambda text: table[text]


def test_constants():
    assert (MASK31, PORT_BITS) == (0x7FFFFFFF, 16)


# -- numbers -------------------------------------------------------------------------

# the first 31 bits of sha256, from coreutils (`printf %s TEXT | sha256sum`, the first 8 hex
# digits with the top bit cleared): the same table as test_policy_plan.py's
SHA31 = {"web": 0x4b5e57f6, "db,web": 0x61102ad8, "10.0.0.0/8": 0x13997fe8, "a": 0x4a978112, "b": 0x3e23e816}


@pytest.mark.parametrize(("text", "value"), sorted(SHA31.items()))
def test_hash31_is_sha256_cut_to_31_bits(text, value):
    assert hash31(text) == value


def test_the_real_hash_numbers_group_sets_cidrs_and_policies():
    assert identities([["web"], ["web", "db"], []]) == {"web": 0x4b5e57f6, "db,web": 0x61102ad8, "": 1}
    assert cidr_identities(["10.0.0.0/8"]) == {"10.0.0.0/8": CIDR | 0x13997fe8}
    assert policy_indexes(["b", "a"]) == {"a": 0x4a978112, "b": 0x3e23e816}
    assert policy_indexes(["x", "y"], hash_fn=lambda _t: 0) == {"x": 1, "y": 2}


@pytest.mark.parametrize(("names", "kwargs", "want"), [
    (["a", "a"], {}, {"a": 7}),
    (["b", "a"], {}, {"a": 7, "b": 8}),
    # the hash is cut to 31 bits
    (["a"], {"hash_fn": lambda _t: 0xFFFFFFFF}, {"a": MASK31}),
    (["a"], {"hash_fn": lambda _t: 0x80000007}, {"a": 7}),
    # reserved numbers are stepped past, like the ones already given
    (["a", "b"], {"reserved": (7, 9)}, {"a": 8, "b": 10}),
    (["a"], {"reserved": iter([7])}, {"a": 8}),
    # the tag is or-ed in; probing wraps at 2**31 and keeps the tag
    (["a", "b"], {"hash_fn": lambda _t: MASK31, "tag": CIDR, "reserved": (CIDR,)},
     {"a": 0xFFFFFFFF, "b": CIDR | 1}),
    (["a", "b", "c"], {"hash_fn": lambda _t: MASK31 - 1}, {"a": MASK31 - 1, "b": MASK31, "c": 0}),
    ([], {}, {}),
])
def test_assign_numbers(names, kwargs, want):
    kwargs.setdefault("hash_fn", lambda _t: 7)
    assert assign_numbers(names, **kwargs) == want


@pytest.mark.parametrize(("groups", "key"), [
    ([], ""), (["web"], "web"), (["web", "app", "web"], "app,web"), ({"b", "a", "c"}, "a,b,c"),
])
def test_group_set_key(groups, key):
    assert group_set_key(groups) == key


def test_identities_of_group_sets():
    h = table_hash({"web": 40, "app,web": 40, "db": 0})
    assert identities([["web"], ["web", "app"], [], ["web", "web"], ["db"]], h) == {
        "app,web": 40, "db": 2, "web": 41, "": 1}
    assert identities([[]], h) == {"": 1}
    assert identities([], h) == {}


# -- ports ---------------------------------------------------------------------------

@pytest.mark.parametrize(("lo", "hi", "want"), [
    (0, 0, [(0, 16)]), (65535, 65535, [(65535, 16)]), (0, 32767, [(0, 1)]), (32768, 65535, [(32768, 1)]),
    (1000, 1001, [(1000, 15)]), (1000, 1003, [(1000, 14)]), (1001, 1002, [(1001, 16), (1002, 16)]),
    (6, 9, [(6, 15), (8, 15)]), (0, 1, [(0, 15)]), (0, 2, [(0, 15), (2, 16)]),
])
def test_port_prefixes(lo, hi, want):
    assert port_prefixes(lo, hi) == want


@pytest.mark.parametrize(("lo", "hi"), [(-1, 5), (5, 4), (0, 65536), (65536, 65536)])
def test_port_prefixes_refuse_a_bad_range(lo, hi):
    with pytest.raises(ValueError, match=f"^bad port range {lo}-{hi}$"):
        port_prefixes(lo, hi)


@pytest.mark.parametrize(("proto", "ports", "want"), [
    ("icmp", (), [(0, 16)]),
    ("tcp", (), [(0, 0)]),
    ("udp", (), [(0, 0)]),
    ("tcp", ((1000, 1000), (22, 22)), [(22, 16), (1000, 16)]),
    ("tcp", ((80, 80), (80, 81)), [(80, 15), (80, 16)]),
    ("udp", ((80, 81), (80, 81)), [(80, 15)]),
])
def test_policy_prefixes(proto, ports, want):
    assert policy_prefixes(pol("p", "web", "db", proto, ports)) == want


# -- words ---------------------------------------------------------------------------

@pytest.mark.parametrize(("policy", "words"), [
    (pol("p", "web", "db", "tcp", [(80, 80)]), "tcp 80 from group web to group db"),
    (pol("p", "10.0.0.0/8", "db", "udp", [(53, 53), (1000, 1001)]), "udp 53,1000-1001 from 10.0.0.0/8 to group db"),
    (pol("p", "web", "db", "tcp"), "tcp (all ports) from group web to group db"),
    (pol("p", "fd00::/8", "db", "icmp"), "icmp from fd00::/8 to group db"),
])
def test_describe(policy, words):
    assert describe(policy) == words


@pytest.mark.parametrize(("text", "limit", "want"), [
    ("x" * 255, 255, "x" * 255),
    ("x" * 256, 255, "x" * 252 + "..."),
    ("a" + "é" * 127, 255, "a" + "é" * 127),              # 255 bytes: kept
    ("ab" + "é" * 127, 255, "ab" + "é" * 125 + "..."),    # 256 bytes: 252 kept
    ("a" + "é" * 128, 255, "a" + "é" * 125 + "..."),      # the cut splits an é: dropped
    ("abcdef", 5, "ab..."),
    ("abcde", 5, "abcde"),
    ("", 255, ""),
])
def test_cut(text, limit, want):
    assert cut(text, limit) == want
    if limit == 255:
        assert cut(text) == want


# -- the tables of one node, worked out by hand --------------------------------------

HASH = table_hash({"web": 100, "app,web": 200, "10.0.0.0/8": 300, "10.1.0.0/16": 400,
                   "p1": 11, "p2": 22, "p4": 44})
POLICIES = [
    pol("p4", "10.1.0.0/16", "db", "icmp"),
    pol("p1", "web", "db", "tcp", [(80, 80)]),
    pol("p3", "app", "other", "tcp", [(22, 22)]),   # selects other nodes only
    pol("p2", "10.0.0.0/8", "db", "udp", [(53, 53), (1000, 1001)]),
]
C8, C16 = CIDR | 300, CIDR | 400


def test_a_node_s_policy_tables_by_hand():
    t = plan_policies(["db", "x"], [["web"], ["web", "app"], []], POLICIES, hash_fn=HASH)
    assert t == PolicyTables(
        policy={
            (200, 6, 80, 16): 11, (100, 6, 80, 16): 11,
            (C8, 17, 53, 16): 22, (C8, 17, 1000, 15): 22,
            # 10.1.0.0/16 lies in 10.0.0.0/8: its identity carries both policies
            (C16, 17, 53, 16): 22, (C16, 17, 1000, 15): 22, (C16, 1, 0, 16): 44,
        },
        cidr_ident={"10.0.0.0/8": C8, "10.1.0.0/16": C16},
        names={
            ("policy", 11): "p1", ("rule", 11): "tcp 80 from group web to group db",
            ("policy", 22): "p2", ("rule", 22): "udp 53,1000-1001 from 10.0.0.0/8 to group db",
            ("policy", 44): "p4", ("rule", 44): "icmp from 10.1.0.0/16 to group db",
            ("identity", 200): "app,web", ("identity", 100): "web",
            ("cidr", C8): "10.0.0.0/8", ("cidr", C16): "10.1.0.0/16",
        },
        config={"policy_enforced": 1, "policy_default": 11},
        identity_of={"app,web": 200, "web": 100, "": 1},
        selected_by=("p1", "p2", "p4"),
        index_of={"p1": 11, "p2": 22, "p4": 44},
    )


def test_a_node_no_policy_selects_has_no_config_and_no_entries():
    t = plan_policies(["web"], [["web"]], POLICIES, hash_fn=HASH)
    assert (t.policy, t.cidr_ident, t.config, t.selected_by, t.index_of) == ({}, {}, {}, (), {})
    assert t.names == {("identity", 100): "web"}
    assert t.identity_of == {"web": 100}


def test_a_longer_prefix_at_the_same_address_does_not_contain_the_shorter():
    h = table_hash({"10.0.0.0/8": 1, "10.0.0.0/9": 2, "a": 5, "b": 6})
    t = plan_policies(["db"], [], [pol("a", "10.0.0.0/8", "db", "tcp", [(1, 1)]),
                                   pol("b", "10.0.0.0/9", "db", "tcp", [(2, 2)])], hash_fn=h)
    assert t.policy == {(CIDR | 1, 6, 1, 16): 5, (CIDR | 2, 6, 1, 16): 5, (CIDR | 2, 6, 2, 16): 6}


def test_ipv6_cidrs_contain_by_prefix_and_ipv4_never_holds_ipv6():
    h = table_hash({"fd00::/8": 1, "fd00::/16": 2, "0.0.0.0/0": 3, "a": 5, "b": 6, "c": 7})
    t = plan_policies(["db"], [], [pol("a", "fd00::/8", "db", "tcp", [(1, 1)]),
                                   pol("b", "fd00::/16", "db", "tcp", [(2, 2)]),
                                   pol("c", "0.0.0.0/0", "db", "tcp", [(3, 3)])], hash_fn=h)
    assert t.policy == {(CIDR | 1, 6, 1, 16): 5, (CIDR | 2, 6, 1, 16): 5, (CIDR | 2, 6, 2, 16): 6,
                        (CIDR | 3, 6, 3, 16): 7}


def test_policies_given_as_a_mapping_keep_an_id_they_carry():
    h = table_hash({"web": 100, "key-id": 8, "own-id": 9})
    t = plan_policies(["db"], [["web"]], {"key-id": pol("", "web", "db", "tcp", [(1, 1)]),
                                         "other-key": pol("own-id", "web", "db", "tcp", [(2, 2)])}, hash_fn=h)
    assert t.selected_by == ("key-id", "own-id")
    assert t.policy == {(100, 6, 1, 16): 8, (100, 6, 2, 16): 9}


def test_empty_policy_tables_are_empty_frozen_and_not_shared():
    """The incremental planner starts from PolicyTables(): empty, and no two share a dict."""
    import dataclasses

    a, b = PolicyTables(), PolicyTables()
    assert (a.policy, a.cidr_ident, a.names, a.config, a.identity_of, a.selected_by, a.index_of) == (
        {}, {}, {}, {}, {}, (), {})
    for name in ("policy", "cidr_ident", "names", "config", "identity_of", "index_of"):
        assert getattr(a, name) is not getattr(b, name), name
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.config = {"policy_enforced": 1}
