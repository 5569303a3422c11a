"""The ``controller_fanout`` benchmark's harness, tiny: 20 Watch streams (5 client processes,
one node identity each, the default 4 streams per identity), 3 changes. Asserts that every
stream opened with a snapshot, every change reached every stream, and the rows have the
contract's shape; latency is printed, never asserted (the figure is the benchmark's:
``python -m bench run --suites controller_fanout``)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict

import pytest

from bench.controller_fanout import METRICS, SUITE, _percentile, measure, rows
from bench.results import CONTRACT_KEYS, ResultSet, make_row
from tests.support import grpc as gs

pytestmark = pytest.mark.zk
STREAMS, PROCS, CHANGES = 20, 5, 3


@pytest.fixture(scope="module")
def certs():
    with gs.node_certs([f"fan-{i}" for i in range(PROCS)]) as d:
        yield d


def test_a_change_reaches_every_stream_and_the_rows_have_the_contract_shape(zk_server, zk_prefix, certs):
    with gs.controllers() as start:
        ctl = start(gs.controller_config(zk_server.address, zk_prefix, certs))
        # the controller runs in this process here: its CPU row is this process's
        m = measure(ctl.address, certs, streams=STREAMS, procs=PROCS, changes=CHANGES, interval_s=0.2,
                    server_pid=os.getpid())
    print(f"{STREAMS} streams: delivery p50 {_percentile(m['latency_ms'], 0.5):.1f} ms, "
          f"p99 {_percentile(m['latency_ms'], 0.99):.1f} ms")
    assert m["errors"] == [] and m["streams"] == STREAMS
    assert m["sent"] == CHANGES and m["deliveries"] == STREAMS * CHANGES and m["missed"] == 0
    assert len(m["all_streams_ms"]) == CHANGES and all(ms > 0 for ms in m["latency_ms"])

    results = ResultSet("test")
    rows(results, make_row, STREAMS, [m], PROCS)
    got = [asdict(r) for r in results.rows]
    assert [r["metric"] for r in got] == list(METRICS)
    for r in got:
        assert set(CONTRACT_KEYS) <= set(r)
        assert (r["suite"], r["backend"], r["peers"]) == (SUITE, "controller", STREAMS)
        assert isinstance(r["value"], float) and not math.isnan(r["value"])
    values = {r["metric"]: r["value"] for r in got}
    assert values["streams"] == STREAMS and values["deliveries_missed"] == 0
    assert values["delivery_ms_p50"] <= values["delivery_ms_p99"] <= values["delivery_ms_max"]


def test_the_grpc_floor_server_delivers_every_change_to_every_stream():
    """bench/grpc_floor.py (the bare grpc.aio server the suite is compared with) measures
    what the suite measures: here 8 streams, 2 changes, each change delivered to every
    stream once, with the server's CPU sampled."""
    from bench.grpc_floor import run

    (m,) = run(streams=8, changes=2, reps=1)
    assert m["errors"] == [] and m["streams"] == 8
    assert m["sent"] == 2 and m["deliveries"] == 16 and m["missed"] == 0
    assert len(m["latency_ms"]) == 16 and all(ms > 0 for ms in m["latency_ms"])
