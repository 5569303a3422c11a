"""Agent behaviour with an in-memory registry and the dry-run datapath.

The clock and sleep are injected, so throttle and guard tests are exact and fast.
"""

from __future__ import annotations

import ipaddress
import random
import threading

import pytest

from overlay.agent import Agent
from overlay.config import config_from_dict
from overlay.datapath.dryrun import DryRunDatapath
from overlay.model import Node
from overlay.registry import RegistryView
from tests.support.feed import FeedRegistry
from tests.support.wait import wait_for

SUBNET = ipaddress.IPv4Network("192.168.0.0/18")
HOSTS = list(SUBNET.hosts())


class FakeRegistry:
    """A registry whose view the test sets directly."""

    name = "fake"

    def __init__(self):
        self.nodes: dict[str, Node] = {}
        self.connected = True
        self.max_change: int | None = None
        self.listener = None

    def start(self, listener):
        self.listener = listener

    def view(self) -> RegistryView:
        return RegistryView(nodes=dict(self.nodes), connected=self.connected, max_change=self.max_change)

    def put(self, node: Node):
        self.nodes[node.node_id] = node
        if self.listener:
            self.listener()


@pytest.fixture(autouse=True, params=["full", "feed"])
def registry_kind(request, monkeypatch):
    """Every test twice: a registry without a change feed (the agent resyncs in full on
    every change) and one with it (the incremental path)."""
    monkeypatch.setattr(FakeRegistry, "__new__", (lambda cls: object.__new__(cls)) if request.param == "full"
                        else (lambda cls: FeedRegistry()))
    return request.param


def peer(i: int, network: str = "ec2") -> Node:
    return Node(f"n{i}", network, f"10.1.{i // 250}.{i % 250 + 1}", f"198.19.{i // 250}.{i % 250 + 1}", str(HOSTS[i + 10]))


SELF = Node("self", "ec2", "10.0.0.1", "198.18.0.1", str(HOSTS[0]))


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def make_agent(threshold=20, throttle=(0.0, 0.0), n=0, settle=0.0, **extra):
    cfg = config_from_dict(
        {
            "node_id": "self",
            "network": "ec2",
            "addresses": {"private": SELF.private, "public": SELF.public},
            "registry": {"backend": "static"},
            "guard": {"max_change": threshold, "settle_s": settle},
            "throttle": {"min_s": throttle[0], "max_s": throttle[1]},
            **extra,
        }
    )
    reg = FakeRegistry()
    for i in range(n):
        reg.nodes[f"n{i}"] = peer(i)
    dp = DryRunDatapath()
    clock = FakeClock()
    agent = Agent(cfg, reg, dp, SELF, clock=clock, sleep=clock.sleep, rng=random.Random(7))
    reg.start(agent.notify)
    return agent, reg, dp, clock


def test_initial_sync_programs_every_peer_and_is_ready():
    agent, reg, dp, _ = make_agent(n=30)
    agent.reconcile()
    assert agent.ready
    assert len(dp.state["nat"]) == 30
    assert dp.state["nat"][peer(3).overlay].real == peer(3).private
    assert {p["node_id"] for p in agent.status()["peers"]} == {f"n{i}" for i in range(30)}


def test_one_change_is_one_peers_ops_and_second_reconcile_is_empty():
    agent, reg, dp, _ = make_agent(n=100)
    agent.reconcile()
    reg.put(peer(100))
    ops = agent.reconcile()
    assert sorted((o.table, o.key) for o in ops) == sorted(
        [("nat", peer(100).overlay), ("peers", peer(100).private)]
    )
    assert agent.reconcile() == []


@pytest.mark.parametrize(
    "removed, added, threshold, held",
    [
        (25, 0, 20, True),   # 25 removals at threshold 20: held
        (25, 25, 20, True),  # 25 removed plus 25 added: still held (net count would be 0)
        (5, 0, 20, False),   # 5 removals: applied
        (20, 0, 20, False),  # exactly at the threshold: applied
    ],
)
def test_churn_guard(removed, added, threshold, held):
    agent, reg, dp, _ = make_agent(threshold=threshold, n=60)
    agent.reconcile()
    for i in range(removed):
        del reg.nodes[f"n{i}"]
    for i in range(100, 100 + added):
        reg.nodes[f"n{i}"] = peer(i)
    agent.reconcile()
    status = agent.status()
    assert status["guard"]["tripped"] is held
    present = {peer(i).overlay for i in range(removed)} & set(dp.state["nat"])
    if held:
        assert len(present) == removed, "held removals must stay in the datapath"
        assert status["guard"]["size"] == removed
        assert sorted(status["guard"]["held"]["removed"]) == sorted(f"n{i}" for i in range(removed))
    else:
        assert not present
    # additions are applied at once, held or not
    assert all(peer(i).overlay in dp.state["nat"] for i in range(100, 100 + added))


def test_changed_real_addresses_count_as_churn_and_are_held():
    agent, reg, dp, _ = make_agent(threshold=3, n=10)
    agent.reconcile()
    for i in range(4):
        p = peer(i)
        reg.nodes[p.node_id] = Node(p.node_id, "vpc", p.private, p.public, p.overlay)  # now cross-network
    agent.reconcile()
    assert agent.guard.tripped
    assert sorted(agent.guard.held["changed"]) == ["n0", "n1", "n2", "n3"]
    assert dp.state["nat"][peer(0).overlay].real == peer(0).private  # old mapping kept


def test_raising_the_threshold_live_releases_the_held_change():
    agent, reg, dp, _ = make_agent(threshold=20, n=40)
    agent.reconcile()
    for i in range(25):
        del reg.nodes[f"n{i}"]
    agent.reconcile()
    assert agent.guard.tripped
    reg.max_change = 30  # <prefix>/config/max_change written by an operator
    agent.reconcile()
    assert not agent.guard.tripped
    assert len(dp.state["nat"]) == 15
    assert agent.status()["guard"]["threshold"] == 30


