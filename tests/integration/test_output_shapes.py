"""The JSON outputs of ``overlay status``, ``overlay maps`` and ``overlay why`` keep their
shapes (issue 12, acceptance 1): key sets and value types, recursively, compared with
examples recorded from a real daemon (tests/data/shapes/, tests.support.shapes).

One real daemon (static registry, eBPF datapath, ``reject_all``) runs in a namespace
``db`` joined by a veth to ``cli``, which holds the peers' addresses: web-1 10.41.0.2
(group web) and app-1 10.41.0.3 (group app), and 10.41.0.9, no member. The shapes of
``why`` under policies, and of ``maps`` with policy entries, are recorded by
test_policies_netns.py (no policies reach a daemon of the static registry).
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.support.daemons import Daemon
from tests.support.netns import NetnsSet, new_pin_root, require_bcc, veth
from tests.support.shapes import check_shape
from tests.support.wait import wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

DB, WEB, APP, OTHER, ADMIN = "10.41.0.1", "10.41.0.2", "10.41.0.3", "10.41.0.9", "10.41.0.10"
PEERS = [
    {"node_id": "web-1", "network": "lan", "private": WEB, "public": "198.18.41.2",
     "overlay": "192.168.0.2", "groups": ["web"]},
    {"node_id": "app-1", "network": "lan", "private": APP, "public": "198.18.41.3",
     "overlay": "192.168.0.3", "groups": ["app"]},
]
# objects of /status whose keys are data (node ids, map names), not a fixed set
STATUS_DATA = ("rejected_records", "swept")
# `overlay why` cases: name -> (src, proto, port)
WHY = {
    "member": (WEB, "tcp", "7000"),
    "open_port": (OTHER, "tcp", "8080"),
    "not_allowed": (OTHER, "udp", "7000"),
    "failsafe": (ADMIN, "tcp", "22"),
    "martian": ("127.0.0.1", "icmp", "-"),
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    require_bcc()
    made = NetnsSet()
    pin_root = new_pin_root("shapes")
    d = None
    try:
        db, cli = made("shdb"), made("shcli")
        veth(db, "eth0", cli, "eth0")
        db.run("ip", "addr", "add", f"{DB}/24", "dev", "eth0")
        for a in (WEB, APP, OTHER, ADMIN):
            cli.run("ip", "addr", "add", f"{a}/24", "dev", "eth0")
        config = {
            "node_id": "db-1", "network": "lan", "groups": ["db"],
            "addresses": {"private": DB, "public": "198.18.41.1", "overlay": "192.168.0.1"},
            "registry": {"backend": "static", "peers": PEERS},
            "datapath": {"backend": "ebpf", "interface": "eth0", "pin_root": pin_root},
            "filter": {"reject_all": True, "open_ports": [8080], "ssh_whitelist": [f"{ADMIN}/32"]},
        }
        d = Daemon(db.name, config, str(tmp_path_factory.mktemp("shapes")))
        d.start()
        wait_for(lambda: (d.status() or {}).get("ready"), 120.0, "the daemon ready", 0.5)
        # a flow this host opens (one UDP datagram), so that ovl_ct has an entry
        db.py(f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('{WEB}', 7000))")
        yield d
    finally:
        if d is not None:
            d.stop()
        made.close()
        shutil.rmtree(pin_root, ignore_errors=True)


def _json(d: Daemon, *argv: str) -> dict:
    res = d.run(*argv, "-c", d.config_path)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_status_json_shape(daemon):
    check_shape("status", _json(daemon, "status", "--json"), STATUS_DATA)


def test_maps_json_shape(daemon):
    got = _json(daemon, "maps", "--json")
    assert got["ovl_ct"]["entries"], "no conntrack entry: the datagram did not leave one"
    check_shape("maps", got)


def test_why_json_shape(daemon):
    got = {case: _json(daemon, "why", src, DB, proto, port, "--json") for case, (src, proto, port) in WHY.items()}
    assert {c: v["reason"] for c, v in got.items()} == {
        "member": "member", "open_port": "open_port", "not_allowed": "not_allowed", "failsafe": "failsafe",
        "martian": "martian"}
    check_shape("why", got)
