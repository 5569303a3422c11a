"""Issue 11, acceptance 4: an outsider flooding an open port cannot break a live overlay stream.

Members ``a`` and ``b`` run the eBPF datapath (``reject_all``, ``a`` with an open port
and conntrack maps of 64 entries: ``datapath.sizes.conntrack``/``conntrack6``/
``conntrack_in``/``frag``). ``a`` streams 4 MB to ``b``'s overlay address (a flow ``a``
initiated: its NAT state is an ``ovl_ct`` entry). Half way the stream goes idle and
the outsider sends 20,000 SYNs (bounded to 30 s) from random source ports to ``a``'s
open port. Before this issue every SYN-ACK ``a`` sent created a conntrack entry in the
one shared LRU, evicting the idle stream's NAT entry, after which ``b``'s ACKs were no
longer translated back to its overlay address and the stream broke. Now inbound flows
leave markers in ``ovl_ct_in`` only: the stream resumes and its bytes and sha256 match.
"""

from __future__ import annotations

import pytest

from tests.support.netns import NetnsSet, new_pin_root, require_bcc, veth
from tests.support.paths import program

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

SUBNET = "192.168.0.0/18"
HOSTS = {
    "a": {"private": "10.40.0.1", "overlay": "192.168.0.1"},
    "b": {"private": "10.40.0.2", "overlay": "192.168.0.2"},
}
OUTSIDER = "10.40.0.9"
OPEN, STREAM = 8080, 9000
SMALL = {"conntrack": 64, "conntrack6": 64, "conntrack_in": 64, "frag": 64}
FLOOD, NBYTES = 20_000, 4 << 20


def node(name: str) -> dict:
    h = HOSTS[name]
    return {"node_id": name, "network": "n", "private": h["private"], "public": f"198.18.40.{h['private'][-1]}",
            "overlay": h["overlay"]}


@pytest.fixture
def net():
    require_bcc()
    made = NetnsSet()
    pins = []
    try:
        sw = made("cx-sw")
        sw.run("ip", "link", "add", "br0", "type", "bridge")
        sw.run("ip", "link", "set", "br0", "up")
        ns = {}
        for i, (name, addr) in enumerate([("a", HOSTS["a"]["private"]), ("b", HOSTS["b"]["private"]),
                                          ("o", OUTSIDER)]):
            ns[name] = made(f"cx-{name}")
            veth(ns[name], "eth0", sw, f"p{i}")
            sw.run("ip", "link", "set", f"p{i}", "master", "br0")
            ns[name].run("ip", "addr", "add", f"{addr}/24", "dev", "eth0")
        for name in ("a", "b"):
            pins.append(new_pin_root(f"cx-{name}"))
            peer = "b" if name == "a" else "a"
            config = {"node_id": name, "network": "n", "overlay_subnet": SUBNET,
                      "addresses": {k: v for k, v in node(name).items() if k in ("private", "public", "overlay")},
                      "registry": {"backend": "static"},
                      "datapath": {"backend": "ebpf", "interface": "eth0", "sizes": SMALL},
                      "filter": {"reject_all": True, "open_ports": [OPEN] if name == "a" else []}}
            ns[name].helper("plan", proc_timeout=120, interface="eth0", private=HOSTS[name]["private"],
                            overlay=HOSTS[name]["overlay"], pin_root=pins[-1], subnet=SUBNET, sizes=SMALL,
                            node=node(name), peers=[node(peer)], config=config)
            for dev in ("ovl0", "ovl0p"):
                ns[name].offload_off(dev)
        ns["a_pin"] = pins[0]
        yield ns
    finally:
        made.close()
        import shutil

        for p in pins:
            shutil.rmtree(p, ignore_errors=True)


def state(ns) -> dict:
    return ns["a"].helper("observe", interface="eth0", private=HOSTS["a"]["private"],
                          overlay=HOSTS["a"]["overlay"], pin_root=ns["a_pin"], subnet=SUBNET, sizes=SMALL)


def test_syn_flood_does_not_break_an_idle_overlay_stream(net):
    a, b, o = net["a"], net["b"], net["o"]
    listener = a.popen(*program("iptctl"), "serve", str(OPEN), text=True)  # a listener: SYN-ACKs (cookies)
    assert listener.stdout.readline().strip() == "ready"
    server = b.helper_bg("stream-serve", port=STREAM, nbytes=NBYTES, timeout=120)
    sender = a.helper_bg("stream-send", host=HOSTS["b"]["overlay"], port=STREAM, nbytes=NBYTES, seconds=4,
                         chunks=64, pause_after=NBYTES // 2, pause_s=15, timeout=60)
    try:
        assert sender.first == {"connected": True}
        import json

        paused = json.loads(sender.stdout.readline())
        assert paused.get("paused"), paused
        before = state(net)
        assert before["fill"]["ovl_ct"]["max_entries"] == 64
        flood = o.helper("syn-flood", proc_timeout=60, src=OUTSIDER, host=HOSTS["a"]["private"], port=OPEN,
                         count=FLOOD, max_s=30)
        during = state(net)
        out, err = sender.communicate(timeout=120)
        sent = json.loads(out.strip().splitlines()[-1])
        got, _ = server.communicate(timeout=120)
        got = json.loads(got.strip().splitlines()[-1])
    finally:
        for proc in (listener, server, sender):
            if proc.poll() is None:
                proc.kill()
    # the flood was real and exceeded the conntrack maps several hundred times over
    assert flood["sent"] >= 0.9 * FLOOD, flood
    opened = during["counters"]["pass_open_port"] - before["counters"]["pass_open_port"]
    assert opened >= 0.9 * FLOOD, (opened, flood)
    assert during["fill"]["ovl_ct_in"]["entries"] >= 32, during["fill"]["ovl_ct_in"]
    # ... yet only flows this host initiated are in ovl_ct: the stream's translated entry
    assert during["fill"]["ovl_ct"]["entries"] <= 4, during["fill"]["ovl_ct"]
    # and the stream finished intact
    assert sent["error"] is None and got["error"] is None, (sent, got)
    assert sent["sent"] == got["received"] == NBYTES
    assert got["sha256"] == sent["sha256"] == sent["echo"]
    assert got["peer"] == HOSTS["a"]["private"]
