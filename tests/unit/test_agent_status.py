"""The agent's ``/status`` document, its error handling and its adoption of a live datapath,
checked against hand-written expectations (docs/daemon.md describes the document).

One small fleet: n1 in this node's network (reached at its private address), n2 in the other
(its public address, from the old system's layout), n3 claiming n1's overlay address later
(a conflict), a rejected record; a datapath that counts drops and a registry that adds its
controller. Every key of the document is compared.
"""

from __future__ import annotations

import random

import pytest

from overlay.agent import Agent
from overlay.config import config_from_dict
from overlay.datapath.dryrun import DryRunDatapath
from overlay.errors import DatapathError, RegistryError
from overlay.model import Node
from overlay.ops import NatEntry
from overlay.registry import RegistryView

SELF = Node("self", "ec2", "10.0.0.1", "198.18.0.1", "192.168.0.1", ("web",))
N1 = Node("n1", "ec2", "10.0.0.2", "198.18.0.2", "192.168.0.2", ("db",))
N2 = Node("n2", "vpc", "10.1.0.3", "198.19.0.3", "192.168.0.3")
N3 = Node("n3", "vpc", "10.1.0.4", "198.19.0.4", "192.168.0.2")      # n1's overlay address


class Registry:
    name = "fake"

    def __init__(self):
        self.nodes = {"n1": N1, "n2": N2, "n3": N3}
        self.connected = True

    def view(self) -> RegistryView:
        return RegistryView(nodes=dict(self.nodes), connected=self.connected, rejected={"nodes/bad": "not JSON"},
                            sources={"n2": "neti"}, order={"n1": 1, "n2": 2, "n3": 3})

    def status_extra(self) -> dict:
        return {"controller": "ctl:9470"}


class Datapath(DryRunDatapath):
    def counters(self) -> dict[str, int]:
        return {"drop_policy": 3, "drop_no_peer": 1, "pkts": 9}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(datapath=None, registry=None, **cfg):
    config = config_from_dict({"node_id": "self", "network": "ec2", "groups": ["web"],
                               "addresses": {"private": SELF.private, "public": SELF.public},
                               "registry": {"backend": "static"}, "guard": {"max_change": 5, "settle_s": 0},
                               "filter": {"mode": "audit"}, **cfg})
    clock = Clock()
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        clock.now += s

    agent = Agent(config, registry or Registry(), datapath or Datapath(), SELF, clock=clock, sleep=sleep,
                  rng=random.Random(3))
    return agent, clock, sleeps


def test_the_status_document_key_by_key():
    agent, _, _ = make()
    ops = agent.reconcile()
    tables: dict[str, int] = {}
    for op in ops:
        tables[op.table] = tables.get(op.table, 0) + 1
    # n1 and n2 (not n3): nat, peers each; this node's three addresses; loopback failsafe;
    # the filter's mode and reject_all; the name of n1's identity (group db)
    assert tables == {"nat": 2, "peers": 2, "self": 3, "failsafe": 1, "config": 2, "names": 1}
    assert agent.status() == {
        "node_id": "self", "network": "ec2", "overlay": "192.168.0.1", "private": "10.0.0.1",
        "public": "198.18.0.1", "groups": ["web"], "ready": True,
        "registry": {"backend": "fake", "connected": True, "controller": "ctl:9470"},
        "datapath": {"backend": "dryrun", "counters": {"drop_policy": 3, "drop_no_peer": 1, "pkts": 9}},
        "peers": [
            {"node_id": "n1", "network": "ec2", "overlay": "192.168.0.2", "real": "10.0.0.2", "groups": ["db"],
             "source": "native"},
            {"node_id": "n2", "network": "vpc", "overlay": "192.168.0.3", "real": "198.19.0.3", "groups": [],
             "source": "neti"},
        ],
        "excluded": [{"node_id": "n3",
                      "reason": "overlay address 192.168.0.2 is held by the earlier registration n1"}],
        "drops": {"policy": 3, "no_peer": 1},
        "policy": {"enforced": False, "selected_by": [], "mode": "audit"},
        "conflicts": 1,
        "conflict_entries": [{"node_id": "n3", "kind": "overlay", "address": "192.168.0.2", "holder": "n1"}],
        "ungranted": {},
        "rejected": 1,
        "rejected_records": {"nodes/bad": "not JSON"},
        "guard": {"tripped": False, "threshold": 5, "size": 0, "held": {"removed": [], "changed": []},
                  "trips": 0, "settling": 0, "held_count": 0},
        "applies": 1,
        "ops_total": 11,
        "swept": {},
        "last_error": None,
    }
    assert (agent.last_apply_ops, agent.ops_total, agent.applies) == (11, 11, 1)
    assert agent.reconcile() == []
    assert (agent.last_apply_ops, agent.ops_total, agent.applies) == (0, 11, 2)


