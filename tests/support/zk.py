"""A real ZooKeeper for tests (pytest plugin, loaded from tests/conftest.py).

``zk_server`` (session): one standalone server from Debian's package on a free
loopback port with a fresh data dir, removed at the end, failures included.
``zk_prefix`` (function): a unique registry prefix per test, wiped afterwards.
``zk_client``: a raw kazoo client for setting up records by hand.
``registries``: a factory of ZooKeeperRegistry instances, all closed afterwards.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

ZK_JAR = "/usr/share/java/zookeeper.jar"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.02) -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wipe(client, path: str, chunk: int = 2000) -> None:
    """Delete ``path`` and everything below it: list level by level, delete deepest first,
    pipelining the requests (a few rounds at most, each request with a timeout)."""
    from kazoo.exceptions import NoNodeError, NotEmptyError

    for _ in range(3):
        levels: list[list[str]] = []
        level = [path]
        while level:
            present: list[str] = []
            below: list[str] = []
            for i in range(0, len(level), chunk):
                pending = [(p, client.get_children_async(p)) for p in level[i:i + chunk]]
                for p, res in pending:
                    try:
                        kids = res.get(timeout=30)
                    except NoNodeError:
                        continue
                    present.append(p)
                    below.extend(f"{p}/{k}" for k in kids)
            levels.append(present)
            level = below
        if not any(levels):
            return
        for present in reversed(levels):
            batches = []
            for i in range(0, len(present), 500):  # multi-op deletes: far fewer round trips
                tx = client.transaction()
                for p in present[i:i + 500]:
                    tx.delete(p)
                batches.append((present[i:i + 500], tx.commit_async()))
            for paths, res in batches:
                if not any(isinstance(r, Exception) for r in res.get(timeout=60)):
                    continue
                pending = [client.delete_async(p) for p in paths]  # one failed: one by one
                for one in pending:
                    try:
                        one.get(timeout=30)
                    except (NoNodeError, NotEmptyError):
                        pass


def expire_session(client) -> None:
    """Expire a kazoo client's session the way kazoo's own test harness does:
    a second client takes over the same session id and password, then closes it."""
    from kazoo.client import KazooClient

    session_id, password = client.client_id
    hosts = ",".join(f"{h}:{p}" for h, p in client.hosts)
    other = KazooClient(hosts=hosts, client_id=(session_id, password),
                        timeout=client._session_timeout / 1000.0)
    try:
        other.start(timeout=10)
    finally:
        other.stop()
        other.close()


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
