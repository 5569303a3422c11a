"""Watch over real sockets and a real ZooKeeper: resumption, history, replicas, leases.

The resumption test kills (SIGKILL) a watcher process built only from
proto/overlay.proto at many points during 1,000 updates; each restart resumes from
the last revision it had written down. Its history must equal the controller's
journal: every delta starts where the previous one ended (no gaps, no duplicates)
and carries exactly the journal's changes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import textwrap
import threading
import time

import pytest

from overlay.controller import servicer as servicer_mod
from overlay.controller.journal import coalesce
from overlay.errors import NotFound
from overlay.model import Endpoint, Policy
from overlay.rpc.convert import change_from_pb
from tests.support import grpc as gs
from tests.support.paths import PYTHON
from tests.support.wait import wait_for

pytestmark = pytest.mark.zk


@pytest.fixture(scope="module")
def certs():
    base = gs.tmpdir()
    try:
        yield gs.make_certs(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _cfg(zk_server, zk_prefix, certs, **kw):
    return gs.controller_config(zk_server.address, zk_prefix, certs[0], **kw)


def _state_of(store) -> dict:
    return store.values()


def _read_until(call, pb2, head: int, timeout: float = 20.0) -> list:
    """Messages of a Watch call until one reaches ``head``."""
    out = []
    deadline = time.monotonic() + timeout
    for m in call:
        out.append(m)
        if m.revision >= head and (m.kind == pb2.WatchResponse.DELTA or m.last):
            return out
        if time.monotonic() > deadline:
            break
    pytest.fail(f"the stream did not reach revision {head}")


# --- kill and resume during 1,000 updates ------------------------------------------------------

WATCHER = textwrap.dedent('''
    import json, os, sys
    sys.modules["overlay"] = None
    gen, target, certs, hist = sys.argv[1:5]
    import grpc
    import overlay_pb2 as pb2, overlay_pb2_grpc as pb2_grpc

    rev, epoch = 0, ""
    if os.path.exists(hist):
        data = open(hist, "rb").read()
        cut = data.rfind(b"\\n") + 1
        if cut != len(data):                 # killed in the middle of a line: not applied
            with open(hist, "r+b") as fh:
                fh.truncate(cut)
        for line in data[:cut].splitlines():
            rec = json.loads(line)
            rev, epoch = rec["revision"], rec["epoch"]
    read = lambda f: open(os.path.join(certs, f), "rb").read()
    creds = grpc.ssl_channel_credentials(read("ca.crt"), read("operator.key"), read("operator.crt"))
    opts = [("grpc.keepalive_time_ms", 10000), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.secure_channel(target, creds, options=opts) as ch, open(hist, "ab") as out:
        call = pb2_grpc.RegistryStub(ch).Watch(pb2.WatchRequest(from_revision=rev, epoch=epoch), timeout=120)
        print("watching from", rev, flush=True)
        snapshot = []
        for m in call:
            changes = [c.SerializeToString().hex() for c in m.changes]
            if m.kind == pb2.WatchResponse.SNAPSHOT:
                snapshot += changes
                if not m.last:
                    continue
                changes, snapshot = snapshot, []
            rec = {"kind": "snapshot" if m.kind == pb2.WatchResponse.SNAPSHOT else "delta",
                   "revision": m.revision, "base": m.base_revision, "epoch": m.epoch, "reset": m.reset,
                   "coalesced": m.coalesced, "changes": changes}
            out.write(json.dumps(rec).encode() + b"\\n")
            out.flush()
''')


class _Pace:
    """Shared progress of the producers; they never run more than ``slack`` updates past
    the next kill point, so the kills land while updates are still coming."""

    def __init__(self, slack: int = 60):
        self.done = 0
        self.next_kill = 0
        self.slack = slack
        self.cond = threading.Condition()

    def step(self) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.done < self.next_kill + self.slack, timeout=30)
            self.done += 1
            self.cond.notify_all()

    def killed_at(self, nxt: int) -> None:
        with self.cond:
            self.next_kill = nxt
            self.cond.notify_all()


def _produce(op, n_updates: int, worker: int, workers: int, errors: list, pace: _Pace) -> None:
    rng = random.Random(worker)
    done = 0
    i = worker
    try:
        while done < n_updates:
            pace.step()
            kind = i % 4
            if kind == 0:
                op.put_policy(Policy(Endpoint(group=f"g{i % 7}"), Endpoint(group="web"), "tcp",
                                     ((1000 + rng.randrange(5000), 1000 + rng.randrange(5000) + 5000),),
                                     f"p{worker}-{i % 9}"))
            elif kind == 1:
                op.put_group(f"g{worker}-{i % 5}", f"update {i}")
            elif kind == 2:
                node_id = f"n{worker}-{i % 6}"
                ip = op.allocate(node_id)
                op.register(gs.node(node_id, ip, groups=("web", f"g{i % 3}"), index=1 + i % 200))
            else:
                try:
                    if i % 8 == 3:
                        op.delete_policy(f"p{worker}-{rng.randrange(9)}")
                    else:
                        op.deregister(f"n{worker}-{rng.randrange(6)}")
                except NotFound:
                    op.put_group(f"g{worker}-x", f"fallback {i}")
            done += 1
            i += workers
    except Exception as exc:  # reported by the test
        errors.append(exc)


def test_watch_resumes_across_kills_with_the_servers_history(zk_server, zk_prefix, certs):
    work = gs.tmpdir()
    procs: list[subprocess.Popen] = []
    try:
        os.makedirs(os.path.join(work, "gen"))
        gen = gs.generate_standalone(os.path.join(work, "gen"))
        # the script sits beside the generated code, which it imports from there
        script, hist = os.path.join(gen, "watcher.py"), os.path.join(work, "history.jsonl")
        with open(script, "w") as fh:
            fh.write(WATCHER)
        with gs.controllers() as start:
            ctl = start(_cfg(zk_server, zk_prefix, certs))
            store = ctl.store
            op = gs.client(ctl.address, certs[0])
            op.put_group("web", "before the watcher")
            for w in range(4):                     # the producers' nodes may hold the groups they claim
                for k in range(6):
                    op.set_node_groups(f"n{w}-{k}", ["web", "g0", "g1", "g2"])

            def launch() -> subprocess.Popen:
                p = subprocess.Popen([PYTHON, script, gen, ctl.address, certs[0], hist], cwd=work,
                                     env=gs.standalone_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
                procs.append(p)
                assert p.stdout.readline().startswith("watching from"), p.stderr.read()
                return p

            watcher = launch()
            errors: list = []
            workers = 4
            rng = random.Random(7)
            points = sorted(rng.sample(range(20, 980), 12))  # kill after these many updates
            pace = _Pace()
            pace.killed_at(points[0])
            producers = [threading.Thread(target=_produce, args=(op, 1000 // workers, w, workers, errors, pace))
                         for w in range(workers)]
            for t in producers:
                t.start()
            kills = 0
            for n, point in enumerate(points):
                wait_for(lambda p=point: pace.done >= p or not any(t.is_alive() for t in producers),
                            timeout=60, what=f"{point} updates")
                watcher.send_signal(signal.SIGKILL)
                watcher.wait(10)
                kills += 1
                time.sleep(rng.uniform(0.0, 0.2))  # updates go on while the watcher is down
                watcher = launch()
                pace.killed_at(points[n + 1] if n + 1 < len(points) else 10**9)
            for t in producers:
                t.join(30)
            assert not errors, errors
            head = store.head
            wait_for(lambda: _last_revision(hist) == head, timeout=30, what="the watcher to catch up")
            watcher.send_signal(signal.SIGKILL)
            watcher.wait(10)
            journal = {rev: (key, value) for rev, key, value in store.journal()}
            final = _state_of(store)
            op.close()
        assert kills == 12
        _check_history(hist, journal, final, head)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()
        shutil.rmtree(work, ignore_errors=True)


def _last_revision(hist: str) -> int:
    try:
        with open(hist, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return -1
    lines = data[:data.rfind(b"\n") + 1].splitlines()
    return json.loads(lines[-1])["revision"] if lines else -1


def _decode(hexes: list[str]) -> list[tuple]:
    from overlay.rpc.proto import modules

    pb2, _ = modules()
    out = []
    for h in hexes:
        ch = pb2.Change.FromString(bytes.fromhex(h))
        key, value = change_from_pb(ch)
        out.append((ch.revision, key, value))
    return out


def _check_history(hist: str, journal: dict, final: dict, head: int) -> None:
    with open(hist, "rb") as fh:
        records = [json.loads(line) for line in fh.read().splitlines()]
    assert records[0]["kind"] == "snapshot" and not records[0]["reset"]
    state = {k: v for _, k, v in _decode(records[0]["changes"])}
    rev, epoch = records[0]["revision"], records[0]["epoch"]
    applied: list[int] = []
    coalesced = 0
    for rec in records[1:]:
        assert rec["kind"] == "delta", "a resume fell back to a snapshot"
        assert rec["epoch"] == epoch
        assert rec["base"] == rev, f"gap or duplicate: delta from {rec['base']} after {rev}"
        assert rec["revision"] >= rec["base"]
        got = _decode(rec["changes"])
        expected = [(r, *journal[r]) for r in range(rec["base"] + 1, rec["revision"] + 1) if journal[r][0] is not None]
        if rec["coalesced"]:
            coalesced += 1
            expected = coalesce(expected)
        assert got == expected, f"delta {rec['base']}->{rec['revision']} differs from the journal"
        for r, key, value in got:
            applied.append(r)
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
        rev = rec["revision"]
    assert rev == head
    assert applied == sorted(set(applied)), "a change was applied twice or out of order"
    assert coalesced == 0 or len(applied) < head  # a coalesced delta skips superseded changes only
    assert state == final
    assert head - records[0]["revision"] >= 1000  # at least one revision per update


# --- too old, epochs, ahead ---------------------------------------------------------------------


def test_too_old_revision_gets_a_fresh_snapshot_and_the_journal_is_compacted(zk_server, zk_prefix, certs,
                                                                            zk_client, monkeypatch):
    monkeypatch.setattr(servicer_mod, "AHEAD_WAIT_S", 0.5)
    with gs.controllers() as start:
        ctl = start(_cfg(zk_server, zk_prefix, certs, window=16))
        with gs.client(ctl.address, certs[0]) as op:
            pb2 = op.pb2
            op.put_group("keep", "stays")
            for i in range(60):
                op.put_group("churn", f"v{i}")
            head, epoch = ctl.store.head, ctl.store.epoch
            # compacted: superseded entries older than the window are gone from ZooKeeper
            children = wait_for(lambda: (lambda c: c if len(c) <= 16 + 2 else None)(
                zk_client.get_children(f"{zk_prefix}/changes")), what="compaction")
            assert f"r-{head:020d}" in children
            floor = json.loads(zk_client.get(f"{zk_prefix}/changes")[0])["floor"]
            assert 0 < floor <= head - 16

            def first(from_revision, ep):
                call = op.watch(from_revision, ep, timeout=10)
                m = next(call)
                call.cancel()
                return m

            m = first(3, epoch)
            assert m.kind == pb2.WatchResponse.SNAPSHOT and m.reset and m.last and m.revision == head
            assert {c.id: c.group.description for c in m.changes} == {"keep": "stays", "churn": "v59"}
            m = first(head - 5, epoch)
            assert m.kind == pb2.WatchResponse.DELTA and m.base_revision == head - 5 and not m.reset
            assert [c.revision for c in m.changes] == list(range(head - 4, head + 1))
            m = first(head - 5, "another-epoch")
            assert m.kind == pb2.WatchResponse.SNAPSHOT and m.reset
            m = first(head, epoch)   # up to date: an empty delta says the stream is live
            assert m.kind == pb2.WatchResponse.DELTA and m.base_revision == m.revision == head and not m.changes
            m = first(head + 100, epoch)  # from the future (another journal): after a short wait, a snapshot
            assert m.kind == pb2.WatchResponse.SNAPSHOT and m.reset
        # a replica started now folds the compacted journal into the same state
        other = start(_cfg(zk_server, zk_prefix, certs, window=16))
        assert other.store.head == head and other.store.epoch == epoch
        assert _state_of(other.store) == _state_of(ctl.store)


def test_streams_at_different_revisions_get_exactly_their_deltas_built_once(zk_server, zk_prefix, certs):
    """Three streams, one two revisions behind and two at the head: each gets exactly the
    changes after its own revision, and the next change is built once for all three."""
    with gs.controllers() as start:
        ctl = start(_cfg(zk_server, zk_prefix, certs))
        with gs.client(ctl.address, certs[0]) as op:
            pb2 = op.pb2
            revs = [op.put_group(f"g{i}", f"d{i}") for i in range(4)]
            epoch = ctl.store.epoch
            built = ctl.servicer.deltas.built
            behind, *at_head = (op.watch(r, epoch, timeout=30) for r in (revs[1], revs[3], revs[3]))
            try:
                m = next(behind)
                assert (m.kind, m.base_revision, m.revision) == (pb2.WatchResponse.DELTA, revs[1], revs[3])
                assert [(c.revision, c.id, c.group.description) for c in m.changes] == \
                    [(revs[2], "g2", "d2"), (revs[3], "g3", "d3")]
                for call in at_head:   # live and up to date: one empty delta
                    m = next(call)
                    assert (m.base_revision, m.revision, len(m.changes)) == (revs[3], revs[3], 0)
                rev = op.put_group("g4", "d4")
                got = [next(call) for call in (behind, *at_head)]
            finally:
                for call in (behind, *at_head):
                    call.cancel()
        for m in got:
            assert (m.kind, m.base_revision, m.revision, m.coalesced) == (pb2.WatchResponse.DELTA, revs[3], rev, False)
            assert [(c.revision, c.id, c.group.description) for c in m.changes] == [(rev, "g4", "d4")]
        assert ctl.servicer.deltas.built - built == 2   # revs[1]->revs[3] once, revs[3]->rev once for three


# --- two replicas ---------------------------------------------------------------------------


def test_two_replicas_agree_and_survive_the_leader(zk_server, zk_prefix, certs):
    with gs.controllers() as start:
        a = start(_cfg(zk_server, zk_prefix, certs), replica="replica-a")
        b = start(_cfg(zk_server, zk_prefix, certs), replica="replica-b")
        assert a.store.is_leader and not b.store.is_leader
        op_a, op_b = gs.client(a.address, certs[0]), gs.client(b.address, certs[0])
        pb2 = op_a.pb2
        watch_b = op_b.watch(0, timeout=60)
        snap = next(watch_b)
        assert snap.kind == pb2.WatchResponse.SNAPSHOT
        # a write through A is seen by a watcher of B, and the other way round
        rev = op_a.put_policy(Policy(Endpoint(group="web"), Endpoint(group="db"), "tcp", ((5432, 5432),), "pg"))
        m = next(watch_b)
        assert m.base_revision == snap.revision and m.revision == rev
        assert [(c.id, c.policy.to_group) for c in m.changes] == [("pg", "db")]
        watch_a = op_a.watch(0, timeout=60)
        next(watch_a)
        rev2 = op_b.put_group("db", "from b")
        m = next(watch_a)
        assert m.revision == rev2 and m.changes[0].group.description == "from b"
        wait_for(lambda: a.store.head == b.store.head, what="replicas at the same head")
        assert a.store.journal() == b.store.journal()
        watch_a.cancel()
        # the leader goes away: B takes over the journal; B's watcher sees no gap
        resume_from, epoch = m.revision, m.epoch
        op_a.close()
        a.stop()
        wait_for(lambda: b.store.is_leader, timeout=30, what="B to lead")
        rev3 = op_b.put_group("db", "after failover")
        m = next(watch_b)
        assert m.base_revision == rev and m.kind == pb2.WatchResponse.DELTA  # rev2's change came first
        changes = list(m.changes)
        while m.revision < rev3:
            m = next(watch_b)
            changes += list(m.changes)
        assert [c.group.description for c in changes] == ["from b", "after failover"]
        assert [c.revision for c in changes] == [rev2, rev3] == [rev + 1, rev + 2]
        # a client of A resumes on B from A's revision: a delta, no snapshot
        call = op_b.watch(resume_from, epoch, timeout=10)
        m = next(call)
        call.cancel()
        assert m.kind == pb2.WatchResponse.DELTA and m.base_revision == resume_from and m.revision == rev3
        watch_b.cancel()
        op_b.close()


# --- slow consumers ---------------------------------------------------------------------------


def test_slow_consumer_gets_coalesced_updates(zk_server, zk_prefix, certs, monkeypatch):
    monkeypatch.setattr(servicer_mod, "COALESCE_AFTER", 8)
    with gs.controllers() as start:
        ctl = start(_cfg(zk_server, zk_prefix, certs))
        small_window = (*gs.FAST_CLIENT_OPTIONS, ("grpc.http2.bdp_probe", 0))
        from overlay.rpc.client import Client
        from overlay.rpc.tls import tls_from_dir

        with gs.client(ctl.address, certs[0]) as op, \
                Client(ctl.address, tls_from_dir(certs[0]), options=small_window) as slow:
            pb2 = op.pb2
            call = slow.watch(0, timeout=60)
            first = next(call)
            ips = {f"n{i}": op.allocate(f"n{i}") for i in range(4)}
            groups = tuple(f"group-with-a-rather-long-name-{g:02d}" for g in range(60))  # ~2.5 KiB records
            for nid in ips:
                op.set_node_groups(nid, groups)   # granted, so the records keep them
            updates = 240
            for i in range(updates):  # the consumer reads nothing meanwhile
                nid = f"n{i % 4}"
                op.register(gs.node(nid, ips[nid], groups=groups, index=1 + i % 250))
            head = ctl.store.head
            msgs = _read_until(call, pb2, head)
            call.cancel()
        assert any(m.coalesced for m in msgs), "no coalesced delta"
        assert len(msgs) < updates
        state = {}
        rev = first.revision
        for m in msgs:
            assert m.base_revision == rev
            rev = m.revision
            for c in m.changes:
                key, value = change_from_pb(c)
                state[key] = value
        assert rev == head
        assert {k: v for k, v in state.items() if k[0] == "node"} == \
            {k: v for k, v in _state_of(ctl.store).items() if k[0] == "node"}


# --- leases (issue 16) ------------------------------------------------------------------------


def _persistent(zk_client, path: str):
    """The stat of ``path`` if it exists and no session owns it (not ephemeral), else None."""
    stat = zk_client.exists(path)
    return stat if stat is not None and stat.ephemeralOwner == 0 else None


def test_a_nodes_record_lives_while_it_watches_plus_the_lease(zk_server, zk_prefix, certs, zk_client):
    with gs.controllers() as start:
        ctl = start(_cfg(zk_server, zk_prefix, certs, lease_s=1.0))
        path, mark = f"{zk_prefix}/nodes/web-1", f"{zk_prefix}/leases/web-1"
        with gs.client(ctl.address, certs[0], "web-1") as web1, gs.client(ctl.address, certs[0]) as op:
            ip = web1.allocate("web-1")
            web1.register(gs.node("web-1", ip))
            # persistent (no replica's session owns it) and leased
            assert _persistent(zk_client, path) and _persistent(zk_client, mark)
            assert ctl.store.held() == ["web-1"]
            wait_for(lambda: zk_client.exists(path) is None, timeout=8, what="the lease to expire")
            assert zk_client.exists(mark) is None and ctl.store.leases.expired_total == 1
            # with a Watch stream open the record stays
            call = web1.watch(0, timeout=30)
            next(call)
            web1.register(gs.node("web-1", ip))
            time.sleep(3.0)
            assert _persistent(zk_client, path) and ctl.store.held() == ["web-1"]
            call.cancel()
            wait_for(lambda: zk_client.exists(path) is None, timeout=8, what="the lease to expire after the stream")
            # an operator's registration is not leased: it stays until DeregisterNode
            ip2 = op.allocate("web-2")
            op.register(gs.node("web-2", ip2, index=2))
            time.sleep(3.0)
            assert _persistent(zk_client, f"{zk_prefix}/nodes/web-2") and not zk_client.exists(f"{zk_prefix}/leases/web-2")
            assert op.deregister("web-2") > 0 and zk_client.exists(f"{zk_prefix}/nodes/web-2") is None


def test_heartbeats_keep_a_record_that_does_not_watch(zk_server, zk_prefix, certs, zk_client):
    import grpc

    with gs.controllers() as start:
        ctl = start(_cfg(zk_server, zk_prefix, certs, lease_s=1.5))
        path = f"{zk_prefix}/nodes/web-1"
        with gs.client(ctl.address, certs[0], "web-1") as web1, gs.client(ctl.address, certs[0]) as op:
            with pytest.raises(NotFound, match="not registered"):
                web1.heartbeat("web-1")
            assert gs.code_of(lambda: web1.stub.Heartbeat(web1.pb2.HeartbeatRequest(node_id="web-2"), timeout=5)) \
                == grpc.StatusCode.PERMISSION_DENIED
            web1.register(gs.node("web-1", web1.allocate("web-1")))
            t0 = time.monotonic()
            while time.monotonic() - t0 < 5.0:       # three leases long, a heartbeat every 0.5 s
                assert web1.heartbeat("web-1") == 1.5
                assert _persistent(zk_client, path)
                time.sleep(0.5)
            assert op.heartbeat("web-1") == 1.5      # an operator may renew any node's lease
            wait_for(lambda: zk_client.exists(path) is None, timeout=10, what="expiry once the heartbeats stop")


def test_a_record_outlives_the_replica_it_was_registered_through(zk_server, zk_prefix, certs, zk_client):
    path = f"{zk_prefix}/nodes/web-1"
    with gs.controllers() as start:
        a = start(_cfg(zk_server, zk_prefix, certs, lease_s=2.0), replica="replica-a")
        b = start(_cfg(zk_server, zk_prefix, certs, lease_s=2.0), replica="replica-b")
        assert a.store.is_leader
        with gs.client(a.address, certs[0], "web-1") as via_a:
            ip = via_a.allocate("web-1")
            via_a.register(gs.node("web-1", ip))
            call = via_a.watch(0, timeout=60)
            next(call)
            holders = f"{zk_prefix}/holders"
            wait_for(lambda: b"web-1" in zk_client.get(f"{holders}/replica-a")[0], what="A publishes its holding")
            created = zk_client.exists(path).czxid
            # the replica it registered through (and the leader) goes: the record stays
            a.stop()
            call.cancel()
            assert zk_client.exists(f"{holders}/replica-a") is None
            wait_for(lambda: b.store.is_leader, timeout=30, what="B to lead")
            # the node fails over to B: it watches there, and is held there
            with gs.client(b.address, certs[0], "web-1") as via_b:
                call = via_b.watch(0, timeout=60)
                next(call)
                via_b.register(gs.node("web-1", ip))
                time.sleep(5.0)     # two and a half leases
                assert zk_client.exists(path).czxid == created     # never removed, never re-created
                assert b.store.held() == ["web-1"]
                call.cancel()
            # silent on every replica: gone one lease later
            wait_for(lambda: zk_client.exists(path) is None, timeout=10, what="expiry by the new leader")


def test_records_of_an_older_controller_are_made_persistent_and_leased(zk_server, zk_prefix, certs, zk_client):
    """What an older controller left: a record EPHEMERAL in its own session (which also holds
    its election member). A replica of this version makes it persistent and leased, so the old
    replica's going no longer removes it."""
    from kazoo.client import KazooClient

    for p in ("alloc/id-to-ip", "alloc/ip-to-id", "nodes", "controllers"):
        zk_client.ensure_path(f"{zk_prefix}/{p}")
    old = KazooClient(hosts=zk_server.address, timeout=10)
    old.start(timeout=15)
    try:
        old.create(f"{zk_prefix}/controllers/n-", b"old-replica", ephemeral=True, sequence=True)
        ip = "192.168.0.33"
        old.create(f"{zk_prefix}/alloc/id-to-ip/web-3", ip.encode())
        old.create(f"{zk_prefix}/alloc/ip-to-id/{ip}", b"web-3")
        record = json.dumps({"v": 1, **gs.node("web-3", ip, index=3).to_dict()}).encode()
        old.create(f"{zk_prefix}/nodes/web-3", record, ephemeral=True)
        # a ZooKeeper daemon's own ephemeral record (not a controller session) is left alone
        daemon = KazooClient(hosts=zk_server.address, timeout=10)
        daemon.start(timeout=15)
        daemon.create(f"{zk_prefix}/alloc/id-to-ip/web-2", b"192.168.0.32")
        daemon.create(f"{zk_prefix}/alloc/ip-to-id/192.168.0.32", b"web-2")
        daemon.create(f"{zk_prefix}/nodes/web-2", json.dumps({"v": 1, **gs.node("web-2", "192.168.0.32", index=2)
                                                               .to_dict()}).encode(), ephemeral=True)
        with gs.controllers() as start:
            ctl = start(_cfg(zk_server, zk_prefix, certs, lease_s=30.0))
            wait_for(lambda: _persistent(zk_client, f"{zk_prefix}/nodes/web-3"), what="the record made persistent")
            assert zk_client.get(f"{zk_prefix}/nodes/web-3")[0] == record
            assert _persistent(zk_client, f"{zk_prefix}/leases/web-3")
            assert zk_client.exists(f"{zk_prefix}/nodes/web-2").ephemeralOwner == daemon.client_id[0]
            assert ctl.store.leases.migrated_total == 1
            old.stop()     # the old replica goes: its session closes
            wait_for(lambda: ctl.store.is_leader, timeout=30, what="the new replica to lead")
            with gs.client(ctl.address, certs[0]) as op:
                wait_for(lambda: {n.node_id for n in op.list_nodes()[0]} == {"web-2", "web-3"},
                         what="both records in the journal")
        daemon.stop()
        daemon.close()
    finally:
        old.stop()
        old.close()


def test_records_survive_the_controllers_session_expiry(zk_server, zk_prefix, certs, zk_client):
    from tests.support.zk import expire_session

    with gs.controllers() as start:
        ctl = start(_cfg(zk_server, zk_prefix, certs))
        with gs.client(ctl.address, certs[0]) as op, gs.client(ctl.address, certs[0], "web-1") as web1:
            ip = web1.allocate("web-1")
            web1.register(gs.node("web-1", ip))
            path = f"{zk_prefix}/nodes/web-1"
            created = zk_client.exists(path).czxid
            old = ctl.store.session_id
            expire_session(ctl.store._zk.client)
            holders = f"{zk_prefix}/holders/{ctl.store.replica}"
            wait_for(lambda: ctl.store.session_id not in (0, old) and zk_client.exists(holders) is not None
                     and zk_client.exists(holders).ephemeralOwner == ctl.store.session_id,
                     timeout=20, what="the holdings published again under the new session")
            assert zk_client.exists(path).czxid == created      # never removed
            assert op.get_node("web-1").overlay == ip
            # and the journal still advances: the replica leads again
            rev = op.put_group("after", "expiry")
            assert rev > 0
