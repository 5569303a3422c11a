"""ZooKeeperRegistry against a real ZooKeeper (Debian's package, started by the fixture in tests/conftest.py).

Every test gets its own prefix; timing assertions poll with bounded deadlines.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl_credential

from overlay.config import Auth, RegistryConfig
from overlay.errors import AllocationExhausted, NotFound, RegistryError
from overlay.model import Node, serialise_node
from overlay.registry import Registry
from overlay.registry.zookeeper import ZooKeeperRegistry
from overlay.zk.layout import bootstrap
from tests.support.wait import wait_for
from tests.support.zk import expire_session

pytestmark = pytest.mark.zk

SUBNET = ipaddress.IPv4Network("192.168.0.0/18")


@pytest.fixture(autouse=True)
def _quiet_kazoo():
    logging.getLogger("kazoo").setLevel(logging.WARNING)
    yield


def cfg(server, prefix, timeout_s=3.0, auth=None, operator=None, node_identities=()) -> RegistryConfig:
    return RegistryConfig(hosts=(server.address,), prefix=prefix, timeout_s=timeout_s,
                          auth=auth, operator=operator, node_identities=tuple(node_identities))


def mknode(node_id: str, overlay: str, n: int = 1, groups=("web",)) -> Node:
    return Node(node_id, "ec2", f"10.0.{n // 250}.{n % 250 + 1}", f"198.18.{n // 250}.{n % 250 + 1}",
                overlay, tuple(groups), ((80, 80),))


class Counter:
    def __init__(self):
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.n += 1


def join(reg: ZooKeeperRegistry, node_id: str, n: int = 1, requested=None, watch=True) -> Node:
    """What the agent does: allocate, start watching, register.

    ``watch=False`` skips start(): a peer that only publishes, so that big tests do
    not spend this process's CPU on a second full view of the fleet.
    """
    ip = reg.allocate(node_id, requested)
    if watch:
        reg.start(lambda: None)
    node = mknode(node_id, ip, n)
    reg.register(node)
    return node


# --- (a) allocation -------------------------------------------------------------------------


def test_is_a_registry(zk_server, zk_prefix, registries):
    assert isinstance(registries(cfg(zk_server, zk_prefix), SUBNET, "x"), Registry)


def test_concurrent_allocation_exhausts_a_27(zk_server, zk_prefix, registries, zk_client):
    subnet = ipaddress.IPv4Network("192.168.7.0/27")  # 30 usable addresses
    config = cfg(zk_server, zk_prefix)
    regs = [registries(config, subnet, f"node-{i}") for i in range(32)]
    for r in regs:  # connect first, so that the allocations below really race
        r._ensure_client()
    barrier = threading.Barrier(len(regs))
    results: dict[str, str | Exception] = {}

    def run(i: int) -> None:
        barrier.wait(30)
        try:
            results[f"node-{i}"] = regs[i].allocate(f"node-{i}")
        except Exception as exc:  # noqa: BLE001 - recorded and asserted on below
            results[f"node-{i}"] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(regs))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - t0
    addrs = {k: v for k, v in results.items() if isinstance(v, str)}
    errors = {k: v for k, v in results.items() if not isinstance(v, str)}
    print(f"\n32 allocators on {subnet}: {len(addrs)} addresses, {len(errors)} exhausted, {elapsed:.2f} s")
    assert len(results) == 32
    assert len(addrs) == 30
    assert len(set(addrs.values())) == 30
    hosts = {str(h) for h in subnet.hosts()}
    assert set(addrs.values()) == hosts  # network and broadcast never handed out
    assert len(errors) == 2
    for exc in errors.values():
        assert isinstance(exc, AllocationExhausted), exc
        assert str(exc) == f"overlay subnet {subnet} is exhausted: all 30 addresses are allocated"
    # ZooKeeper holds both directions, consistently
    for node_id, ip in addrs.items():
        assert zk_client.get(f"{zk_prefix}/alloc/id-to-ip/{node_id}")[0].decode() == ip
        assert zk_client.get(f"{zk_prefix}/alloc/ip-to-id/{ip}")[0].decode() == node_id
    # a restart (new registry instance, new session) keeps the address
    some_id, some_ip = next(iter(sorted(addrs.items())))
    regs[int(some_id.split("-")[1])].close()
    again = registries(config, subnet, some_id)
    assert again.allocate(some_id) == some_ip


def test_requested_address(zk_server, zk_prefix, registries):
    config = cfg(zk_server, zk_prefix)
    a = registries(config, SUBNET, "a")
    b = registries(config, SUBNET, "b")
    assert a.allocate("a", "192.168.1.10") == "192.168.1.10"
    assert a.allocate("a", "192.168.1.10") == "192.168.1.10"
    assert a.allocate("a") == "192.168.1.10"
    with pytest.raises(RegistryError, match=r"192\.168\.1\.10 is already allocated to node 'a'"):
        b.allocate("b", "192.168.1.10")
    with pytest.raises(RegistryError, match="outside the overlay subnet"):
        b.allocate("b", "10.9.9.9")
    with pytest.raises(RegistryError, match="network or broadcast"):
        b.allocate("b", "192.168.0.0")
    # a node whose configured static overlay changes moves to it
    assert a.allocate("a", "192.168.1.11") == "192.168.1.11"
    assert b.allocate("b", "192.168.1.10") == "192.168.1.10"


def test_random_allocation_uses_rng_and_is_not_sequential(zk_server, zk_prefix, registries):
    import random

    config = cfg(zk_server, zk_prefix)
    got = [registries(config, SUBNET, f"r{i}", rng=random.Random(i)).allocate(f"r{i}") for i in range(5)]
    assert len(set(got)) == 5
    ints = sorted(int(ipaddress.IPv4Address(g)) for g in got)
    assert ints != list(range(ints[0], ints[0] + 5))


# --- (b) re-registration --------------------------------------------------------------------


def test_reregisters_after_session_expiry_and_deletion(zk_server, zk_prefix, registries, zk_client):
    config = cfg(zk_server, zk_prefix, timeout_s=2.0)
    a = registries(config, SUBNET, "a")
    node = join(a, "a")
    obs = registries(config, SUBNET, "obs")
    obs.start(lambda: None)
    wait_for(lambda: obs.view().nodes.get("a") == node, what="observer sees a")
    path = f"{zk_prefix}/nodes/a"

    old_session = a.session_id
    assert zk_client.exists(path).ephemeralOwner == old_session
    t0 = time.monotonic()
    expire_session(a._zk.client)

    def reregistered():
        st = zk_client.exists(path)
        return st is not None and st.ephemeralOwner not in (0, old_session) and st.ephemeralOwner == a.session_id

    wait_for(reregistered, timeout=15, what="re-registration after session expiry")
    print(f"\nre-registered {time.monotonic() - t0:.2f} s after session expiry")
    assert json.loads(zk_client.get(path)[0]) == node.to_dict()
    assert a.allocate("a") == node.overlay
    wait_for(lambda: obs.view().nodes.get("a") == node, what="observer sees a again")

    # someone deletes the node's own record: it comes back, same overlay
    t0 = time.monotonic()
    zk_client.delete(path)
    wait_for(lambda: zk_client.exists(path) is not None, timeout=10, what="re-registration after deletion")
    print(f"re-registered {time.monotonic() - t0:.2f} s after deletion")
    assert json.loads(zk_client.get(path)[0])["overlay"] == node.overlay
    wait_for(lambda: obs.view().nodes.get("a") == node, what="observer sees a after deletion")


def test_restart_takes_over_the_previous_sessions_record(zk_server, zk_prefix, registries, zk_client):
    """A restarted daemon finds its old ephemeral record (old session not yet expired):
    it refreshes the data at once and re-creates the record under its own session when
    the old session ends."""
    config = cfg(zk_server, zk_prefix, timeout_s=2.0)
    old = registries(config, SUBNET, "a")
    first = join(old, "a", 1)
    new = registries(config, SUBNET, "a")
    assert new.allocate("a") == first.overlay
    new.start(lambda: None)
    second = mknode("a", first.overlay, 5)
    new.register(second)
    path = f"{zk_prefix}/nodes/a"
    assert json.loads(zk_client.get(path)[0]) == second.to_dict()
    assert zk_client.exists(path).ephemeralOwner == old.session_id
    old.close()
    wait_for(lambda: (st := zk_client.exists(path)) is not None and st.ephemeralOwner == new.session_id,
             timeout=10, what="record re-created under the new session")
    assert json.loads(zk_client.get(path)[0]) == second.to_dict()


def test_detach_keeps_the_record_and_the_next_start_resumes_the_session(zk_server, zk_prefix, registries,
                                                                         zk_client, tmp_path):
    """What a daemon's SIGTERM does (issue 16): the session is left open, its id saved (0600);
    the next start resumes it, so the record is never deleted (same czxid) and a watching peer
    never loses it. Without a restart the record goes when the session times out."""
    import os
    import stat

    config = cfg(zk_server, zk_prefix, timeout_s=3.0)
    saved = str(tmp_path / "state" / "zk-session-a.json")
    peer = registries(config, SUBNET, "b")
    join(peer, "b", 2)
    seen: list[bool] = []
    first_run = registries(config, SUBNET, "a", session_file=saved)
    me = join(first_run, "a", 1)
    path = f"{zk_prefix}/nodes/a"
    wait_for(lambda: "a" in peer.view().nodes, what="the peer sees a")
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append("a" in peer.view().nodes)
            time.sleep(0.01)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        before = zk_client.exists(path)
        session = first_run.session_id
        first_run.detach()
        assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
        assert json.loads(open(saved).read())["session"] == f"{session:x}"
        time.sleep(1.0)       # a restart that takes a while (inside the session timeout)
        second_run = registries(config, SUBNET, "a", session_file=saved)
        assert second_run.allocate("a") == me.overlay
        assert second_run.session_id == session and not os.path.exists(saved)
        second_run.start(lambda: None)
        second_run.register(me)
        time.sleep(4.0)       # past the session timeout: the resumed session keeps it
        after = zk_client.exists(path)
        assert (after.czxid, after.ephemeralOwner) == (before.czxid, session)
    finally:
        stop.set()
        t.join(5)
    assert seen and all(seen), "the peer lost a at some point"
    # no restart: the record lives as long as the session, then goes
    second_run.detach()
    wait_for(lambda: zk_client.exists(path) is None, timeout=15, what="the session to time out")
    # a saved session that expired: the next start gets a new one and registers again
    third_run = registries(config, SUBNET, "a", session_file=saved)
    join(third_run, "a", 1)
    assert third_run.session_id != session and zk_client.exists(path).ephemeralOwner == third_run.session_id
    # another node's saved session is never taken
    other = registries(config, SUBNET, "c", session_file=saved)
    third_run.detach()
    other.allocate("c")
    assert other.session_id != third_run.session_id and os.path.exists(saved)
    # deregistering for good: the saved session is resumed and the record removed
    last = registries(config, SUBNET, "a", session_file=saved)
    last.deregister()
    assert zk_client.exists(path) is None
    with pytest.raises(NotFound):
        last.deregister()


def test_closed_registry_refuses_work(zk_server, zk_prefix, registries):
    reg = registries(cfg(zk_server, zk_prefix), SUBNET, "a")
    reg.allocate("a")
    reg.close()
    assert reg.view().connected is False
    with pytest.raises(RegistryError, match="closed"):
        reg.allocate("a")


def test_unreachable_registry_is_a_registry_error(registries):
    config = RegistryConfig(hosts=("127.0.0.1:1",), prefix="/overlay", timeout_s=1.0)
    with pytest.raises(RegistryError, match="unreachable"):
        registries(config, SUBNET, "a").allocate("a")


# --- (c) hostile records --------------------------------------------------------------------


def _record(node_id: str, overlay: str, **over) -> bytes:
    d = mknode(node_id, overlay).to_dict()
    d.update(over)
    return json.dumps(d).encode()


def test_hostile_records_are_rejected(zk_server, zk_prefix, registries, zk_client):
    config = cfg(zk_server, zk_prefix)
    peer_reg = registries(config, SUBNET, "peer")
    peer = join(peer_reg, "peer")
    obs = registries(config, SUBNET, "obs")
    changes = Counter()
    obs.start(changes)
    wait_for(lambda: "peer" in obs.view().nodes, what="valid peer in view")

    # one node that owns its allocation, for the bad records that need an owner
    zk_client.create(f"{zk_prefix}/alloc/ip-to-id/192.168.2.2", b"owned")
    zk_client.create(f"{zk_prefix}/alloc/id-to-ip/owned", b"192.168.2.2")
    big = _record("big", "192.168.2.3", network="x" * 5200)
    assert len(big) > 5 * 1024
    hostile = {
        "badjson": (b'{"v": 1, "node_id": ', "not JSON"),
        "nonutf8": (b'{"v": 1, "node_id": "\xff\xfe"}', "not UTF-8"),
        "zero": (_record("zero", "0.0.0.0"), "unspecified"),
        "cidr": (_record("cidr", "192.168.2.4", private="10.0.0.0/24"), "CIDR"),
        "outside": (_record("outside", "10.200.0.1"), "outside the overlay subnet"),
        "thief": (_record("thief", peer.overlay), "allocated to 'peer', not 'thief'"),
        "owned": (_record("owned", "192.168.2.2", v=3), "unsupported version"),
        "big": (big, "over the 4096-byte limit"),
        "alias": (_record("someone-else", "192.168.2.5"), "names node_id 'someone-else'"),
        "unallocated": (_record("unallocated", "192.168.2.6"), "not allocated"),
        "list": (b"[1, 2, 3]", "JSON object"),
    }
    before = obs.rejected_total
    for name, (data, _) in hostile.items():
        zk_client.create(f"{zk_prefix}/nodes/{name}", data, ephemeral=True)
    zk_client.create(f"{zk_prefix}/policies/good", json.dumps(
        {"v": 1, "from": {"group": "web"}, "to": {"group": "db"}, "proto": "tcp", "ports": [5432]}).encode())
    zk_client.create(f"{zk_prefix}/policies/evil", json.dumps(
        {"v": 1, "from": {"cidr": "0.0.0.0/0"}, "to": {"cidr": "10.0.0.0/8"}, "proto": "tcp"}).encode())
    zk_client.create(f"{zk_prefix}/config/max_change", b"lots")

    wait_for(lambda: set(hostile) <= set(obs.view().rejected) and "policy:evil" in obs.view().rejected
             and "good" in obs.view().policies and obs.rejected_total - before >= len(hostile) + 2,
             what="all hostile records rejected")
    view = obs.view()
    for name, (_, reason) in hostile.items():
        assert name not in view.nodes
        assert reason in view.rejected[name], (name, view.rejected[name])
    assert view.nodes == {"peer": peer}
    assert view.max_change is None
    assert set(view.policies) == {"good"}
    assert obs.rejected_total - before == len(hostile) + 2  # + policy:evil + config/max_change
    # one log line per record version: re-reading the same versions logs nothing new
    counted = obs.rejected_total
    obs.request_resync("test")
    wait_for(lambda: obs.view().revision > view.revision, what="resync")
    assert obs.rejected_total == counted
    # a new version of a bad record is counted again; fixing it admits it
    zk_client.set(f"{zk_prefix}/nodes/thief", _record("thief", "192.168.2.9"))
    wait_for(lambda: "not allocated" in obs.view().rejected.get("thief", ""), what="thief v2 rejected")
    assert obs.rejected_total == counted + 1
    zk_client.create(f"{zk_prefix}/alloc/ip-to-id/192.168.2.9", b"thief")
    wait_for(lambda: "thief" in obs.view().nodes, what="thief admitted once allocated")
    assert "thief" not in obs.view().rejected
    zk_client.set(f"{zk_prefix}/config/max_change", b"7")
    wait_for(lambda: obs.view().max_change == 7, what="max_change 7")
    assert changes.n >= 3


def test_unreadable_records_are_rejected_not_fatal(zk_server, zk_prefix, registries, zk_client):
    """A record (or a squat of our own name) with an ACL nobody else can read."""
    from kazoo.security import make_digest_acl

    config = cfg(zk_server, zk_prefix)
    peer = join(registries(config, SUBNET, "peer"), "peer", watch=False)
    secret_acl = [make_digest_acl("mallory", "pw", all=True)]
    zk_client.create(f"{zk_prefix}/nodes/secret", _record("secret", "192.168.3.3"), acl=secret_acl,
                     ephemeral=True)
    zk_client.create(f"{zk_prefix}/nodes/victim", _record("victim", "192.168.3.4"), acl=secret_acl,
                     ephemeral=True)
    zk_client.create(f"{zk_prefix}/policies/secret", b"{}", acl=secret_acl)
    victim = registries(config, SUBNET, "victim")
    ip = victim.allocate("victim")
    with pytest.raises(RegistryError, match="NoAuth|ACL"):
        victim.register(mknode("victim", ip))
    victim.start(lambda: None)
    wait_for(lambda: victim.view().synced and "peer" in victim.view().nodes, what="victim in sync")
    view = victim.view()
    assert "cannot be read" in view.rejected["secret"]
    assert "cannot be read" in view.rejected["policy:secret"]
    assert view.nodes == {"peer": peer}
    # and it keeps following changes. (ZooKeeper sends no watch events for znodes the
    # watcher cannot read, so unreadable records are only noticed by a full resync.)
    late = join(registries(config, SUBNET, "late"), "late", 2, watch=False)
    wait_for(lambda: victim.view().nodes.get("late") == late, what="late peer")


def test_flood_of_10000_records(zk_server, zk_prefix, registries, zk_client):
    config = cfg(zk_server, zk_prefix)
    peer = join(registries(config, SUBNET, "peer"), "peer", requested="192.168.60.1", watch=False)
    obs = registries(config, SUBNET, "obs")
    obs.start(lambda: None)
    wait_for(lambda: "peer" in obs.view().nodes, what="valid peer in view")
    logging.getLogger("overlay.registry.zookeeper").setLevel(logging.ERROR)  # 10,000 warnings
    n = 10_000
    t0 = time.monotonic()
    pending = []
    for start in range(0, n, 500):
        tx = zk_client.transaction()
        for i in range(start, start + 500):
            # unallocated overlays: each must be rejected
            data = _record(f"flood-{i}", str(SUBNET.network_address + 1000 + i))
            tx.create(f"{zk_prefix}/nodes/flood-{i}", data, ephemeral=True)
        pending.append(tx.commit_async())
    for p in pending:
        assert not any(isinstance(r, Exception) for r in p.get(timeout=60))
    created = time.monotonic() - t0
    wait_for(lambda: len(obs.view().rejected) >= n, timeout=60, what="10,000 rejections")
    handled = time.monotonic() - t0
    print(f"\n10,000 hostile records: created in {created:.2f} s, all rejected after {handled:.2f} s")
    view = obs.view()
    assert view.nodes == {"peer": peer}
    bad = {k: r for k, r in view.rejected.items() if k.startswith("flood-") and "not allocated" not in r}
    assert not bad, list(bad.items())[:5]
    # still responsive: a new valid peer shows up
    late = join(registries(config, SUBNET, "late"), "late", 2, requested="192.168.60.2", watch=False)
    wait_for(lambda: obs.view().nodes.get("late") == late, what="late peer")


# --- (d) reads per change -------------------------------------------------------------------


def _populate(client, prefix: str, n: int, batch: int = 300) -> None:
    """n peers (allocation + ephemeral record each), created in multi-op transactions."""
    for p in ("alloc/id-to-ip", "alloc/ip-to-id", "nodes", "policies", "config"):
        client.ensure_path(f"{prefix}/{p}")
    hosts = SUBNET.hosts()
    pending = []
    for start in range(0, n, batch):
        tx = client.transaction()
        for i in range(start, min(n, start + batch)):
            node_id = f"p{i}"
            ip = str(next(hosts))
            tx.create(f"{prefix}/alloc/ip-to-id/{ip}", node_id.encode())
            tx.create(f"{prefix}/alloc/id-to-ip/{node_id}", ip.encode())
            tx.create(f"{prefix}/nodes/{node_id}", serialise_node(mknode(node_id, ip, i)), ephemeral=True)
        pending.append(tx.commit_async())
    for p in pending:
        results = p.get(timeout=60)
        assert not any(isinstance(r, Exception) for r in results), results[:3]


def _measure(server, prefix, registries, n: int) -> dict[str, int]:
    fleet = KazooClient(hosts=server.address, timeout=10)
    fleet.start(timeout=15)
    try:
        t0 = time.monotonic()
        _populate(fleet, prefix, n)
        t1 = time.monotonic()
        obs = registries(cfg(server, prefix), SUBNET, "obs")
        obs.start(lambda: None)
        wait_for(lambda: obs.view().synced and len(obs.view().nodes) == n, timeout=90, what=f"{n} peers")
        t2 = time.monotonic()
        out = {"initial_sync": obs.reads}

        # one more peer joins (allocation + record)
        r0 = obs.reads
        new = join(registries(cfg(server, prefix), SUBNET, "newcomer"), "newcomer", 7, watch=False)
        wait_for(lambda: obs.view().nodes.get("newcomer") == new, what="newcomer")
        out["join"] = obs.reads - r0
        # an existing peer changes its record
        r0 = obs.reads
        changed = mknode("p1", obs.view().nodes["p1"].overlay, 1, groups=("db", "web"))
        fleet.set(f"{prefix}/nodes/p1", serialise_node(changed))
        wait_for(lambda: obs.view().nodes.get("p1") == changed, what="p1 change")
        out["update"] = obs.reads - r0
        # a peer leaves
        r0 = obs.reads
        fleet.delete(f"{prefix}/nodes/p2")
        wait_for(lambda: "p2" not in obs.view().nodes, what="p2 gone")
        out["leave"] = obs.reads - r0
        print(f"\nN={n}: populate {t1 - t0:.2f} s, initial sync {t2 - t1:.2f} s; reads: {out}")
        return out
    finally:
        fleet.stop()
        fleet.close()


def test_reads_per_change_do_not_grow_with_n(zk_server, registries):
    import uuid

    from tests.support.zk import wipe

    results = {}
    for n in (100, 10_000):
        prefix = f"/test-reads-{uuid.uuid4().hex[:8]}"
        try:
            results[n] = _measure(zk_server, prefix, registries, n)
        finally:
            c = KazooClient(hosts=zk_server.address, timeout=10)
            c.start(timeout=15)
            try:
                wipe(c, prefix)
            finally:
                c.stop()
                c.close()
    print(f"\nreads per change: N=100 {results[100]}, N=10000 {results[10_000]}")
    for kind in ("join", "update", "leave"):
        assert results[10_000][kind] <= results[100][kind] + 1, kind
        assert results[10_000][kind] <= 3, kind
    # the initial sync is O(N): record + owner per peer, plus a few listings
    assert results[10_000]["initial_sync"] <= 2 * 10_000 + 20


# --- (e) auth and ACLs ----------------------------------------------------------------------


def test_acls_keep_nodes_to_their_own_records(zk_server, zk_prefix, registries):
    op = Auth("digest", "operator", "op-secret")
    auth_a = Auth("digest", "node-a", "secret-a")
    auth_b = Auth("digest", "node-b", "secret-b")
    # a node cannot use a layout nobody bootstrapped
    with pytest.raises(RegistryError, match="bootstrap"):
        registries(cfg(zk_server, zk_prefix, auth=auth_a), SUBNET, "a").allocate("a")
    ids = [make_digest_acl_credential(a.user, a.password) for a in (auth_a, auth_b)]
    bootstrap(cfg(zk_server, zk_prefix, node_identities=ids), op, max_change=20)
    bootstrap(cfg(zk_server, zk_prefix, node_identities=ids), op)  # idempotent
    # an identity the operator did not list may not create records
    with pytest.raises(RegistryError, match="ACL"):
        registries(cfg(zk_server, zk_prefix, auth=Auth("digest", "node-c", "c")), SUBNET, "c").allocate("c")

    a = registries(cfg(zk_server, zk_prefix, auth=auth_a), SUBNET, "a")
    b = registries(cfg(zk_server, zk_prefix, auth=auth_b), SUBNET, "b")
    node_a = join(a, "a", 1)
    node_b = join(b, "b", 2)
    wait_for(lambda: a.view().nodes.get("b") == node_b, what="a sees b")
    assert a.view().max_change == 20
    ip_b = node_b.overlay

    as_a = KazooClient(hosts=zk_server.address, timeout=10, auth_data=[("digest", "node-a:secret-a")])
    anon = KazooClient(hosts=zk_server.address, timeout=10)
    as_a.start(timeout=15)
    anon.start(timeout=15)
    try:
        p = zk_prefix
        for client in (as_a, anon):
            with pytest.raises(NoAuthError):
                client.set(f"{p}/nodes/b", serialise_node(node_a))
            with pytest.raises(NoAuthError):
                client.delete(f"{p}/nodes/b")
            with pytest.raises(NoAuthError):
                client.set(f"{p}/alloc/id-to-ip/b", node_a.overlay.encode())
            with pytest.raises(NoAuthError):
                client.delete(f"{p}/alloc/ip-to-id/{ip_b}")
            with pytest.raises(NoAuthError):
                client.set(f"{p}/config/max_change", b"100000")
            with pytest.raises(NoAuthError):
                client.delete(f"{p}/config/max_change")
            with pytest.raises(NoAuthError):
                client.create(f"{p}/policies/open", b"{}")
            with pytest.raises(NoAuthError):
                client.set_acls(f"{p}/nodes", OPEN_ACL_UNSAFE)
            with pytest.raises(NoAuthError):
                client.create(f"{p}/assignments/b", b'{"v": 1, "groups": ["admin"]}')
            # everyone reads
            assert json.loads(client.get(f"{p}/nodes/b")[0])["node_id"] == "b"
        # a node changes its own record (re-register with new data)
        moved = Node("a", "ec2", "10.0.9.9", node_a.public, node_a.overlay, node_a.groups, node_a.open_ports)
        a.register(moved)
        wait_for(lambda: b.view().nodes.get("a") == moved, what="b sees a's new record")
        # the operator changes the threshold; nodes see it
        operator_reg = registries(cfg(zk_server, zk_prefix, operator=op), SUBNET, "operator")
        operator_reg.set_max_change(5)
        wait_for(lambda: a.view().max_change == 5 and b.view().max_change == 5, what="max_change 5")
        with pytest.raises(RegistryError, match="ACL"):
            a.set_max_change(1000)
        for client in (anon,):     # unauthenticated: creates nothing under nodes or alloc
            for parent in ("nodes", "alloc/id-to-ip", "alloc/ip-to-id"):
                with pytest.raises(NoAuthError):
                    client.create(f"{p}/{parent}/evil", b"x")
        # what a node writes names the operator too: it may re-ACL it (overlay zk acl-repair)
        for path in (f"{p}/nodes/a", f"{p}/alloc/id-to-ip/a", f"{p}/alloc/ip-to-id/{node_a.overlay}"):
            acl, _ = as_a.get_acls(path)
            assert {(x.id.scheme, x.id.id.split(":")[0], x.perms) for x in acl} == {
                ("digest", "node-a", 31), ("digest", "operator", 31), ("world", "anyone", 1)}, path
    finally:
        for c in (as_a, anon):
            c.stop()
            c.close()


# --- (f) suspended connection ---------------------------------------------------------------


def test_suspended_keeps_the_view(zk_server, zk_prefix, registries):
    config = cfg(zk_server, zk_prefix, timeout_s=2.0)
    peer_reg = registries(config, SUBNET, "peer")
    peer = join(peer_reg, "peer")
    obs = registries(config, SUBNET, "obs")
    changes = Counter()
    obs.start(changes)
    wait_for(lambda: obs.view().nodes == {"peer": peer}, what="peer in view")
    before = obs.view()
    calls = changes.n
    t0 = time.monotonic()
    zk_server.pause()
    try:
        wait_for(lambda: not obs.view().connected, timeout=10, what="SUSPENDED")
        suspended_after = time.monotonic() - t0
        view = obs.view()
        assert view.nodes == before.nodes
        assert view.revision > before.revision
        assert changes.n > calls
    finally:
        zk_server.resume()
    t1 = time.monotonic()
    wait_for(lambda: obs.view().connected and obs.view().synced and obs.view().nodes == {"peer": peer},
             timeout=20, what="reconnected and in sync")
    print(f"\nsuspended after {suspended_after:.2f} s of pause; in sync {time.monotonic() - t1:.2f} s after resume")
    # still following changes
    late = join(registries(config, SUBNET, "late"), "late", 3)
    wait_for(lambda: obs.view().nodes.get("late") == late, what="late peer after reconnect")


# --- (g) assignments and order keys -------------------------------------------------------------


def test_assignments_are_followed_and_records_carry_their_allocation_order(zk_server, zk_prefix, registries,
                                                                           zk_client):
    config = cfg(zk_server, zk_prefix)
    early, late = registries(config, SUBNET, "early"), registries(config, SUBNET, "late")
    n_early = join(early, "early", 1, watch=False)
    n_late = join(late, "late", 2, watch=False)
    obs = registries(config, SUBNET, "obs")
    obs.start(lambda: None)
    v = wait_for(lambda: (lambda x: x if set(x.nodes) == {"early", "late"} else None)(obs.view()), what="both")
    # the order key is the zxid that created the record's allocation (read back from ZooKeeper itself)
    for n in (n_early, n_late):
        assert v.order[n.node_id] == zk_client.exists(f"{zk_prefix}/alloc/ip-to-id/{n.overlay}").czxid
    assert v.order["early"] < v.order["late"]
    # a restart (a new session, a new record) keeps the order: the allocation is the same
    early.close()
    again = registries(config, SUBNET, "early")
    join(again, "early", 1, watch=False)
    wait_for(lambda: "early" in obs.view().nodes and obs.view().order["early"] == v.order["early"], what="rejoin")
    assert v.grants == {}                                          # nothing granted yet: no groups
    # assignments: created, changed, invalid, deleted; one event each
    zk_client.create(f"{zk_prefix}/assignments/early", b'{"v": 1, "groups": ["web", "db"]}')
    zk_client.create(f"{zk_prefix}/assignments/bogus", b'{"v": 1, "groups": "admin"}')
    wait_for(lambda: obs.view().grants.get("early") == ("db", "web") and "assignment:bogus" in obs.view().rejected,
             what="assignments seen")
    assert "bogus" not in obs.view().grants
    zk_client.set(f"{zk_prefix}/assignments/early", b'{"v": 1, "groups": []}')
    wait_for(lambda: obs.view().grants.get("early") == (), what="assignment narrowed")
    reads = obs.reads
    zk_client.delete(f"{zk_prefix}/assignments/early")
    zk_client.delete(f"{zk_prefix}/assignments/bogus")
    wait_for(lambda: obs.view().grants == {} and "assignment:bogus" not in obs.view().rejected, what="deleted")
    assert obs.reads == reads                                      # deletions cost no read
