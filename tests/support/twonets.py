"""The two-network topology of the datapath suites (eBPF, iptables, conformance).

Emulation of the networks only: the product is what runs in the hosts. See the
drawing below; :func:`wire_networks` builds it, :class:`Lab` adds the eBPF datapath
of h1..h3 (``tests.support.dpctl``) and :func:`lab_context` removes it all.
"""

from __future__ import annotations

import contextlib
import os
import shutil

from tests.support.netns import HelperNetns, NetnsSet, new_pin_root, require_bcc, veth

#
#   network A (10.0.0.0/24)            network B (10.0.0.0/24: the overlap)
#   h1 10.0.0.1 --+                     h3 10.0.0.11 --- edgeB 10.0.0.254
#   h2 10.0.0.2 --+- br0 in "sw"                           | 1:1 NAT
#   h4 10.0.0.4 --+  10.0.0.254 1:1 NAT                    | 198.18.2.0/24
#   (outsider)       198.18.1.0/24 ---- wan 198.18.0.0/30 -+
#
# "sw" is network A's switch and edge at once (a bridge, and iptables 1:1
# NAT towards the wan); "edgeB" is network B's edge. h4 runs no datapath.
# Emulation of the networks only: the product is what runs in h1..h3.

SUBNET = "192.168.0.0/18"
HOSTS = {
    "h1": {"network": "A", "private": "10.0.0.1", "public": "198.18.1.1", "overlay": "192.168.0.1"},
    "h2": {"network": "A", "private": "10.0.0.2", "public": "198.18.1.2", "overlay": "192.168.0.2"},
    "h3": {"network": "B", "private": "10.0.0.11", "public": "198.18.2.11", "overlay": "192.168.0.3"},
}
OUTSIDER = {"network": "A", "private": "10.0.0.4"}


def real_of(src: str, dst: str) -> str:
    """The address host ``src`` uses to reach host ``dst`` (private if same network)."""
    same = HOSTS[src]["network"] == HOSTS[dst]["network"]
    return HOSTS[dst]["private"] if same else HOSTS[dst]["public"]


def member_ops(name: str) -> dict:
    """dpctl ops spec for host ``name``: every other host a member peer,
    reached through its real address."""
    nat, peers = {}, {}
    for other in HOSTS:
        if other == name:
            continue
        real = real_of(name, other)
        nat[HOSTS[other]["overlay"]] = real
        peers[real] = 1
    return {"nat": nat, "peers": peers}


def wire_networks(ns: dict[str, HelperNetns], hosts: dict[str, dict]) -> None:
    """Wire the topology above into namespaces ``ns`` (keys "sw", "edgeB" and the host
    names): the hosts of network A on its bridge (ports p1, p2, ... in name order), h3
    behind edge B, the wan between the edges, and the 1:1 NAT of every host that has a
    ``public`` address."""
    sw, edge = ns["sw"], ns["edgeB"]
    sw.run("ip", "link", "add", "br0", "type", "bridge")
    sw.run("ip", "addr", "add", "10.0.0.254/24", "dev", "br0")
    sw.run("ip", "link", "set", "br0", "up")
    on_a = [name for name, h in hosts.items() if h["network"] == "A"]
    for i, h in enumerate(sorted(on_a), start=1):
        veth(ns[h], "eth0", sw, f"p{i}")
        sw.run("ip", "link", "set", f"p{i}", "master", "br0")
    veth(ns["h3"], "eth0", edge, "lan")
    edge.run("ip", "addr", "add", "10.0.0.254/24", "dev", "lan")
    veth(sw, "wan", edge, "wan")
    sw.run("ip", "addr", "add", "198.18.0.1/30", "dev", "wan")
    edge.run("ip", "addr", "add", "198.18.0.2/30", "dev", "wan")
    sw.run("ip", "route", "add", "198.18.2.0/24", "via", "198.18.0.2")
    edge.run("ip", "route", "add", "198.18.1.0/24", "via", "198.18.0.1")
    for e in (sw, edge):
        e.sysctl("net.ipv4.ip_forward", "1")
    for name, h in hosts.items():
        if h.get("public"):
            # the edges' 1:1 NAT (emulation of the networks, not the product)
            e = sw if h["network"] == "A" else edge
            e.run("iptables", "-t", "nat", "-A", "PREROUTING", "-d", h["public"],
                  "-j", "DNAT", "--to-destination", h["private"])
            e.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", h["private"],
                  "-o", "wan", "-j", "SNAT", "--to-source", h["public"])
        ns[name].run("ip", "addr", "add", f"{h['private']}/24", "dev", "eth0")
        ns[name].run("ip", "route", "add", "default", "via", "10.0.0.254")


class Lab:
    """The topology above; ``start_datapaths()`` loads h1..h3 with member ops."""

    def __init__(self, make: NetnsSet):
        self.ns = {name: make(name) for name in ("sw", "edgeB", "h1", "h2", "h3", "h4")}
        self.pin_roots: dict[str, str] = {}
        wire_networks(self.ns, {**HOSTS, "h4": OUTSIDER})
        # the bridge forwards once its ports are up; bounded wait
        for _ in range(10):
            if self.ns["h1"].helper("ping", host="10.0.0.2", count=1, wait=1.0)["ok"]:
                break

    def dp_args(self, name: str) -> dict:
        if name not in self.pin_roots:
            self.pin_roots[name] = new_pin_root(name)
        h = HOSTS[name]
        return {"interface": "eth0", "private": h["private"], "overlay": h["overlay"],
                "pin_root": self.pin_roots[name], "subnet": SUBNET}

    def dp(self, name: str, action: str = "start", ops: dict | None = None, **extra) -> dict:
        return self.ns[name].helper(action, ops=ops, **self.dp_args(name), **extra)

    def start_datapaths(self, names=tuple(HOSTS)) -> dict[str, dict]:
        out = {}
        for name in names:
            out[name] = self.dp(name, "start", member_ops(name))
            # the product leaves offload alone; tests switch it off on its veth too
            self.ns[name].offload_off("ovl0")
            self.ns[name].offload_off("ovl0p")
        return out

    def close(self) -> None:
        for path in self.pin_roots.values():
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def lab_context():
    """A Lab whose namespaces and pins are removed on exit, failures included."""
    require_bcc()
    made = NetnsSet()
    lab = None
    try:
        lab = Lab(made)
        yield lab
    finally:
        if lab is not None:
            lab.close()
        made.close()
        # pins of a lab that failed half-way
        for entry in os.listdir("/sys/fs/bpf"):
            if entry.startswith(f"ovltest-{os.getpid()}-"):
                shutil.rmtree(os.path.join("/sys/fs/bpf", entry), ignore_errors=True)
