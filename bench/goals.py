"""The goals of issues 8, 14 and 15, evaluated on the rows of a run (reported, never asserted).

Each goal compares figures measured in the same run: for the traffic suites the
median of the paired ratios (each repetition's value over the baseline measured
beside it, seconds apart), else the ratio of the medians. A goal whose rows are
missing (a quick run has no 50,000-peer point, say) is evaluated at the
largest peer count the run has, and says so; with no data at all it is
reported as not measured.
"""

from __future__ import annotations

from collections.abc import Callable


def _value(rows, suite, backend, metric, peers=None):
    for r in rows:
        if (r["suite"], r["backend"], r["metric"]) == (suite, backend, metric) and (
            peers is None or r["peers"] == peers
        ):
            return r["value"]
    return None


def _peer_counts(rows, suite, backend, metric) -> list[int]:
    return sorted({r["peers"] for r in rows
                   if (r["suite"], r["backend"], r["metric"]) == (suite, backend, metric)})


def _at(rows, suite, backend, metric, want: int) -> int | None:
    """``want`` if measured, else the largest measured peer count."""
    counts = _peer_counts(rows, suite, backend, metric)
    if not counts:
        return None
    return want if want in counts else counts[-1]


def _goal(name: str, text: str, target: float, higher_is_better: bool,
          compute: Callable[[list], tuple[float | None, int | None, str]]):
    def run(rows):
        measured, peers, detail = compute(rows)
        met = None
        if measured is not None:
            met = measured >= target if higher_is_better else measured <= target
        return {"goal": name, "text": text, "target": target,
                "direction": ">=" if higher_is_better else "<=", "measured": measured,
                "peers": peers, "met": met, "detail": detail}
    return run


def _ratio(num, den):
    if num is None or den is None or den == 0:
        return None
    return round(num / den, 4)


def _paired(rows, suite, backend, metric, n):
    """The median of the paired ratios (``<metric>`` rows written by the run), if any."""
    return _value(rows, suite, backend, metric, n)


def _conn_vs_bare(rows):
    n = _at(rows, "conn_setup", "ebpf-tc", "conn_per_s", 50000)
    e = _value(rows, "conn_setup", "ebpf-tc", "conn_per_s", n)
    b = _value(rows, "conn_setup", "bare", "conn_per_s")
    paired = _paired(rows, "conn_setup", "ebpf-tc", "conn_per_s_vs_bare", n)
    if paired is not None:
        return round(paired, 4), n, (f"median of paired ratios; medians: ebpf-tc {e} conn/s at "
                                     f"{n} peers, bare {b} conn/s")
    return _ratio(e, b), n, f"ebpf-tc {e} conn/s at {n} peers / bare {b} conn/s"


def _conn_vs_iptables(rows):
    n = _at(rows, "conn_setup", "ebpf-tc", "conn_per_s", 10000)
    e = _value(rows, "conn_setup", "ebpf-tc", "conn_per_s", n)
    i = _value(rows, "conn_setup", "iptables", "conn_per_s", n)
    paired = _paired(rows, "conn_setup", "ebpf-tc", "conn_per_s_vs_iptables", n)
    if paired is not None:
        return round(paired, 4), n, (f"median of paired ratios; medians: ebpf-tc {e}, "
                                     f"iptables {i} conn/s at {n} peers")
    return _ratio(e, i), n, f"ebpf-tc {e} / iptables {i} conn/s at {n} peers"


def _update_one(rows):
    n = _at(rows, "update_one", "ebpf-tc", "ms", 10000)
    e = _value(rows, "update_one", "ebpf-tc", "ms", n)
    i = _value(rows, "update_one", "iptables", "ms", n)
    return _ratio(i, e), n, f"iptables {i} ms / ebpf-tc {e} ms at {n} peers"


def _full_sync(rows):
    n = _at(rows, "full_sync", "ebpf-tc", "ms", 50000)
    e = _value(rows, "full_sync", "ebpf-tc", "ms", n)
    i = _value(rows, "full_sync", "iptables", "ms", n)
    return _ratio(i, e), n, f"iptables {i} ms / ebpf-tc {e} ms at {n} peers"


def _rr(metric):
    def compute(rows):
        n = _at(rows, "rr", "ebpf-tc", metric, 50000)
        e = _value(rows, "rr", "ebpf-tc", metric, n)
        b = _value(rows, "rr", "bare", metric)
        paired = _paired(rows, "rr", "ebpf-tc", f"{metric}_vs_bare", n)
        if paired is not None:
            return round(paired, 4), n, (f"median of paired ratios; medians: ebpf-tc {e} us at "
                                         f"{n} peers, bare {b} us")
        return _ratio(e, b), n, f"ebpf-tc {e} us at {n} peers / bare {b} us"
    return compute


