"""Labs for tests: each one under a name of its own (``overlay lab --name``), so a test's
lab never meets a developer's (``make lab``: ``ovl-lab-*``) nor another test run's.

The name is the test's tag plus this process's id: namespaces ``ovl-<tag><pid>-*``,
``/run/overlay-<tag><pid>``, ``/sys/fs/bpf/overlay/<tag><pid>``.
"""

from __future__ import annotations

import os

import pytest

from overlay.lab.lab import Lab
from tests.support.netns import require_bcc


def lab_name(tag: str) -> str:
    """``tag`` (a few lowercase letters) and this process's id, as a lab name."""
    return f"{tag}{os.getpid() % 100000}"


def make_lab(tag: str, lines: list[str] | None = None, topology: str | None = None, **kwargs) -> Lab:
    """A Lab named after ``tag`` whose processes die with the test process; its progress
    lines are printed (and appended to ``lines``)."""

    def emit(text: str, newline: bool = True) -> None:
        print(text, end="\n" if newline else "", flush=True)
        if lines is not None:
            lines.append(text)

    return Lab(topology, name=lab_name(tag), emit=emit, die_with_parent=True, **kwargs)


def require_lab_tools() -> None:
    """Skip unless bcc, ZooKeeper and the tools the lab runs are installed."""
    require_bcc()
    if not os.path.exists("/usr/share/java/zookeeper.jar"):
        pytest.skip("ZooKeeper is not installed (Debian's zookeeper package)")
    for cmd in ("nsenter", "ethtool", "iptables-restore"):
        if not any(os.access(os.path.join(d, cmd), os.X_OK) for d in os.environ.get("PATH", "").split(":")):
            pytest.skip(f"{cmd} is not installed")