def test_counters_and_fill_that_fail_leave_them_out():
    class Broken(DryRunDatapath):
        def counters(self):
            raise DatapathError("maps gone")

        def fill(self):
            raise DatapathError("maps gone")

    agent, _, _ = make(datapath=Broken())
    agent.reconcile()
    st = agent.status()
    assert st["datapath"] == {"backend": "dryrun", "counters": {}} and st["drops"] == {}
    assert "fill" not in st


def test_a_registry_without_extra_status_adds_nothing():
    reg = Registry()
    reg.status_extra = None          # not callable: nothing added
    agent, _, _ = make(registry=reg)
    assert agent.status()["registry"] == {"backend": "fake", "connected": False}


def test_a_failed_reconcile_is_counted_reported_and_cleared_by_the_next_good_one():
    class Failing(Datapath):
        fail = True

        def apply(self, ops):
            if self.fail:
                raise DatapathError("netlink said no")
            super().apply(ops)

    dp = Failing()
    agent, _, _ = make(datapath=dp)
    agent.step()
    agent.step()
    assert (agent.errors, agent.last_error, agent.ready) == (2, "netlink said no", False)
    assert agent.status()["last_error"] == "netlink said no"
    dp.fail = False
    agent.step()
    assert (agent.errors, agent.last_error, agent.ready) == (2, None, True)
    assert len(dp.state["nat"]) == 2


def test_an_error_that_is_not_an_overlay_error_is_not_swallowed():
    class Buggy(Datapath):
        def observe(self):
            raise KeyError("bug")

    agent, _, _ = make(datapath=Buggy())
    try:
        agent.step()
    except KeyError:
        pass
    else:
        raise AssertionError("a bug must not be swallowed by step()")
    assert agent.errors == 0


def test_step_throttles_only_once_something_was_applied_and_not_after_stop():
    import threading

    agent, clock, sleeps = make(throttle={"min_s": 2, "max_s": 3})
    agent.wake.set()
    agent.step()                                     # the first sync: at once
    assert sleeps == [] and agent.applies == 1 and not agent.wake.is_set()
    agent.step()
    assert len(sleeps) == 1 and 2 <= sleeps[0] <= 3 and agent.applies == 2
    assert sleeps[0] == random.Random(3).uniform(2, 3)   # drawn from the rng the agent was given
    stop = threading.Event()
    stop.set()
    agent.step(stop)                                 # stopped during the wait: no reconcile
    assert len(sleeps) == 2 and agent.applies == 2
    still, _, no_sleeps = make(throttle={"min_s": 0, "max_s": 0})
    still.step()
    still.step()
    assert no_sleeps == [] and still.applies == 2


def test_a_registry_error_in_step_is_counted():
    class Down(Registry):
        def view(self):
            raise RegistryError("zk down")

    agent, _, _ = make(registry=Down())
    agent.step()
    assert (agent.errors, agent.last_error) == (1, "zk down")


