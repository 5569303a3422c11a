"""The churn guard (overlay/guard.py), pure: weighing and decisions, no threads, no clock.

Expectations are hand tables: which overlay addresses a change removes or moves, and
what the guard must decide at each step of a scripted timeline."""

from __future__ import annotations

import pytest

from overlay.config import config_from_dict
from overlay.guard import Churn, Decision, Guard, weigh
from overlay.model import Node
from overlay.plan import AppliedPeer, plan

SELF = Node("self", "ec2", "10.0.0.1", "198.18.0.1", "192.168.0.1", ("web",))


def _applied(*specs):
    """By overlay address, as the agent keeps them: (node_id, overlay, real)."""
    return {ov: AppliedPeer(i, "ec2", ov, real) for i, ov, real in specs}


# --- weighing --------------------------------------------------------------------------------

WEIGH_CASES = [
    ("nothing", _applied(("a", "192.168.0.2", "10.0.0.2")), _applied(("a", "192.168.0.2", "10.0.0.2")), (), ()),
    ("one added is not churn", {}, _applied(("a", "192.168.0.2", "10.0.0.2")), (), ()),
    ("one removed", _applied(("a", "192.168.0.2", "10.0.0.2")), {}, ("192.168.0.2",), ()),
    (
        "real address changed",
        _applied(("a", "192.168.0.2", "10.0.0.2")),
        _applied(("a", "192.168.0.2", "10.0.0.3")),
        (),
        ("192.168.0.2",),
    ),
    (
        # a node that moves to another overlay address: its old address goes, the new one is an addition
        "overlay changed",
        _applied(("a", "192.168.0.2", "10.0.0.2")),
        _applied(("a", "192.168.0.3", "10.0.0.2")),
        ("192.168.0.2",),
        (),
    ),
    (
        "mixed",
        _applied(("a", "192.168.0.2", "10.0.0.2"), ("b", "192.168.0.3", "10.0.0.3"), ("c", "192.168.0.4", "10.0.0.4")),
        _applied(("b", "192.168.0.3", "10.0.0.33"), ("c", "192.168.0.4", "10.0.0.4"), ("d", "192.168.0.5", "10.0.0.5"),
                 ("e", "192.168.0.6", "10.0.0.6")),
        ("192.168.0.2",),
        ("192.168.0.3",),
    ),
]


@pytest.mark.parametrize(("desc", "before", "after", "removed", "changed"), WEIGH_CASES, ids=[c[0] for c in WEIGH_CASES])
def test_weigh(desc, before, after, removed, changed):
    c = weigh(before, after)
    assert (c.removed, c.changed) == (removed, changed)
    assert c.size == len(removed) + len(changed)


def test_weigh_ignores_group_changes():
    before = {"192.168.0.2": AppliedPeer("a", "ec2", "192.168.0.2", "10.0.0.2", ("web",))}
    after = {"192.168.0.2": AppliedPeer("a", "ec2", "192.168.0.2", "10.0.0.2", ("db",))}
    assert weigh(before, after).size == 0


def test_weigh_between_plans():
    cfg = config_from_dict({"node_id": "self", "network": "ec2", "registry": {"hosts": ["zk.example:2181"]}})
    peers = [Node(f"p{i}", "ec2", f"10.0.1.{i}", f"198.18.1.{i}", f"192.168.1.{i}") for i in range(1, 31)]
    before = plan(SELF, peers, cfg)
    after = plan(SELF, peers[5:] + [Node("new", "ec2", "10.0.2.1", "198.18.2.1", "192.168.2.1")], cfg)
    c = weigh({p.overlay: p for p in before.peers}, {p.overlay: p for p in after.peers})
    assert c.removed == tuple(f"192.168.1.{i}" for i in range(1, 6)) and c.changed == ()


# --- decisions -------------------------------------------------------------------------------

FLEET = _applied(*((f"n{i}", f"192.168.0.{i + 10}", f"10.0.0.{i + 10}") for i in range(30)))


def _removing(n: int) -> Churn:
    return Churn(removed=tuple(sorted(FLEET)[:n]))


def test_below_the_threshold_goes_through():
    g = Guard(threshold=5)
    assert g.decide(_removing(5), 0.0, 0.0, FLEET) == Decision(hold=False)
    assert not g.tripped and g.trips == 0 and g.to_dict()["size"] == 0


def test_above_the_threshold_is_held_until_the_threshold_rises():
    g = Guard(threshold=5)
    assert g.decide(_removing(6), 0.0, 0.0, FLEET) == Decision(hold=True)
    assert g.tripped and g.size == 6 and g.trips == 1
    assert g.held == {"removed": [FLEET[o].node_id for o in sorted(FLEET)[:6]], "changed": []}
    # the same churn again: still held, not a second trip
    assert g.decide(_removing(6), 1.0, 0.0, FLEET).hold and g.trips == 1
    # more of it: still the same trip
    assert g.decide(_removing(8), 2.0, 0.0, FLEET).hold and g.trips == 1 and g.size == 8
    g.threshold = 8  # raised live (config/max_change)
    assert g.decide(_removing(8), 3.0, 0.0, FLEET) == Decision(hold=False)
    assert not g.tripped and g.size == 0 and g.held == {"removed": [], "changed": []}
    assert g.to_dict() == {"tripped": False, "threshold": 8, "size": 0, "held": {"removed": [], "changed": []},
                           "trips": 1, "settling": 0}


