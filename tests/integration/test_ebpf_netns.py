"""The eBPF datapath end to end, in network namespaces (see tests/support/twonets.py).

h1 and h2 share network A, h3 sits in network B behind a 1:1 NAT edge, h4
is an outsider in A running nothing. h1..h3 run EbpfDatapath, programmed
with hand-built ops (every other host a member, reached through its real
address: private in the same network, public across). Checksum offload is
off on every veth.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from overlay import abi
from tests.support.netns import finish, netns_inode, require_bcc, veth
from tests.support.paths import REPO, program
from tests.support.twonets import HOSTS, OUTSIDER, lab_context, member_ops, real_of

pytestmark = [pytest.mark.root]


@pytest.fixture(scope="module")
def lab():
    with lab_context() as lab:
        lab.started = lab.start_datapaths()
        yield lab


def overlay(name: str) -> str:
    return HOSTS[name]["overlay"]


def tcp(lab, src: str, dst_ns: str, host: str, port: int, timeout: float = 3) -> dict:
    return lab.ns[src].helper("connect-tcp", host=host, port=port, timeout=timeout)


def serve(lab, name: str, kind: str, port: int, count: int = 1, timeout: float = 15):
    return lab.ns[name].helper_bg(kind, port=port, count=count, timeout=timeout)


def counters(lab, name: str) -> dict:
    return lab.dp(name, "observe")["counters"]


def test_fresh_start_loads_attaches_and_observes(lab):
    for name, res in lab.started.items():
        assert res["adopted"] is False
        tc = {"ingress", "egress", "overlay_egress"}
        sock = {"connect4", "sendmsg4", "recvmsg4", "getpeername4"}
        assert set(res["attachments"]) == tc | sock, res["attachments"]
        for key, att in res["attachments"].items():
            if key in tc:       # attached, running what is pinned
                assert att["prog_id"] and att["prog_id"] == att["pinned_prog_id"], (name, key)
            else:               # tc mode: socket mode's programs loaded and pinned, not attached
                assert att["pinned_prog_id"] and att["prog_id"] is None and att["link_id"] is None, (name, key, att)
        want = member_ops(name)
        seen = res["observe"]
        assert {k: v["real"] for k, v in seen["nat"].items()} == want["nat"]
        assert set(seen["peers"]) == set(want["peers"])
        assert seen["config"] == {"reject_all": 0, "mode": 0}


@pytest.mark.parametrize("src,dst", [("h1", "h2"), ("h2", "h1"), ("h1", "h3"), ("h3", "h2")])
def test_tcp_udp_ping_via_overlay(lab, src, dst):
    """Same network -> private address, other network -> public; the server
    sees the client's real address, the client only the overlay address."""
    client_real_seen_by_server = real_of(dst, src)
    before = counters(lab, src)

    srv = serve(lab, dst, "serve-tcp", 7001)
    res = tcp(lab, src, dst, overlay(dst), 7001)
    assert res["ok"], res
    assert res["peer"] == overlay(dst)
    assert res["server_saw"] == client_real_seen_by_server
    assert finish(srv)["seen"] == [client_real_seen_by_server]

    srv = serve(lab, dst, "serve-udp", 7002)
    res = lab.ns[src].helper("send-udp", host=overlay(dst), port=7002)
    assert res["ok"], res
    assert res["reply_from"] == overlay(dst)  # unconnected socket: the wire source
    assert res["server_saw"] == client_real_seen_by_server
    finish(srv)

    ping = lab.ns[src].helper("ping", host=overlay(dst), count=3)
    assert ping["replies"] == 3, ping
    assert ping["from"] == [overlay(dst)]

    after = counters(lab, src)
    assert after["nat_egress"] > before["nat_egress"]
    assert after["nat_ingress"] > before["nat_ingress"]


def test_real_addresses_untouched(lab):
    before = counters(lab, "h1")
    for dst, addr in (("h2", HOSTS["h2"]["private"]), ("h3", HOSTS["h3"]["public"])):
        srv = serve(lab, dst, "serve-tcp", 7003)
        res = tcp(lab, "h1", dst, addr, 7003)
        assert res["ok"], res
        assert res["peer"] == addr
        assert res["server_saw"] == real_of(dst, "h1")
        finish(srv)
        srv = serve(lab, dst, "serve-udp", 7004)
        res = lab.ns["h1"].helper("send-udp", host=addr, port=7004)
        assert res["ok"] and res["reply_from"] == addr, res
        finish(srv)
    after = counters(lab, "h1")
    assert after["nat_egress"] == before["nat_egress"]
    assert after["nat_ingress"] == before["nat_ingress"]


