"""The agent's life over time, on the injected clock: the full re-read of the datapath
(at start, every ``resync_s``, after a reconnect), the loop's wake-up at the settle
deadline, the settle window starting afresh for each batch, and what a held
re-addressed peer keeps (its old mapping both ways, never its new reverse entry).

Drift (an entry someone deleted behind the agent's back) is the witness of a re-read:
the agent repairs it only when it observes the datapath again."""

from __future__ import annotations

import threading

import pytest

from overlay.model import Node
from tests.support.feed import FeedRegistry
from tests.support.wait import wait_for
from tests.unit.test_agent import FakeRegistry, make_agent, peer


@pytest.fixture(autouse=True)
def _feed_registry(monkeypatch):
    """A registry with a change feed: the agent's incremental path, where a full re-read
    of the datapath happens only at start, every ``resync_s`` and after a reconnect (a
    registry without a feed has the agent re-read in full on every change)."""
    monkeypatch.setattr(FakeRegistry, "__new__", lambda cls: FeedRegistry())


def _drift(dp, overlay: str) -> None:
    """Delete ``overlay``'s NAT entry behind the agent's back."""
    del dp.state["nat"][overlay]


def _counting_observe(dp) -> list[int]:
    calls: list[int] = []
    real = dp.observe

    def observe():
        calls.append(1)
        return real()

    dp.observe = observe
    return calls


def test_the_datapath_is_read_again_every_resync_s_and_not_before():
    agent, reg, dp, clock = make_agent(n=5)
    agent.resync_s = 300.0
    reads = _counting_observe(dp)
    agent.reconcile()
    assert len(reads) == 1
    _drift(dp, peer(2).overlay)
    for t in (1.0, 150.0, 299.9):
        clock.now = t
        assert agent.reconcile() == []        # the agent's copy says all is there: nothing to do
        assert peer(2).overlay not in dp.state["nat"]
    assert len(reads) == 1
    clock.now = 300.0                          # exactly resync_s after the last read
    ops = agent.reconcile()
    assert len(reads) == 2 and len(ops) == 1
    assert dp.state["nat"][peer(2).overlay].real == peer(2).private
    clock.now = 599.0                          # the next one counts from the last read
    agent.reconcile()
    assert len(reads) == 2
    clock.now = 600.0
    agent.reconcile()
    assert len(reads) == 3


def test_the_datapath_is_read_again_after_a_reconnect():
    agent, reg, dp, clock = make_agent(n=5)
    agent.resync_s = 10_000.0
    reads = _counting_observe(dp)
    agent.reconcile()
    _drift(dp, peer(4).overlay)
    reg.connected = False
    clock.now = 1.0
    assert agent.reconcile() == [] and not agent.ready
    assert len(reads) == 1
    reg.connected = True
    clock.now = 2.0
    ops = agent.reconcile()
    assert len(reads) == 2 and len(ops) == 1 and agent.ready
    assert peer(4).overlay in dp.state["nat"]
    agent.reconcile()                          # connected since: no further read
    assert len(reads) == 2


def test_the_idle_loop_resyncs_every_resync_s():
    """No registry event at all: the loop itself wakes for the resync and repairs drift."""
    agent, reg, dp, clock = make_agent(n=3)
    agent.resync_s = 300.0
    agent.reconcile()
    applies = agent.applies
    _drift(dp, peer(1).overlay)
    stop = threading.Event()
    t = threading.Thread(target=agent.run, args=(stop, 0.01), daemon=True)
    agent.wake.clear()
    try:
        clock.now = 100.0
        agent.wake.set()                        # run() sets it too: one reconcile, no read
        t.start()
        wait_for(lambda: agent.applies == applies + 1, 5, "one reconcile")
        assert peer(1).overlay not in dp.state["nat"]
        clock.now = 300.0                       # idle, and resync_s has passed
        wait_for(lambda: peer(1).overlay in dp.state["nat"], 5, "the resync's repair")
        assert peer(1).overlay in dp.state["nat"]
    finally:
        stop.set()
        agent.wake.set()
        t.join(5)
    assert not t.is_alive()