def test_the_operator_releases_what_is_held():
    g = Guard(threshold=2)
    assert g.request_release() == (False, "the churn guard is not holding anything")
    assert not g.release_requested
    changed = Churn(changed=tuple(sorted(FLEET)[:4]))
    assert g.decide(changed, 0.0, 0.0, FLEET).hold
    assert g.held["changed"] == ["n0", "n1", "n2", "n3"]
    assert g.request_release() == (True, "released: 4 held changes will be applied")
    assert g.decide(changed, 1.0, 0.0, FLEET) == Decision(hold=False)
    assert not g.tripped and not g.release_requested
    # a later mass change trips it again
    assert g.decide(_removing(3), 2.0, 0.0, FLEET).hold and g.trips == 2


def test_churn_settles_before_it_is_weighed():
    """t=0: 3 removals arrive (settle 2 s): held while settling; t=1: 25 more: the window
    does not restart; t=2: the batch (25) is weighed against 20 and trips the guard."""
    g = Guard(threshold=20)
    assert g.decide(_removing(3), 0.0, 2.0, FLEET) == Decision(hold=True, settle_until=2.0)
    assert g.settling == 3 and not g.tripped
    assert g.decide(_removing(25), 1.0, 2.0, FLEET) == Decision(hold=True, settle_until=2.0)
    assert g.settling == 25
    assert g.decide(_removing(25), 2.0, 2.0, FLEET) == Decision(hold=True)
    assert g.tripped and g.size == 25 and g.settling == 0
    # while tripped no settling: a change of the batch is weighed at once
    assert g.decide(_removing(26), 2.5, 2.0, FLEET) == Decision(hold=True)
    assert g.size == 26


def test_a_settled_small_batch_goes_through_and_the_window_restarts():
    g = Guard(threshold=20)
    assert g.decide(_removing(2), 10.0, 2.0, FLEET).settle_until == 12.0
    assert g.decide(_removing(2), 12.0, 2.0, FLEET) == Decision(hold=False)
    assert g.churn_since is None
    # nothing pending: the window is gone; the next churn starts a new one
    assert g.decide(Churn(), 13.0, 2.0, FLEET) == Decision(hold=False)
    assert g.decide(_removing(1), 20.0, 2.0, FLEET).settle_until == 22.0


# --- a fresh guard, frozen results, what it logs ---------------------------------------------


def test_a_fresh_guard_holds_nothing():
    assert Guard().to_dict() == {"tripped": False, "threshold": 20, "size": 0,
                                 "held": {"removed": [], "changed": []}, "trips": 0, "settling": 0}
    g = Guard()
    assert g.release_requested is False and g.churn_since is None and g.node_id == ""
    assert g.request_release() == (False, "the churn guard is not holding anything")


def test_churn_and_decisions_are_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        Churn((), ()).removed = ("x",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Decision(hold=True).hold = False


def test_a_settle_time_below_one_second_still_settles():
    g = Guard(threshold=20)
    churn = Churn(("192.168.0.2",), ())
    applied = _applied(("a", "192.168.0.2", "10.0.0.2"))
    assert g.decide(churn, 10.0, 0.5, applied) == Decision(hold=True, settle_until=10.5)
    assert g.decide(churn, 10.5, 0.5, applied) == Decision(hold=False)


def test_what_the_guard_logs_once_per_trip_and_on_release(caplog):
    g = Guard(threshold=1, node_id="n7")
    applied = _applied(*((f"p{i}", f"192.168.0.{i}", f"10.0.0.{i}") for i in range(2, 6)))
    three = Churn(("192.168.0.2", "192.168.0.3", "192.168.0.4"), ())
    with caplog.at_level("WARNING", logger="overlay.guard"):
        g.decide(three, 0.0, 0.0, applied)
        g.decide(three, 1.0, 0.0, applied)                       # the same hold: no new line
        assert [r.getMessage() for r in caplog.records] == [
            "[n7] churn guard tripped: 3 removed and 0 changed peers exceed max_change 1; holding them "
            "(raise the threshold or run `overlay guard release`)"]
        g.decide(Churn(("192.168.0.2",), ("192.168.0.5",)), 2.0, 0.0, applied)   # it changed: said again
        assert caplog.records[-1].getMessage().startswith(
            "[n7] churn guard tripped: 1 removed and 1 changed peers exceed max_change 1;")
        assert len(caplog.records) == 2 and g.trips == 1
        assert g.request_release() == (True, "released: 2 held changes will be applied")
        assert g.decide(three, 3.0, 0.0, applied) == Decision(hold=False)
        assert caplog.records[-1].getMessage() == "[n7] churn guard: applying 2 held changes (released by the operator)"
        g.decide(three, 4.0, 0.0, applied)
        g.threshold = 3
        g.decide(three, 5.0, 0.0, applied)
        assert caplog.records[-1].getMessage() == "[n7] churn guard: applying 3 held changes (threshold now 3)"
    assert g.trips == 2
