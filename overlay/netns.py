"""Network namespaces and the processes we start: the one home of these primitives.

Used by the ZooKeeper server wrapper (:mod:`overlay.zk.server`), the netns lab
(:mod:`overlay.lab`), the tests (``tests/support``) and the benchmarks (``bench/``);
never by the daemon's product path (the product talks netlink through pyroute2).

Commands run inside a namespace through ``nsenter --net`` (not ``ip netns exec``,
which also remounts ``/sys`` and so hides bpffs from a datapath). Short Python work
inside a namespace runs in a thread that has ``setns``-ed into it: ``setns`` moves
only the calling thread. Every call has a timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from overlay.errors import OverlayError

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
T = TypeVar("T")


class NetnsError(OverlayError):
    """A namespace or a command in it failed; the message names the step and the cause."""


# --- commands ---------------------------------------------------------------------------


def run(argv: Sequence[str], *, input: str | None = None, timeout: float = 30,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run ``argv`` (output captured as text); a failure raises NetnsError naming the command."""
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise NetnsError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from None
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip()
        raise NetnsError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): {msg}")
    return proc


def nsenter(ns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside namespace ``ns`` (network namespace only; mounts unchanged)."""
    return ["nsenter", f"--net={NETNS_DIR}/{ns}", "--", *argv]


def sh(ns: str, script: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a POSIX shell script inside ``ns``; a failure names the namespace and the output."""
    try:
        return run(nsenter(ns, ["sh", "-c", script]), timeout=timeout)
    except NetnsError as exc:
        raise NetnsError(f"in {ns}: {exc}") from None


def ip_batch(ns: str, commands: Sequence[str], timeout: float = 30) -> None:
    """Run ``ip`` commands (one per line, without the leading ``ip``) in ``ns``, in one process."""
    if commands:
        run(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n", timeout=timeout)


# --- namespaces -------------------------------------------------------------------------


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def exists(ns: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, ns))


def add_netns(ns: str) -> None:
    if not exists(ns):
        run(["ip", "netns", "add", ns])


def del_netns(ns: str) -> None:
    if exists(ns):
        run(["ip", "netns", "del", ns], check=False)


def netns_pids(ns: str) -> list[int]:
    """Processes whose network namespace is ``ns`` (what ``ip netns pids`` prints)."""
    try:
        st = os.stat(os.path.join(NETNS_DIR, ns))
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            nst = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (nst.st_dev, nst.st_ino) == (st.st_dev, st.st_ino):
            pids.append(int(entry))
    return pids


def kill_inside(ns: str, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to every process inside ``ns`` (no waiting); returns their pids."""
    pids = netns_pids(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def setns(ns: str) -> None:
    """Move the calling thread into network namespace ``ns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fd = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(f"namespace {ns} does not exist") from None
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(ns: str, fn: Callable[..., T], *args: Any, timeout: float = 30) -> T:
    """Call ``fn(*args)`` in a fresh thread moved into namespace ``ns``; return its result
    (an exception it raised, or a :class:`NetnsError` for a timeout, is returned too)."""
    return parallel_in_netns([(ns, fn, args)], timeout=timeout)[0]


def parallel_in_netns(calls: Sequence[tuple[str, Callable[..., Any], tuple]], timeout: float = 30) -> list[Any]:
    """Run each ``(ns, fn, args)`` in its own thread inside ``ns``; results in order.

    A call that raised returns its exception object (the caller decides); one
    that did not finish in ``timeout`` seconds returns a :class:`NetnsError`.
    """
    results: list[Any] = [NetnsError("did not finish in time")] * len(calls)

    def worker(i: int, ns: str, fn: Callable[..., Any], args: tuple) -> None:
        try:
            setns(ns)
            results[i] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            results[i] = exc

    threads = []
    for i, (ns, fn, args) in enumerate(calls):
        t = threading.Thread(target=worker, args=(i, ns, fn, args), name=f"netns-{ns}", daemon=True)
        t.start()
        threads.append(t)
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    for i, t in enumerate(threads):
        if t.is_alive():
            results[i] = NetnsError(f"{calls[i][0]}: did not finish within {timeout:g} s")
    return results


# --- processes --------------------------------------------------------------------------


def die_with_parent_preexec() -> None:
    """``preexec_fn`` of a child: SIGKILL it when the thread that started it dies (tests:
    nothing outlives a killed pytest)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def proc_start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int | None, start_time: int | None = None) -> bool:
    """True if ``pid`` runs and (when given) is the process that started at ``start_time``."""
    if not pid:
        return False
    st = proc_start_time(pid)
    return st is not None and (start_time is None or st == start_time)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def start_process(argv: Sequence[str], log_path: str, cwd: str | None = None,
                  env: dict[str, str] | None = None, die_with_parent: bool = False) -> tuple[int, int]:
    """Start ``argv`` detached (own session), output appended to ``log_path``.

    Returns ``(pid, start_time)``. The process outlives the caller unless
    ``die_with_parent`` (tests: SIGKILL when the calling thread dies).
    """
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=cwd, env=env, close_fds=True,
                preexec_fn=die_with_parent_preexec if die_with_parent else None,
            )
        except OSError as exc:
            raise NetnsError(f"cannot start {argv[0]}: {exc.strerror}") from None
    _detached.append(proc)  # keep the Popen so that a child we outlive as parent is reaped
    st = proc_start_time(proc.pid)
    return proc.pid, st or 0


_detached: list[subprocess.Popen] = []


def reap_children() -> None:
    for proc in list(_detached):
        if proc.poll() is not None:
            _detached.remove(proc)


def stop_process(pid: int, start_time: int | None = None, timeout: float = 5.0,
                 sig: int = signal.SIGTERM) -> bool:
    """Stop a process (and its process group) we started: ``sig``, then SIGKILL.

    Returns True if it was running. A pid that now belongs to another process
    (different start time) is left alone.
    """
    if not alive(pid, start_time):
        _reap(pid)
        return False
    for target in (lambda s: os.killpg(pid, s), lambda s: os.kill(pid, s)):
        try:
            target(sig)
            break
        except ProcessLookupError:
            continue
        except PermissionError:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)  # a stopped (paused) process must wake up to die
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap_children()
        _reap(pid)
        if not alive(pid, start_time):
            return True
        time.sleep(0.05)
    for target in (lambda s: os.killpg(pid, s), lambda s: os.kill(pid, s)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            target(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and alive(pid, start_time):
        reap_children()
        _reap(pid)
        time.sleep(0.05)
    return True


def stop_processes(procs: Sequence[tuple[int, int | None]], timeout: float = 5.0) -> list[int]:
    """:func:`stop_process` for many at once (signals first, then one wait); returns those that ran."""
    running = [(pid, st) for pid, st in procs if alive(pid, st)]
    for pid, _st in running:
        for target in (os.killpg, os.kill):
            try:
                target(pid, signal.SIGTERM)
                break
            except (ProcessLookupError, PermissionError):
                continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p, st) for p, st in running):
        reap_children()
        for pid, _st in running:
            _reap(pid)
        time.sleep(0.05)
    for pid, st in running:
        if alive(pid, st):
            stop_process(pid, st, timeout=0, sig=signal.SIGKILL)
    return [pid for pid, _st in running]


def kill_all_in(ns: str, timeout: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process inside namespace ``ns``; returns their pids."""
    pids = netns_pids(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap_children()
        for pid in pids:
            _reap(pid)
        if not any(alive(p) for p in pids):
            return pids
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        reap_children()
        for pid in pids:
            _reap(pid)
        time.sleep(0.05)
    return pids


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()[-20000:]
    except OSError:
        return "(no log)"
    return "\n".join("    " + ln for ln in text.splitlines()[-lines:])


# --- one namespace ----------------------------------------------------------------------


class Netns:
    """A network namespace by name and the commands that run inside it (``nsenter --net``).

    ``Netns(name)`` names an existing one; :meth:`add` creates one (loopback up).
    :meth:`delete` kills what still runs inside and removes it.
    """

    def __init__(self, name: str):
        self.name = name

    @classmethod
    def add(cls, name: str, **kwargs: Any) -> Netns:
        run(["ip", "netns", "add", name])
        ns = cls(name, **kwargs)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def cmd(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net={NETNS_DIR}/{self.name}", *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 30, input: str | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(self.cmd(*argv), capture_output=True, text=True, timeout=timeout, input=input,
                                  cwd=cwd)
        except subprocess.TimeoutExpired:
            raise NetnsError(f"[{self.name}] {' '.join(argv)}: did not finish within {timeout:g} s") from None
        if check and proc.returncode != 0:
            raise NetnsError(f"[{self.name}] {' '.join(argv)} -> {proc.returncode}\n"
                             f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def popen(self, *argv: str, **kwargs: Any) -> subprocess.Popen:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(self.cmd(*argv), **kwargs)

    def sysctl(self, key: str, value: str) -> None:
        self.run("sh", "-c", f"echo {value} > /proc/sys/{key.replace('.', '/')}")

    def offload_off(self, dev: str) -> None:
        """Checksum offload off (DESIGN §5: otherwise veth hides checksum errors)."""
        self.run("ethtool", "-K", dev, "tx", "off", "rx", "off")

    def delete(self) -> None:
        kill_inside(self.name)
        del_netns(self.name)
