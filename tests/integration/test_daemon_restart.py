"""Restart and upgrade paths of the real daemon, under a live stream (issue 16).

Two members of one network (h1, h2) run ``overlay daemon`` (eBPF datapath, reject_all,
ZooKeeper registry in its own namespace on the same switch). h2 streams a paced 6 MiB
to h1's overlay address: h2's datapath translates it (NAT) and tracks it (conntrack).
Meanwhile h2's daemon is stopped with SIGTERM and started again twice:

1. a plain restart: the new process resumes the ZooKeeper session the old one left open
   (its record is never deleted: same czxid), adopts the pinned datapath (no compile);
2. an upgrade: the restart comes with a new build (``datapath.sizes.names`` changed, so
   the programs' digest differs and the programs must be compiled again, which takes
   seconds): the programs are replaced atomically (tc filter replace: new program ids,
   the filters run them), the NAT map and the stream's conntrack entry are kept.

All along, h1's daemon never loses h2 as a peer (its /status polled many times a second),
and the stream ends with every byte delivered in order (same count and sha256 at both
ends), no reset, and not one packet leaving h2's ovl0 untranslated (no window without a
program).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time

import pytest

from overlay.zk.server import ZooKeeperServer
from tests.support.daemons import Daemon, peer_ids, statuses
from tests.support.netns import HelperNetns, new_pin_root, require_bcc, veth
from tests.support.twonets import HOSTS, lab_context
from tests.support.wait import wait_for
from tests.support.zk import read_in_netns

pytestmark = [pytest.mark.root, pytest.mark.zk]

ZK_IP, ZK_PORT = "10.0.0.100", 2181
NBYTES = 6 * 1024 * 1024
SECONDS = 40.0
PORT = 7200


def _config(name: str, pin_root: str, state_dir: str, names_size: int = 65536) -> dict:
    h = HOSTS[name]
    return {
        "node_id": name, "network": h["network"],
        "addresses": {"private": h["private"], "public": h["public"], "overlay": h["overlay"]},
        "registry": {"backend": "zookeeper", "hosts": [f"{ZK_IP}:{ZK_PORT}"], "prefix": "/restart",
                     "timeout_s": 6},
        "datapath": {"backend": "ebpf", "interface": "eth0", "pin_root": pin_root,
                     "sizes": {"names": names_size}},
        "filter": {"reject_all": True},
        "state_dir": state_dir,
    }


def _rx_packets(ns, dev: str) -> int:
    link = json.loads(ns.run("ip", "-s", "-j", "link", "show", dev).stdout)[0]
    return int(link["stats64"]["rx"]["packets"])


def _filter_progs(ns) -> dict[str, int]:
    """The program id each of our tc filters on eth0 runs (from `tc -j`, not from the product)."""
    out = {}
    for direction in ("ingress", "egress"):
        for f in json.loads(ns.run("tc", "-j", "filter", "show", "dev", "eth0", direction).stdout or "[]"):
            opts = f.get("options", {})
            if "prog" in opts and str(opts.get("bpf_name", "")).startswith("ovl_"):
                out[direction] = opts["prog"]["id"]
    return out


def _maps(d: Daemon) -> dict:
    return json.loads(d.run("maps", "--json", "-c", d.config_path).stdout)


def _ct_has(maps: dict, dst: str, port: int) -> bool:
    """Does conntrack hold a flow to ``dst:port`` (an entry with both among its fields)?"""
    return any(dst in e.values() and port in e.values() for e in maps["ovl_ct"]["entries"])


def test_sigterm_restarts_and_an_upgrade_keep_peers_nat_and_the_stream():
    require_bcc()
    work = tempfile.mkdtemp(prefix="ovl-restart-")
    with lab_context() as lab:
        zk_ns = HelperNetns.add(f"ovt{os.getpid()}-zk")
        zk = None
        daemons: dict[str, Daemon] = {}
        try:
            veth(zk_ns, "eth0", lab.ns["sw"], "pz")
            lab.ns["sw"].run("ip", "link", "set", "pz", "master", "br0")
            zk_ns.run("ip", "addr", "add", f"{ZK_IP}/24", "dev", "eth0")
            zk = ZooKeeperServer(os.path.join(work, "zk"), ZK_IP, ZK_PORT, netns=zk_ns.name, fsync=False,
                                 heap_mb=256, die_with_parent=True)
            zk.start(timeout=60)
            pins = {n: new_pin_root(f"rs{n}") for n in ("h1", "h2")}
            for n in ("h1", "h2"):
                daemons[n] = Daemon(lab.ns[n].name, _config(n, pins[n], os.path.join(work, n, "state")),
                                    os.path.join(work, n))
                daemons[n].start()
            h1, h2 = daemons["h1"], daemons["h2"]

            def converged():
                s1, s2 = statuses([h1.netns, h2.netns])
                return s1 and s2 and s1["ready"] and s2["ready"] and peer_ids(s1) == {"h2"} and peer_ids(s2) == {"h1"}

            wait_for(converged, timeout=90, what="both daemons ready, each the other's peer")
            for n in ("h1", "h2"):
                lab.ns[n].offload_off("ovl0")
                lab.ns[n].offload_off("ovl0p")
            ns2 = lab.ns["h2"]
            untranslated0 = _rx_packets(ns2, "ovl0p")
            record = "/restart/nodes/h2"
            zk_stat = lambda: _zk_stat(zk_ns.name, record)  # noqa: E731
            created = zk_stat()

            # h1 watches: h2 must never leave its peers
            lost: list[float] = []
            stop = threading.Event()

            def watch():
                while not stop.is_set():
                    s = statuses([h1.netns])[0]
                    if s is None or "h2" not in (peer_ids(s) or set()):
                        lost.append(time.monotonic())
                    time.sleep(0.1)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            srv = lab.ns["h1"].helper_bg("stream-serve", port=PORT, nbytes=NBYTES, timeout=SECONDS + 60)
            cli = ns2.helper_bg("stream-send", host=HOSTS["h1"]["overlay"], port=PORT, nbytes=NBYTES,
                                seconds=SECONDS, chunks=400, timeout=SECONDS + 60)
            assert cli.first == {"connected": True}
            time.sleep(2.0)
            before = _maps(h2)
            progs_before = _filter_progs(ns2)
            assert _ct_has(before, HOSTS["h1"]["private"], PORT), "the stream is not tracked"

            # 1. SIGTERM, start again: session resumed, datapath adopted
            t0 = time.monotonic()
            h2.stop()
            h2.start()
            wait_for(lambda: (s := h2.status()) and s["ready"], timeout=60, what="h2 ready after the restart")
            plain_s = time.monotonic() - t0
            assert "resumed ZooKeeper session" in open(h2.log).read()
            assert "adopted pinned datapath" in open(h2.log).read().split("---- test: starting")[-1]
            assert _filter_progs(ns2) == progs_before
            assert cli.poll() is None, "the stream ended during the restart"

            # 2. an upgrade: a new build (another digest): compiled, replaced atomically
            t0 = time.monotonic()
            h2.stop()
            h2.write(_config("h2", pins["h2"], os.path.join(work, "h2", "state"), names_size=32768))
            h2.start()
            wait_for(lambda: (s := h2.status()) and s["ready"], timeout=90, what="h2 ready after the upgrade")
            upgrade_s = time.monotonic() - t0
            last_run = open(h2.log).read().split("---- test: starting")[-1]
            assert "loaded and attached the datapath" in last_run and "resumed ZooKeeper session" in last_run
            after = _maps(h2)
            progs_after = _filter_progs(ns2)
            assert after["digest"] != before["digest"]
            assert progs_after.keys() == progs_before.keys() == {"ingress", "egress"}
            assert all(progs_after[k] != progs_before[k] for k in progs_after)      # new programs
            assert after["ovl_nat"]["entries"] == before["ovl_nat"]["entries"]        # NAT kept
            assert after["ovl_names"]["max_entries"] == 32768
            assert _ct_has(after, HOSTS["h1"]["private"], PORT), "the stream's conntrack entry was lost"

            sent = _finish(cli)
            got = _finish(srv)
            stop.set()
            watcher.join(5)
            assert sent["error"] is None and got["error"] is None, (sent, got)
            assert sent["sent"] == got["received"] == NBYTES
            assert got["sha256"] == sent["sha256"] == sent["echo"]
            assert _rx_packets(ns2, "ovl0p") == untranslated0, "packets left ovl0 untranslated"
            assert not lost, f"h1 lost h2 as a peer {len(lost)} times"
            assert zk_stat() == created, "h2's record was deleted and re-created"
            print(f"\nrestart {plain_s:.1f} s, upgrade (compile) {upgrade_s:.1f} s; h2 never left h1's peers")
        finally:
            for d in daemons.values():
                d.stop()
            if zk is not None:
                zk.stop()
            zk_ns.delete()
            shutil.rmtree(work, ignore_errors=True)


def _zk_stat(ns: str, path: str) -> tuple[int, int] | None:
    """(czxid, ephemeralOwner) of ``path``, read with kazoo from inside ``ns``."""
    st = read_in_netns(ns, f"{ZK_IP}:{ZK_PORT}", lambda c: c.exists(path))
    return (st.czxid, st.ephemeralOwner) if st else None


def _finish(proc, timeout: float = SECONDS + 60) -> dict:
    out, err = proc.communicate(timeout=timeout)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, err
    return json.loads(lines[-1])
