"""The incremental planner against the reference planner (issue 14, acceptance 6).

Random event sequences (node records added, removed and changed: addresses, networks,
groups, IPv6, overlay collisions; order keys; assignments; policies added, removed and
narrowed; this node's record; config: nat_overrides, reject_all, mode, open ports,
conntrack lifetimes) are applied to a plain view and to an :class:`IncrementalPlanner`;
after every event its state must equal ``plan()`` of the same view (tables, applied
peers, excluded with reasons, conflicts, ungranted, selected_by), and every table key
whose desired value changed must be among the keys the event reports as touched (the
agent diffs only those). The universe is small on purpose, so that collisions of
overlay and real addresses, shared IPv6 addresses and identity changes are frequent.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.config import config_from_dict
from overlay.incremental import IncrementalPlanner
from overlay.model import Endpoint, Node, Policy
from overlay.ops import TABLES
from overlay.plan import plan

SEQUENCES = 2000          # acceptance 6: at least 2,000 random event sequences

IDS = [f"n{i}" for i in range(7)] + ["self"]
NETS = ["ec2", "vpc"]
PRIV = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
PUB = ["198.18.0.1", "198.18.0.2", "198.18.0.3", "198.19.0.4"]
OVL = ["192.168.0.1", "192.168.0.2", "192.168.0.3", "192.168.0.4", "192.168.0.5", "192.168.0.0",
       "10.9.9.9", "192.168.63.255"]
SIX = [None, None, "fd00::1", "fd00::2", "fd00::3"]
GROUPS = ["web", "db", "ops"]
POLICY_IDS = ["p0", "p1", "p2", "p3"]
CIDRS = ["10.0.0.0/8", "10.0.0.0/24", "198.18.0.0/15", "fd00::/64"]

groups_st = st.lists(st.sampled_from(GROUPS), max_size=3, unique=True).map(lambda g: tuple(sorted(g)))


@st.composite
def nodes(draw, node_id=None):
    return Node(node_id or draw(st.sampled_from(IDS)), draw(st.sampled_from(NETS)), draw(st.sampled_from(PRIV)),
                draw(st.sampled_from(PUB)), draw(st.sampled_from(OVL)), draw(groups_st),
                private6=draw(st.sampled_from(SIX)), public6=draw(st.sampled_from(SIX)))


@st.composite
def policies(draw):
    if draw(st.booleans()):
        src = Endpoint(group=draw(st.sampled_from(GROUPS)))
    else:
        src = Endpoint(cidr=draw(st.sampled_from(CIDRS)))
    proto = draw(st.sampled_from(["tcp", "udp", "icmp"]))
    ports: tuple = ()
    if proto != "icmp":
        ports = tuple(draw(st.lists(st.sampled_from([(22, 22), (80, 80), (8000, 8100), (5432, 5432)]),
                                    max_size=2, unique=True)))
    return Policy(src, Endpoint(group=draw(st.sampled_from(GROUPS))), proto, ports,
                  draw(st.sampled_from(POLICY_IDS)))


configs = st.fixed_dictionaries({
    "nat_overrides": st.dictionaries(st.sampled_from(OVL[:5]), st.sampled_from(PRIV + PUB), max_size=2),
    "filter": st.fixed_dictionaries({"reject_all": st.booleans(), "mode": st.sampled_from(["enforce", "audit"]),
                                     "open_ports": st.lists(st.sampled_from([22, 80, 443]), max_size=2,
                                                            unique=True)}),
    "datapath": st.fixed_dictionaries({"conntrack": st.fixed_dictionaries({"udp_s": st.sampled_from([30, 60])})}),
})

events = st.one_of(
    st.tuples(st.just("node"), nodes(), st.integers(1, 6)),
    st.tuples(st.just("remove"), st.sampled_from(IDS)),
    st.tuples(st.just("order"), st.sampled_from(IDS), st.one_of(st.none(), st.integers(1, 6))),
    st.tuples(st.just("grant"), st.sampled_from(IDS), st.one_of(st.none(), groups_st)),
    st.tuples(st.just("policy"), policies()),
    st.tuples(st.just("unpolicy"), st.sampled_from(POLICY_IDS)),
    st.tuples(st.just("self"), nodes("self")),
    st.tuples(st.just("config"), configs),
)


def make_config(extra: dict):
    base = {"node_id": "self", "network": "ec2", "overlay_subnet": "192.168.0.0/18",
            "registry": {"hosts": ["127.0.0.1:2181"]}}
    return config_from_dict(base | extra)


SELF = Node("self", "ec2", "10.0.0.1", "198.18.0.1", "192.168.0.1", ("web",))


def check(inc: IncrementalPlanner, view: dict, self_node: Node, config) -> None:
    ref = plan(self_node, view["nodes"].values(), config, policies=view["policies"], grants=view["grants"],
               order=view["order"])
    got = inc.desired()
    for name in TABLES:
        assert got.tables[name] == ref.tables[name], (name, got.tables[name], ref.tables[name])
    assert got.peers == ref.peers
    assert got.excluded == ref.excluded
    assert got.conflicts == ref.conflicts
    assert got.ungranted == ref.ungranted
    assert got.selected_by == ref.selected_by
    assert got.groups == ref.groups


def snapshot(inc: IncrementalPlanner) -> dict:
    return {name: dict(table) for name, table in inc.tables.items()}


def assert_touched(before: dict, after: dict, touched: dict) -> None:
    for name in TABLES:
        old, new = before[name], after[name]
        changed = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
        missing = changed - set(touched.get(name, ()))
        assert not missing, f"{name}: changed keys not reported as touched: {sorted(map(str, missing))}"


@pytest.mark.parametrize("grants_mode", [False, True], ids=["records-carry-groups", "assignments"])
def test_incremental_equals_plan(grants_mode):
    @settings(max_examples=SEQUENCES // 2, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(events, min_size=1, max_size=25))
    def run(seq):
        config = make_config({})
        self_node = SELF
        view = {"nodes": {}, "order": {}, "grants": {} if grants_mode else None, "policies": {}}
        inc = IncrementalPlanner(self_node, config)
        if grants_mode:
            inc.rebuild({}, {}, {}, {})
        check(inc, view, self_node, config)
        for ev in seq:
            before = snapshot(inc)
            kind = ev[0]
            if kind == "node":
                node, order = ev[1], ev[2]
                view["nodes"][node.node_id] = node
                view["order"][node.node_id] = order
                touched = inc.update(nodes={node.node_id: node}, order={node.node_id: order})
            elif kind == "remove":
                view["nodes"].pop(ev[1], None)
                view["order"].pop(ev[1], None)
                touched = inc.update(nodes={ev[1]: None}, order={ev[1]: None})
            elif kind == "order":
                _set(view["order"], ev[1], ev[2])
                touched = inc.update(order={ev[1]: ev[2]})
            elif kind == "grant":
                if not grants_mode:
                    continue
                _set(view["grants"], ev[1], ev[2])
                touched = inc.update(grants={ev[1]: ev[2]})
            elif kind == "policy":
                view["policies"][ev[1].policy_id] = ev[1]
                touched = inc.update(policies={ev[1].policy_id: ev[1]})
            elif kind == "unpolicy":
                view["policies"].pop(ev[1], None)
                touched = inc.update(policies={ev[1]: None})
            elif kind == "self":
                self_node = ev[1]
                touched = inc.set_self(self_node)
            else:
                config = make_config(ev[1])
                touched = inc.set_config(config)
            check(inc, view, self_node, config)
            assert_touched(before, snapshot(inc), touched)

    run()


def _set(table: dict, key, value) -> None:
    if value is None:
        table.pop(key, None)
    else:
        table[key] = value


def test_batch_event_equals_plan():
    """One event may carry several records (a registry's batch): the same result."""
    config = make_config({})
    peers = {f"b{i}": Node(f"b{i}", "vpc", f"10.1.0.{i}", f"198.19.1.{i}", f"192.168.1.{i}", ("db",))
             for i in range(1, 40)}
    peers["dup"] = Node("dup", "vpc", "10.1.0.99", "198.19.1.3", "192.168.1.99")   # public held by b3
    order = {node_id: i for i, node_id in enumerate(peers, 1)}
    inc = IncrementalPlanner(SELF, config)
    inc.update(nodes=peers, order=order)
    check(inc, {"nodes": peers, "order": order, "grants": None, "policies": {}}, SELF, config)
    assert [c.node_id for c in inc.desired().conflicts] == ["dup"]
    inc.update(nodes={"b3": None}, order={"b3": None})      # the holder leaves: dup takes over
    del peers["b3"], order["b3"]
    check(inc, {"nodes": peers, "order": order, "grants": None, "policies": {}}, SELF, config)
    assert "dup" in {p.node_id for p in inc.desired().peers}
