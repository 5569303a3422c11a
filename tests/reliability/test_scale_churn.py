"""Reliability test 5 (issue 16): 5,000 records, 20 watching daemons, 20 changes a second
for 2 minutes (10 with --soak-long).

The records are written straight into ZooKeeper (allocations and node records, valid), a
controller (its own process) journals them, and 20 daemons follow it: agents with the
dry-run datapath, each with its own grpc registry (its own stream, its own certificate),
10 to a process (``tests.support.fleet``). Then the test changes records at 20 a second:
re-addressed (a new public address: a changed NAT entry for half the daemons' view),
regrouped, removed, added back, keeping its own model of what it wrote.

At the end every daemon's applied peers equal the model (the test computes the expected
set itself: each record's real address is its private one for the daemons' network,
``ec2``, else its public one), no stream ever needed a fresh snapshot or a reconnection
(no event was lost or skipped), and no process grew past its memory bound.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import subprocess
import tempfile
import time

import pytest
import yaml

from tests.support import grpc as gs
from tests.support.fleet import digest, peak_rss_kb
from tests.support.paths import PYTHON, REPO, program
from tests.support.wait import free_port, wait_for

pytestmark = [pytest.mark.zk]

RECORDS = 5000
WATCHERS = 20
PER_PROCESS = 10
RATE = 20                      # changes per second
SUBNET = ipaddress.IPv4Network("192.168.0.0/17")
# memory bounds (peak RSS): a regression guard, far above what a run uses (printed)
CONTROLLER_RSS_MB = 300
FLEET_RSS_MB = 500             # per process of 10 agents, each with 5,000 peers


def _record(i: int, rev: int) -> dict:
    net = "ec2" if i % 2 else "vpc"
    return {"v": 1, "node_id": f"n{i}", "network": net, "private": f"10.{i // 250 % 250}.{i % 250}.{1 + rev % 200}",
            "public": f"198.{18 + rev % 2}.{i // 250 % 250}.{1 + i % 250}",
            "overlay": str(SUBNET.network_address + 1 + i), "groups": [f"g{rev % 7}"], "open_ports": [80 + rev % 3]}


def _expected(model: dict[str, dict]) -> str:
    return digest([(r["node_id"], r["overlay"], r["private"] if r["network"] == "ec2" else r["public"])
                   for r in model.values()])


@pytest.mark.timeout(2400)
def test_5000_records_20_watchers_under_churn(zk_server, zk_prefix, zk_client, durations):
    rng = random.Random(16)
    work = tempfile.mkdtemp(prefix="ovl-churn-")
    procs: list[subprocess.Popen] = []
    try:
        certs = os.path.join(work, "certs")
        from overlay.controller import certs as certs_mod

        certs_mod.init(certs)
        watchers = [f"w{i}" for i in range(WATCHERS)]
        for w in watchers:
            certs_mod.issue(certs, w)
        # the records, straight into ZooKeeper (pipelined)
        for p in ("alloc/id-to-ip", "alloc/ip-to-id", "nodes", "policies", "config"):
            zk_client.ensure_path(f"{zk_prefix}/{p}")
        model: dict[str, dict] = {}
        pending = []
        for i in range(RECORDS):
            rec = _record(i, 0)
            model[rec["node_id"]] = rec
            pending += [zk_client.create_async(f"{zk_prefix}/alloc/id-to-ip/n{i}", rec["overlay"].encode()),
                        zk_client.create_async(f"{zk_prefix}/alloc/ip-to-id/{rec['overlay']}", f"n{i}".encode()),
                        zk_client.create_async(f"{zk_prefix}/nodes/n{i}", json.dumps(rec).encode())]
        for res in pending:
            res.get(timeout=60)

        # the controller, in its own process
        port = free_port()
        ctl_cfg = os.path.join(work, "controller.yaml")
        with open(ctl_cfg, "w") as fh:
            yaml.safe_dump({"overlay_subnet": str(SUBNET),
                            "registry": {"hosts": [zk_server.address], "prefix": zk_prefix},
                            "controller": {"listen": f"127.0.0.1:{port}", "tls": {
                                "ca": f"{certs}/ca.crt", "cert": f"{certs}/controller.crt",
                                "key": f"{certs}/controller.key"}}}, fh)
        ctl_log = open(os.path.join(work, "controller.log"), "w")
        ctl = subprocess.Popen([PYTHON, "-m", "overlay.cli", "controller", "-c", ctl_cfg],
                               stdout=ctl_log, stderr=subprocess.STDOUT, cwd=REPO)
        procs.append(ctl)
        with gs.client(f"127.0.0.1:{port}", certs) as op:
            wait_for(lambda: len(op.list_nodes()[0]) == RECORDS, timeout=120, interval=0.5,
                     ignore=(Exception,), what="the controller to journal every record")

        # 20 watching daemons, 10 to a process
        fleet = []
        for k in range(0, WATCHERS, PER_PROCESS):
            names = watchers[k:k + PER_PROCESS]
            args = {"nodes": names, "controllers": [f"127.0.0.1:{port}"], "certs": certs, "subnet": str(SUBNET),
                    "throttle": [2.0, 4.0],
                    "self_overlays": [str(SUBNET.broadcast_address - 1 - k - j) for j in range(len(names))]}
            p = subprocess.Popen([*program("fleet"), json.dumps(args)], cwd=REPO, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=open(os.path.join(work, f"fleet{k}.log"), "w"),
                                 text=True)
            procs.append(p)
            assert json.loads(p.stdout.readline())["started"] == len(names)
            fleet.append(p)

        def reports() -> list[dict]:
            out = []
            for p in fleet:
                p.stdin.write("report\n")
                p.stdin.flush()
                out.append(json.loads(p.stdout.readline()))
            return out

        def all_equal(want: str):
            got = reports()
            agents = {n: a for r in got for n, a in r["agents"].items()}
            return got if all(a["ready"] and a["digest"] == want for a in agents.values()) else None

        wait_for(lambda: all_equal(_expected(model)), timeout=180, interval=2.0, what="every watcher in sync")

        # churn: RATE changes a second, each one znode write, paced
        removed: set[str] = set()
        counts = {"readdressed": 0, "regrouped": 0, "removed": 0, "added": 0}
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < durations.churn_s:
            i = rng.randrange(RECORDS)
            node_id, path = f"n{i}", f"{zk_prefix}/nodes/n{i}"
            roll = rng.random()
            if node_id in removed:
                rec = _record(i, n + 1)
                zk_client.create_async(path, json.dumps(rec).encode())
                model[node_id] = rec
                removed.discard(node_id)
                counts["added"] += 1
            elif roll < 0.15:
                zk_client.delete_async(path)
                del model[node_id]
                removed.add(node_id)
                counts["removed"] += 1
            else:
                rec = _record(i, n + 1) if roll < 0.6 else {**model[node_id], "groups": [f"g{n % 7}", "churn"]}
                zk_client.set_async(path, json.dumps(rec).encode())
                model[node_id] = rec
                counts["readdressed" if roll < 0.6 else "regrouped"] += 1
            n += 1
            time.sleep(max(0.0, t0 + n / RATE - time.monotonic()))
        churn_s = time.monotonic() - t0
        t_end = time.monotonic()
        got = wait_for(lambda: all_equal(_expected(model)), timeout=120, interval=1.0,
                       what="every watcher equal to the registry after the churn")
        settle_s = time.monotonic() - t_end
        agents = {name: a for r in got for name, a in r["agents"].items()}
        fleet_rss = [r["rss_kb"] // 1024 for r in got]
        ctl_rss = peak_rss_kb(ctl.pid) // 1024
        with gs.client(f"127.0.0.1:{port}", certs) as op:
            listed = {nd.node_id for nd in op.list_nodes()[0]}
        print(f"\n{n} changes in {churn_s:.0f} s ({n / churn_s:.1f}/s: {counts}); {len(model)} records at the end; "
              f"every watcher equal {settle_s:.1f} s after; peak RSS controller {ctl_rss} MB, "
              f"fleet processes {fleet_rss} MB; journal head {max(a['revision'] for a in agents.values())}")
        assert listed == set(model)                       # the controller agrees with the model
        assert all(a["peers"] == len(model) for a in agents.values())
        assert all(a["snapshots"] == 1 and a["resets"] == 0 and a["reconnects"] == 0 for a in agents.values()), agents
        assert n >= RATE * durations.churn_s * 0.9
        assert ctl_rss <= CONTROLLER_RSS_MB and all(r <= FLEET_RSS_MB for r in fleet_rss)
    finally:
        for p in procs:
            if p.stdin is not None:
                try:
                    p.stdin.write("stop\n")
                    p.stdin.flush()
                except OSError:
                    pass
            else:
                p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        shutil.rmtree(work, ignore_errors=True)
