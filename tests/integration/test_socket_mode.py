"""Socket mode (datapath.mode: socket) end to end, in a real cgroup-v2 hierarchy.

The topology of tests/support/twonets.py. h1 runs the eBPF datapath in socket mode with
``datapath.cgroup`` set to this test's own cgroup (``<cgroup2>/ovltest-<pid>``, with a
``child``; tests/support/cgroups.py), h2 and h3 in tc mode. Client processes join the
test cgroup (or its child, or neither) before they make a socket.

Evidence that a flow was translated at the socket and never took the ``ovl0`` hop: the
counters the socket programs keep (``sock_*``) rise while ``nat_egress``, which the
program on ``ovl0`` counts for every packet it translates, stays put, and ``ovl0p`` (the
NOARP peer of ``ovl0``) receives nothing untranslated; what the applications see (getpeername, recvfrom) and what the server
saw (the client's real address) come from the sockets themselves.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.support.cgroups import own_cgroup, procs
from tests.support.netns import finish
from tests.support.twonets import HOSTS, lab_context, member_ops, real_of

pytestmark = [pytest.mark.root]

H2_OVERLAY = HOSTS["h2"]["overlay"]
H2_REAL = real_of("h1", "h2")          # h2's private address: same network as h1


@pytest.fixture(scope="module")
def env():
    with own_cgroup() as (cg, child), lab_context() as lab:
        lab.cg, lab.child = cg, child
        lab.started = {"h1": lab.dp("h1", "start", member_ops("h1"), mode="socket", cgroup=cg,
                                    proc_timeout=240)}  # a compile on a loaded machine, bounded
        lab.started.update(lab.start_datapaths(("h2", "h3")))
        for dev in ("ovl0", "ovl0p"):
            lab.ns["h1"].offload_off(dev)
        try:
            yield lab
        finally:
            lab.dp("h1", "teardown")


def counters(lab, name: str = "h1") -> dict:
    return lab.dp(name, "observe", mode="socket" if name == "h1" else "tc", cgroup=lab.cg)["counters"]


def rx_ovl0p(lab) -> int:
    """Packets that left ovl0 untranslated (the trace of a flap)."""
    link = json.loads(lab.ns["h1"].run("ip", "-s", "-j", "link", "show", "ovl0p").stdout)[0]
    return int(link["stats64"]["rx"]["packets"])


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def test_socket_links_attached_to_the_test_cgroup_only(env):
    att = env.started["h1"]["attachments"]
    want_cg = os.stat(env.cg).st_ino
    for hook in ("connect4", "sendmsg4", "recvmsg4", "getpeername4"):
        assert att[hook]["link_id"], (hook, att[hook])
        assert att[hook]["cgroup_id"] == want_cg, hook
        assert att[hook]["prog_id"] == att[hook]["pinned_prog_id"], hook
    for tc_hook in ("ingress", "egress", "overlay_egress"):   # tc stays attached
        assert att[tc_hook]["prog_id"] == att[tc_hook]["pinned_prog_id"], tc_hook
    assert env.started["h2"]["attachments"]["connect4"]["link_id"] is None  # tc mode: no links


@pytest.mark.parametrize("where", ["cgroup", "child"])
def test_tcp_translated_at_connect(env, where):
    before, ovl0p = counters(env), rx_ovl0p(env)
    srv = env.ns["h2"].helper_bg("serve-tcp", port=7101)
    res = env.ns["h1"].helper("connect-tcp", host=H2_OVERLAY, port=7101,
                              join_cgroup=env.cg if where == "cgroup" else env.child)
    assert res["ok"], res
    assert res["peer"] == H2_OVERLAY          # getpeername
    assert res["server_saw"] == real_of("h2", "h1")
    assert finish(srv)["seen"] == [real_of("h2", "h1")]
    d = delta(before, counters(env))
    assert d.get("sock_connect") == 1 and d.get("sock_peername", 0) >= 1, d
    assert "nat_egress" not in d and "nat_ingress" not in d, d
    assert rx_ovl0p(env) == ovl0p


@pytest.mark.parametrize("action,where,port,counted", [
    ("udp-connected", "cgroup", 7102, ("sock_connect", "sock_recvmsg")),   # connect, send, recvfrom
    ("send-udp", "child", 7103, ("sock_sendmsg", "sock_recvmsg")),         # sendto, recvfrom
])
def test_udp(env, action, where, port, counted):
    before, ovl0p = counters(env), rx_ovl0p(env)
    srv = env.ns["h2"].helper_bg("serve-udp", port=port)
    res = env.ns["h1"].helper(action, host=H2_OVERLAY, port=port,
                              join_cgroup=env.cg if where == "cgroup" else env.child)
    assert res["ok"], res
    assert res["reply_from"] == H2_OVERLAY    # recvfrom
    assert res.get("peer", H2_OVERLAY) == H2_OVERLAY   # getpeername (connected)
    assert res["server_saw"] == real_of("h2", "h1")
    finish(srv)
    d = delta(before, counters(env))
    assert all(d.get(c) == 1 for c in counted), d
    assert "nat_egress" not in d and "nat_ingress" not in d, d
    assert rx_ovl0p(env) == ovl0p


def test_real_address_stays_real(env):
    """A socket that talks to a peer's real address sees the real address."""
    before = counters(env)
    srv = env.ns["h2"].helper_bg("serve-udp", port=7104)
    res = env.ns["h1"].helper("send-udp", host=H2_REAL, port=7104, join_cgroup=env.cg)
    assert res["ok"] and res["reply_from"] == H2_REAL, res
    finish(srv)
    srv = env.ns["h2"].helper_bg("serve-tcp", port=7104)
    res = env.ns["h1"].helper("connect-tcp", host=H2_REAL, port=7104, join_cgroup=env.cg)
    assert res["ok"] and res["peer"] == H2_REAL, res
    finish(srv)
    assert not {k for k in delta(before, counters(env)) if k.startswith(("sock_", "nat_"))}


