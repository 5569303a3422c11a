"""Who holds what (overlay/ownership.py) and the planner's conflict rule, from hand-made tables.

Every expectation below is written by hand from the rule (docs/registry.md, "Address
ownership"): of the records that claim one address, the one with the lowest order key
keeps it (ties: the lower node id); the later ones are excluded, counted, and name the
holder. A node that lost one claim holds none of its addresses.
"""

from __future__ import annotations

import pytest

from overlay.config import config_from_dict
from overlay.errors import InvalidRecord
from overlay.model import Node
from overlay.ops import NatEntry
from overlay.ownership import (
    Conflict,
    fleet_claims,
    granted,
    holders,
    parse_assignment,
    resolve,
    serialise_assignment,
)
from overlay.plan import plan

CFG = config_from_dict({"node_id": "self", "network": "ec2", "registry": {"hosts": ["zk.example:2181"]}})
SELF_EC2 = Node("self", "ec2", "10.0.0.1", "198.18.0.1", "192.168.0.1", ("web",))
SELF_DC = Node("self", "dc1", "10.0.2.1", "198.19.2.1", "192.168.0.1", ("web",))


def n(node_id, network, private, public, overlay, groups=()):
    return Node(node_id, network, private, public, overlay, tuple(groups))


VICTIM = n("victim", "ec2", "10.0.0.5", "198.18.0.5", "192.168.0.5", ["db"])
THIEF = n("thief", "ec2", "10.0.0.5", "198.18.0.5", "192.168.0.66")            # copies both addresses
A_THIEF = n("a-thief", "ec2", "10.0.0.5", "198.18.0.5", "192.168.0.67")        # sorts before victim
VPC_COPY = n("vpc-copy", "vpc", "10.0.1.9", "198.18.0.5", "192.168.0.68")      # victim's public only

# description, self, peers, order, applied {node_id: real}, excluded {node_id: (kind, address, holder)}
PLAN_CASES = [
    ("the earlier registration keeps its addresses; the copy is out",
     SELF_EC2, [THIEF, VICTIM], {"victim": 10, "thief": 20},
     {"victim": "10.0.0.5"}, {"thief": ("real", "10.0.0.5", "victim")}),
    ("order beats node id: a later thief that sorts first is still out",
     SELF_EC2, [A_THIEF, VICTIM], {"victim": 10, "a-thief": 20},
     {"victim": "10.0.0.5"}, {"a-thief": ("real", "10.0.0.5", "victim")}),
    ("whoever registered first keeps it, even if it is the copy",
     SELF_EC2, [VICTIM, THIEF], {"victim": 30, "thief": 20},
     {"thief": "10.0.0.5"}, {"victim": ("real", "10.0.0.5", "thief")}),
    ("equal order: the lower node id",
     SELF_EC2, [VICTIM, THIEF], {"victim": 7, "thief": 7},
     {"thief": "10.0.0.5"}, {"victim": ("real", "10.0.0.5", "thief")}),
    ("a record without an order key comes last",
     SELF_EC2, [A_THIEF, VICTIM], {"victim": 99},
     {"victim": "10.0.0.5"}, {"a-thief": ("real", "10.0.0.5", "victim")}),
    ("one overlay, two records: the earlier keeps it",
     SELF_EC2, [n("late", "vpc", "10.0.1.7", "198.19.0.7", "192.168.0.9"),
                n("early", "vpc", "10.0.1.8", "198.19.0.8", "192.168.0.9")], {"early": 1, "late": 2},
     {"early": "198.19.0.8"}, {"late": ("overlay", "192.168.0.9", "early")}),
    ("a loser holds nothing: the third may take the loser's overlay",
     SELF_EC2, [n("a", "vpc", "10.0.1.1", "198.19.0.1", "192.168.0.10"),
                n("b", "vpc", "10.0.1.2", "198.19.0.1", "192.168.0.11"),
                n("c", "vpc", "10.0.1.3", "198.19.0.3", "192.168.0.11")], {"a": 1, "b": 2, "c": 3},
     {"a": "198.19.0.1", "c": "198.19.0.3"}, {"b": ("real", "198.19.0.1", "a")}),
    ("seen from a third network both are reached at the public address: conflict",
     SELF_DC, [VPC_COPY, VICTIM], {"victim": 1, "vpc-copy": 2},
     {"victim": "198.18.0.5"}, {"vpc-copy": ("real", "198.18.0.5", "victim")}),
    ("seen from the copy's own network it reaches the copy privately: no conflict here",
     n("self", "vpc", "10.0.1.1", "198.19.0.1", "192.168.0.1"), [VPC_COPY, VICTIM], {"victim": 1, "vpc-copy": 2},
     {"victim": "198.18.0.5", "vpc-copy": "10.0.1.9"}, {}),
    ("no conflict, no exclusion",
     SELF_EC2, [VICTIM, n("other", "ec2", "10.0.0.6", "198.18.0.6", "192.168.0.6")], {},
     {"victim": "10.0.0.5", "other": "10.0.0.6"}, {}),
]


