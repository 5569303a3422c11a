"""One lab, one timeline: reliability tests 1, 3, 4 and 7 (issue 16) in a single run.

The lab: the default topology with a three-server ZooKeeper ensemble (a namespace per
server), two controller replicas, ec2 (through ZooKeeper) with two members, vpc (through
the controllers) with four. Its controllers' ``lease_s`` outlasts test 1's stop. Every
scenario keeps the same promise: no daemon ever applies fewer peers (a :class:`PeerWatch`
polls every running daemon's ``/status`` every second), and the connectivity matrix stays
as expected (checked at every step). So they run one after another while test 1's two
stopped daemons stay stopped (a 5-minute wait, used by the others):

====  =====================================================================================
 1    vpc-api's daemon SIGSTOPped, vpc-db's SIGKILLed, for ``daemon_stopped_s``; then
      continued / started again (it adopts its pins)
 3    the controller replica the vpc daemons use is killed (SIGKILL) under a live stream
      between two vpc hosts: each live vpc daemon is on the other replica within 5 s; the
      stream loses nothing; the replica is started again
 4    both replicas down for ``controllers_down_s``: the vpc daemons fail static (not
      ready, datapath as it was); back up: converged within 10 s
 7    a ZooKeeper follower killed, then the leader (no quorum left): the ec2 daemons fail
      static, the controllers keep serving; the leader back (a quorum): an overlay address
      is allocated through ZooKeeper and through a controller; the follower back
====  =====================================================================================

It runs in a thread (:class:`FleetTimeline`) while the suite's other tests run; each of
the four tests waits for its part and asserts on what it recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field

from overlay import netns as nx
from overlay.lab.check import format_matrix
from tests.support.daemons import peer_ids, statuses
from tests.support.lab import make_lab
from tests.support.paths import PYTHON, REPO, program
from tests.support.reliability import Durations, PeerWatch, topology_file

VPC_API = {"name": "vpc-api", "private": "10.0.0.14", "public": "198.18.2.14", "groups": ["api"]}
STREAM_PORT = 7400
STREAM_BYTES = 4 * 1024 * 1024
STREAM_S = 15.0


@dataclass
class Part:
    """What one test of the timeline recorded."""

    done: threading.Event = field(default_factory=threading.Event)
    start: float = 0.0
    end: float = 0.0
    data: dict = field(default_factory=dict)


class FleetTimeline:
    def __init__(self, durations: Durations, workdir: str):
        self.d = durations
        self.workdir = workdir
        self.parts = {k: Part() for k in ("t1", "t3", "t4", "t7")}
        self.error: str | None = None
        self.matrix_failures: list[tuple[float, str, str]] = []
        self.watch: PeerWatch | None = None
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._main, name="fleet-timeline", daemon=True)
        self.finished = threading.Event()

    # --- for the tests ----------------------------------------------------------------

    def start(self) -> FleetTimeline:
        self.thread.start()
        return self

    def wait(self, key: str, timeout: float) -> Part:
        part = self.parts[key]
        if not part.done.wait(timeout):
            raise AssertionError(f"the fleet timeline did not reach the end of {key} in {timeout:g} s")
        if self.error is not None and not part.data:
            raise AssertionError(f"the fleet timeline failed before {key} finished:\n{self.error}")
        return part

    def violations_in(self, part: Part) -> list:
        return [v for v in (self.watch.violations if self.watch else []) if part.start <= v[0] <= part.end]

    def matrix_failures_in(self, part: Part) -> list:
        return [m for m in self.matrix_failures if part.start <= m[0] <= part.end]

    def close(self, timeout: float) -> None:
        self.finished.wait(timeout)

    # --- the timeline -------------------------------------------------------------------

    def _main(self) -> None:
        self.lab = None
        try:
            self._run()
        except BaseException:  # noqa: BLE001 - reported to the tests
            self.error = traceback.format_exc()
        finally:
            if self.watch is not None:
                self.watch.stop()
            for part in self.parts.values():
                part.end = part.end or time.monotonic()
                part.done.set()
            try:
                if self.lab is not None:
                    self.lab.down()
            finally:
                self.finished.set()

    def _check(self, label: str) -> None:
        results, ok = self.lab.check()
        if not ok:
            self.matrix_failures.append((time.monotonic(), label,
                                         format_matrix(self.lab.topology(), results, verbose=False)))

    def _status(self, host: str) -> dict | None:
        return statuses([self.lab.names.host(host)])[0]

    def _pid(self, key: str) -> int:
        return self.lab.load_state()["procs"][key]["pid"]

    def _run(self) -> None:
        topo_path = topology_file(os.path.join(self.workdir, "topology.yaml"), ensemble=3,
                                  lease_s=self.d.daemon_stopped_s + 120, extra_vpc=(VPC_API,), drop_ec2=("ec2-app",))
        lab = self.lab = make_lab("rel", self.lines, topology=topo_path)
        lab.down()
        lab.up(ready_timeout=240)
        topo = lab.topology()
        overlays = dict(lab.load_state()["overlays"])
        members = [h.name for h in topo.members]
        self.overlays = overlays
        self.watch = PeerWatch({h: lab.names.host(h) for h in members},
                               {h: {overlays[o] for o in members if o != h} for h in members}).start()
        self._check("lab up")

        # --- test 1 starts: two vpc daemons stop (one hung, one crashed) ---------------
        t1 = self.parts["t1"]
        t1.start = time.monotonic()
        stopped = {"vpc-api", "vpc-db"}
        self.watch.skip |= stopped     # they do not answer (the matrix checks their datapaths)
        os.kill(self._pid("daemon:vpc-api"), signal.SIGSTOP)
        lab.kill_daemon("vpc-db", signal.SIGKILL)
        self._check("vpc-api stopped, vpc-db killed")
        live_grpc = ["vpc-web", "vpc-app"]
        live = [h for h in members if h not in stopped]

        # --- test 3: the replica in use is killed under a live stream ------------------
        t3 = self.parts["t3"]
        t3.start = time.monotonic()
        using = {h: self._status(h)["registry"]["controller"] for h in live_grpc}
        victim = topo.controllers.index(using["vpc-web"]) + 1
        victim_addr = topo.controllers[victim - 1]
        srv, cli = self._stream("vpc-web", "vpc-app")
        time.sleep(2.0)
        t_kill = time.monotonic()
        lab.controller_stop(victim, signal.SIGKILL)
        failover: dict[str, float | None] = {h: None for h in live_grpc}
        while time.monotonic() - t_kill < 20 and any(v is None for v in failover.values()):
            for h, s in zip(live_grpc, statuses([lab.names.host(h) for h in live_grpc]), strict=True):
                reg = (s or {}).get("registry", {})
                if failover[h] is None and reg.get("connected") and reg.get("controller") != victim_addr:
                    failover[h] = round(time.monotonic() - t_kill, 2)
            time.sleep(0.1)
        stream = {"sender": self._finish(cli), "receiver": self._finish(srv)}
        self._check("one controller replica killed")
        t3.data = {"victim": victim_addr, "using": using, "failover_s": failover, "stream": stream,
                   "vpc_ready": {h: (self._status(h) or {}).get("ready") for h in live_grpc}}
        lab.controller_start(victim)
        t3.end = time.monotonic()
        t3.done.set()

        # --- test 4: every controller down ----------------------------------------------
        t4 = self.parts["t4"]
        t4.start = time.monotonic()
        lab.controller_stop(sig=signal.SIGKILL)
        down_at = time.monotonic()
        seen_down: dict[str, dict] = {}
        while time.monotonic() - down_at < self.d.controllers_down_s:
            for h, s in zip(live_grpc, statuses([lab.names.host(h) for h in live_grpc]), strict=True):
                if s is not None:
                    seen_down[h] = {"ready": s["ready"], "connected": s["registry"]["connected"],
                                    "peers": len(s["peers"])}
            self._check("every controller down")
            time.sleep(max(0.0, min(30.0, down_at + self.d.controllers_down_s - time.monotonic())))
        t4.data["down_s"] = round(time.monotonic() - down_at, 1)
        lab.controller_start()
        up_at = time.monotonic()
        t4.data["converged_s"] = self._converged(live, members, since=up_at, timeout=60)
        self._check("controllers back")
        t4.data["seen_down"] = seen_down
        t4.end = time.monotonic()
        t4.done.set()

        # --- test 7: the ZooKeeper ensemble loses a follower, then its leader -----------
        t7 = self.parts["t7"]
        t7.start = time.monotonic()
        roles = {i: lab.zookeeper_role(i) for i in (1, 2, 3)}
        leader = next(i for i, r in roles.items() if r == "leader")
        follower = next(i for i, r in roles.items() if r == "follower")
        ec2 = [h for h in members if topo.registry_of(h) == "zookeeper"]
        lab.zookeeper_stop(follower, signal.SIGKILL)
        time.sleep(15)
        after_follower = {h: (self._status(h) or {}).get("ready") for h in live}
        self._check("a ZooKeeper follower killed")
        lab.zookeeper_stop(leader, signal.SIGKILL)
        time.sleep(20)
        no_quorum = {h: (self._status(h) or {}).get("ready") for h in live}
        self._check("the ZooKeeper leader killed too (no quorum)")
        lab.zookeeper_start(leader)
        quorum_at = time.monotonic()
        t7.data["ec2_back_s"] = self._ready(ec2, timeout=60, since=quorum_at)
        t7.data["allocated"] = self._allocate_both_ways()
        lab.zookeeper_start(follower)
        t7.data["converged_s"] = self._converged(live, members, since=quorum_at, timeout=60)
        self._check("the ensemble whole again")
        t7.data.update(roles=roles, leader=leader, follower=follower, after_follower=after_follower,
                       no_quorum=no_quorum, ec2=ec2)
        t7.end = time.monotonic()
        t7.done.set()

        # --- test 1 ends: the stopped daemons come back ----------------------------------
        time.sleep(max(0.0, t1.start + self.d.daemon_stopped_s - time.monotonic()))
        self._check("at the end of the stop")
        t1.data["stopped_s"] = round(time.monotonic() - t1.start, 1)
        os.kill(self._pid("daemon:vpc-api"), signal.SIGCONT)
        lab.start_daemon("vpc-db")
        t1.data["back_s"] = self._converged(members, members, since=time.monotonic(), timeout=120)
        self.watch.skip -= stopped
        self._check("the stopped daemons back")
        s = self._status("vpc-db")
        t1.data["vpc_db"] = {"ready": s["ready"], "ops_total": s["ops_total"]}
        t1.data["adopted"] = "adopted pinned datapath" in open(lab.daemon_log("vpc-db")).read().split("---- lab:")[-1]
        t1.end = time.monotonic()
        t1.done.set()
        self.watch.stop()

    # --- helpers --------------------------------------------------------------------------

    def _ready(self, hosts: list[str], timeout: float, since: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = statuses([self.lab.names.host(h) for h in hosts])
            if all(s is not None and s["ready"] for s in got):
                return round(time.monotonic() - since, 2)
            time.sleep(0.1)
        return None

    def _converged(self, hosts: list[str], members: list[str], since: float, timeout: float) -> float | None:
        """Seconds from ``since`` until the daemon of every one of ``hosts`` is ready, connected
        and has every other member as a peer (None if not within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = statuses([self.lab.names.host(h) for h in hosts])
            if all(s is not None and s["ready"] and s["registry"]["connected"] and
                   peer_ids(s) == set(members) - {h} for h, s in zip(hosts, got, strict=True)):
                return round(time.monotonic() - since, 2)
            time.sleep(0.1)
        return None

    def _stream(self, src: str, dst: str):
        def start(where: str, action: str, **args):
            argv = nx.nsenter(self.lab.names.host(where), [*program("dpctl"), action, json.dumps(args)])
            proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            first = proc.stdout.readline()
            assert first.startswith("{"), proc.stderr.read() if proc.poll() is not None else first
            return proc

        srv = start(dst, "stream-serve", port=STREAM_PORT, nbytes=STREAM_BYTES, timeout=STREAM_S + 40)
        cli = start(src, "stream-send", host=self.overlays[dst], port=STREAM_PORT, nbytes=STREAM_BYTES,
                    seconds=STREAM_S, chunks=300, timeout=STREAM_S + 40)
        return srv, cli

    @staticmethod
    def _finish(proc) -> dict:
        out, err = proc.communicate(timeout=STREAM_S + 60)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        return json.loads(lines[-1]) if lines else {"error": err}

    def _allocate_both_ways(self) -> dict:
        """Allocate an overlay address through ZooKeeper (from ec2-web) and through a
        controller (from the ZooKeeper machine, operator certificate)."""
        topo = self.lab.topology()
        zk_script = (
            "import ipaddress, sys; from overlay.config import RegistryConfig; "
            "from overlay.registry.zookeeper import ZooKeeperRegistry; "
            "r = ZooKeeperRegistry(RegistryConfig(hosts=tuple(sys.argv[1].split(',')), timeout_s=10), "
            "ipaddress.IPv4Network(sys.argv[2]), 'rel-probe-zk'); print(r.allocate('rel-probe-zk')); r.close()")
        grpc_script = (
            "import sys; from overlay.rpc.client import Client; from overlay.rpc.tls import tls_from_dir; "
            "c = Client(sys.argv[1], tls_from_dir(sys.argv[2]), timeout=20); print(c.allocate('rel-probe-grpc'))")
        out = {}
        for key, ns, argv in (
                ("zookeeper", self.lab.names.host("ec2-web"), [PYTHON, "-c", zk_script, topo.zookeeper,
                                                               str(topo.overlay_subnet)]),
                ("controller", self.lab.names.zookeeper(topo), [PYTHON, "-c", grpc_script, topo.controller,
                                                                 self.lab.certs_dir])):
            proc = nx.run(nx.nsenter(ns, argv), timeout=60, check=False)
            out[key] = proc.stdout.strip() if proc.returncode == 0 else f"failed: {proc.stderr.strip()[-300:]}"
        return out
