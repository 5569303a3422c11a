"""The benchmark harness (bench/): result rows, goals, report, fleet (the end-to-end smoke
run, which needs root, is tests/integration/test_bench_smoke.py). No timing threshold is
asserted anywhere here."""

from __future__ import annotations

import os

import pytest

from bench import goals, peers, report
from bench.results import CONTRACT_KEYS, ResultSet, load, make_row, summarize

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rows():
    rs = ResultSet("test")
    rs.add(make_row("conn_setup", "bare", 0, "conn_per_s", "conn/s", [100.0, 120.0, 110.0]))
    for n, e, i in ((10000, 99.0, 40.0), (50000, 97.0, 10.0)):
        rs.add(make_row("conn_setup", "ebpf-tc", n, "conn_per_s", "conn/s", [e]))
        rs.add(make_row("conn_setup", "iptables", n, "conn_per_s", "conn/s", [i]))
    rs.add(make_row("update_one", "ebpf-tc", 10000, "ms", "ms", [0.1, 0.2]))
    rs.add(make_row("update_one", "iptables", 10000, "ms", "ms", [150.0]))
    rs.add(make_row("memory", "ebpf-tc", 50000, "kernel_bytes_per_peer", "bytes/peer", [240.0]))
    rs.add(make_row("fanout", "dryrun", 1000, "event_to_apply_ms_p99", "ms", [5.0, 7.0],
                    agents=10))
    return rs


def test_rows_carry_the_contract_keys(tmp_path):
    rs = _rows()
    path = tmp_path / "latest.json"
    rs.write(str(path))
    data = load(str(path))
    assert {"machine", "run", "rows", "goals"} <= set(data)
    assert data["rows"]
    for row in data["rows"]:
        assert set(CONTRACT_KEYS) <= set(row), row
        assert isinstance(row["value"], float | int)
        assert isinstance(row["peers"], int)
        assert row["min"] <= row["value"] <= row["max"]
    assert data["machine"]["cpus"] and data["machine"]["kernel"]
    assert data["run"]["profile"] == "test"
    assert not os.path.exists(str(path) + ".tmp")
    fan = [r for r in data["rows"] if r["suite"] == "fanout"]
    assert fan[0]["agents"] == 10
    assert "agents" not in data["rows"][0]


def test_summarize_is_median_min_max():
    assert summarize([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert summarize([4.0, 1.0]) == (2.5, 1.0, 4.0)
    with pytest.raises(ValueError):
        summarize([])


def test_goals_are_ratios_of_medians():
    by = {g["goal"]: g for g in goals.evaluate([r.to_dict() for r in _rows().rows])}
    assert by["conn_setup_vs_bare"]["measured"] == pytest.approx(97.0 / 110.0, rel=1e-3)
    assert by["conn_setup_vs_bare"]["peers"] == 50000
    assert by["conn_setup_vs_bare"]["met"] is False
    assert by["conn_setup_vs_iptables"]["measured"] == pytest.approx(99.0 / 40.0, rel=1e-3)
    assert by["conn_setup_vs_iptables"]["met"] is True
    assert by["update_one_vs_iptables"]["measured"] == pytest.approx(1000.0, rel=1e-3)
    assert by["update_one_vs_iptables"]["met"] is True
    assert by["kernel_bytes_per_peer"]["met"] is False
    assert by["full_sync_vs_iptables"]["met"] is None  # not measured


def test_both_ends_goals_read_only_server_filter_rows():
    """Issue 15's goals take the paired ratio of rows measured with both ends filtering;
    a client-only row of the same key is ignored (hand table)."""
    rows = [make_row("rr", "ebpf-tc", 10000, "latency_us_p50_vs_bare", "x", [1.01, 1.2, 1.05],
                     server_filter=True),
            make_row("rr", "ebpf-tc", 50000, "latency_us_p50_vs_bare", "x", [1.0],
                     server_filter=False),
            make_row("stream", "ebpf-socket", 50000, "gbps_vs_bare", "x", [0.99, 0.95],
                     server_filter=True)]
    by = {g["goal"]: g for g in goals.evaluate([r.to_dict() for r in rows])}
    assert (by["tc_rr_p50_vs_bare"]["measured"], by["tc_rr_p50_vs_bare"]["peers"]) == (1.05, 10000)
    assert by["tc_rr_p50_vs_bare"]["met"] is True
    assert by["socket_stream_vs_bare"]["measured"] == pytest.approx(0.97)
    assert by["socket_stream_vs_bare"]["met"] is True
    assert by["tc_stream_vs_bare"]["met"] is None  # no rows with both ends filtering
    assert rows[0].to_dict()["server_filter"] is True and "server_filter" not in _rows().rows[0].to_dict()


def test_report_rewrites_only_the_generated_part(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nhand-written intro\n\n{report.BEGIN}\nold\n{report.END}\n"
                   "\n## Analysis\n\nhand-written analysis\n")
    data = _rows().to_dict()
    report.write_report(data, str(tmp_path), doc=str(doc))
    text = doc.read_text()
    assert "hand-written intro" in text and "hand-written analysis" in text
    assert "\nold\n" not in text
    assert "New TCP connections per second" in text
    assert "| 50,000 |" in text
    assert "Goals" in text
    assert report.goals_text(data).startswith("==> goals")


def test_plots_are_written(tmp_path):
    # matplotlib comes with the set-up (scripts/setup.sh): a missing one fails here, never skips
    from bench.plots import plot_all

    made = plot_all(_rows().to_dict(), str(tmp_path))
    assert made and all(os.path.getsize(p) > 0 for p in made)
    assert {os.path.basename(p) for p in made} >= {"conn_setup.png", "update_one.png"}


def test_target_peer_is_the_last_dnat_rule():
    """The iptables baseline walks every other peer's rule before the target's."""
    from overlay.config import config_from_dict
    from overlay.datapath.iptables import nat_rules
    from overlay.model import Node
    from overlay.plan import plan

    cfg = config_from_dict(peers.config_dict("iptables", "eth0", "10.77.2.1"))
    a = cfg.addresses
    me = Node(cfg.node_id, cfg.network, a.private, a.public, a.overlay)
    fleet = peers.fleet(300, "10.77.2.2")
    desired = plan(me, fleet, cfg)
    assert len(desired.peers) == 300
    rules = nat_rules(desired.tables, a.overlay, a.private)
    assert len(rules) == 301  # self + peers
    assert f"-d {peers.target_overlay(300)}/32" in rules[-1]
    assert rules[-1].endswith("--to-destination 10.77.2.2")


