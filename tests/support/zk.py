"""ZooKeeper for tests: the server's jar, wiping a prefix, expiring a session.

The fixtures (``zk_server``, ``zk_prefix``, ``zk_client``, ``registries``) are in
tests/conftest.py.
"""

from __future__ import annotations

ZK_JAR = "/usr/share/java/zookeeper.jar"


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


def client_in_netns(ns: str, hosts: str, timeout: float = 5):
    """A started kazoo client of ``hosts`` whose connection thread was started inside namespace
    ``ns`` (so its sockets, reconnections included, are made there). The caller stops it."""
    from overlay import netns as nx

    def start():
        from kazoo.client import KazooClient

        c = KazooClient(hosts=hosts, timeout=timeout)
        c.start(timeout=10)
        return c

    res = nx.in_netns(ns, start, timeout=30)
    if isinstance(res, BaseException):
        raise res
    return res


def read_in_netns(ns: str, hosts: str, fn):
    """``fn(client)`` with a kazoo client of ``hosts`` connected from inside namespace ``ns``."""
    c = client_in_netns(ns, hosts)
    try:
        return fn(c)
    finally:
        c.stop()
        c.close()
