"""The reliability suite (issue 16): seven failure scenarios, all marked ``soak``.

Tests 1, 3, 4 and 7 share one lab and one timeline (:mod:`tests.support.timeline`),
which runs in a thread from the first reliability test on, while tests 2, 5 and 6 run in
the foreground in namespaces of their own; the four timeline tests come last and assert
on what it recorded. So the long waits overlap: the suite takes about as long as its
longest scenario (test 1's stopped daemons, 5 minutes), not as their sum.
``--soak-long`` (or ``OVERLAY_SOAK_LONG=1``) runs the longer variants.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.support.reliability import Durations, soak_long

# Foreground first, then the tests that read the timeline (in the order it runs them).
ORDER = ("test_zookeeper_blackhole", "test_scale_churn", "test_pins_two_namespaces",
         "test_controller_kill", "test_controllers_down", "test_zookeeper_ensemble", "test_daemon_stopped")


def pytest_collection_modifyitems(session, config, items) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    mine = [i for i in items if os.path.dirname(str(i.fspath)) == here]
    if not mine:
        return
    for item in mine:
        item.add_marker(pytest.mark.soak)

    def rank(item) -> int:
        name = item.module.__name__.rsplit(".", 1)[-1]
        return ORDER.index(name) if name in ORDER else len(ORDER)

    positions = [items.index(i) for i in mine]
    for pos, item in zip(positions, sorted(mine, key=rank), strict=True):
        items[pos] = item
    config.stash[_WANTED] = any("fleet" in i.fixturenames for i in mine)


_WANTED = pytest.StashKey[bool]()


def _tools_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, bpffs, eBPF programs)"
    if not os.path.exists("/usr/share/java/zookeeper.jar"):
        return "ZooKeeper is not installed (Debian's zookeeper package)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc (python3-bpfcc) is not installed"
    for cmd in ("nsenter", "ethtool", "iptables-restore"):
        if shutil.which(cmd) is None:
            return f"{cmd} is not installed"
    return None


@pytest.fixture(scope="session")
def durations(request) -> Durations:
    return Durations.pick(soak_long(request.config))


@pytest.fixture(scope="session", autouse=True)
def _fleet_timeline(request, durations):
    """Starts the shared lab's timeline with the first reliability test (when a test of the
    session wants it); takes the lab down at the end of the session."""
    if not request.config.stash.get(_WANTED, False) or _tools_missing() is not None:
        yield None
        return
    from tests.support.timeline import FleetTimeline

    workdir = tempfile.mkdtemp(prefix="ovl-fleet-")
    timeline = FleetTimeline(durations, workdir).start()
    try:
        yield timeline
    finally:
        timeline.close(timeout=durations.daemon_stopped_s + 600)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def fleet(_fleet_timeline):
    missing = _tools_missing()
    if missing is not None:
        pytest.skip(missing)
    return _fleet_timeline
