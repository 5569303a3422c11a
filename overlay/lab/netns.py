"""Namespaces, commands and processes for the netns lab.

The lab is an emulation harness, not the product: it drives ``ip``,
``iptables`` and ``ethtool`` as subprocesses. Commands that must run inside a
namespace use ``nsenter --net`` (not ``ip netns exec``, which remounts
``/sys`` and so hides bpffs from the daemons). Short Python work inside a
namespace (probes, status requests) runs in a thread that has ``setns``-ed
into it. Every call has a timeout.
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
_CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class LabError(OverlayError):
    """The lab could not do what was asked; the message names the step and the cause."""


# --- commands ---------------------------------------------------------------------------


def run(argv: Sequence[str], *, input: str | None = None, timeout: float = 30,
        check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LabError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from None
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip()
        raise LabError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): {msg}")
    return proc


def nsenter(ns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside namespace ``ns`` (network namespace only; mounts unchanged)."""
    return ["nsenter", f"--net={NETNS_DIR}/{ns}", "--", *argv]


def sh(ns: str, script: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a POSIX shell script inside ``ns``; a failure names the namespace and the output."""
    try:
        return run(nsenter(ns, ["sh", "-c", script]), timeout=timeout)
    except LabError as exc:
        raise LabError(f"in {ns}: {exc}") from None


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


def in_netns(ns: str, fn: Callable[..., T], *args: Any, timeout: float = 30) -> T:
    """Call ``fn(*args)`` in a fresh thread moved into namespace ``ns``; return its result."""
    return parallel_in_netns([(ns, fn, args)], timeout=timeout)[0]


def parallel_in_netns(calls: Sequence[tuple[str, Callable[..., Any], tuple]], timeout: float = 30) -> list[Any]:
    """Run each ``(ns, fn, args)`` in its own thread inside ``ns``; results in order.

    A call that raised returns its exception object (the caller decides); one
    that did not finish in ``timeout`` seconds returns a ``LabError``.
    """
    results: list[Any] = [LabError("did not finish in time")] * len(calls)

    def worker(i: int, ns: str, fn: Callable[..., Any], args: tuple) -> None:
        try:
            _setns(ns)
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
            results[i] = LabError(f"{calls[i][0]}: did not finish within {timeout:g} s")
    return results


def _setns(ns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fd = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LabError(f"namespace {ns} does not exist") from None
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


# --- processes --------------------------------------------------------------------------


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


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


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
                preexec_fn=_die_with_parent if die_with_parent else None,
            )
        except OSError as exc:
            raise LabError(f"cannot start {argv[0]}: {exc.strerror}") from None
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
