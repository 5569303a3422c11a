"""overlay audit's pure core: a hand-made fleet and the answers worked out by hand."""

from __future__ import annotations

import ipaddress

import pytest

from overlay.audit import (
    Allocation,
    Host,
    Snapshot,
    audit,
    format_report,
    parse_inventory,
    version_key,
)

DAY = 86400.0
NOW = 1_000 * DAY


def fleet() -> Snapshot:
    s = Snapshot(ipaddress.IPv4Network("10.7.0.0/29"))          # 6 host addresses
    s.hosts = [
        Host("web-1", "native", "10.7.0.1", "10.0.0.1", "198.18.0.1", "0.2.0"),
        Host("web-2", "native", "10.7.0.2", "10.0.0.2", "198.18.0.2", "0.1.0"),
        Host("db-1", "native", "10.7.0.3", "10.0.0.3", "198.18.0.3", None),
        Host("web-1", "neti", "10.7.0.1", "10.0.0.1", "198.18.0.1"),   # moved: in both, native wins
        Host("i-old", "neti", "10.7.0.4", "10.0.0.4", "198.18.0.4"),
    ]
    s.allocations = [
        Allocation("web-1", "10.7.0.1", "native", NOW - 100 * DAY),
        Allocation("web-1", "10.7.0.1", "neti", NOW - 400 * DAY),
        Allocation("web-2", "10.7.0.2", "native", NOW - 1 * DAY),
        Allocation("db-1", "10.7.0.3", "native", NOW - 1 * DAY),
        Allocation("i-old", "10.7.0.4", "neti", NOW - 500 * DAY),
        Allocation("gone-a", "10.7.0.5", "neti", NOW - 90 * DAY),      # stale, old enough
        Allocation("gone-a", "10.7.0.5", "native", NOW - 40 * DAY),
        Allocation("gone-b", "10.7.0.6", "native", NOW - 3 * DAY),     # no host, but recent
    ]
    return s


def test_the_hand_worked_report():
    r = audit(fleet(), ["web-1", "10.0.0.2", "db-2", "198.18.0.9"], "0.2", 30, NOW)
    assert r["hosts"] == 4
    assert r["missing"] == ["db-2", "198.18.0.9"]
    assert r["unlisted"] == ["db-1", "i-old"]
    assert r["versions"] == {"0.1.0": ["web-2"], "0.2.0": ["web-1"], "neti": ["i-old"], "unknown": ["db-1"]}
    assert r["below"] == ["db-1", "i-old", "web-2"]
    assert r["only_neti"] == ["i-old"]
    assert r["addresses"] == {"subnet": "10.7.0.0/29", "total": 6, "allocated": 6, "free": 0}
    assert r["stale"] == [{"node_id": "gone-a", "overlay": "10.7.0.5", "layouts": ["native", "neti"],
                           "age_days": 40.0}]
    text = "\n".join(format_report(r))
    assert "in the inventory, not registered: 2" in text and "only in the old layout: 1" in text
    assert "gone-a" in text and "gone-b" not in text


def test_without_inventory_or_floor():
    r = audit(fleet(), None, None, 2, NOW)
    assert "missing" not in r and "unlisted" not in r and "below" not in r
    assert [s["node_id"] for s in r["stale"]] == ["gone-a", "gone-b"]
    with pytest.raises(ValueError, match="not a version"):
        audit(fleet(), None, "latest", 2, NOW)


def test_an_old_entry_without_an_id_is_its_overlay():
    s = Snapshot(ipaddress.IPv4Network("10.7.0.0/29"), [Host(None, "neti", "10.7.0.4", "10.0.0.4", "198.18.0.4")])
    r = audit(s, ["10.7.0.4"], None, 30, NOW)
    assert r["missing"] == [] and r["only_neti"] == ["10.7.0.4"] and r["versions"] == {"neti": ["10.7.0.4"]}


@pytest.mark.parametrize("text, column, want", [
    ("web-1\n# comment\n\n10.0.0.2\nweb-1\n", None, ["web-1", "10.0.0.2"]),
    ("name,rack\nweb-1,a\nweb-2,b\n", None, ["web-1", "web-2"]),
    ("rack,private_ip\na,10.0.0.1\n", None, ["10.0.0.1"]),
    ("rack,Private_IP,node_id\na,10.0.0.1,x\n", "private_ip", ["10.0.0.1"]),
    ("", None, []),
])
def test_inventory(text, column, want):
    assert parse_inventory(text, column) == want


@pytest.mark.parametrize("text, column, why", [
    ("web 1\n", None, "one id or address per line"),
    ("rack,row\na,b\n", None, "names no id or address column"),
    ("rack,ip\na,10.0.0.1\n", "node_id", "has no column 'node_id'"),
    ("node_id,ip\n,10.0.0.1\n", None, "row 2 has no value"),
])
def test_inventory_errors(text, column, why):
    with pytest.raises(ValueError, match=why):
        parse_inventory(text, column)


def test_version_key():
    assert version_key("0.10.1") > version_key("0.9")
    assert version_key("1.2.3rc1") == (1, 2, 3)
    assert version_key("neti") is None