def _memory(rows):
    n = _at(rows, "memory", "ebpf-tc", "kernel_bytes_per_peer", 50000)
    v = _value(rows, "memory", "ebpf-tc", "kernel_bytes_per_peer", n)
    return v, n, f"ebpf-tc map memory {v} bytes per peer at {n} peers"


def _agent_change(rows):
    n = _at(rows, "update_one", "core", "agent_change_ms_p50", 50000)
    v = _value(rows, "update_one", "core", "agent_change_ms_p50", n)
    return v, n, f"agent p50 {v} ms for one change among {n} peers"


def _agent_growth(rows):
    counts = _peer_counts(rows, "update_one", "core", "agent_change_ms_p50")
    if len(counts) < 2:
        return None, None, "needs two peer counts"
    lo, hi = (_value(rows, "update_one", "core", "agent_change_ms_p50", c) for c in (counts[0], counts[-1]))
    return _ratio(hi, lo), counts[-1], f"p50 {hi} ms at {counts[-1]} / {lo} ms at {counts[0]}"


def _agent_rss(rows):
    n = _at(rows, "memory", "core", "agent_rss_bytes_per_peer", 50000)
    v = _value(rows, "memory", "core", "agent_rss_bytes_per_peer", n)
    return v, n, f"agent RSS {v} bytes per peer at {n} peers"


def _controller_fanout(rows):
    n = _at(rows, "controller_fanout", "controller", "delivery_ms_p99", 1000)
    v = _value(rows, "controller_fanout", "controller", "delivery_ms_p99", n)
    return v, n, f"p99 {v} ms from a write to its receipt on each of {n} Watch streams"


def _both_ends(suite, backend, metric):
    """Issue 15: the paired ratio to bare of ``backend``'s rows measured with both ends
    filtering (``server_filter`` true), at 50,000 peers or the largest N measured."""
    def compute(rows):
        both = [r for r in rows if r.get("server_filter")]
        n = _at(both, suite, backend, f"{metric}_vs_bare", 50000)
        if n is None:
            return None, None, f"no {backend} {suite} rows with both ends filtering"
        v = _value(both, suite, backend, f"{metric}_vs_bare", n)
        return v, n, f"median of paired ratios, {backend} with both ends filtering, {n} peers"
    return compute


GOALS = [
    _goal("conn_setup_vs_bare", "eBPF connection rate at 50,000 peers >= 0.95x bare",
          0.95, True, _conn_vs_bare),
    _goal("conn_setup_vs_iptables", "eBPF connection rate >= 2x iptables at 10,000 peers",
          2.0, True, _conn_vs_iptables),
    _goal("update_one_vs_iptables", "one-change update >= 1000x faster than iptables at 10,000",
          1000.0, True, _update_one),
    _goal("full_sync_vs_iptables", "full sync of 50,000 peers >= 50x faster than iptables",
          50.0, True, _full_sync),
    _goal("rr_p50_vs_bare", "request/response latency (p50) within 2% of bare",
          1.02, False, _rr("latency_us_p50")),
    _goal("rr_p99_vs_bare", "request/response latency (p99) within 2% of bare",
          1.02, False, _rr("latency_us_p99")),
    _goal("kernel_bytes_per_peer", "kernel memory <= 128 bytes per peer",
          128.0, False, _memory),
    _goal("agent_change_ms_p50", "agent's time for one change <= 1 ms p50 at 50,000 peers",
          1.0, False, _agent_change),
    _goal("agent_change_growth", "agent's p50 per change grows < 2x from 1,000 to 50,000 peers",
          2.0, False, _agent_growth),
    _goal("agent_rss_bytes_per_peer", "agent RSS <= 400 bytes per peer at 50,000 peers",
          400.0, False, _agent_rss),
    _goal("controller_fanout_p99", "one controller delivers a change to 1,000 Watch streams, p99 < 100 ms",
          100.0, False, _controller_fanout),
    _goal("socket_conn_vs_bare", "socket mode, both ends filtering: conn/s at 50,000 >= 0.97x bare",
          0.97, True, _both_ends("conn_setup", "ebpf-socket", "conn_per_s")),
    _goal("socket_rr_p50_vs_bare", "socket mode, both ends filtering: rr p50 within 3% of bare",
          1.03, False, _both_ends("rr", "ebpf-socket", "latency_us_p50")),
    _goal("socket_stream_vs_bare", "socket mode, both ends filtering: stream >= 0.97x bare",
          0.97, True, _both_ends("stream", "ebpf-socket", "gbps")),
    _goal("tc_rr_p50_vs_bare", "tc mode, both ends filtering: rr p50 within 8% of bare",
          1.08, False, _both_ends("rr", "ebpf-tc", "latency_us_p50")),
    _goal("tc_stream_vs_bare", "tc mode, both ends filtering: stream >= 0.93x bare",
          0.93, True, _both_ends("stream", "ebpf-tc", "gbps")),
]


def evaluate(rows: list[dict]) -> list[dict]:
    return [g(rows) for g in GOALS]