@pytest.mark.parametrize(("desc", "me", "peers", "order", "applied", "excluded"), PLAN_CASES,
                         ids=[c[0] for c in PLAN_CASES])
def test_plan_keeps_the_earlier_registration(desc, me, peers, order, applied, excluded):
    d = plan(me, peers, CFG, order=order)
    assert {p.node_id: p.real for p in d.peers} == applied
    got = {c.node_id: (c.kind, c.address, c.holder) for c in d.conflicts}
    assert got == excluded
    assert len(d.conflicts) == len(excluded)                       # counted
    for node_id, (kind, address, holder) in excluded.items():      # and named in the exclusions
        assert dict(d.excluded)[node_id] == f"{kind} address {address} is held by the earlier registration {holder}"
    by_id = {p.node_id: p for p in peers}
    assert d.tables["nat"] == {by_id[i].overlay: NatEntry(real) for i, real in applied.items()}
    assert set(d.tables["peers"]) == set(applied.values())


def test_fleet_claims_and_holders():
    """The controller's view: overlay anywhere, private within a network, public anywhere."""
    live = [VICTIM, n("vpc-twin", "vpc", "10.0.0.5", "198.19.0.5", "192.168.0.7")]   # same private, other network
    assert holders(THIEF, live) == [Conflict("thief", "private", "10.0.0.5", "victim"),
                                    Conflict("thief", "public", "198.18.0.5", "victim")]
    assert holders(VPC_COPY, live) == [Conflict("vpc-copy", "public", "198.18.0.5", "victim")]
    stolen_overlay = n("x", "vpc", "10.0.1.50", "198.19.0.50", "192.168.0.5")
    assert holders(stolen_overlay, live) == [Conflict("x", "overlay", "192.168.0.5", "victim")]
    assert holders(VICTIM, live) == []                       # its own record is no conflict
    assert holders(n("ok", "vpc", "10.0.0.6", "198.19.0.6", "192.168.0.8"), live) == []
    assert fleet_claims(VICTIM) == [("overlay", "192.168.0.5"), ("private", "ec2", "10.0.0.5"),
                                    ("public", "198.18.0.5")]
    kept, conflicts = resolve([THIEF, VICTIM, VPC_COPY], {"victim": 1, "thief": 2, "vpc-copy": 3})
    assert [k.node_id for k in kept] == ["victim"]
    assert [(c.node_id, c.kind, c.holder) for c in conflicts] == [("thief", "private", "victim"),
                                                                  ("vpc-copy", "public", "victim")]


# --- groups are granted ----------------------------------------------------------------------


def test_plan_uses_granted_groups_only():
    admin_claim = n("mallory", "ec2", "10.0.0.9", "198.18.0.9", "192.168.0.9", ["admin", "web"])
    honest = n("db-1", "ec2", "10.0.0.8", "198.18.0.8", "192.168.0.8", ["db"])
    grants = {"mallory": ("web",), "db-1": ("db", "extra"), "self": ()}
    d = plan(SELF_EC2, [admin_claim, honest], CFG, grants=grants)
    assert {p.node_id: p.groups for p in d.peers} == {"mallory": ("web",), "db-1": ("db",)}
    assert d.ungranted == (("mallory", ("admin",)), ("self", ("web",)))
    assert d.groups == ()                                   # this node's own claim is narrowed too
    # no assignment at all: no groups
    d = plan(SELF_EC2, [admin_claim], CFG, grants={})
    assert d.peers[0].groups == () and d.ungranted == (("mallory", ("admin", "web")), ("self", ("web",)))
    # None: the registry already carries granted groups only (static, grpc)
    d = plan(SELF_EC2, [admin_claim], CFG)
    assert d.peers[0].groups == ("admin", "web") and d.ungranted == () and d.groups == ("web",)


def test_granted():
    assert granted(VICTIM, {"victim": ("db",)}) == (VICTIM, ())
    got, dropped = granted(VICTIM, {})
    assert got.groups == () and dropped == ("db",)


ASSIGNMENTS = [
    (b'{"v": 1, "groups": ["web", "db", "web"]}', ("db", "web")),
    (b'{"v": 1, "groups": []}', ()),
    (b'{"v": 2, "groups": []}', "version"),
    (b'{"v": 1}', "must be"),
    (b'{"v": 1, "groups": "web"}', "list"),
    (b'{"v": 1, "groups": ["a b"]}', "group"),
    (b'{"v": 1, "groups": [], "x": 1}', "must be"),
    (b"not json", "JSON"),
    (b"\xff", "UTF-8"),
    (b'{"v": 1, "groups": [' + b",".join(b'"g%d"' % i for i in range(65)) + b"]}", "more than 64"),
    (b" " * 5000, "bytes"),
]


@pytest.mark.parametrize(("data", "want"), ASSIGNMENTS)
def test_parse_assignment(data, want):
    if isinstance(want, tuple):
        assert parse_assignment(data) == want
        assert parse_assignment(serialise_assignment(want)) == want
    else:
        with pytest.raises(InvalidRecord, match=want):
            parse_assignment(data)
