"""Reliability test 2 (issue 16): ZooKeeper black-holed past the session timeout.

Three daemons (ZooKeeper registry, dry-run datapath: what they applied shows in
/status) and ZooKeeper each in a namespace of their own, on one switch. ZooKeeper's
packets are then dropped, both ways, inside its namespace (iptables DROP: nothing is
refused, the connections just go silent) for three session timeouts, so ZooKeeper
expires every session and deletes every record. Meanwhile every daemon fails static:
not ready, every peer still applied (polled many times a second). Once the packets flow
again, every daemon re-registers under a new session with the same overlay address, and
all converge.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import pytest

from overlay.zk.server import ZooKeeperServer
from tests.support.daemons import Daemon, peer_ids, statuses
from tests.support.netns import NetnsSet, require_root, veth
from tests.support.reliability import PeerWatch
from tests.support.wait import wait_for
from tests.support.zk import read_in_netns

pytestmark = [pytest.mark.root, pytest.mark.zk]

ZK_IP, ZK_PORT = "10.0.0.100", 2181
SESSION_S = 4.0
NODES = {"d1": "10.0.0.1", "d2": "10.0.0.2", "d3": "10.0.0.3"}
DROP = (("INPUT", "--dport"), ("OUTPUT", "--sport"))


def _records(zk_ns: str) -> dict[str, tuple[str, int]]:
    """node_id -> (overlay, owning session) of every record, read from inside ZooKeeper's namespace."""

    def read(c) -> dict[str, tuple[str, int]]:
        out = {}
        for n in c.get_children("/bh/nodes"):
            data, st = c.get(f"/bh/nodes/{n}")
            out[n] = (json.loads(data)["overlay"], st.ephemeralOwner)
        return out

    return read_in_netns(zk_ns, f"{ZK_IP}:{ZK_PORT}", read)


@pytest.mark.timeout(600)
def test_zookeeper_black_holed_past_the_session_timeout():
    require_root()
    if not os.path.exists("/usr/share/java/zookeeper.jar"):
        pytest.skip("ZooKeeper is not installed")
    work = tempfile.mkdtemp(prefix="ovl-blackhole-")
    made = NetnsSet()
    zk = None
    daemons: list[Daemon] = []
    watch = None
    try:
        sw = made("bhsw")
        sw.run("ip", "link", "add", "br0", "type", "bridge")
        sw.run("ip", "link", "set", "br0", "up")
        zk_ns = made("bhzk")
        for i, (name, ip) in enumerate([("bhzk", ZK_IP), *((f"bh{n}", ip) for n, ip in NODES.items())]):
            ns = zk_ns if name == "bhzk" else made(name)
            veth(ns, "eth0", sw, f"p{i}")
            sw.run("ip", "link", "set", f"p{i}", "master", "br0")
            ns.run("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        zk = ZooKeeperServer(os.path.join(work, "zk"), ZK_IP, ZK_PORT, netns=zk_ns.name, fsync=False, heap_mb=256,
                             die_with_parent=True)
        zk.start(timeout=60)
        for n, ip in NODES.items():
            d = Daemon(f"{made.prefix}bh{n}", {
                "node_id": n, "network": "ec2", "addresses": {"private": ip, "public": f"198.18.1.{ip.rsplit('.', 1)[1]}"},
                "registry": {"backend": "zookeeper", "hosts": [f"{ZK_IP}:{ZK_PORT}"], "prefix": "/bh",
                             "timeout_s": SESSION_S},
                "datapath": {"backend": "dryrun"}, "state_dir": os.path.join(work, n, "state"),
            }, os.path.join(work, n))
            d.start()
            daemons.append(d)
        names = [d.netns for d in daemons]

        def converged():
            got = statuses(names)
            return all(s and s["ready"] and peer_ids(s) == set(NODES) - {s["node_id"]} for s in got) and got

        got = wait_for(converged, timeout=60, what="three daemons ready, each with the two others")
        overlays = {s["node_id"]: s["overlay"] for s in got}
        before = _records(zk_ns.name)
        assert {n: o for n, (o, _s) in before.items()} == overlays
        watch = PeerWatch({d.node_id: d.netns for d in daemons},
                          {n: {overlays[o] for o in NODES if o != n} for n in NODES}, interval=0.2).start()

        # black hole: drop (not refuse) every ZooKeeper packet, both ways
        for chain, port_opt in DROP:
            zk_ns.run("iptables", "-I", chain, "-p", "tcp", port_opt, str(ZK_PORT), "-j", "DROP")
        t0 = time.monotonic()
        time.sleep(SESSION_S)
        during = []
        while time.monotonic() - t0 < 3 * SESSION_S:
            during.append(statuses(names))
            time.sleep(1.0)
        for chain, port_opt in DROP:
            zk_ns.run("iptables", "-D", chain, "-p", "tcp", port_opt, str(ZK_PORT), "-j", "DROP")
        held_s = time.monotonic() - t0
        # fail static all along: not ready, every peer still applied
        assert during and all(s and not s["ready"] and not s["registry"]["connected"] for got in during for s in got)
        assert all(peer_ids(s) == set(NODES) - {s["node_id"]} for got in during for s in got)

        # the sessions expired: every daemon registers again, same overlay, new session
        wait_for(converged, timeout=60, what="convergence after the black hole")
        after = wait_for(lambda: (lambda r: r if len(r) == 3 else None)(_records(zk_ns.name)), timeout=30,
                         what="three records again")
        watch.stop()
        print(f"\nblack hole {held_s:.1f} s (session timeout {SESSION_S:g} s); "
              f"{watch.polls} polls; violations {watch.violations}")
        assert {n: o for n, (o, _s) in after.items()} == overlays
        assert all(after[n][1] != before[n][1] for n in NODES), "a session survived: no expiry was tested"
        assert watch.violations == [], "a daemon applied fewer peers"
        assert all("ZooKeeper session lost" in open(d.log).read() for d in daemons)
    finally:
        if watch is not None:
            watch.stop()
        for d in daemons:
            d.stop()
        if zk is not None:
            zk.stop()
        made.close()
        shutil.rmtree(work, ignore_errors=True)
