"""The pure differ (DESIGN §5, §7.4): minimal ops, safe order, exact application."""

from __future__ import annotations

import copy
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.config import config_from_dict
from overlay.diff import apply_ops, diff, diff_table
from overlay.guard import weigh
from overlay.model import Node
from overlay.ops import TABLES, NatEntry, Op, PeerEntry, empty_state
from overlay.plan import plan

N_PEERS = 2_000   # exactness among many peers (the speed at 10k+ is measured in bench/)


def _churn(before, after):
    """What the churn guard weighs between two plans (by overlay address)."""
    return weigh({p.overlay: p for p in before.peers}, {p.overlay: p for p in after.peers})


SUBNET = ipaddress.IPv4Network("192.168.0.0/18")
SELF = Node("self", "ec2", "10.0.0.1", "198.18.0.1", "192.168.0.1")
CONFIG = config_from_dict(
    {
        "node_id": "self",
        "network": "ec2",
        "registry": {"hosts": ["198.51.100.2:2181"]},
        "filter": {"open_ports": [22, "8000-8100"], "ssh_whitelist": ["198.18.0.0/15"]},
    }
)


def _peer(i: int, network: str | None = None) -> Node:
    """Peer number ``i`` (1-based): half in ec2, half in vpc, all addresses unique."""
    net = network or ("ec2" if i % 2 else "vpc")
    return Node(
        f"p{i:05d}",
        net,
        str(ipaddress.IPv4Address("10.1.0.0") + i),
        str(ipaddress.IPv4Address("198.18.64.0") + i if net == "ec2" else ipaddress.IPv4Address("198.19.64.0") + i),
        str(SUBNET.network_address + 1 + i),
    )


@pytest.fixture(scope="module")
def fleet():
    peers = [_peer(i) for i in range(1, N_PEERS + 1)]
    desired = plan(SELF, peers, CONFIG)
    assert len(desired.peers) == N_PEERS and desired.excluded == ()
    return peers, desired


def _observed(state) -> dict:
    return copy.deepcopy(state.tables)


def test_unchanged_state_yields_no_ops(fleet):
    peers, desired = fleet
    assert diff(desired.tables, _observed(desired)) == []
    again = plan(SELF, list(reversed(peers)), CONFIG)
    assert diff(again.tables, _observed(desired)) == []


def test_one_added_peer_yields_exactly_its_two_puts(fleet):
    peers, before = fleet
    new = _peer(N_PEERS + 1, "vpc")
    after = plan(SELF, [*peers, new], CONFIG)
    ops = diff(after.tables, _observed(before))
    assert ops == [
        Op("peers", new.public, PeerEntry()),
        Op("nat", new.overlay, NatEntry(new.public)),
    ]
    assert _churn(before, after).size == 0


def test_one_removed_peer_yields_exactly_its_two_deletes(fleet):
    peers, before = fleet
    gone = peers[1321]
    after = plan(SELF, peers[:1321] + peers[1322:], CONFIG)
    real = gone.real_address_from(SELF.network)
    ops = diff(after.tables, _observed(before))
    assert ops == [Op("nat", gone.overlay), Op("peers", real)]
    assert all(op.is_delete for op in ops)
    assert _churn(before, after).removed == (gone.overlay,)


@pytest.mark.parametrize("index", [776, 777], ids=["same-network-private", "other-network-public"])
def test_one_changed_real_address_yields_exactly_that_peers_ops(fleet, index):
    peers, before = fleet
    old = peers[index]
    if old.network == SELF.network:  # its private address is the real one
        moved = Node(old.node_id, old.network, "10.2.0.9", old.public, old.overlay)
        old_real, new_real = old.private, "10.2.0.9"
    else:  # its public address is
        moved = Node(old.node_id, old.network, old.private, "198.19.250.9", old.overlay)
        old_real, new_real = old.public, "198.19.250.9"
    after = plan(SELF, [*peers[:index], moved, *peers[index + 1 :]], CONFIG)
    ops = diff(after.tables, _observed(before))
    assert ops == [
        Op("peers", old_real),
        Op("peers", new_real, PeerEntry()),
        Op("nat", old.overlay, NatEntry(new_real)),
    ]
    c = _churn(before, after)
    assert (c.removed, c.changed) == ((), (old.overlay,))