def test_operator_release_lets_the_held_change_through_once():
    agent, reg, dp, _ = make_agent(threshold=20, n=40)
    agent.reconcile()
    for i in range(25):
        del reg.nodes[f"n{i}"]
    agent.reconcile()
    assert agent.guard.tripped
    assert "25" in agent.request_release()
    agent.reconcile()
    assert not agent.guard.tripped and len(dp.state["nat"]) == 15
    # the next large change trips again: the release was for that change only
    for i in range(25, 40):
        del reg.nodes[f"n{i}"]
    agent.guard.threshold = 10
    reg.max_change = 10
    agent.reconcile()
    assert agent.guard.tripped


def test_fail_static_while_disconnected():
    agent, reg, dp, _ = make_agent(n=30)
    agent.reconcile()
    before = {t: dict(v) for t, v in dp.state.items()}
    reg.connected = False
    reg.nodes.clear()  # whatever the view says while disconnected is not applied
    assert agent.reconcile() == []
    assert not agent.ready
    assert dp.state == before
    reg.connected = True
    reg.nodes = {f"n{i}": peer(i) for i in range(30)}
    assert agent.reconcile() == []
    assert agent.ready


def test_throttle_jitters_and_coalesces_changes_arriving_during_the_wait():
    agent, reg, dp, clock = make_agent(throttle=(2.0, 4.0), n=5)
    agent.step()  # first sync is not delayed
    assert clock.sleeps == []
    applies_before = dp.applies

    def change_during_sleep(s):
        clock.sleeps.append(s)
        clock.now += s
        for i in range(5, 15):  # ten changes arrive while waiting
            reg.put(peer(i))

    agent.sleep = change_during_sleep
    reg.put(peer(15))
    agent.step()
    assert len(clock.sleeps) == 1 and 2.0 <= clock.sleeps[0] <= 4.0
    assert dp.applies == applies_before + 1, "all changes coalesced into one apply"
    assert len(dp.state["nat"]) == 16


def test_run_loop_reacts_to_registry_events_and_stops():
    agent, reg, dp, _ = make_agent(n=3)
    agent.clock = __import__("time").monotonic
    stop = threading.Event()
    t = threading.Thread(target=agent.run, args=(stop, 0.05), daemon=True)
    t.start()
    try:
        reg.put(peer(7))
        wait_for(lambda: peer(7).overlay in dp.state["nat"], 2, "peer 7 applied by the loop")
    finally:
        stop.set()
        agent.wake.set()
        t.join(5)
    assert not t.is_alive()


def test_rejected_records_are_counted_in_status():
    agent, reg, dp, _ = make_agent(n=2)
    reg.view = lambda: RegistryView(nodes=dict(reg.nodes), rejected={"bad": "not JSON", "evil": "stolen overlay"})
    agent.reconcile()
    assert agent.status()["rejected"] == 2


def test_removals_arriving_one_by_one_are_weighed_together_after_settling():
    """A registry hiccup arrives as a stream of events; the guard must see the whole batch."""
    agent, reg, dp, clock = make_agent(threshold=20, n=40, settle=2.0)
    agent.reconcile()
    for i in range(25):  # 25 deletions, each followed by a reconcile, within the settle time
        del reg.nodes[f"n{i}"]
        reg.put(peer(100 + i))  # additions keep flowing meanwhile
        agent.reconcile()
        clock.now += 0.05
        assert peer(i).overlay in dp.state["nat"], "a removal was applied before settling"
        assert peer(100 + i).overlay in dp.state["nat"], "an addition was delayed"
        assert not agent.guard.tripped
    assert agent.status()["guard"]["settling"] == 25
    assert agent.next_deadline == pytest.approx(2.0)
    clock.now = 2.0
    agent.reconcile()
    assert agent.guard.tripped and agent.guard.size == 25
    assert all(peer(i).overlay in dp.state["nat"] for i in range(25))


def test_a_few_removals_are_applied_after_settling():
    agent, reg, dp, clock = make_agent(threshold=20, n=10, settle=2.0)
    agent.reconcile()
    for i in range(3):
        del reg.nodes[f"n{i}"]
    agent.reconcile()
    assert peer(0).overlay in dp.state["nat"]
    clock.now += 2.0
    agent.reconcile()
    assert not agent.guard.tripped
    assert not any(peer(i).overlay in dp.state["nat"] for i in range(3))


def test_sweep_runs_every_few_seconds_and_is_reported():
    """The agent lets the datapath delete expired state at most every SWEEP_S;
    a failing sweep is logged, never raised."""
    from overlay.agent import SWEEP_S
    from overlay.errors import DatapathError

    agent, _, dp, clock = make_agent()
    calls = []

    def sweep():
        calls.append(clock.now)
        if len(calls) == 3:
            raise DatapathError("map gone")
        return {"ovl_ct": 2, "ovl_frag": 1}

    dp.sweep = sweep
    for _ in range(4):
        agent.sweep()            # the same instant: once
    clock.now += SWEEP_S / 2
    agent.sweep()
    assert calls == [0.0]
    clock.now += SWEEP_S
    agent.sweep()
    clock.now += SWEEP_S
    agent.sweep()                # raises inside: swallowed
    assert len(calls) == 3
    assert agent.status()["swept"] == {"ovl_ct": 4, "ovl_frag": 2}


def test_sweep_without_a_sweeping_datapath_is_a_no_op():
    agent, _, _, _ = make_agent()
    agent.sweep()
    assert agent.status()["swept"] == {}
