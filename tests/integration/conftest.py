"""Helpers for integration tests in network namespaces.

Everything a test builds lives in namespaces it creates (named with a
per-process prefix) and in bpffs directories under ``/sys/fs/bpf/ovltest-*``;
the fixtures remove both on the way out, failures included. The root
namespace gets no address, route or link. Subprocesses are fine here (tests
only): commands run inside a namespace with ``ip netns exec``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, bpffs and eBPF programs)")
    if not os.path.ismount("/sys/fs/bpf"):
        pytest.skip("bpffs is not mounted at /sys/fs/bpf")


def require_bcc() -> None:
    require_root()
    pytest.importorskip("bcc", reason="bcc (python3-bpfcc) is not installed")


def _ip(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", *args], check=check, capture_output=True, text=True, timeout=timeout
    )


class Netns:
    """A network namespace created with ``ip netns add`` and its commands."""

    def __init__(self, name: str):
        self.name = name
        _ip("netns", "add", name)
        self.run("ip", "link", "set", "lo", "up")

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            self.cmd(*argv), capture_output=True, text=True, timeout=timeout, input=input
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"[{self.name}] {' '.join(argv)} -> {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def popen(self, *argv: str, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(self.cmd(*argv), **kwargs)

    def py(self, code: str, *args: str, timeout: float = 60, check: bool = True):
        """Run Python code in the namespace, with the repo on sys.path."""
        return self.run(PYTHON, "-c", code, *args, timeout=timeout, check=check)

    def sysctl(self, key: str, value: str) -> None:
        self.run("sh", "-c", f"echo {value} > /proc/sys/{key.replace('.', '/')}")

    def offload_off(self, dev: str) -> None:
        self.run("ethtool", "-K", dev, "tx", "off", "rx", "off")

    def delete(self) -> None:
        # Kill what still runs inside, then remove the namespace.
        pids = _ip("netns", "pids", self.name, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        _ip("netns", "del", self.name, check=False)


def veth(a: Netns, dev_a: str, b: Netns, dev_b: str) -> None:
    """A veth pair between two namespaces, both ends up, offload off."""
    tmp_a, tmp_b = f"ovt{os.getpid() % 100000}a", f"ovt{os.getpid() % 100000}b"
    _ip("link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
    try:
        _ip("link", "set", tmp_a, "netns", a.name)
        _ip("link", "set", tmp_b, "netns", b.name)
    except subprocess.CalledProcessError:
        _ip("link", "del", tmp_a, check=False)
        raise
    a.run("ip", "link", "set", tmp_a, "name", dev_a)
    b.run("ip", "link", "set", tmp_b, "name", dev_b)
    for ns, dev in ((a, dev_a), (b, dev_b)):
        ns.offload_off(dev)
        ns.run("ip", "link", "set", dev, "up")


@pytest.fixture
def netns_factory():
    """Create namespaces named ``ovt<pid>-<name>``; all removed at the end."""
    require_root()
    made: list[Netns] = []
    prefix = f"ovt{os.getpid()}-"

    def make(name: str) -> Netns:
        ns = Netns(prefix + name)
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in reversed(made):
            ns.delete()


@pytest.fixture
def pin_root():
    """A private bpffs directory; unpinned (recursively) at the end."""
    require_root()
    path = f"/sys/fs/bpf/ovltest-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- the two-network topology ---------------------------------------------------
#
#   network A (10.0.0.0/24)            network B (10.0.0.0/24: the overlap)
#   h1 10.0.0.1 --+                     h3 10.0.0.11 --- edgeB 10.0.0.254
#   h2 10.0.0.2 --+- br0 in "sw"                           | 1:1 NAT
#                    10.0.0.254 1:1 NAT                    | 198.18.2.0/24
#                    198.18.1.0/24 ---- wan 198.18.0.0/30 -+
#
# "sw" is network A's switch and edge at once (a bridge, and iptables 1:1
# NAT towards the wan); "edgeB" is network B's edge. Emulation only.

SUBNET = "192.168.0.0/18"
HOSTS = {
    "h1": {"network": "A", "private": "10.0.0.1", "public": "198.18.1.1", "overlay": "192.168.0.1"},
    "h2": {"network": "A", "private": "10.0.0.2", "public": "198.18.1.2", "overlay": "192.168.0.2"},
    "h3": {"network": "B", "private": "10.0.0.11", "public": "198.18.2.11", "overlay": "192.168.0.3"},
}


def real_of(src: str, dst: str) -> str:
    """The address host ``src`` uses to reach host ``dst`` (private if same network)."""
    same = HOSTS[src]["network"] == HOSTS[dst]["network"]
    return HOSTS[dst]["private"] if same else HOSTS[dst]["public"]


class Topology:
    def __init__(self, make):
        self.ns = {name: make(name) for name in ("sw", "edgeB", "h1", "h2", "h3")}
        sw, edge = self.ns["sw"], self.ns["edgeB"]
        sw.run("ip", "link", "add", "br0", "type", "bridge")
        sw.run("ip", "addr", "add", "10.0.0.254/24", "dev", "br0")
        sw.run("ip", "link", "set", "br0", "up")
        for i, h in enumerate(("h1", "h2"), start=1):
            veth(self.ns[h], "eth0", sw, f"p{i}")
            sw.run("ip", "link", "set", f"p{i}", "master", "br0")
        veth(self.ns["h3"], "eth0", edge, "lan")
        edge.run("ip", "addr", "add", "10.0.0.254/24", "dev", "lan")
        veth(sw, "wan", edge, "wan")
        sw.run("ip", "addr", "add", "198.18.0.1/30", "dev", "wan")
        edge.run("ip", "addr", "add", "198.18.0.2/30", "dev", "wan")
        sw.run("ip", "route", "add", "198.18.2.0/24", "via", "198.18.0.2")
        edge.run("ip", "route", "add", "198.18.1.0/24", "via", "198.18.0.1")
        for ns in (sw, edge):
            ns.sysctl("net.ipv4.ip_forward", "1")
        for name, h in HOSTS.items():
            edge_ns = sw if h["network"] == "A" else edge
            edge_ns.run("iptables", "-t", "nat", "-A", "PREROUTING", "-d", h["public"],
                        "-j", "DNAT", "--to-destination", h["private"])
            edge_ns.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", h["private"],
                        "-o", "wan", "-j", "SNAT", "--to-source", h["public"])
            ns = self.ns[name]
            ns.run("ip", "addr", "add", f"{h['private']}/24", "dev", "eth0")
            ns.run("ip", "route", "add", "default", "via", "10.0.0.254")

    def wait_ready(self) -> None:
        # the bridge needs a moment to forward; bounded
        self.ns["h1"].run("ping", "-c", "1", "-W", "2", "10.0.0.2", check=False, timeout=10)


@pytest.fixture
def topology(netns_factory):
    topo = Topology(netns_factory)
    topo.wait_ready()
    return topo


def host_ops_json(name: str, **extra) -> str:
    """The ops (as JSON for dp_helper.py) that program host ``name``'s datapath:
    every other host as a member peer, through its real address."""
    nat, rnat, peers = {}, {}, {}
    for other in HOSTS:
        if other == name:
            continue
        real = real_of(name, other)
        nat[HOSTS[other]["overlay"]] = real
        rnat[real] = HOSTS[other]["overlay"]
        peers[real] = 1
    spec = {"nat": nat, "rnat": rnat, "peers": peers}
    spec.update(extra)
    return json.dumps(spec)