def test_a_change_the_other_network_cannot_see_yields_no_ops(fleet):
    peers, before = fleet
    old = peers[777]
    assert old.network != SELF.network
    moved = Node(old.node_id, old.network, "10.2.0.9", old.public, old.overlay)
    after = plan(SELF, [*peers[:777], moved, *peers[778:]], CONFIG)
    assert diff(after.tables, _observed(before)) == []
    assert _churn(before, after).size == 0


def test_applying_the_diff_reaches_the_desired_state(fleet):
    peers, before = fleet
    after = plan(SELF, peers[100:] + [_peer(N_PEERS + i) for i in range(1, 51)], CONFIG)
    observed = _observed(before)
    ops = diff(after.tables, observed)
    assert len(ops) == 2 * 100 + 2 * 50
    assert apply_ops(observed, ops) == after.tables
    assert diff(after.tables, observed) == []


def test_config_and_failsafe_changes_are_single_ops(fleet):
    peers, before = fleet
    stricter = config_from_dict(
        {
            "node_id": "self",
            "network": "ec2",
            "registry": {"hosts": ["198.51.100.2:2181"]},
            "filter": {
                "reject_all": True,
                "open_ports": [22, "8000-8100"],
                "ssh_whitelist": ["198.18.0.0/15", "203.0.113.0/24"],
            },
        }
    )
    ops = diff(plan(SELF, peers, stricter).tables, _observed(before))
    assert ops == [Op("failsafe", "203.0.113.0/24", 1), Op("config", "reject_all", 1)]


def test_ops_order_nat_deletes_first_nat_puts_last():
    observed = empty_state()
    observed["nat"] = {"192.168.0.2": NatEntry("10.0.0.2"), "192.168.0.3": NatEntry("10.0.0.3")}
    observed["peers"] = {"10.0.0.2": PeerEntry(), "10.0.0.3": PeerEntry()}
    observed["ports"] = {(0, 1): 1 << 16}
    observed["config"] = {"reject_all": 0, "mode": 0}
    desired = empty_state()
    desired["nat"] = {"192.168.0.3": NatEntry("10.0.0.3"), "192.168.0.4": NatEntry("10.0.0.4")}
    desired["peers"] = {"10.0.0.3": PeerEntry(), "10.0.0.4": PeerEntry()}
    desired["failsafe"] = {"198.18.0.0/15": 1}
    desired["config"] = {"reject_all": 1, "mode": 0}
    ops = diff(desired, observed)
    assert ops == [
        Op("nat", "192.168.0.2"),
        Op("peers", "10.0.0.2"),
        Op("peers", "10.0.0.4", PeerEntry()),
        Op("ports", (0, 1)),
        Op("failsafe", "198.18.0.0/15", 1),
        Op("config", "reject_all", 1),
        Op("nat", "192.168.0.4", NatEntry("10.0.0.4")),
    ]


def test_diff_table_sorts_keys_and_puts_only_differences():
    deletes, puts = diff_table("t", {"b": 1, "a": 2, "c": 3}, {"a": 2, "c": 4, "z": 0, "y": 0})
    assert deletes == [Op("t", "y"), Op("t", "z")]
    assert puts == [Op("t", "b", 1), Op("t", "c", 3)]


def test_missing_tables_count_as_empty():
    desired = {"nat": {"192.168.0.2": NatEntry("10.0.0.2")}}
    assert diff(desired, {}) == [Op("nat", "192.168.0.2", NatEntry("10.0.0.2"))]
    assert diff({}, desired) == [Op("nat", "192.168.0.2")]


# --- property: apply_ops(observed, diff(desired, observed)) == desired -------------------

