"""The agent's incremental path against its full path (issue 14).

Two agents get the same random events: one on a registry without a change feed (every
change: the whole view, plan, full diff: the reference) and one on a registry with it
(incremental planner, guard over the touched and held peers, diff of the touched keys).
After every event their datapaths must hold the same tables, and ``/status`` must show
the same peers, exclusions and guard. Events: peers joining, leaving, moving address,
network or groups, overlay collisions, policies, the live threshold, the operator's
release and the clock passing the settle window.
"""

from __future__ import annotations

import ipaddress
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.agent import Agent
from overlay.config import config_from_dict
from overlay.datapath.dryrun import DryRunDatapath
from overlay.model import Node, policy_from_dict
from overlay.registry import RegistryView
from tests.support.feed import FeedRegistry

HOSTS = list(ipaddress.IPv4Network("192.168.0.0/18").hosts())
SELF = Node("self", "ec2", "10.0.0.1", "198.18.0.1", str(HOSTS[0]), ("db",))


class PlainRegistry:
    name = "fake"

    def __init__(self):
        self.nodes, self.policies, self.max_change, self.connected = {}, {}, None, True

    def view(self) -> RegistryView:
        return RegistryView(nodes=dict(self.nodes), policies=dict(self.policies), max_change=self.max_change,
                            connected=self.connected)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def make(reg):
    cfg = config_from_dict({
        "node_id": "self", "network": "ec2", "groups": ["db"],
        "addresses": {"private": SELF.private, "public": SELF.public},
        "registry": {"backend": "static"}, "guard": {"max_change": 2, "settle_s": 5},
    })
    for i in range(6):
        reg.nodes[f"n{i}"] = Node(f"n{i}", "ec2", f"10.1.0.{i}", f"198.19.0.{i}", str(HOSTS[i + 10]), ("web",))
    clock = Clock()
    dp = DryRunDatapath()
    agent = Agent(cfg, reg, dp, SELF, clock=clock, sleep=lambda s: None, rng=random.Random(1))
    agent.reconcile()
    return agent, dp, clock


nodes = st.builds(
    lambda i, net, priv, ovl, groups: Node(f"n{i}", net, f"10.1.0.{priv}", f"198.19.0.{priv}", str(HOSTS[10 + ovl]),
                                           tuple(sorted(groups))),
    st.integers(0, 9), st.sampled_from(["ec2", "vpc"]), st.integers(0, 9), st.integers(0, 9),
    st.lists(st.sampled_from(["web", "ops"]), max_size=2, unique=True))
policy = st.builds(lambda pid, src, port: policy_from_dict(
    {"v": 1, "from": {"group": src}, "to": {"group": "db"}, "proto": "tcp", "ports": [port]}, pid),
    st.sampled_from(["p0", "p1"]), st.sampled_from(["web", "ops"]), st.sampled_from([22, 5432]))
events = st.lists(st.one_of(
    st.tuples(st.just("put"), nodes),
    st.tuples(st.just("del"), st.integers(0, 9)),
    st.tuples(st.just("policy"), policy),
    st.tuples(st.just("unpolicy"), st.sampled_from(["p0", "p1"])),
    st.tuples(st.just("max_change"), st.one_of(st.none(), st.integers(0, 6))),
    st.tuples(st.just("release")),
    st.tuples(st.just("time"), st.sampled_from([1.0, 6.0])),
), min_size=1, max_size=20)


@settings(max_examples=300, database=None)   # issue 14: 300 sequences, whatever the profile
@given(events)
def test_incremental_agent_matches_full_agent(seq):
    pairs = [make(PlainRegistry()), make(FeedRegistry())]
    regs = [a.registry for a, _, _ in pairs]
    for ev in seq:
        for reg in regs:
            if ev[0] == "put":
                reg.nodes[ev[1].node_id] = ev[1]
            elif ev[0] == "del":
                reg.nodes.pop(f"n{ev[1]}", None)
            elif ev[0] == "policy":
                reg.policies[ev[1].policy_id] = ev[1]
            elif ev[0] == "unpolicy":
                reg.policies.pop(ev[1], None)
            elif ev[0] == "max_change":
                reg.max_change = ev[1]
        for agent, _, clock in pairs:
            if ev[0] == "release":
                agent.request_release()
            elif ev[0] == "time":
                clock.now += ev[1]
            agent.reconcile()
        (full, full_dp, _), (inc, inc_dp, _) = pairs
        assert inc.feed_seq is not None
        assert inc_dp.state == full_dp.state
        a, b = full.status(), inc.status()
        for key in ("peers", "excluded", "guard", "policy", "conflicts"):
            assert b[key] == a[key], key
