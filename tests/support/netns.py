"""Network namespaces a test creates, and what runs inside them.

Everything a test builds lives in namespaces it creates (named with a per-process
prefix, :class:`NetnsSet`) and in bpffs directories under ``/sys/fs/bpf/ovltest-*``
(:func:`new_pin_root`); the fixtures (tests/integration/conftest.py) remove both on
the way out, failures included. The root namespace gets no address, route or link:
veth pairs are created between two test namespaces. The namespace class is the
project's one (:class:`overlay.netns.Netns`, commands through ``nsenter --net``);
:class:`HelperNetns` adds the test programs of tests/support.
"""

from __future__ import annotations

import json
import os
import select
import subprocess

import pytest

from overlay.netns import Netns, run
from tests.support.paths import PYTHON, REPO, program


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, bpffs and eBPF programs)")
    if not os.path.ismount("/sys/fs/bpf"):
        pytest.skip("bpffs is not mounted at /sys/fs/bpf")


def require_bcc() -> None:
    require_root()
    pytest.importorskip("bcc", reason="bcc (python3-bpfcc) is not installed")


class HelperNetns(Netns):
    """A test namespace that also runs the test programs (``python -m tests.support.X``,
    from the repository)."""

    def run(self, *argv: str, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("cwd", REPO)
        return super().run(*argv, **kwargs)

    def popen(self, *argv: str, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("cwd", REPO)
        return super().popen(*argv, **kwargs)

    def py(self, code: str, *args: str, timeout: float = 60, check: bool = True):
        """Run Python code in the namespace (the project's venv)."""
        return self.run(PYTHON, "-c", code, *args, timeout=timeout, check=check)

    def helper(self, action: str, proc_timeout: float = 60, **args) -> dict:
        """Run ``tests.support.dpctl ACTION`` in the namespace; its last JSON line."""
        proc = self.run(*program("dpctl"), action, json.dumps(args), timeout=proc_timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise AssertionError(f"[{self.name}] {action}: no result\n{proc.stderr}")
        return json.loads(lines[-1])

    def helper_bg(self, action: str, **args) -> subprocess.Popen:
        """Start ``tests.support.dpctl ACTION`` in the background; returns once it printed
        its first line (e.g. a server listening), bounded by 60 s."""
        proc = self.popen(*program("dpctl"), action, json.dumps(args), text=True)
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        if not ready:
            proc.kill()
            raise AssertionError(f"[{self.name}] {action}: did not start")
        proc.first = json.loads(proc.stdout.readline() or "null")
        if proc.first is None:
            proc.wait(5)
            raise AssertionError(f"[{self.name}] {action}: exited: {proc.stderr.read()}")
        return proc


def finish(proc, timeout: float = 40) -> dict:
    """Wait for a ``helper_bg`` process; its last JSON line."""
    out, err = proc.communicate(timeout=timeout)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, err
    return json.loads(lines[-1])


def veth(a: Netns, dev_a: str, b: Netns, dev_b: str) -> None:
    """A veth pair between two namespaces (created inside them, never in the root
    namespace), both ends up, checksum offload off."""
    run(["ip", "-n", a.name, "link", "add", dev_a, "type", "veth", "peer", "name", dev_b, "netns", b.name])
    for ns, dev in ((a, dev_a), (b, dev_b)):
        ns.offload_off(dev)
        ns.run("ip", "link", "set", dev, "up")


class NetnsSet:
    """Namespaces named ``<prefix><name>`` (default ``ovt<pid>-``), all deleted on close
    (even on failure)."""

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix if prefix is not None else f"ovt{os.getpid()}-"
        self.made: list[HelperNetns] = []

    def __call__(self, name: str) -> HelperNetns:
        ns = HelperNetns.add(self.prefix + name)
        self.made.append(ns)
        return ns

    def close(self) -> None:
        for ns in reversed(self.made):
            ns.delete()
        self.made.clear()


def netns_inode(name: str) -> int:
    """The inode of named namespace ``name`` as ``stat`` prints it (an independent reference
    for the datapath's pin layout, ``<pin_root>/<netns inode>/<interface>``)."""
    return int(run(["stat", "-L", "-c", "%i", f"/run/netns/{name}"]).stdout)


def new_pin_root(tag: str) -> str:
    path = f"/sys/fs/bpf/ovltest-{os.getpid()}-{tag}"
    os.makedirs(path, exist_ok=True)
    return path
