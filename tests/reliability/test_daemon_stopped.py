"""Reliability test 1 (issue 16): daemons stopped for 5 minutes (15 with --soak-long).

On the shared lab (:mod:`tests.support.timeline`): vpc-api's daemon is SIGSTOPped and
vpc-db's SIGKILLed; their pinned datapaths keep serving and their records (leased:
the lab's ``controller.lease_s`` outlasts the stop) keep them peers of everyone, while
tests 3, 4 and 7 shake the rest of the fleet. All along, no daemon applies fewer peers
and the connectivity matrix is unchanged. Then vpc-api continues and vpc-db starts again
(adopting its pinned state), and everything converges.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.root, pytest.mark.zk]


@pytest.mark.timeout(2400)
def test_daemons_stopped_and_killed_for_minutes(fleet, durations):
    part = fleet.wait("t1", timeout=durations.daemon_stopped_s + 900)
    d = part.data
    assert d.get("back_s") is not None, fleet.error or d
    print(f"\nstopped {d['stopped_s']} s; back and converged {d['back_s']} s later; "
          f"{fleet.watch.polls} polls of every daemon's peers")
    assert d["stopped_s"] >= durations.daemon_stopped_s
    assert d["adopted"] and d["vpc_db"]["ready"]
    assert fleet.violations_in(part) == [], "a daemon applied fewer peers"
    assert fleet.matrix_failures_in(part) == [], fleet.matrix_failures_in(part)[0][2]
    assert fleet.error is None, fleet.error