def test_the_loop_wakes_at_the_settle_deadline_without_an_event():
    """Removals wait settle_s; nothing else happens; the loop must come back by itself at
    the deadline (its idle wait is 30 s here, far beyond this test's 5 s bound)."""
    agent, reg, dp, clock = make_agent(threshold=20, n=10, settle=2.0)
    agent.resync_s = 10_000.0
    agent.reconcile()
    for i in range(3):
        del reg.nodes[f"n{i}"]
    agent.reconcile()                                  # t=0: settling until 2.0
    clock.now = 1.9
    stop = threading.Event()
    t = threading.Thread(target=agent.run, args=(stop, 30.0), daemon=True)
    applies = agent.applies
    t.start()
    try:
        wait_for(lambda: agent.applies == applies + 1, 5, "the start's reconcile")   # still settling
        assert agent.next_deadline == 2.0
        assert peer(0).overlay in dp.state["nat"]
        clock.now = 2.5
        wait_for(lambda: peer(0).overlay not in dp.state["nat"], 5, "the apply at the settle deadline")
        assert not any(peer(i).overlay in dp.state["nat"] for i in range(3))
        assert agent.next_deadline is None
    finally:
        stop.set()
        agent.wake.set()
        t.join(5)
    assert not t.is_alive()


def test_the_settle_window_starts_afresh_after_the_churn_is_undone():
    agent, reg, dp, clock = make_agent(threshold=20, n=10, settle=2.0)
    agent.reconcile()
    gone = reg.nodes.pop("n0")
    agent.reconcile()                           # t=0: settling until 2
    assert agent.next_deadline == 2.0
    clock.now = 1.0
    reg.nodes["n0"] = gone                      # back: no churn, the window closes
    agent.reconcile()
    assert agent.next_deadline is None and agent.guard.settling == 0
    clock.now = 5.0
    del reg.nodes["n1"]                         # a new batch: its own window, 5..7
    agent.reconcile()
    assert peer(1).overlay in dp.state["nat"], "the new removal was applied without settling"
    assert agent.next_deadline == 7.0
    clock.now = 7.0
    agent.reconcile()
    assert peer(1).overlay not in dp.state["nat"]


def test_the_settle_window_starts_afresh_after_a_batch_is_applied():
    agent, reg, dp, clock = make_agent(threshold=20, n=10, settle=2.0)
    agent.reconcile()
    del reg.nodes["n0"]
    agent.reconcile()
    clock.now = 2.0
    agent.reconcile()
    assert peer(0).overlay not in dp.state["nat"]
    clock.now = 10.0
    del reg.nodes["n1"]
    agent.reconcile()
    assert peer(1).overlay in dp.state["nat"] and agent.next_deadline == 12.0
    clock.now = 11.9
    agent.reconcile()
    assert peer(1).overlay in dp.state["nat"]
    clock.now = 12.0
    agent.reconcile()
    assert peer(1).overlay not in dp.state["nat"]


def test_a_held_re_addressed_peer_keeps_its_old_mapping_and_is_not_admitted_at_its_new_address():
    agent, reg, dp, _ = make_agent(threshold=0, n=4)
    agent.reconcile()
    old = peer(2)
    moved = Node(old.node_id, old.network, "10.9.9.9", old.public, old.overlay)
    reg.nodes[old.node_id] = moved
    agent.reconcile()
    assert agent.guard.tripped and agent.guard.held["changed"] == ["n2"]
    assert dp.state["nat"][old.overlay].real == old.private
    assert old.private in dp.state["peers"]
    assert "10.9.9.9" not in dp.state["peers"], "the held peer's new address is already admitted"
    # released: the new mapping replaces the old one
    agent.request_release()
    agent.reconcile()
    assert dp.state["nat"][old.overlay].real == "10.9.9.9"
    assert "10.9.9.9" in dp.state["peers"] and old.private not in dp.state["peers"]
