"""A test's own cgroup-v2 directory (socket mode's programs attach only there).

``own_cgroup()`` makes ``<cgroup2 mount>/ovltest-<pid>`` and a ``child`` in it, and
removes both on exit (failures included), first moving any process still in them back
to the mount's root. The machine's real root cgroup never gets a program of a test.
"""

from __future__ import annotations

import contextlib
import os

import pytest


def cgroup2_mount() -> str | None:
    """Where the unified (v2) hierarchy is mounted, None when it is not."""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return fields[1]
    return None


def procs(path: str) -> list[int]:
    with open(os.path.join(path, "cgroup.procs")) as f:
        return [int(x) for x in f.read().split()]


def _evacuate_and_remove(path: str, root: str) -> None:
    if not os.path.isdir(path):
        return
    for entry in os.listdir(path):
        sub = os.path.join(path, entry)
        if os.path.isdir(sub):
            _evacuate_and_remove(sub, root)
    for pid in procs(path):
        with contextlib.suppress(OSError), open(os.path.join(root, "cgroup.procs"), "w") as f:
            f.write(str(pid))
    os.rmdir(path)


@contextlib.contextmanager
def own_cgroup(tag: str = ""):
    """(the test cgroup ``ovltest-<pid>[-<tag>]``, its child), removed on exit."""
    root = cgroup2_mount()
    if root is None:
        pytest.skip("no cgroup-v2 hierarchy mounted")
    path = os.path.join(root, f"ovltest-{os.getpid()}" + (f"-{tag}" if tag else ""))
    child = os.path.join(path, "child")
    _evacuate_and_remove(path, root)   # a leftover of a killed run of this pid
    os.mkdir(path)
    try:
        os.mkdir(child)
        yield path, child
    finally:
        _evacuate_and_remove(path, root)


def joining(cgroup: str, argv: list[str]) -> list[str]:
    """``argv`` run by a shell that first moves itself into ``cgroup`` (then execs it)."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup, *argv]
