"""Reliability test 4 (issue 16): every controller down for 2 minutes (10 with --soak-long).

On the shared lab (:mod:`tests.support.timeline`): both replicas are killed. The vpc
daemons fail static (not ready, disconnected, every peer still applied), no daemon
anywhere applies fewer peers, the matrix stays green all along; the replicas back, every
daemon is ready, connected and has every other member as a peer within 10 s.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.root, pytest.mark.zk]

CONVERGE_S = 10.0


@pytest.mark.timeout(1800)
def test_all_controllers_down_then_back(fleet, durations):
    part = fleet.wait("t4", timeout=900 + durations.controllers_down_s)
    d = part.data
    assert d.get("converged_s") is not None, fleet.error or d
    print(f"\ncontrollers down {d['down_s']} s; converged {d['converged_s']} s after they were back")
    assert d["down_s"] >= durations.controllers_down_s
    assert d["seen_down"] and all(not s["ready"] and not s["connected"] and s["peers"] == 5
                                  for s in d["seen_down"].values()), d["seen_down"]
    assert d["converged_s"] <= CONVERGE_S
    assert fleet.violations_in(part) == [], "a daemon applied fewer peers"
    assert fleet.matrix_failures_in(part) == [], fleet.matrix_failures_in(part)[0][2]
