"""Fixtures of the whole suite: a real ZooKeeper (Debian's package); Hypothesis budgets.

``zk_server`` (session): one standalone server on a free loopback port with a fresh
data dir, removed at the end, failures included. ``zk_prefix`` (function): a unique
registry prefix per test, wiped afterwards. ``zk_client``: a raw kazoo client for
setting up records by hand. ``registries``: a factory of ZooKeeperRegistry instances,
all closed afterwards. Helpers are in tests/support.

Hypothesis: every property test runs ``HYPOTHESIS_EXAMPLES[profile]`` examples unless it
names its own count (a few do, with the reason beside it); no deadline (the machine is
shared, a slow example is not a failure). The profile is ``overlay`` (``tests/unit`` must
run in under 90 s as any user: docs/testing.md) or, for a longer search,
``OVERLAY_HYPOTHESIS=deep``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.support.wait import free_port
from tests.support.zk import ZK_JAR, wipe

HYPOTHESIS_EXAMPLES = {"overlay": 100, "deep": 2000}
for _name, _count in HYPOTHESIS_EXAMPLES.items():
    settings.register_profile(_name, max_examples=_count, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("OVERLAY_HYPOTHESIS", "overlay"))


def pytest_addoption(parser) -> None:
    parser.addoption("--soak-long", action="store_true", default=False,
                     help="reliability suite (tests/reliability): run the long variants (also OVERLAY_SOAK_LONG=1)")


@pytest.fixture(scope="session")
def zk_server() -> Iterator[object]:
    if not os.path.exists(ZK_JAR) or shutil.which("java") is None:
        pytest.skip("Debian's zookeeper package (and java) is not installed")
    from overlay.zk.server import ZooKeeperServer

    data_dir = tempfile.mkdtemp(prefix="overlay-zk-")
    server = ZooKeeperServer(data_dir, "127.0.0.1", free_port(), fsync=False, die_with_parent=True)
    try:
        server.start(timeout=60)
        yield server
    finally:
        try:
            server.resume()
            server.stop()
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def zk_client(zk_server) -> Iterator[object]:
    from kazoo.client import KazooClient

    client = KazooClient(hosts=zk_server.address, timeout=10)
    client.start(timeout=15)
    try:
        yield client
    finally:
        client.stop()
        client.close()


@pytest.fixture
def zk_prefix(zk_server) -> Iterator[str]:
    from kazoo.client import KazooClient

    prefix = f"/test-{uuid.uuid4().hex[:12]}"
    yield prefix
    if not zk_server.running():
        return
    zk_server.resume()
    client = KazooClient(hosts=zk_server.address, timeout=10)
    try:
        client.start(timeout=15)
        wipe(client, prefix)
    except Exception:  # cleanup is best effort; the data dir goes at session end
        pass
    finally:
        client.stop()
        client.close()


@pytest.fixture
def registries() -> Iterator[Callable[..., object]]:
    """``registries(config, subnet, node_id)`` -> a ZooKeeperRegistry closed at teardown."""
    from overlay.registry.zookeeper import ZooKeeperRegistry

    made: list[ZooKeeperRegistry] = []

    def factory(*args, **kwargs) -> ZooKeeperRegistry:
        reg = ZooKeeperRegistry(*args, **kwargs)
        made.append(reg)
        return reg

    try:
        yield factory
    finally:
        for reg in made:
            try:
                reg.close()
            except Exception:
                pass
