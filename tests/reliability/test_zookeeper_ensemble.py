"""Reliability test 7 (issue 16): a three-server ZooKeeper ensemble loses a follower, then
its leader.

On the shared lab (:mod:`tests.support.timeline`; ``zookeeper: {ensemble: 3}``, each
server in its own namespace): a follower killed, the daemons and controllers carry on
with the two left (everyone ready); the leader killed too (no quorum): the ZooKeeper
daemons fail static, the controllers keep serving their last state (the vpc daemons stay
ready); no daemon applies fewer peers and the matrix stays green throughout; once a
quorum is back, an overlay address is allocated both through ZooKeeper and through a
controller, and every daemon converges.
"""

from __future__ import annotations

import ipaddress

import pytest

pytestmark = [pytest.mark.root, pytest.mark.zk]


@pytest.mark.timeout(1800)
def test_ensemble_loses_a_follower_then_the_leader(fleet, durations):
    part = fleet.wait("t7", timeout=1200 + durations.controllers_down_s)
    d = part.data
    assert d.get("roles"), fleet.error or d
    print(f"\nroles {d['roles']}; killed follower {d['follower']} then leader {d['leader']}; "
          f"ec2 back {d['ec2_back_s']} s after the quorum; allocated {d['allocated']}")
    assert sorted(d["roles"].values()) == ["follower", "follower", "leader"]
    assert all(d["after_follower"].values()), d["after_follower"]
    assert {h: r for h, r in d["no_quorum"].items() if h in d["ec2"]} == {h: False for h in d["ec2"]}
    assert all(r for h, r in d["no_quorum"].items() if h not in d["ec2"]), d["no_quorum"]
    assert d["ec2_back_s"] is not None and d["converged_s"] is not None
    for way, address in d["allocated"].items():
        assert ipaddress.IPv4Address(address) in ipaddress.IPv4Network("192.168.0.0/18"), (way, address)
    assert fleet.violations_in(part) == [], "a daemon applied fewer peers"
    assert fleet.matrix_failures_in(part) == [], fleet.matrix_failures_in(part)[0][2]