def test_unknown_overlay_address_dropped_no_peer(lab):
    before = counters(lab, "h1")
    res = tcp(lab, "h1", "h2", "192.168.0.77", 7005, timeout=1.5)
    assert not res["ok"]
    assert counters(lab, "h1")["drop_no_peer"] > before["drop_no_peer"]


def test_nat_overrides_in_the_slots_and_in_ovl_nat_ext_then_deleted(lab):
    """ABI 4: h1 reaches h2 through an override inside the subnet (an ovl_nat slot) and one
    outside it (ovl_nat_ext; routed to ovl0 through extra_routes, as the daemon does); the
    server sees h1's real address, the client the overlay address. Deleted, both are
    dropped as NO_PEER."""
    real = real_of("h1", "h2")
    inside, outside = "192.168.0.200", "203.0.113.7"
    try:
        res = lab.dp("h1", "apply", {"nat": {inside: [real, True], outside: [real, True]}},
                     extra_routes=[outside])
        assert res["observe"]["nat"][inside] == res["observe"]["nat"][outside] == \
            {"real": real, "override": True}
        assert res["fill"]["ovl_nat_ext"]["entries"] == 1   # only the one outside the subnet
        for addr in (inside, outside):
            srv = serve(lab, "h2", "serve-tcp", 7010)
            got = tcp(lab, "h1", "h2", addr, 7010)
            assert got["ok"] and got["peer"] == addr and got["server_saw"] == real_of("h2", "h1"), got
            finish(srv)
        # (every dpctl call starts the datapath: the route stays only while extra_routes has it)
        before = lab.dp("h1", "apply", {"delete": {"nat": [inside, outside]}},
                        extra_routes=[outside])["counters"]
        for addr in (inside, outside):
            assert not tcp(lab, "h1", "h2", addr, 7011, timeout=1.0)["ok"]
        assert counters(lab, "h1")["drop_no_peer"] >= before["drop_no_peer"] + 2
    finally:
        lab.dp("h1", "apply", {"delete": {"nat": [inside, outside]}})  # and the route goes