def test_a_live_datapath_is_adopted_without_its_overrides():
    dp = Datapath()
    dp.state["nat"] = {"192.168.0.8": NatEntry("10.0.0.8", True), "192.168.0.9": NatEntry("10.0.0.9"),
                       "192.168.0.7": NatEntry("10.0.0.7", True)}      # overrides first and last
    reg = Registry()
    reg.connected = False                            # adopted before the registry answers
    agent, _, _ = make(datapath=dp, registry=reg)
    assert agent.reconcile() == []                   # unreachable: nothing observed, nothing applied
    assert agent.applied_peers == {}
    reg.connected = True
    reg.nodes = {}
    agent.guard.threshold = 0
    agent.config = config_from_dict({"node_id": "self", "network": "ec2",
                                     "addresses": {"private": SELF.private, "public": SELF.public},
                                     "registry": {"backend": "static"}, "guard": {"max_change": 0, "settle_s": 0}})
    agent.reconcile()
    held = agent.status()["guard"]
    assert held["tripped"] and held["held"]["removed"] == ["adopted:192.168.0.9"]
    peers = {p["overlay"]: p for p in agent.status()["peers"]}
    assert peers == {"192.168.0.9": {"node_id": "adopted:192.168.0.9", "network": "?", "overlay": "192.168.0.9",
                                     "real": "10.0.0.9", "groups": [], "source": "native"}}
    assert dp.state["nat"]["192.168.0.9"] == NatEntry("10.0.0.9")


def test_going_offline_logs_once_and_keeps_the_datapath(caplog):
    agent, _, _ = make()
    agent.reconcile()
    before = {t: dict(v) for t, v in agent.datapath.state.items()}
    agent.registry.connected = False
    with caplog.at_level("WARNING", logger="overlay.agent"):
        agent.reconcile()
        agent.reconcile()
    lines = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert lines == ["[self] registry unreachable: keeping the datapath as it is"]
    assert agent.datapath.state == before and not agent.ready and not agent.connected
    assert agent.status()["registry"]["connected"] is False and agent.status()["ready"] is False


def test_the_sweep_runs_every_5_seconds_as_documented():
    """docs/datapath.md: "The agent calls datapath.sweep() every 5 s"."""
    agent, clock, _ = make()
    calls = []
    agent.datapath.sweep = lambda: calls.append(clock.now) or {}
    agent.sweep()
    clock.now += 4.99
    agent.sweep()
    clock.now += 0.01
    agent.sweep()
    assert calls == [100.0, 105.0]


def test_fresh_agent_state():
    agent, clock, _ = make()
    assert agent.resync_s == 300.0
    assert agent.last_apply_ops == 0
    own = Agent(agent.config, Registry(), Datapath(), SELF)       # no rng given: a Random of its own
    assert isinstance(own.rng, random.Random) and own.rng is not random._inst
    assert agent.heartbeat == 100.0
    assert (agent.ready, agent.connected, agent.applies, agent.errors, agent.ops_total) == (False, False, 0, 0, 0)
    assert agent.last_resync == float("-inf") and agent.last_sweep == float("-inf")
    assert agent.next_deadline is None and agent.last_error is None and agent.observed is None
    assert agent.groups == ("web",)
    assert not agent.wake.is_set()


def test_notify_release_and_config_wake_the_loop():
    agent, _, _ = make()
    agent.notify()
    assert agent.wake.is_set()
    agent.wake.clear()
    agent.request_release()
    assert not agent.wake.is_set()                   # nothing held: no wake-up
    agent.reconcile()
    assert agent.feed_seq is None
    new = config_from_dict({"node_id": "self", "network": "ec2", "addresses": {"private": SELF.private,
                            "public": SELF.public}, "registry": {"backend": "static"}})
    agent.feed_seq = 7
    agent.set_config(new)
    assert agent.config is new and agent.feed_seq is None and agent.wake.is_set()


def test_a_release_of_a_tripped_guard_wakes_the_loop():
    reg = Registry()
    agent, _, _ = make(registry=reg, guard={"max_change": 0, "settle_s": 0})
    agent.reconcile()
    reg.nodes = {}
    agent.reconcile()
    assert agent.guard.tripped
    agent.wake.clear()
    agent.request_release()
    assert agent.wake.is_set()


def test_long_lists_in_status_stop_at_100():
    class Many(Registry):
        def view(self):
            nodes = {"n1": N1} | {f"c{i}": Node(f"c{i}", "vpc", f"10.2.0.{i + 1}", f"198.19.1.{i + 1}", N1.overlay)
                                  for i in range(101)}
            return RegistryView(nodes=nodes, rejected={f"nodes/bad{i:03d}": "x" for i in range(101)},
                                order={"n1": 0} | {f"c{i}": i + 1 for i in range(101)})

    agent, _, _ = make(registry=Many())
    agent.reconcile()
    st = agent.status()
    assert (st["conflicts"], len(st["conflict_entries"])) == (101, 100)
    assert (st["rejected"], len(st["rejected_records"])) == (101, 100)
    assert sorted(st["rejected_records"])[-1] == "nodes/bad099"      # the first 100 by key
    assert len(st["excluded"]) == 101