def test_outside_the_cgroup_takes_the_tc_path(env):
    """A process outside the configured cgroup is not translated at the socket: the tc
    path (ovl0) carries it, and it still works."""
    before = counters(env)
    srv = env.ns["h2"].helper_bg("serve-tcp", port=7105)
    res = env.ns["h1"].helper("connect-tcp", host=H2_OVERLAY, port=7105)
    assert res["ok"] and res["peer"] == H2_OVERLAY, res
    finish(srv)
    d = delta(before, counters(env))
    assert not {k for k in d if k.startswith("sock_")}, d
    assert d.get("nat_egress", 0) >= 1 and d.get("nat_ingress", 0) >= 1, d


def test_icmp_echo_takes_the_tc_path(env):
    before = counters(env)
    ping = env.ns["h1"].helper("ping", host=H2_OVERLAY, count=2, join_cgroup=env.cg)
    assert ping["replies"] == 2 and ping["from"] == [H2_OVERLAY], ping
    d = delta(before, counters(env))
    assert d.get("nat_egress", 0) >= 2 and not {k for k in d if k.startswith("sock_")}, d


def test_other_namespace_falls_back_to_tc(env):
    """h3 (another network namespace, tc mode) in h1's cgroup: h1's socket programs run
    for its sockets but leave them alone (netns cookie), h3's own tc path translates."""
    before1, before3 = counters(env), counters(env, "h3")
    srv = env.ns["h2"].helper_bg("serve-tcp", port=7106)
    res = env.ns["h3"].helper("connect-tcp", host=H2_OVERLAY, port=7106, join_cgroup=env.cg)
    assert res["ok"] and res["peer"] == H2_OVERLAY, res
    assert res["server_saw"] == real_of("h2", "h3")
    finish(srv)
    d1, d3 = delta(before1, counters(env)), delta(before3, counters(env, "h3"))
    assert d1.get("sock_other_netns") == 1 and "sock_connect" not in d1, d1
    assert d3.get("nat_egress", 0) >= 1 and d3.get("nat_ingress", 0) >= 1, d3


def test_stream_survives_kill_9_and_restart(env):
    h1, h2 = env.ns["h1"], env.ns["h2"]
    nbytes, seconds = 4_000_000, 6.0
    args = dict(mode="socket", cgroup=env.cg, **env.dp_args("h1"))
    holders = []
    try:
        first = h1.helper_bg("hold", ops=member_ops("h1"), max_s=60, **args)
        holders.append(first)
        assert first.first["adopted"] is True   # the fixture's load, adopted
        before, ovl0p = counters(env), rx_ovl0p(env)
        srv = h2.helper_bg("stream-serve", port=7107, nbytes=nbytes, timeout=30)
        cli = h1.helper_bg("stream-send", host=H2_OVERLAY, port=7107, nbytes=nbytes,
                           seconds=seconds, chunks=200, timeout=20, join_cgroup=env.cg)
        assert cli.first == {"connected": True}
        time.sleep(seconds * 0.3)
        assert cli.poll() is None, "the stream ended before the kill"
        first.kill()
        first.wait(5)
        second = h1.helper_bg("hold", ops=member_ops("h1"), max_s=60, **args)
        holders.append(second)
        assert cli.poll() is None, "the stream ended before the restart"
        assert second.first["adopted"] is True
        for hook in ("connect4", "sendmsg4", "recvmsg4", "getpeername4"):
            assert second.first["attachments"][hook] == first.first["attachments"][hook], hook
        sent, got = finish(cli), finish(srv)
        assert sent["error"] is None and got["error"] is None, (sent, got)
        assert sent["sent"] == got["received"] == nbytes
        assert got["sha256"] == sent["sha256"] == sent["echo"]
        assert got["peer"] == real_of("h2", "h1")
        d = delta(before, counters(env))
        assert d.get("sock_connect") == 1 and "nat_egress" not in d, d
        assert rx_ovl0p(env) == ovl0p
    finally:
        for p in holders:
            if p.poll() is None:
                p.kill()
                p.wait(5)


def test_teardown_detaches_from_the_cgroup(env):
    """Last: teardown removes the links; the cgroup keeps no program of ours (its procs
    are untouched), and a connect from it is no longer translated."""
    env.dp("h1", "teardown")
    st = env.dp("h1", "start", member_ops("h1"))       # back in tc mode, fresh
    for hook in ("connect4", "sendmsg4", "recvmsg4", "getpeername4"):
        assert st["attachments"][hook]["link_id"] is None, hook
    assert st["counters"].get("sock_connect", 0) == 0
    srv = env.ns["h2"].helper_bg("serve-tcp", port=7108)
    res = env.ns["h1"].helper("connect-tcp", host=H2_OVERLAY, port=7108, join_cgroup=env.cg)
    assert res["ok"] and res["peer"] == H2_OVERLAY, res
    finish(srv)
    d = env.dp("h1", "observe")["counters"]      # tc mode
    assert d.get("sock_connect", 0) == 0 and d["nat_egress"] >= 1, d
    assert procs(env.cg) == []  # the helpers that joined it are gone