# Small key universes: keys of desired and observed overlap often, also in unrelated pairs
# (a put over a different value, a delete beside a put: the cases that matter).
_ips = st.integers(0, 31).map(lambda i: f"10.0.0.{i}")
_overlays = st.integers(0, 31).map(lambda i: f"192.168.0.{i}")
_values = {
    "nat": st.dictionaries(_overlays, st.builds(NatEntry, _ips, st.booleans()), max_size=8),
    "peers": st.dictionaries(_ips, st.builds(PeerEntry, st.integers(0, 3), st.integers(0, 3)), max_size=8),
    "ports": st.dictionaries(
        st.tuples(st.integers(0, 1), st.integers(0, 15)), st.integers(1, (1 << 64) - 1), max_size=6
    ),
    "failsafe": st.dictionaries(st.sampled_from(["198.18.0.0/15", "10.0.0.0/8", "192.0.2.7/32"]), st.integers(1, 3)),
    "config": st.fixed_dictionaries({"reject_all": st.integers(0, 1), "mode": st.integers(0, 1)}),
    "policy": st.dictionaries(
        st.tuples(st.integers(1, 4), st.sampled_from([1, 6, 17]), st.integers(0, 3), st.integers(14, 16)),
        st.integers(1, 3), max_size=6,
    ),
    "cidr_ident": st.dictionaries(st.sampled_from(["10.0.0.0/8", "10.1.0.0/16"]), st.integers(1 << 31, (1 << 31) + 3)),
    "names": st.dictionaries(st.tuples(st.sampled_from(["policy", "identity"]), st.integers(1, 3)),
                             st.sampled_from(["web", "db", "p1"]), max_size=6),
    "self": st.dictionaries(st.sampled_from(["10.0.0.1", "198.18.1.1", "fd00::1"]), st.just(1)),
}
states = st.fixed_dictionaries({t: _values[t] for t in TABLES})


@st.composite
def related_states(draw):
    """A desired state and an observed one that shares some of it (like real life)."""
    desired = draw(states)
    noise = draw(states)
    observed = {}
    for t in TABLES:
        keep = draw(st.sets(st.sampled_from(sorted(desired[t], key=repr))) if desired[t] else st.just(set()))
        observed[t] = {**noise[t], **{k: desired[t][k] for k in keep}}
    return desired, observed


@given(st.one_of(st.tuples(states, states), related_states()))
def test_apply_ops_of_diff_reaches_desired(pair):
    desired, observed = pair
    before = copy.deepcopy(observed)
    ops = diff(desired, observed)
    assert observed == before, "diff must not mutate its input"
    result = apply_ops(copy.deepcopy(observed), ops)
    assert result == desired
    # minimal: one op per key that differs, none for keys that agree
    differing = sum(
        1
        for t in TABLES
        for k in set(desired[t]) | set(observed[t])
        if desired[t].get(k, None) != observed[t].get(k, None) or (k in desired[t]) != (k in observed[t])
    )
    assert len(ops) == differing
    assert len({(op.table, op.key) for op in ops}) == len(ops)
    # safe order: every nat delete precedes every other op, every nat put follows them
    kinds = ["nat-del" if op.table == "nat" and op.is_delete else "nat-put" if op.table == "nat" else "mid" for op in ops]
    assert kinds == sorted(kinds, key=["nat-del", "mid", "nat-put"].index)
    # idempotent: applying again changes nothing, and the diff is now empty
    assert apply_ops(copy.deepcopy(result), ops) == desired
    assert diff(desired, result) == []


@pytest.mark.parametrize("value", [None, 0, "", False])
def test_an_absent_key_is_put_whatever_its_desired_value(value):
    """Absent is not "equal to a falsy value": a key missing from the observed table is put
    even when its desired value is None, 0, "" or False (the differ's sentinel)."""
    assert diff_table("config", {"k": value}, {}) == ([], [Op("config", "k", value)])
    assert diff_table("config", {"k": value}, {"k": value}) == ([], [])
