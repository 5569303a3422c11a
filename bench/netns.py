"""Network namespaces of a benchmark run, and their clean-up.

Every namespace is named ``ovl-bench-<pid>-<name>`` (the pid of the run that
made it), every veth pair is created directly between two of them (``ip -n A
link add ... peer ... netns B``), so the root namespace never gets a link, an
address or a route. :class:`Topology` deletes what it made on ``close()``,
killing whatever still runs inside first; :func:`remove_stale` removes what a
killed run left behind (namespaces and bpffs pins whose pid is gone). The namespace
class is the project's one (:class:`overlay.netns.Netns`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

from overlay.netns import Netns, del_netns, kill_inside, list_netns, run

__all__ = ["PIN_BASE", "PREFIX", "Netns", "Topology", "delete_netns", "ip", "remove_stale"]

PREFIX = "ovl-bench-"
PIN_BASE = "/sys/fs/bpf/overlay/bench"


def ip(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return run(["ip", *args], check=check, timeout=timeout)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str) -> int | None:
    rest = name[len(PREFIX):]
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def delete_netns(name: str) -> None:
    kill_inside(name)
    del_netns(name)


def remove_stale() -> list[str]:
    """Delete bench namespaces and pin directories of runs that no longer exist."""
    removed = []
    for name in list_netns():
        if not name.startswith(PREFIX):
            continue
        pid = _owner_pid(name)
        if pid is not None and pid != os.getpid() and not _pid_alive(pid):
            delete_netns(name)
            removed.append(name)
    if os.path.isdir(PIN_BASE):
        for entry in os.listdir(PIN_BASE):
            if entry.isdigit() and int(entry) != os.getpid() and not _pid_alive(int(entry)):
                shutil.rmtree(os.path.join(PIN_BASE, entry), ignore_errors=True)
                removed.append(os.path.join(PIN_BASE, entry))
    return removed


class Topology:
    """Namespaces and veth pairs of one run; ``close()`` removes them all."""

    def __init__(self, tag: str = ""):
        self.base = f"{PREFIX}{os.getpid()}-{tag + '-' if tag else ''}"
        self.made: list[Netns] = []
        self.cgroups: list[tuple[str, str]] = []
        self.pin_root = os.path.join(PIN_BASE, str(os.getpid()))

    def netns(self, name: str) -> Netns:
        ns = Netns.add(self.base + name)
        self.made.append(ns)
        return ns

    def veth(self, a: Netns, dev_a: str, addr_a: str, b: Netns, dev_b: str, addr_b: str) -> None:
        """A veth pair made inside ``a`` with its peer directly in ``b``; addresses as CIDR."""
        ip("-n", a.name, "link", "add", dev_a, "type", "veth", "peer", "name", dev_b,
           "netns", b.name)
        for ns, dev, addr in ((a, dev_a, addr_a), (b, dev_b, addr_b)):
            ns.run("ip", "addr", "add", addr, "dev", dev)
            ns.run("ip", "link", "set", dev, "up")

    def cgroup(self, name: str) -> str:
        """A cgroup-v2 directory of this run, ``<cgroup2 mount>/<namespace base><name>``,
        removed by close() (its processes moved back to the mount's root first)."""
        root = next((f[1] for f in (line.split() for line in open("/proc/self/mounts"))
                     if len(f) > 2 and f[2] == "cgroup2"), None)
        if root is None:
            raise RuntimeError("no cgroup-v2 hierarchy is mounted (socket mode needs one)")
        path = os.path.join(root, self.base + name)
        os.makedirs(path, exist_ok=True)
        self.cgroups.append((root, path))
        return path

    @staticmethod
    def join_cgroup(ns: Netns, cgroup: str) -> None:
        """Every process ``ns`` runs from now on starts by moving itself into ``cgroup``."""
        cmd = ns.cmd
        ns.cmd = lambda *argv: ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup,
                                *cmd(*argv)]

    def pins(self, name: str) -> str:
        path = os.path.join(self.pin_root, name)
        os.makedirs(path, exist_ok=True)
        return path

    def close(self) -> None:
        for ns in reversed(self.made):
            delete_netns(ns.name)
        self.made.clear()
        for root, path in self.cgroups:
            with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.procs")) as f:
                for pid in f.read().split():
                    with contextlib.suppress(OSError), open(os.path.join(root, "cgroup.procs"), "w") as out:
                        out.write(pid)
            with contextlib.suppress(OSError):
                os.rmdir(path)
        self.cgroups.clear()
        shutil.rmtree(self.pin_root, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(PIN_BASE)
