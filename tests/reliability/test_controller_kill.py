"""Reliability test 3 (issue 16): a controller replica killed with SIGKILL, two replicas.

On the shared lab (:mod:`tests.support.timeline`): the replica the vpc daemons use is
killed while vpc-web streams 4 MiB to vpc-app's overlay address. Each live vpc daemon is
connected to the other replica within 5 s; no daemon anywhere applies fewer peers; the
matrix stays green; the stream ends with every byte, in order, and no reset.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.root, pytest.mark.zk]

FAILOVER_S = 5.0


@pytest.mark.timeout(1200)
def test_controller_kill_with_two_replicas(fleet):
    part = fleet.wait("t3", timeout=900)
    d = part.data
    assert d, fleet.error
    print(f"\nkilled {d['victim']}; failover: {d['failover_s']}")
    assert all(v is not None and v <= FAILOVER_S for v in d["failover_s"].values()), d["failover_s"]
    assert all(d["vpc_ready"].values()), d["vpc_ready"]
    sent, got = d["stream"]["sender"], d["stream"]["receiver"]
    assert sent.get("error") is None and got.get("error") is None, d["stream"]
    assert sent["sent"] == got["received"] and got["sha256"] == sent["sha256"] == sent["echo"]
    assert fleet.violations_in(part) == [], "a daemon applied fewer peers"
    assert fleet.matrix_failures_in(part) == [], fleet.matrix_failures_in(part)[0][2]