def test_ungranted_groups_in_status_stop_at_100():
    class Granting(Registry):
        def view(self):
            nodes = {f"g{i:03d}": Node(f"g{i:03d}", "vpc", f"10.3.0.{i + 1}", f"198.19.3.{i + 1}",
                                       f"192.168.3.{i + 1}", ("admin",)) for i in range(101)}
            return RegistryView(nodes=nodes, grants={n: () for n in nodes})

    agent, _, _ = make(registry=Granting())
    agent.reconcile()
    ungranted = agent.status()["ungranted"]
    assert len(ungranted) == 100 and ungranted["g000"] == ["admin"]
    assert len(agent.ungranted) == 102 and ("self", ("web",)) in agent.ungranted   # and this node's own


def test_the_log_lines(caplog):
    """What an operator reads: each line word for word."""
    class Flaky(Datapath):
        def sweep(self):
            raise DatapathError("sweep map gone")

        def fill(self):
            raise DatapathError("fill map gone")

        def counters(self):
            raise DatapathError("counter map gone")

    agent, clock, _ = make(datapath=Flaky(), throttle={"min_s": 1, "max_s": 1})
    with caplog.at_level("DEBUG", logger="overlay.agent"):
        agent.reconcile()
        agent.step()
        agent.sweep()
        agent.status()
        agent.datapath.apply = lambda ops: (_ for _ in ()).throw(DatapathError("apply failed"))
        agent.registry.nodes = {"n1": N1}
        agent.step()
    assert [r.getMessage() for r in caplog.records] == [
        "[self] applied 11 ops (2 peers)",
        "[self] excluding n3: overlay address 192.168.0.2 is held by the earlier registration n1",
        "[self] throttle: applying in 1.00 s",
        "[self] sweep failed: sweep map gone",
        "counters unavailable: counter map gone",
        "fill levels unavailable: fill map gone",
        "[self] throttle: applying in 1.00 s",
        "[self] reconcile failed: apply failed",
    ]
    levels = [r.levelname for r in caplog.records]
    assert levels == ["INFO", "WARNING", "DEBUG", "DEBUG", "DEBUG", "DEBUG", "DEBUG", "ERROR"]


class LoopWake:
    """Stands in for the loop's ``threading.Event``: records each wait's timeout, lets simulated
    time pass when nothing woke the loop, and stops the loop after ``n`` waits."""

    def __init__(self, clock: Clock, stop, n: int):
        self.clock, self.stop, self.n = clock, stop, n
        self.flag = False
        self.timeouts: list[float] = []

    def set(self) -> None:
        self.flag = True

    def clear(self) -> None:
        self.flag = False

    def is_set(self) -> bool:
        return self.flag

    def wait(self, timeout: float) -> bool:
        self.timeouts.append(round(timeout, 6))
        if not self.flag:
            self.clock.now = round(self.clock.now + timeout, 6)
        if len(self.timeouts) >= self.n:
            self.stop.set()
        return self.flag


def _loop(agent, clock, n: int, **run) -> tuple[list[float], list[float]]:
    """Run the loop for ``n`` waits with step() recording when it ran (and clearing the wake)."""
    import threading

    stop = threading.Event()
    agent.wake = LoopWake(clock, stop, n)
    steps: list[float] = []

    def step(stop=None):
        agent.wake.clear()
        steps.append(clock.now)

    agent.step = step
    agent.run(stop, **run)
    return agent.wake.timeouts, steps


def test_the_loop_waits_idle_s_1_by_default_and_beats_each_round():
    agent, clock, _ = make()
    agent.last_resync = 100.0
    timeouts, steps = _loop(agent, clock, 4)
    assert timeouts == [1.0, 1.0, 1.0, 1.0]
    assert steps == [100.0]                       # the first round always reconciles
    assert agent.heartbeat == 102.0               # the fourth round began at 102 (its wait ends at 103)


