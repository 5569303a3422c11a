"""Edge tables of the planner's two exclusion rules, expectations written by hand:

- own address (network-aware): a peer is reached at its private address in this node's
  network and at its public one elsewhere; it is excluded when that address is one of
  this node's own *in the same address domain*: a same-network peer at this node's
  private or public address. A peer of another network is reached by its public address,
  in another domain than this node's private one: the same digits there are no clash.
- claimants: of the records claiming one overlay or one real address, the earliest keeps
  it; the reason names the kind of the address lost (overlay before real when a record
  loses both), and a record that loses one claim holds none of its others."""

from __future__ import annotations

import pytest

from overlay.model import Node
from overlay.plan import AppliedPeer, DesiredState, plan
from tests.unit.test_plan import SELF, cfg, node

# SELF: ec2, private 10.0.0.1, public 198.18.0.1, overlay 192.168.0.1

OWN_CASES = [
    # desc, peer, excluded reason fragment or None (kept), the real address it gets
    ("same network, at this node's private", node("p", "ec2", "10.0.0.1", "198.18.0.50", "192.168.0.50"),
     "real address 10.0.0.1 is this node's own", None),
    ("same network, its private at this node's public", node("p", "ec2", "198.18.0.1", "198.18.0.51", "192.168.0.51"),
     "real address 198.18.0.1 is this node's own", None),
    ("same network, only its public is this node's (not the address used)",
     node("p", "ec2", "10.0.0.52", "198.18.0.1", "192.168.0.52"), None, "10.0.0.52"),
    ("other network, same private digits (the overlap)", node("p", "vpc", "10.0.0.1", "198.19.0.53", "192.168.0.53"),
     None, "198.19.0.53"),
    ("other network, its public has the digits of this node's private",
     node("p", "vpc", "10.0.0.54", "10.0.0.1", "192.168.0.54"), None, "10.0.0.1"),
    ("other network, a different address everywhere", node("p", "vpc", "10.0.0.55", "198.19.0.55", "192.168.0.55"),
     None, "198.19.0.55"),
]


@pytest.mark.parametrize("desc, peer, reason, real", OWN_CASES, ids=[c[0] for c in OWN_CASES])
def test_own_address_rule_is_network_aware(desc, peer, reason, real):
    d = plan(SELF, [peer], cfg())
    if reason is None:
        assert dict(d.excluded) == {}
        assert [(p.node_id, p.real) for p in d.peers] == [("p", real)]
        assert d.tables["nat"][peer.overlay].real == real and real in d.tables["peers"]
    else:
        assert dict(d.excluded) == {"p": reason}
        assert d.peers == () and d.tables["nat"] == {} and d.tables["peers"] == {}
        assert d.conflicts == ()      # an own address is no registration conflict


def _n(node_id: str, overlay: str, private: str, network: str = "ec2") -> Node:
    return node(node_id, network, private, f"198.19.9.{overlay.rsplit('.', 1)[1]}", overlay)


CLAIM_CASES = [
    # desc, peers, order, {excluded: (kind, address, holder)}, kept
    ("one overlay, different real addresses",
     [_n("a", "192.168.1.5", "10.0.0.5"), _n("b", "192.168.1.5", "10.0.0.6")], {},
     {"b": ("overlay", "192.168.1.5", "a")}, ["a"]),
    ("one overlay and one real address: the overlay is named (checked first)",
     [_n("a", "192.168.1.5", "10.0.0.5"), _n("b", "192.168.1.5", "10.0.0.5")], {},
     {"b": ("overlay", "192.168.1.5", "a")}, ["a"]),
    ("one real address, different overlays",
     [_n("a", "192.168.1.5", "10.0.0.5"), _n("b", "192.168.1.6", "10.0.0.5")], {},
     {"b": ("real", "10.0.0.5", "a")}, ["a"]),
    ("the registry's order, not the node id, decides",
     [_n("a", "192.168.1.5", "10.0.0.5"), _n("b", "192.168.1.5", "10.0.0.6")], {"a": 7, "b": 3},
     {"a": ("overlay", "192.168.1.5", "b")}, ["b"]),
    ("a loser holds none of its claims: a third record may take its real address",
     [_n("a", "192.168.1.5", "10.0.0.5"), _n("b", "192.168.1.5", "10.0.0.6"), _n("c", "192.168.1.7", "10.0.0.6")],
     {}, {"b": ("overlay", "192.168.1.5", "a")}, ["a", "c"]),
    ("same private in two networks: two real addresses, no clash",
     [_n("a", "192.168.1.5", "10.0.0.5", "ec2"), node("b", "vpc", "10.0.0.5", "198.19.8.6", "192.168.1.6")], {},
     {}, ["a", "b"]),
]


