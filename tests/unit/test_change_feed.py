"""The change feed of a registry's view (ViewState.changes; docs/plugins.md)."""

from __future__ import annotations

from overlay import registry as reg_mod
from overlay.model import Node
from overlay.registry import ViewState
from overlay.registry.static import StaticRegistry

A = Node("a", "ec2", "10.0.0.2", "198.18.0.2", "192.168.0.2", ("web",))
B = Node("b", "vpc", "10.0.0.3", "198.19.0.3", "192.168.0.3")


def test_changes_name_what_changed_with_current_values():
    v = ViewState(connected=True, synced=True, grants={})
    start = v.snapshot().seq
    with v.lock:
        v.nodes["a"], v.order["a"], v.grants["a"] = A, 7, ("web",)
        v.nodes["b"] = B
    mid = v.changes(start).seq
    with v.lock:
        del v.nodes["b"]
        v.rejected["policy:p"] = "bad JSON"
        v.max_change = 5
    ch = v.changes(mid)
    assert ch.nodes == {"b": None} and ch.order == {"b": None} and ch.grants == {"b": None}
    assert ch.rejected == {"policy:p": "bad JSON"} and ch.max_change == 5
    ch = v.changes(start)
    assert ch.nodes == {"a": A, "b": None} and ch.order == {"a": 7, "b": None}
    assert ch.grants == {"a": ("web",), "b": None}
    assert v.changes(ch.seq).nodes == {} and v.changes(ch.seq).seq == ch.seq


def test_unknown_after_a_wholesale_replace_or_beyond_what_the_feed_keeps(monkeypatch):
    v = ViewState(connected=True, synced=True)
    seq = v.snapshot().seq
    with v.lock:
        v.nodes = {"a": A}              # a snapshot after a reconnect
    assert v.changes(seq) is None
    assert v.changes(v.snapshot().seq) is not None
    monkeypatch.setattr(reg_mod, "FEED_KEEP", 3)
    seq = v.snapshot().seq
    with v.lock:
        for i in range(4):
            v.policies[f"p{i}"] = None
    assert v.changes(seq) is None        # 4 keys changed, the feed keeps 3
    assert v.changes(seq + 1) is not None
    assert v.changes(v.snapshot().seq + 1) is None   # a position the view never gave


def test_static_registry_feeds_only_what_a_reload_changed():
    r = StaticRegistry([A, B])
    seq = r.view().seq
    r.replace([A, Node("c", "ec2", "10.0.0.4", "198.18.0.4", "192.168.0.4")])
    ch = r.changes(seq)
    assert set(ch.nodes) == {"b", "c"} and ch.nodes["b"] is None
    assert ch.order == {"b": None, "c": 1}
    assert r.view().order == {"a": 0, "c": 1}
