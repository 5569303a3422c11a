"""Issue 11, acceptance 2: real ``nmap`` from an outsider against a ``reject_all`` member.

Two namespaces on one link (a veth pair), IPv6 left ON (link-local addresses, NDP):
the member runs a datapath with ``reject_all: true`` and one open port, and a TCP
and UDP listener on ``::`` (dual-stack) on a port closed to outsiders and on the
open port; the outsider runs nmap SYN scans, plain, ``-f`` (8-byte fragments),
``-ff`` (16-byte), ``--mtu 24`` and ``-6`` against the member's link-local address,
and the results come from nmap's XML (``-oX -``).

Before any datapath is loaded the same scans report both ports ``open`` (the scan
sees the listeners), so a ``filtered`` afterwards is the datapath's doing.

Expected states (hand table, docs/datapath.md "Fragments"): the closed port is
``filtered`` and the open port ``open`` in every scan, on both backends. With the
eBPF datapath a first fragment that does not carry the whole TCP header (``-f``: 8
bytes, ``-ff``: 16) is judged on its ports alone (the open-port step needs nothing
more) and refused otherwise (frag_short); its later fragments follow its verdict.
With iptables the kernel reassembles the datagram before the filter table
(conntrack's defragmentation), which then judges the whole SYN.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

from tests.support.netns import NetnsSet, new_pin_root, require_bcc, require_root, veth
from tests.support.paths import program

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

MEMBER, OUTSIDER = "10.20.0.1", "10.20.0.2"
CLOSED, OPEN = 7000, 8080
SUBNET = "192.168.0.0/18"

SCANS = {  # name: nmap options (besides the target)
    "plain": ["-sS"],
    "f": ["-sS", "-f"],
    "ff": ["-sS", "-ff"],
    "mtu24": ["-sS", "--mtu", "24"],
    "ipv6": ["-6", "-sS"],
}
FILTERED_OPEN = ("filtered", "open")
EXPECT = {  # backend -> scan -> (closed port, open port)
    "ebpf": dict.fromkeys(SCANS, FILTERED_OPEN),
    "iptables": dict.fromkeys(SCANS, FILTERED_OPEN),
}


def _require(backend: str) -> None:
    require_root()
    if shutil.which("nmap") is None:
        pytest.skip("nmap is not installed (scripts/setup.sh installs it)")
    if backend == "ebpf":
        require_bcc()


class Link:
    """member <-> outsider, IPv6 on; the listeners on the member."""

    def __init__(self, made: NetnsSet, backend: str):
        self.backend = backend
        self.member = made(f"nm{backend[:3]}-m")
        self.outsider = made(f"nm{backend[:3]}-o")
        veth(self.member, "eth0", self.outsider, "eth0")
        self.member.run("ip", "addr", "add", f"{MEMBER}/24", "dev", "eth0")
        self.outsider.run("ip", "addr", "add", f"{OUTSIDER}/24", "dev", "eth0")
        self.link_local = self._link_local(self.member)
        self._link_local(self.outsider)  # nmap -6 needs a usable source address too
        self.server = self.member.popen(*program("iptctl"), "serve", str(CLOSED), str(OPEN), text=True)
        assert self.server.stdout.readline().strip() == "ready"
        self.pin_root = new_pin_root(f"nmap-{backend}")

    @staticmethod
    def _link_local(ns) -> str:
        for _ in range(100):  # DAD takes a moment; bounded
            out = ns.run("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link").stdout
            if out and "tentative" not in out:
                return out.split()[3].split("/")[0]
            time.sleep(0.1)
        raise AssertionError(f"[{ns.name}] no usable link-local address on eth0: {out!r}")

    def scan(self, name: str) -> tuple[str, str]:
        """nmap SCANS[name] from the outsider: (closed port state, open port state)."""
        target = ["-e", "eth0", f"{self.link_local}%eth0"] if name == "ipv6" else [MEMBER]
        argv = ["nmap", "-n", "-Pn", "-T4", "--max-retries", "1", "--host-timeout", "60s",
                "-p", f"{CLOSED},{OPEN}", "-oX", "-", *SCANS[name], *target]
        xml = self.outsider.run(*argv, timeout=120).stdout
        states = {int(p.get("portid")): p.find("state").get("state")
                  for p in ET.fromstring(xml).iter("port")}
        assert set(states) == {CLOSED, OPEN}, xml
        return states[CLOSED], states[OPEN]

    def load(self) -> dict:
        node = {"node_id": "member", "network": "n", "private": MEMBER, "public": "198.18.20.1",
                "overlay": "192.168.0.1"}
        config = {"node_id": "member", "network": "n", "overlay_subnet": SUBNET,
                  "addresses": {"private": MEMBER, "public": "198.18.20.1", "overlay": "192.168.0.1"},
                  "registry": {"backend": "static"},
                  "datapath": {"backend": self.backend, "interface": "eth0"},
                  "filter": {"reject_all": True, "open_ports": [OPEN]}}
        if self.backend == "ebpf":
            out = self.member.helper("plan", proc_timeout=120, interface="eth0", private=MEMBER,
                                     overlay="192.168.0.1", pin_root=self.pin_root, subnet=SUBNET,
                                     node=node, config=config)
            for dev in ("ovl0", "ovl0p"):
                self.member.offload_off(dev)
            return out
        dp = self.member.popen(*program("iptctl"), "datapath", stdin=subprocess.PIPE, text=True)
        try:
            kwargs = {"interface": "eth0", "overlay_subnet": SUBNET, "self_private": MEMBER,
                      "self_overlay": "192.168.0.1"}
            out, _ = dp.communicate(
                "\n".join(json.dumps(r) for r in (
                    {"cmd": "start", "kwargs": kwargs},
                    {"cmd": "program", "config": config, "peers": []},
                    {"cmd": "quit"})) + "\n", timeout=60)
        finally:
            if dp.poll() is None:
                dp.kill()
        answers = [json.loads(line) for line in out.splitlines()]
        assert all(a["ok"] for a in answers), answers
        return answers[1]

    def counters(self) -> dict[str, int]:
        if self.backend == "ebpf":
            return self.member.helper("observe", interface="eth0", private=MEMBER, overlay="192.168.0.1",
                                      pin_root=self.pin_root, subnet=SUBNET)["counters"]
        return {}

    def close(self) -> None:
        self.server.kill()
        self.server.wait(5)
        shutil.rmtree(self.pin_root, ignore_errors=True)


@pytest.fixture(params=list(EXPECT))
def link(request):
    _require(request.param)
    made = NetnsSet()
    lk = None
    try:
        lk = Link(made, request.param)
        yield lk
    finally:
        if lk is not None:
            lk.close()
        made.close()


def test_nmap_scans(link):
    # without a datapath the scans see both listeners: the scan method works
    assert link.scan("plain") == ("open", "open")
    assert link.scan("f") == ("open", "open")
    assert link.scan("ipv6") == ("open", "open")

    link.load()
    before = link.counters()
    got = {name: link.scan(name) for name in SCANS}
    print(f"nmap against the {link.backend} member (closed {CLOSED}, open {OPEN}): {got}")
    assert got == EXPECT[link.backend], f"backend {link.backend}: nmap saw {got}"
    if link.backend == "ebpf":
        after = link.counters()
        assert after["drop_frag_short"] > before["drop_frag_short"]   # -f / -ff to the closed port
        assert after["pass_fragment"] > before["pass_fragment"]       # -f / -ff to the open port
        assert after["drop_not_allowed"] > before["drop_not_allowed"]  # the closed port's SYNs
        assert after["pass_ndp"] > before["pass_ndp"]                  # the IPv6 scan's neighbour discovery