@pytest.mark.parametrize("desc, peers, order, lost, kept", CLAIM_CASES, ids=[c[0] for c in CLAIM_CASES])
def test_claimants_of_one_address(desc, peers, order, lost, kept):
    d = plan(SELF, peers, cfg(), order=order)
    assert sorted(p.node_id for p in d.peers) == kept
    assert {c.node_id: (c.kind, c.address, c.holder) for c in d.conflicts} == lost
    for node_id, (kind, address, holder) in lost.items():
        assert dict(d.excluded)[node_id] == f"{kind} address {address} is held by the earlier registration {holder}"
    assert set(dict(d.excluded)) == set(lost)


# --- after an excluded peer the others still count; exact reasons; the result types -------


def test_an_excluded_peer_does_not_stop_the_ones_after_it():
    good = node("good", "vpc", "10.0.0.9", "198.19.0.9", "192.168.0.9")
    for bad, reason in [
        (node("junk", "vpc", "10.0.0.8", "198.19.0.8", "not-an-ip"), "overlay address 'not-an-ip' is not an IPv4 address"),
        (node("far", "vpc", "10.0.0.8", "198.19.0.8", "10.9.0.1"),
         "overlay address 10.9.0.1 is outside the overlay subnet 192.168.0.0/18"),
        (node("thief", "vpc", "10.0.0.8", "198.19.0.8", "192.168.0.1"), "overlay address 192.168.0.1 is this node's own"),
        (node("ghost", "ec2", "10.0.0.1", "198.18.0.8", "192.168.0.8"), "real address 10.0.0.1 is this node's own"),
    ]:
        d = plan(SELF, [bad, good], cfg())          # the planner reads the peers in this order
        assert dict(d.excluded) == {bad.node_id: reason}
        assert [p.node_id for p in d.peers] == ["good"]


def test_an_override_of_this_nodes_overlay_does_not_stop_the_others():
    d = plan(SELF, [], cfg(nat_overrides={"192.168.0.1": "10.5.0.1", "192.168.0.2": "10.5.0.2"}))
    assert set(d.tables["nat"]) == {"192.168.0.2"}


def test_applied_peer_and_desired_state_shapes():
    import dataclasses

    p = AppliedPeer("n1", "ec2", "192.168.0.5", "10.0.0.5")
    assert p.to_dict() == {"node_id": "n1", "network": "ec2", "overlay": "192.168.0.5", "real": "10.0.0.5",
                           "groups": []}
    assert p.groups == () and p.real6 is None
    assert AppliedPeer("n1", "ec2", "192.168.0.5", "10.0.0.5", real6="2001:db8::5").to_dict()["real6"] == "2001:db8::5"
    d = DesiredState(tables={})
    assert (d.peers, d.excluded, d.selected_by, d.conflicts, d.ungranted, d.groups) == ((),) * 6
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.real = "10.0.0.6"
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.peers = ()


@pytest.mark.parametrize("host", ["X10.0.0.9:2181", "10.0.0.9X:2181", "[X10.0.0.9]:2181", "x10.0.0.9:2181"])
def test_a_registry_name_that_holds_an_address_is_not_an_address(host):
    """Only an IP literal ("10.0.0.9", "[fd00::9]") is put in the failsafe table: a name whose
    letters hide an address is left to the resolver (extra_failsafe)."""
    assert plan(SELF, [], cfg(registry={"hosts": [host]})).tables["failsafe"] == {}
    assert plan(SELF, [], cfg(registry={"hosts": ["10.0.0.9:2181"]})).tables["failsafe"] == {"10.0.0.9/32": 2}


def test_applied_peers_are_frozen_and_have_slots():
    import dataclasses

    p = AppliedPeer("a", "ec2", "192.168.0.2", "10.0.0.2")
    assert not hasattr(p, "__dict__")   # slots: a plan holds one per peer (10,000 in a fleet)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.real = "10.0.0.3"