def test_reject_all_members_open_ports_failsafe(lab):
    h2 = HOSTS["h2"]["private"]
    lab.dp("h2", "apply", {
        "config": {"reject_all": 1},
        "ports": {"tcp": [8080]},
        "failsafe": {f"{OUTSIDER['private']}/32": abi.FS_SSH},
    })
    try:
        before = counters(lab, "h2")
        # the outsider: a closed port is dropped (not refused: no reset comes back)
        srv = serve(lab, "h2", "serve-tcp", 5000, count=3, timeout=12)
        res = tcp(lab, "h4", "h2", h2, 5000, timeout=2)
        assert not res["ok"] and "timed out" in res["error"], res
        mid = counters(lab, "h2")
        assert mid["drop_not_allowed"] > before["drop_not_allowed"]
        # members still get in, through the overlay (h1, same network; h3, across)
        for member in ("h1", "h3"):
            res = tcp(lab, member, "h2", overlay("h2"), 5000)
            assert res["ok"], (member, res)
        assert finish(srv)["seen"] == [real_of("h2", "h1"), real_of("h2", "h3")]
        # an open port and the failsafe (SSH from the whitelisted range) stay reachable
        for port in (8080, abi.SSH_PORT):
            srv = serve(lab, "h2", "serve-tcp", port)
            res = tcp(lab, "h4", "h2", h2, port)
            assert res["ok"], (port, res)
            finish(srv)
        after = counters(lab, "h2")
        assert after["pass_open_port"] > before["pass_open_port"]
        assert after["pass_failsafe"] > before["pass_failsafe"]
        assert after["pass_member"] > before["pass_member"]
        # the outsider's ping is dropped too
        assert lab.ns["h4"].helper("ping", host=h2, count=1, wait=1.0)["replies"] == 0
    finally:
        lab.dp("h2", "apply", {
            "config": {"reject_all": 0},
            "delete": {"ports": [[0, 8080 // 64]], "failsafe": [f"{OUTSIDER['private']}/32"]},
        })
    state = lab.dp("h2", "observe")["observe"]
    assert state["config"]["reject_all"] == 0 and state["ports"] == {"tcp": [], "udp": []}
    res = tcp(lab, "h4", "h2", h2, 5001, timeout=2)
    assert not res["ok"] and "refused" in res["error"]  # default accept again: RST


def test_second_start_adopts_without_reattach(lab):
    first = lab.dp("h1", "observe")
    again = lab.dp("h1", "start")
    assert again["adopted"] is True
    assert again["reattached"] == []
    assert again["attachments"] == first["attachments"]
    assert again["observe"] == first["observe"]  # adopted: nothing compiled, the same programs


def test_missing_filter_reattached_from_pin(lab):
    """A filter removed behind our back comes back from the pinned program,
    without compiling; the other filters are left alone."""
    before = lab.dp("h3", "observe")["attachments"]
    lab.ns["h3"].run("tc", "filter", "del", "dev", "eth0", "egress", "pref",
                     str(0x4F56), "handle", hex(0x4F56), "bpf")
    res = lab.dp("h3", "start")
    assert res["adopted"] is True and res["reattached"] == ["egress"]
    after = res["attachments"]
    assert after["ingress"] == before["ingress"]
    assert after["overlay_egress"] == before["overlay_egress"]
    assert after["egress"]["prog_id"] == before["egress"]["pinned_prog_id"]


def test_teardown_leaves_nothing(lab):
    args = lab.dp_args("h2")
    # pinned under the namespace's identity (docs/datapath.md, "Pin layout"), with its owner
    pin_dir = os.path.join(args["pin_root"], str(netns_inode(lab.ns["h2"].name)), "eth0")
    assert os.path.isdir(pin_dir) and os.listdir(args["pin_root"]) == [os.path.basename(os.path.dirname(pin_dir))]
    assert "owner" in os.listdir(pin_dir)
    lab.ns["h2"].helper("teardown", **args)
    assert not os.path.exists(pin_dir)
    assert not os.path.exists(args["pin_root"])
    h2 = lab.ns["h2"]
    assert h2.run("ip", "link", "show", "ovl0", check=False).returncode != 0
    assert h2.run("ip", "link", "show", "ovl0p", check=False).returncode != 0
    assert h2.run("tc", "filter", "show", "dev", "eth0", "ingress").stdout.strip() == ""
    assert h2.run("tc", "filter", "show", "dev", "eth0", "egress").stdout.strip() == ""
    assert "clsact" not in h2.run("tc", "qdisc", "show", "dev", "eth0").stdout
    assert "192.168.0.0/18" not in h2.run("ip", "route").stdout
    # plain networking is unaffected
    srv = serve(lab, "h2", "serve-tcp", 7006)
    res = tcp(lab, "h1", "h2", HOSTS["h2"]["private"], 7006)
    assert res["ok"], res
    finish(srv)
    # and a fresh start loads again
    res = lab.dp("h2", "start", member_ops("h2"))
    assert res["adopted"] is False


# -- single-host checks (their own namespace, function-scoped) -------------------


@pytest.fixture
def host(netns_factory, pin_root):
    """One namespace with an uplink eth0 (10.0.0.1/24) and a pin root."""
    require_bcc()
    ns = netns_factory("solo")
    peer = netns_factory("solop")
    veth(ns, "eth0", peer, "eth0")
    ns.run("ip", "addr", "add", "10.0.0.1/24", "dev", "eth0")
    args = {"interface": "eth0", "private": "10.0.0.1", "overlay": "192.168.0.1",
            "pin_root": pin_root, "subnet": "192.168.0.0/18"}
    ns.peer = peer
    return ns, args


def test_unsupported_one_line(host):
    ns, args = host
    res = ns.helper("start", expect_error=True, **{**args, "interface": "eth9"})
    assert res == {"error": "UnsupportedError", "message": "interface eth9 does not exist"}
    # "ip netns exec" remounts /sys: no bpffs there
    out = subprocess.run(
        ["ip", "netns", "exec", ns.name, *program("dpctl"), "start",
         json.dumps({**args, "expect_error": True})],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["error"] == "UnsupportedError" and "bpffs is not mounted" in res["message"]
    assert "\n" not in res["message"]
    # not root
    out = ns.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                 *program("dpctl"), "start", json.dumps({**args, "expect_error": True}),
                 check=False)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["error"] == "UnsupportedError" and "needs root" in res["message"]


def test_resize_recreates_maps_and_keeps_entries(host):
    """A changed map size is a reload: the resized maps are re-created (bcc would
    reuse them unchecked) and their entries carried over; the others are kept."""
    ns, args = host
    # one NAT entry in ovl_nat's slots (192.168.0.0/18: 16,384), one in ovl_nat_ext
    ops = {"nat": {"192.168.0.2": "10.0.0.2", "203.0.113.9": "10.0.0.3"},
           "peers": {"10.0.0.2": 5}, "ports": {"tcp": [443]}}
    small = {"nat": 1024, "peers": 1024, "conntrack": 4096, "failsafe": 64}
    first = ns.helper("start", ops=ops, sizes=small, **args)
    assert first["adopted"] is False
    assert first["fill"]["ovl_nat"] == {"entries": 1, "max_entries": 16384}
    assert first["fill"]["ovl_nat_ext"] == {"entries": 1, "max_entries": 1024}
    again = ns.helper("start", sizes=small, **args)
    assert again["adopted"] is True

    bigger = {**small, "nat": 2048}
    res = ns.helper("start", sizes=bigger, **args)
    assert res["adopted"] is False
    assert res["fill"]["ovl_nat"] == {"entries": 1, "max_entries": 16384}
    assert res["fill"]["ovl_nat_ext"] == {"entries": 1, "max_entries": 2048}
    assert res["fill"]["ovl_peers"] == {"entries": 1, "max_entries": 1024}
    assert res["observe"] == first["observe"]
    for key, att in res["attachments"].items():
        if "link_id" in att:     # socket mode's programs: reloaded and pinned, not attached in tc mode
            assert att["pinned_prog_id"] != first["attachments"][key]["pinned_prog_id"], key
            assert att["prog_id"] is None, key
            continue
        assert att["prog_id"] == att["pinned_prog_id"], key
        assert att["prog_id"] != first["attachments"][key]["prog_id"], key
    assert ns.helper("start", sizes=bigger, **args)["adopted"] is True


def test_addresses_past_the_slots_go_through_ovl_nat_ext(host):
    """A subnet larger than ovl_nat's slots (192.168.0.0/18 with the slot count forced to
    16, the test-only build parameter): 192.168.0.5 takes slot 5, 192.168.1.5 (offset 261)
    ovl_nat_ext; both carry a TCP connection to the peer's real address."""
    ns, args = host
    ns.peer.run("ip", "addr", "add", "10.0.0.2/24", "dev", "eth0")
    ops = {"nat": {"192.168.0.5": "10.0.0.2", "192.168.1.5": "10.0.0.2"}, "peers": {"10.0.0.2": 1}}
    res = ns.helper("start", ops=ops, sizes={"nat_slots": 16}, **args)
    assert res["fill"]["ovl_nat"] == {"entries": 1, "max_entries": 16}
    assert res["fill"]["ovl_nat_ext"]["entries"] == 1
    for dev in ("ovl0", "ovl0p"):
        ns.offload_off(dev)
    for addr in ("192.168.0.5", "192.168.1.5"):
        srv = ns.peer.helper_bg("serve-tcp", port=7020, count=1, timeout=15)
        got = ns.helper("connect-tcp", host=addr, port=7020, timeout=3)
        assert got["ok"] and got["peer"] == addr and got["server_saw"] == "10.0.0.1", (addr, got)
        finish(srv)


def test_a_subnet_change_keeps_every_nat_entry(host):
    """The overlay subnet grows (/18 -> /16: more slots, ovl_nat re-created and refilled,
    an ovl_nat_ext entry now has a slot and moves there), then shrinks and moves (another
    /18: fewer slots, another base; each slot re-indexed by its overlay address, the one
    outside the new subnet into ovl_nat_ext). Each entry keeps its overlay address and
    lives where the programs look for it."""
    ns, args = host
    ops = {"nat": {"192.168.0.2": "10.0.0.2", "192.168.70.9": "10.0.0.3"}}
    first = ns.helper("start", ops=ops, **args)
    assert (first["fill"]["ovl_nat"]["entries"], first["fill"]["ovl_nat_ext"]["entries"]) == (1, 1)
    grown = ns.helper("start", **{**args, "subnet": "192.168.0.0/16"})
    assert grown["adopted"] is False and grown["observe"]["nat"] == first["observe"]["nat"]
    assert grown["fill"]["ovl_nat"] == {"entries": 2, "max_entries": 65536}
    assert grown["fill"]["ovl_nat_ext"]["entries"] == 0
    moved = ns.helper("start", **{**args, "subnet": "192.168.64.0/18", "overlay": "192.168.64.1"})
    assert moved["observe"]["nat"] == first["observe"]["nat"]
    # 192.168.70.9 has a slot of 192.168.64.0/18, 192.168.0.2 is outside it now
    assert (moved["fill"]["ovl_nat"]["entries"], moved["fill"]["ovl_nat_ext"]["entries"]) == (1, 1)
