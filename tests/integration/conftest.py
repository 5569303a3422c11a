"""Helpers for integration tests in network namespaces.

Everything a test builds lives in namespaces it creates (named with a
per-process prefix) and in bpffs directories under ``/sys/fs/bpf/ovltest-*``;
the fixtures remove both on the way out, failures included. The root
namespace gets no address, route or link. Subprocesses are fine here (tests
only): commands run inside a namespace with ``nsenter --net`` (see Netns.cmd).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dp_helper.py")
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
        # nsenter --net, not "ip netns exec": the latter also unshares the mount
        # namespace and remounts /sys, hiding the bpffs at /sys/fs/bpf that the
        # datapath pins into (and that a restarted process must find again).
        return ["nsenter", f"--net=/run/netns/{self.name}", *argv]

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

    def helper(self, action: str, proc_timeout: float = 60, **args) -> dict:
        """Run dp_helper.py ACTION in the namespace; its last JSON line."""
        proc = self.run(PYTHON, HELPER, action, json.dumps(args), timeout=proc_timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise AssertionError(f"[{self.name}] {action}: no result\n{proc.stderr}")
        return json.loads(lines[-1])

    def helper_bg(self, action: str, **args) -> subprocess.Popen:
        """Start dp_helper.py ACTION in the background; returns once it printed
        its first line (e.g. a server listening), bounded by 60 s."""
        proc = self.popen(PYTHON, HELPER, action, json.dumps(args), text=True)
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        if not ready:
            proc.kill()
            raise AssertionError(f"[{self.name}] {action}: did not start")
        proc.first = json.loads(proc.stdout.readline() or "null")
        if proc.first is None:
            proc.wait(5)
            raise AssertionError(f"[{self.name}] {action}: exited: {proc.stderr.read()}")
        return proc

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


def finish(proc, timeout: float = 40) -> dict:
    """Wait for a helper_bg process; its last JSON line."""
    out, err = proc.communicate(timeout=timeout)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, err
    return json.loads(lines[-1])


def veth(a: Netns, dev_a: str, b: Netns, dev_b: str) -> None:
    """A veth pair between two namespaces (created inside them, never in the
    root namespace), both ends up, checksum offload off."""
    _ip("-n", a.name, "link", "add", dev_a, "type", "veth", "peer", "name", dev_b,
        "netns", b.name)
    for ns, dev in ((a, dev_a), (b, dev_b)):
        ns.offload_off(dev)
        ns.run("ip", "link", "set", dev, "up")


class NetnsSet:
    """Namespaces named ``ovt<pid>-<name>``, all deleted on close (even on failure)."""

    def __init__(self):
        self.prefix = f"ovt{os.getpid()}-"
        self.made: list[Netns] = []

    def __call__(self, name: str) -> Netns:
        ns = Netns(self.prefix + name)
        self.made.append(ns)
        return ns

    def close(self) -> None:
        for ns in reversed(self.made):
            ns.delete()
        self.made.clear()


@pytest.fixture
def netns_factory():
    require_root()
    made = NetnsSet()
    try:
        yield made
    finally:
        made.close()


def new_pin_root(tag: str) -> str:
    path = f"/sys/fs/bpf/ovltest-{os.getpid()}-{tag}"
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture
def pin_root():
    """A private bpffs directory; unpinned (recursively) at the end."""
    require_root()
    path = new_pin_root(str(time.monotonic_ns() % 10**9))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- the two-network topology ---------------------------------------------------
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
    """dp_helper ops spec for host ``name``: every other host a member peer,
    reached through its real address."""
    nat, rnat, peers = {}, {}, {}
    for other in HOSTS:
        if other == name:
            continue
        real = real_of(name, other)
        nat[HOSTS[other]["overlay"]] = real
        rnat[real] = HOSTS[other]["overlay"]
        peers[real] = 1
    return {"nat": nat, "rnat": rnat, "peers": peers}


def wire_networks(ns: dict[str, Netns], hosts: dict[str, dict]) -> None:
    """Wire the topology above into namespaces ``ns`` (keys "sw", "edgeB" and the host
    names): h1, h2, h4 on network A's bridge, h3 behind edge B, the wan between the edges,
    and the 1:1 NAT of every host that has a ``public`` address."""
    sw, edge = ns["sw"], ns["edgeB"]
    sw.run("ip", "link", "add", "br0", "type", "bridge")
    sw.run("ip", "addr", "add", "10.0.0.254/24", "dev", "br0")
    sw.run("ip", "link", "set", "br0", "up")
    for i, h in enumerate(("h1", "h2", "h4"), start=1):
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