def test_the_loop_wakes_for_a_resync_exactly_every_resync_s():
    agent, clock, _ = make()
    agent.resync_s = 2.0
    agent.last_resync = 100.0
    timeouts, steps = _loop(agent, clock, 5, idle_s=1.0)
    # 100: the first round; idle until 102, when 102 - 100 >= 2 wakes the loop (with '>' it
    # would be 103); the fifth wait ends the test
    assert steps == [100.0, 102.0] and timeouts == [1.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(("deadline", "timeouts", "steps"), [
    (100.5, [0.5, 0.5, 0.01, 0.01], [100.0, 100.5]),            # waits until the deadline, then 10 ms
    (99.0, [0.01, 0.01, 0.01, 0.01], [100.0, 100.01]),          # past: the shortest wait, 10 ms
    (103.0, [1.0, 1.0, 1.0, 1.0], [100.0]),                     # beyond idle_s: idle_s
])
def test_the_loop_waits_for_the_settle_deadline(deadline, timeouts, steps):
    agent, clock, _ = make()
    agent.last_resync = 100.0
    agent.next_deadline = deadline
    got_timeouts, got_steps = _loop(agent, clock, 4)
    assert (got_timeouts, got_steps) == (timeouts, steps)


def test_the_feed_path_from_seq_0_and_what_it_carries():
    """A view at seq 0 is a feed position (only -1 means no feed): the next reconcile asks for
    the changes after 0 instead of resyncing; the changes' rejected map, sources (None: back to
    native) and nodes reach the status."""
    from overlay.registry import ViewChanges

    class Fed(Registry):
        def __init__(self):
            super().__init__()
            self.asked: list[int] = []
            self.views = 0
            self.next: ViewChanges | None = None

        def view(self):
            self.views += 1
            return RegistryView(nodes=dict(self.nodes), sources={"n2": "neti"}, order={"n1": 1, "n2": 2, "n3": 3},
                                seq=0)

        def changes(self, since):
            self.asked.append(since)
            return self.next

    reg = Fed()
    agent, _, _ = make(registry=reg)
    agent.reconcile()
    assert (agent.feed_seq, reg.views) == (0, 1)
    reg.next = ViewChanges(seq=1, rejected={"nodes/x": "bad"}, sources={"n2": None, "n1": "neti"},
                           nodes={"n3": None}, order={"n3": None})
    ops = agent.reconcile()
    assert (reg.asked, reg.views, agent.feed_seq) == ([0], 1, 1)
    assert ops == []                                   # n3 was excluded: its going changes no table
    st = agent.status()
    assert st["rejected_records"] == {"nodes/x": "bad"} and st["conflicts"] == 0
    assert {p["node_id"]: p["source"] for p in st["peers"]} == {"n1": "neti", "n2": "native"}
    reg.next = ViewChanges(seq=2, connected=False)
    assert agent.reconcile() == [] and not agent.ready and agent.feed_seq == 1
    reg.next = None                                    # "unknown": a full resync
    agent.reconcile()
    assert reg.views == 2 and agent.ready
    reg.next = ViewChanges(seq=3)
    agent.reconcile()
    assert (reg.asked, reg.views) == ([0, 1, 0], 2)
    agent.set_config(agent.config)                     # a new config: a full resync, not changes(None)
    agent.reconcile()
    assert (reg.asked, reg.views) == ([0, 1, 0], 3)


def test_a_new_config_takes_effect_at_the_next_reconcile():
    agent, _, _ = make()
    agent.reconcile()
    stricter = config_from_dict({"node_id": "self", "network": "ec2", "groups": ["web"],
                                 "addresses": {"private": SELF.private, "public": SELF.public},
                                 "registry": {"backend": "static"}, "guard": {"max_change": 5, "settle_s": 0},
                                 "filter": {"mode": "audit", "reject_all": True}})
    agent.set_config(stricter)
    ops = agent.reconcile()
    assert [(op.table, op.key, op.value) for op in ops] == [("config", "reject_all", 1)]


def test_no_throttle_until_an_apply_went_through():
    """The throttle delays changes after a first apply; a first apply that failed (the datapath
    observed, nothing applied) is retried at once."""
    class FailOnce(Datapath):
        failed = False

        def apply(self, ops):
            if not self.failed:
                self.failed = True
                raise DatapathError("busy")
            super().apply(ops)

    agent, _, sleeps = make(datapath=FailOnce(), throttle={"min_s": 2, "max_s": 3})
    agent.step()
    assert agent.errors == 1 and agent.observed is not None and agent.applies == 0
    agent.step()
    assert sleeps == [] and agent.applies == 1
    agent.step()
    assert len(sleeps) == 1


def _web_to_db_on_a_feed(max_change: int):
    """This node in db, two web peers (one identity), a policy from web to db, on a registry with
    a change feed; the guard at ``max_change`` without settling."""
    from overlay.model import policy_from_dict
    from tests.support.feed import FeedRegistry

    reg = FeedRegistry()
    for i in (1, 2):
        reg.nodes[f"w{i}"] = Node(f"w{i}", "ec2", f"10.0.1.{i}", f"198.18.1.{i}", f"192.168.1.{i}", ("web",))
    reg.policies = {"p": policy_from_dict({"v": 1, "from": {"group": "web"}, "to": {"group": "db"}, "proto": "tcp",
                                           "ports": [5432]}, "p")}
    me = Node("self", "ec2", "10.0.0.1", "198.18.0.1", "192.168.0.1", ("db",))
    config = config_from_dict({"node_id": "self", "network": "ec2", "groups": ["db"],
                               "addresses": {"private": me.private, "public": me.public},
                               "registry": {"backend": "static"},
                               "guard": {"max_change": max_change, "settle_s": 0}})
    dp = Datapath()
    return Agent(config, reg, dp, me, clock=Clock(), sleep=lambda s: None, rng=random.Random(1)), reg, dp


def test_a_held_peer_keeps_its_identitys_policy_entries_on_the_feed_path():
    """The guard holds a removal that arrives through the change feed: the peer's nat/peers
    entries stay, and so do its identity's policy entries and name, although the event touched
    no policy key."""
    agent, reg, dp = _web_to_db_on_a_feed(max_change=0)
    agent.reconcile()
    policy_before = dict(dp.state["policy"])
    names_before = dict(dp.state["names"])
    assert policy_before and names_before
    del reg.nodes["w1"]
    agent.reconcile()
    assert agent.feed_seq is not None                  # the incremental path
    assert agent.guard.tripped
    assert dp.state["nat"]["192.168.1.1"] == NatEntry("10.0.1.1")
    assert dp.state["policy"] == policy_before and dp.state["names"] == names_before


def test_held_peers_identity_entries_go_once_the_hold_is_released():
    """Both web peers go at once (their identity with them), the guard holds it; the release
    deletes the identity's policy entries and name with the peers."""
    agent, reg, dp = _web_to_db_on_a_feed(max_change=1)
    agent.reconcile()
    web_ids = {key[1] for key, name in dp.state["names"].items() if key[0] == "identity" and name == "web"}
    assert len(web_ids) == 1 and any(key[0] in web_ids for key in dp.state["policy"])
    del reg.nodes["w1"], reg.nodes["w2"]
    agent.reconcile()
    assert agent.guard.tripped and any(key[0] in web_ids for key in dp.state["policy"])
    agent.request_release()
    agent.reconcile()
    assert not agent.guard.tripped
    assert not any(key[0] in web_ids for key in dp.state["policy"])
    assert not any(key == ("identity", i) for key in dp.state["names"] for i in web_ids)
    assert "192.168.1.1" not in dp.state["nat"]


def test_a_held_peer_keeps_the_nat_entry_the_datapath_has():
    """Held means untouched: a held peer's NAT entry stays as the datapath holds it, even when
    that is not what this agent wrote (seen at a resync)."""
    reg = Registry()
    agent, _, _ = make(registry=reg, guard={"max_change": 0, "settle_s": 0})
    agent.reconcile()
    agent.datapath.state["nat"]["192.168.0.2"] = NatEntry("10.0.0.99")   # changed behind the agent's back
    agent.last_resync = float("-inf")                                    # the next reconcile observes again
    del reg.nodes["n1"]
    ops = agent.reconcile()
    assert agent.guard.tripped
    assert agent.datapath.state["nat"]["192.168.0.2"] == NatEntry("10.0.0.99")
    assert all(op.key != "192.168.0.2" for op in ops)
