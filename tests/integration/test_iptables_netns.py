"""The iptables datapath on a real kernel, in network namespaces made here.

Topology (emulation; namespaces named ``ovl-ipt-<pid>-*``):
h1 and h2 share network A (10.0.0.0/24 on a bridge in "sw", which is also
A's 1:1 NAT edge); h3 sits in network B (the same 10.0.0.0/24) behind edge
"edgeB", so h1 reaches h3 only through its public address. Checksum offload
is off on every veth. The datapath runs inside h1 (tests.support.iptctl
datapath), programmed with ops from plan() and diff(); servers run in h2, h3.

Nothing touches the root namespace: every command runs in a namespace the
fixture made and deletes again, failures included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from tests.support.netns import HelperNetns, NetnsSet
from tests.support.paths import program
from tests.support.twonets import HOSTS, SUBNET, wire_networks

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

HELPER = program("iptctl")
PORT = 7000          # a service port, not open: members only under reject_all
OPEN_PORT = 8080     # in filter.open_ports
SSH_PORT = 22
PORTS = (PORT, OPEN_PORT, SSH_PORT)


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, iptables)")
    for tool in ("ip", "iptables", "iptables-restore", "iptables-save", "ipset", "ethtool"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


class Topology:
    """network A: h1, h2 on a bridge in "sw" (also A's 1:1 NAT edge, 198.18.1.0/24);
    network B: h3 behind "edgeB" (1:1 NAT, 198.18.2.0/24); the edges share a wan link
    (tests/support/twonets.py, without the outsider)."""

    def __init__(self, make: NetnsSet):
        self.ns = {name: make(name) for name in ("sw", "edgeB", "h1", "h2", "h3")}
        wire_networks(self.ns, HOSTS)
        # the bridge needs a moment before it forwards (bounded)
        for _ in range(10):
            if self.ns["h1"].run("ping", "-c", "1", "-W", "1", "10.0.0.2", check=False).returncode == 0:
                break


@pytest.fixture
def topo():
    _require()
    made = NetnsSet(f"ovl-ipt-{os.getpid()}-")
    try:
        yield Topology(made)
    finally:
        made.close()


class Helper:
    """The datapath process in h1's namespace, driven by JSON lines."""

    def __init__(self, ns: HelperNetns):
        self.proc = ns.popen(*HELPER, "datapath", stdin=subprocess.PIPE, text=True)

    def call(self, cmd: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()  # each command is bounded by the helper's timeouts
        if not line:
            raise AssertionError(f"helper exited: {self.proc.stderr.read()}")
        out = json.loads(line)
        assert out["ok"], out.get("trace") or out
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit")
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
        self.proc.kill()


def h1_config(**filt) -> dict:
    h = HOSTS["h1"]
    return {
        "node_id": "h1",
        "network": "A",
        "overlay_subnet": SUBNET,
        "addresses": {"private": h["private"], "public": h["public"], "overlay": h["overlay"]},
        "registry": {"backend": "static"},
        "datapath": {"backend": "iptables", "interface": "eth0"},
        "filter": filt,
    }


def node(name: str) -> dict:
    h = HOSTS[name]
    return {"node_id": name, "network": h["network"], "private": h["private"],
            "public": h["public"], "overlay": h["overlay"]}


def connect(ns: HelperNetns, proto: str, host: str, port: int) -> dict:
    out = ns.run(*HELPER, "connect", proto, host, str(port), timeout=15)
    return json.loads(out.stdout)


def start_servers(topo) -> list[subprocess.Popen]:
    procs = []
    for name in ("h1", "h2", "h3"):
        p = topo.ns[name].popen(*HELPER, "serve", *map(str, PORTS), text=True)
        procs.append(p)
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    return procs


def test_iptables_datapath_end_to_end(topo):
    h1, h2, h3 = topo.ns["h1"], topo.ns["h2"], topo.ns["h3"]
    servers = start_servers(topo)
    dp = Helper(h1)
    try:
        kwargs = {"interface": "eth0", "overlay_subnet": SUBNET,
                  "self_private": HOSTS["h1"]["private"], "self_overlay": HOSTS["h1"]["overlay"]}
        # someone else's rules: kept, and ours go first
        h1.run("iptables", "-A", "INPUT", "-s", "203.0.113.9/32", "-j", "ACCEPT")
        h1.run("iptables", "-t", "nat", "-A", "OUTPUT", "-d", "203.0.113.8/32", "-j", "RETURN")
        dp.call("start", kwargs=kwargs)
        route = h1.run("ip", "-4", "route", "show", SUBNET).stdout
        assert "dev eth0" in route and "proto 79" in route and "src 10.0.0.1" in route, route

        # -- allow-all, both peers members: overlay addresses reach the real ones --------
        first = dp.call("program", config=h1_config(), peers=[node("h2"), node("h3")])
        # nat, filter and the IPv6 filter (ip6tables): IPv6 is on in these namespaces
        assert first["ops"] > 0 and first["stats"]["iptables_restores"] == 3
        assert h1.run("iptables", "-S", "INPUT").stdout.splitlines()[1:] == [
            "-A INPUT -j OVERLAY-IN", "-A INPUT -s 203.0.113.9/32 -j ACCEPT"]
        assert h1.run("iptables", "-t", "nat", "-S", "OUTPUT").stdout.splitlines()[1:] == [
            "-A OUTPUT -j OVERLAY-NAT", "-A OUTPUT -d 203.0.113.8/32 -j RETURN"]
        for proto in ("tcp", "udp"):
            for peer, seen_as in (("h2", HOSTS["h1"]["private"]), ("h3", HOSTS["h1"]["public"])):
                got = connect(h1, proto, HOSTS[peer]["overlay"], PORT)
                assert got["ok"], (proto, peer, got)
                assert got["peer"] == HOSTS[peer]["overlay"], got  # the client sees the overlay address
                assert got["reply"] == seen_as, got  # private in network A, public across
        # traffic that does not use overlay addresses is untouched
        assert connect(h1, "tcp", HOSTS["h2"]["private"], PORT)["ok"]
        assert connect(h1, "tcp", HOSTS["h3"]["public"], PORT)["reply"] == HOSTS["h1"]["public"]
        # an overlay address with no peer is dropped in OUTPUT (drop_no_peer, counted
        # below): UDP's send fails at once with EPERM, TCP's SYN never leaves
        nope = connect(h1, "udp", "192.168.0.99", PORT)
        assert not nope["ok"] and "PermissionError" in nope["error"], nope
        assert not connect(h1, "tcp", "192.168.0.99", PORT)["ok"]

        # -- the same state again: no ops; a forced apply still runs no iptables-restore ----
        again = dp.call("program", config=h1_config(), peers=[node("h2"), node("h3")], force_apply=True)
        assert again["ops"] == 0
        assert again["stats"]["iptables_restores"] == 3 and again["stats"]["ipset_swaps"] == 2
        assert again["stats"]["tables_skipped"] == 5

        # -- reject_all; h2 leaves (non-member); an open port and a whitelisted SSH range --
        cfg = h1_config(reject_all=True, open_ports=[OPEN_PORT], ssh_whitelist=["10.0.0.2/32"])
        enforce = dp.call("program", config=cfg, peers=[node("h3")])
        assert enforce["ops"] > 0
        before = dp.call("counters")["counters"]
        assert before["drop_no_peer"] >= 2, before
        to_h1_private, to_h1_public = HOSTS["h1"]["private"], HOSTS["h1"]["public"]
        blocked = connect(h2, "tcp", to_h1_private, PORT)
        assert not blocked["ok"], blocked
        assert not connect(h2, "udp", to_h1_private, PORT)["ok"]
        assert connect(h2, "tcp", to_h1_private, OPEN_PORT)["ok"]      # open port
        assert connect(h2, "udp", to_h1_private, OPEN_PORT)["ok"]
        assert connect(h2, "tcp", to_h1_private, SSH_PORT)["ok"]       # whitelisted SSH
        member = connect(h3, "tcp", to_h1_public, PORT)                 # member, through the edges
        assert member["ok"] and member["reply"] == HOSTS["h3"]["public"], member
        # h1 still reaches h3 by its overlay address; replies are established
        assert connect(h1, "tcp", HOSTS["h3"]["overlay"], PORT)["ok"]
        after = dp.call("counters")["counters"]
        assert after["drop_not_allowed"] >= before["drop_not_allowed"] + 2, after
        assert after["pass_open_port"] >= 2 and after["pass_failsafe"] >= 1, after
        assert after["pass_member"] >= 1 and after["pass_established"] >= 1, after

        # -- audit mode: would-be drops are counted and let through ---------------------------
        audit = h1_config(reject_all=True, mode="audit", open_ports=[OPEN_PORT],
                          ssh_whitelist=["10.0.0.2/32"])
        dp.call("program", config=audit, peers=[node("h3")])
        assert connect(h2, "tcp", to_h1_private, PORT)["ok"]
        audited = dp.call("counters")["counters"]
        assert audited["drop_not_allowed"] >= after["drop_not_allowed"] + 1, audited

        # -- a restart adopts the installed state: no ops, no reload ---------------------------
        dp.stop()
        dp = Helper(h1)
        dp.call("start", kwargs=kwargs)
        adopted = dp.call("program", config=audit, peers=[node("h3")], force_apply=True)
        assert adopted["ops"] == 0, adopted
        assert adopted["stats"]["iptables_restores"] == 0 and adopted["stats"]["ipset_swaps"] == 0

        # -- teardown removes our chains, jumps, set and route, nothing else ------------------
        def removed() -> None:
            saved = h1.run("iptables-save").stdout
            assert "OVERLAY" not in saved, saved
            assert "OVERLAY" not in h1.run("ip6tables-save").stdout
            assert "-A INPUT -s 203.0.113.9/32 -j ACCEPT" in saved
            assert "-A OUTPUT -d 203.0.113.8/32 -j RETURN" in saved
            assert h1.run("ipset", "list", "-n").stdout.strip() == ""
            assert h1.run("ip", "-4", "route", "show", SUBNET).stdout.strip() == ""

        dp.call("teardown")
        removed()
        assert connect(h1, "tcp", HOSTS["h2"]["private"], PORT)["ok"]
        # and `overlay datapath teardown` (no running datapath, no subnet given)
        dp.call("start", kwargs=kwargs)
        dp.call("program", config=audit, peers=[node("h3")])
        dp.call("remove", kwargs={"interface": "eth0", "pin_root": "/nonexistent",
                                  "overlay_device": "ovl0"})
        removed()
    finally:
        dp.stop()
        for p in servers:
            p.kill()
        deadline = time.monotonic() + 5
        for p in servers:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
