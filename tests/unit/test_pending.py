"""The pending policy change and `overlay policies plan` (pure); expected verdicts by hand."""

from __future__ import annotations

import pytest

from overlay.errors import InvalidRecord
from overlay.model import policy_from_dict
from overlay.pending import (
    Pending,
    effective,
    load_policy_file,
    parse_pending,
    serialise_pending,
    verdict_changes,
)


def pol(pid, src, dst, proto="tcp", ports=(22,)):
    key = "cidr" if "/" in src else "group"
    return policy_from_dict({"v": 1, "from": {key: src}, "to": {"group": dst}, "proto": proto,
                             "ports": list(ports)}, pid)


HOSTS = {"db-1": ("db",), "web-1": ("web",), "bare": ()}


def test_plan_by_hand():
    before = {"a": pol("a", "web", "db", ports=(5432,))}
    after = {"a": pol("a", "web", "db", ports=(5432,)), "b": pol("b", "ops", "web", ports=("20-25",))}
    rows = verdict_changes(HOSTS, before, after)
    # web-1 becomes default-deny: ops may reach 20-25, web->db 5432 does not select it (open -> deny)
    assert rows == [
        {"host": "web-1", "from": "group ops", "proto": "tcp", "ports": "20-25", "before": "open", "after": "allow"},
        {"host": "web-1", "from": "group web", "proto": "tcp", "ports": "5432", "before": "open", "after": "deny"},
    ]


def test_plan_partial_and_removed():
    before = {"a": pol("a", "web", "db", ports=("8000-8010",))}
    after = {"a": pol("a", "web", "db", ports=("8000-8004",))}
    assert verdict_changes(HOSTS, before, after) == [
        {"host": "db-1", "from": "group web", "proto": "tcp", "ports": "8000-8010", "before": "allow",
         "after": "partial"}]
    assert verdict_changes(HOSTS, before, {}) == [
        {"host": "db-1", "from": "group web", "proto": "tcp", "ports": "8000-8010", "before": "allow",
         "after": "open"}]
    assert verdict_changes(HOSTS, before, before) == []


def test_pending_round_trip_and_effective():
    p = Pending("c1", 100.0, 105.0, {}, {"a": pol("a", "web", "db")})
    q = parse_pending(serialise_pending(p))
    assert q == p
    current = {"a": pol("a", "web", "db")}
    assert effective(current, q, 104.9) == (current, False)
    assert effective(current, q, 105.0) == ({}, True)
    assert effective(current, None, 1e12) == (current, False)


@pytest.mark.parametrize("data, why", [
    (b"{", "not JSON"),
    (b'{"v": 2}', '"v": 1'),
    (b'{"v": 1, "id": "x", "created": 1, "deadline": "soon", "previous": {}, "applied": {}}', "deadline"),
    (b'{"v": 1, "id": "x", "created": 1, "deadline": 2, "previous": {"a": {"v": 1}}, "applied": {}}', "previous.a"),
    (b'{"v": 1, "id": "x", "created": 1, "deadline": 2, "previous": {}, "applied": {}, "more": 1}', "unknown"),
])
def test_bad_pending_records(data, why):
    with pytest.raises(InvalidRecord, match=why):
        parse_pending(data)


def test_policy_file():
    got = load_policy_file({"policies": {"a": {"from": {"group": "web"}, "to": {"group": "db"}, "proto": "tcp",
                                               "ports": [22]}}})
    assert got == {"a": pol("a", "web", "db")}
    assert load_policy_file({"policies": {}}) == {}
    for bad in ({}, {"policy": {}}, {"policies": []}, {"policies": {"a": {"to": {"group": "db"}}}}):
        with pytest.raises(InvalidRecord):
            load_policy_file(bad)
