"""``nat_overrides`` keys outside the overlay subnet are routed to the overlay device.

The routes are set by the eBPF datapath's device set-up (netdev.ensure_overlay_device),
checked here against the kernel's main table in a namespace the test creates; traffic
to such a key through a running daemon is tested in test_packaging.py.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.root]

CODE = """
import json, sys
from pyroute2 import IPRoute
from overlay.datapath.ebpf import netdev
for extra in json.loads(sys.argv[1]):
    netdev.ensure_overlay_device("ovl0", "192.168.0.0/18", "10.0.0.1", "192.168.0.1", extra)
with IPRoute() as ipr:
    idx = ipr.link_lookup(ifname="ovl0")[0]
    routes = [(r.get_attr("RTA_DST"), r["dst_len"], r.get_attr("RTA_PREFSRC"))
              for r in ipr.get_routes(family=2, table=254) if r.get_attr("RTA_OIF") == idx]
print(json.dumps(sorted(routes)))
"""


def _routes(ns, *steps: list[str]) -> list[list]:
    return json.loads(ns.py(CODE, json.dumps(list(steps))).stdout.strip().splitlines()[-1])


def test_override_keys_outside_the_subnet_get_routes_and_lose_them(netns_factory):
    ns = netns_factory("ovr")
    ns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    ns.run("ip", "addr", "add", "10.0.0.1/24", "dev", "eth0")
    ns.run("ip", "link", "set", "eth0", "up")
    subnet = ["192.168.0.0", 18, "10.0.0.1"]
    assert _routes(ns, ["10.9.9.9", "192.168.75.1"]) == [
        ["10.9.9.9", 32, "10.0.0.1"], subnet, ["192.168.75.1", 32, "10.0.0.1"]]
    # a later config without 10.9.9.9: its route goes, the other stays (idempotent re-runs)
    assert _routes(ns, ["192.168.75.1"], ["192.168.75.1"]) == [subnet, ["192.168.75.1", 32, "10.0.0.1"]]
    assert _routes(ns, []) == [subnet]
    # routes of the uplink are never touched
    assert ns.run("ip", "-4", "route", "show", "dev", "eth0").stdout.startswith("10.0.0.0/24")
