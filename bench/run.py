"""Run the benchmarks: ``python -m bench run --profile full|quick|smoke``.

Topology (every namespace made here, ``ovl-bench-<pid>-*``; the root
namespace gets nothing)::

    ovl-bench-<pid>-bare  eth0 10.77.1.1 ---- cb 10.77.1.2 \\
    ovl-bench-<pid>-ipt   eth0 10.77.2.1 ---- ci 10.77.2.2  > ovl-bench-<pid>-srv  (ovlbench server)
    ovl-bench-<pid>-ebpf  eth0 10.77.3.1 ---- ce 10.77.3.2 /
    ovl-bench-<pid>-zk    lo: ZooKeeper, churner, K watchers (fanout)

One client namespace per backend, so that every repetition can measure the
three back to back (the order rotates) and a noisy neighbour hits them alike:
``bare`` has no program and no rule and talks to the server's real address;
``ipt`` and ``ebpf`` hold N peers (the target last in rule order) and talk to
the target's overlay address. Load generator clients run on CPU 0, the
server on CPU 1 (when there are two).

Both ends filtering (``--server-filter on``, the default; DESIGN §8): every backend
with a datapath (``iptables``, ``ebpf-tc``, ``ebpf-tc-before``, ``ebpf-socket``) gets a
server namespace of its own (``<client namespace>s``, e.g. ``ebpfs``) with its own
ovlbench server and a second datapath host running the SAME backend with ``reject_all``
and N peers, the client one member among them, as a real deployment does; their traffic
rows carry ``"server_filter": true``. ``bare`` (to the shared ``srv``) and ``bare-2`` (a
second bare client with a bare server of its own, ``bare2s``, set up like the others
but with no datapath: its ``*_vs_bare`` spread is the run's noise floor) stay bare on
both ends: rows ``"server_filter": false``. ``--server-filter off`` gives the older
client-only rows (every client to the shared ``srv``, ``"server_filter": false``).

Before/after rows in one run (``--backends ...,ebpf-tc-before``): ``ebpf-tc-before`` is
``ebpf-tc`` on the datapath of another revision (``--before-rev``, default the branch
point of issue 11; bench/before.py), on both ends, in its own namespaces ``ebfb`` /
``ebfbs`` (10.77.4.1 -> 10.77.4.2); ``ebpf-tc`` rows get paired ``<metric>_vs_before``.

``ebpf-socket``: ``ebpf-tc``'s client in socket mode, namespace ``ebs`` (10.77.7.1 ->
10.77.7.2); its processes (and its server's) run in cgroup-v2 directories of the run (the
datapaths' ``datapath.cgroup``), removed with the topology.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
import traceback

from bench import peers as fleetlib
from bench.netns import Topology, remove_stale
from bench.procs import BIN, BenchError, DpHost, LoadServer, build_loadgen, loadgen
from bench.results import ResultSet, make_row

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
DEFAULT_OUT = os.path.join(RESULTS_DIR, "latest.json")

PORT = 5000  # conn_setup; rr on PORT+1, stream on PORT+2
DATA_SUITES = ("conn_setup", "rr", "stream")
CONTROL_SUITES = ("update_one", "full_sync")
ALL_SUITES = ("full_sync", "update_one", "conn_setup", "rr", "stream", "memory", "fanout", "prog_cost",
              "controller_limits", "controller_fanout", "agent", "external")

CLIENTS = {  # backend -> (client namespace name, client address, server address)
    "bare": ("bare", "10.77.1.1", "10.77.1.2"),
    "iptables": ("ipt", "10.77.2.1", "10.77.2.2"),
    "ebpf-tc": ("ebpf", "10.77.3.1", "10.77.3.2"),
    "ebpf-tc-before": ("ebfb", "10.77.4.1", "10.77.4.2"),
    "ebpf-socket": ("ebs", "10.77.7.1", "10.77.7.2"),
    "bare-2": ("bare2", "10.77.8.1", "10.77.8.2"),
}
SRV_DEV = {"bare": "cb", "iptables": "ci", "ebpf-tc": "ce", "ebpf-tc-before": "cf",
           "ebpf-socket": "cs", "bare-2": "cb2"}  # the veth end in the shared "srv"
DP_BACKEND = {"iptables": "iptables", "ebpf-tc": "ebpf", "ebpf-tc-before": "ebpf", "ebpf-socket": "ebpf"}
BARE = ("bare", "bare-2")  # no program, no rule, on either end: the server's real address
# Backends in socket mode (datapath.mode: socket): their namespaces' processes run in
# cgroup-v2 directories of the run, which are the datapaths' datapath.cgroup.
SOCKET_MODE = ("ebpf-socket",)
# Backends that run the datapath of another revision (--before-rev, bench/before.py),
# and the backend of this revision they are paired with (<metric>_vs_before).
BEFORE = {"ebpf-tc-before": "ebpf-tc"}
CONTROL_BACKENDS = ("iptables", "ebpf-tc")
DEFAULT_BACKENDS = "bare,bare-2,iptables,ebpf-tc,ebpf-socket"  # full_sync, update_one, memory

PROFILES: dict[str, dict] = {
    "full": {
        "peers": [1, 1000, 10000, 50000], "reps": 7, "nice": -10,
        "conn_s": 1.0, "rr_s": 1.0, "stream_s": 1.5, "stream_reps": 5, "rr_size": 64,
        "update_reps": {"ebpf-tc": 20, "iptables": 10}, "update_reps_50k_iptables": 5,
        "map_write_reps": 50, "full_sync_reps": 3, "plan_diff_reps": 3, "prog_stats_s": 1.0,
        "memory_peers": [1000, 10000, 50000], "memory_reps": 3,
        "fanout_agents": [10, 25, 50], "fanout_peers": 1000, "fanout_rounds": 3,
        "fanout_changes": 20, "fanout_rate": 2.0, "fanout_settle_s": 4.0,
        "fanout_default_config": True,
        "limits_watches": 1000, "limits_registers": 10000, "limits_changes": 200, "limits_interval_s": 0.05,
        "limits_reps": 3,
        "agent_peers": [1000, 10000, 50000], "agent_change_reps": 200,
        "ctlfan_streams": [1000], "ctlfan_procs": 4, "ctlfan_changes": 20, "ctlfan_interval_s": 0.5,
        "ctlfan_reps": 3,
    },
    "quick": {
        "peers": [1, 10000], "reps": 3, "nice": -10,
        "conn_s": 1.0, "rr_s": 1.0, "stream_s": 1.0, "stream_reps": 3, "rr_size": 64,
        "update_reps": {"ebpf-tc": 10, "iptables": 5}, "update_reps_50k_iptables": 3,
        "map_write_reps": 20, "full_sync_reps": 2, "plan_diff_reps": 2, "prog_stats_s": 1.0,
        "memory_peers": [10000], "memory_reps": 2,
        "fanout_agents": [10], "fanout_peers": 500, "fanout_rounds": 2,
        "fanout_changes": 10, "fanout_rate": 4.0, "fanout_settle_s": 3.0,
        "fanout_default_config": False,
        "limits_watches": 1000, "limits_registers": 10000, "limits_changes": 100, "limits_interval_s": 0.05,
        "limits_reps": 1,
        "agent_peers": [1000, 10000], "agent_change_reps": 100,
        "ctlfan_streams": [1000], "ctlfan_procs": 4, "ctlfan_changes": 10, "ctlfan_interval_s": 0.5,
        "ctlfan_reps": 1,
    },
    "smoke": {
        "peers": [100], "reps": 1, "nice": None,
        "conn_s": 0.3, "rr_s": 0.3, "stream_s": 0.3, "stream_reps": 1, "rr_size": 64,
        "update_reps": {"ebpf-tc": 2, "iptables": 2}, "update_reps_50k_iptables": 1,
        "map_write_reps": 2, "full_sync_reps": 1, "plan_diff_reps": 1,
        "memory_peers": [100], "memory_reps": 1,
        "fanout_agents": [2], "fanout_peers": 20, "fanout_rounds": 1,
        "fanout_changes": 3, "fanout_rate": 10.0, "fanout_settle_s": 3.0,
        "fanout_default_config": True,
        "limits_watches": 100, "limits_registers": 1000, "limits_changes": 30, "limits_interval_s": 0.05,
        "limits_reps": 1,
        "agent_peers": [100], "agent_change_reps": 20,
        "ctlfan_streams": [20], "ctlfan_procs": 2, "ctlfan_changes": 3, "ctlfan_interval_s": 0.2,
        "ctlfan_reps": 1,
    },
}


def say(msg: str) -> None:
    print(msg, flush=True)


class _Terminated(BaseException):
    pass


def _on_term(signum, _frame):
    raise _Terminated(f"signal {signum}")


# -- the run --------------------------------------------------------------------------------


class Bench:
    def __init__(self, profile: str, suites: list[str], backends: list[str], log_dir: str,
                 peers: list[int] | None = None, before_rev: str | None = None,
                 server_filter: bool = True):
        self.p = dict(PROFILES[profile])
        if peers:
            self.p["peers"] = peers
            self.p["memory_peers"] = [n for n in peers if n >= 100] or peers
        self.profile = profile
        self.suites = suites
        self.backends = [b for b in backends if b != "bare"]
        self.log_dir = log_dir
        self.before_rev = before_rev
        self.before_root: str | None = None
        self.server_filter = server_filter
        self.results = ResultSet(profile, {**self.p, "suites": suites,
                                           "backends": ["bare", *self.backends],
                                           "server_filter": server_filter,
                                           **({"before_rev": before_rev} if before_rev else {})})
        self.topo = Topology()
        self.ns: dict = {}
        self.hosts: dict[str, DpHost] = {}
        self.srv_hosts: dict[str, DpHost] = {}  # backend -> its server's datapath (both ends)
        self.srv_ns: dict = {}  # backend -> the namespace of its server
        self.servers: dict[str, LoadServer] = {}  # server namespace name -> ovlbench server
        self.cgroups: dict[str, str] = {}
        ncpu = os.cpu_count() or 1
        self.client_cpu, self.server_cpu = (0, 1) if ncpu >= 2 else (None, None)
        self.samples: dict[tuple, list[float]] = {}

    # -- bookkeeping --

    def filters(self, backend: str) -> bool:
        """Whether ``backend``'s server runs a datapath too (both ends filtering)."""
        return self.server_filter and backend in DP_BACKEND

    def sample(self, suite: str, backend: str, peers: int, metric: str, value: float) -> None:
        self.samples.setdefault((suite, backend, peers, metric), []).append(value)

    def _rows_from_samples(self) -> None:
        units = {"conn_per_s": "conn/s", "latency_us_p50": "us", "latency_us_p99": "us",
                 "gbps": "Gbit/s", "rtt_us_p50": "us", "rtt_us_p99": "us"}
        for (suite, backend, peers, metric), vals in sorted(self.samples.items(),
                                                             key=lambda kv: str(kv[0])):
            note, unit = None, units.get(metric, "x")
            if backend == "bare":
                note = "no program, no rule: the server's real address (pooled over the run)"
            elif backend == "bare-2" and not metric.endswith("_vs_bare"):
                note = "a second bare client: its paired ratios to bare are the run's noise floor"
            elif metric.endswith("_vs_bare"):
                note = "paired: each repetition's value / the bare value measured beside it"
            elif metric.endswith("_vs_iptables"):
                note = "paired: each repetition's ebpf-tc value / the iptables value beside it"
            elif metric.endswith("_vs_before"):
                note = (f"paired: each repetition's value / the {backend}-before value beside it "
                        f"(revision {self.before_rev})")
            elif backend in BEFORE:
                note = f"the datapath of revision {self.before_rev} (bench/before.py)"
            sf = self.filters(backend)
            if sf:
                note = (note + "; " if note else "") + ("both ends filter: the server runs the same "
                                                         "datapath, reject_all, the client a member")
            self.results.add(make_row(suite, backend, peers, metric, unit, vals, note,
                                      server_filter=sf))

    def guarded(self, suite: str, fn, *args) -> None:
        try:
            fn(*args)
        except (KeyboardInterrupt, _Terminated):
            raise
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            self.results.error(suite, msg)
            say(f"  ! {suite}: {msg}")
            with open(os.path.join(self.log_dir, "errors.log"), "a") as f:
                f.write(traceback.format_exc() + "\n")

    # -- topology --

    def build(self) -> None:
        srv = self.topo.netns("srv")
        self.ns["srv"] = srv
        for backend in ["bare", *self.backends]:
            name, client, server = CLIENTS[backend]
            ns = self.topo.netns(name)
            if self.filters(backend) or backend == "bare-2":
                # bare-2 has a server of its own too (no datapath): set up like the
                # filtering backends, so its spread against bare includes that difference
                own = self.topo.netns(name + "s")
                self.topo.veth(ns, "eth0", f"{client}/24", own, "eth0", f"{server}/24")
                self.srv_ns[backend] = own
            else:
                self.topo.veth(ns, "eth0", f"{client}/24", srv, SRV_DEV[backend], f"{server}/24")
                self.srv_ns[backend] = srv
            if backend in SOCKET_MODE:
                for key, where in ((backend, ns), (f"{backend}:srv", self.srv_ns[backend])):
                    if key not in self.cgroups and where is not srv:
                        self.cgroups[key] = self.topo.cgroup(key.replace(":", "-"))
                        self.topo.join_cgroup(where, self.cgroups[key])
            self.ns[backend] = ns
        for where in {id(n): n for n in self.srv_ns.values()}.values():
            self.servers[where.name] = LoadServer(where, PORT, seconds=3600, cpu=self.server_cpu,
                                                  nice=self.p.get("nice"))
        self.extract_before()

    def extract_before(self) -> None:
        """The datapath of --before-rev, once, when a before backend runs (bench/before.py)."""
        if self.before_root is None and any(b in BEFORE for b in self.backends):
            from bench.before import extract

            self.before_root = extract(self.before_rev, os.path.join(self.log_dir, "before"))
            say(f"  before: revision {self.before_rev} extracted to {os.path.relpath(self.before_root)}")

    def start_hosts(self, sizes: dict | None = None) -> None:
        for backend in [b for b in self.backends if b in DP_BACKEND]:
            self.hosts[backend] = self.start_host(backend, sizes)
            if self.filters(backend):
                self.srv_hosts[backend] = self.start_host(backend, sizes, server=True)

    def start_host(self, backend: str, sizes: dict | None = None, server: bool = False) -> DpHost:
        """A datapath host for ``backend``'s client, or (``server``) for its server: the
        same backend with ``reject_all``, its client a member (``program`` with the
        client's address as the target)."""
        _name, client, server_addr = CLIENTS[backend]
        ns = self.srv_ns[backend] if server else self.ns[backend]
        root = self.before_root if backend in BEFORE else None
        tag = f"{backend}-srv" if server else backend
        host = DpHost(ns, os.path.join(self.log_dir, f"dphost-{tag}.log"),
                      **({"root": root} if root else {}))
        args = {"backend": DP_BACKEND[backend], "interface": "eth0",
                "private": server_addr if server else client}
        if server:
            args["filter"] = {"reject_all": True}
        if backend in SOCKET_MODE:
            args["mode"], args["cgroup"] = "socket", self.cgroups[f"{backend}:srv" if server else backend]
        if DP_BACKEND[backend] == "ebpf":
            args["pin_root"] = self.topo.pins(f"{tag}-{time.monotonic_ns()}")
        if sizes:
            args["sizes"] = sizes
        try:
            res = host.call("start", timeout=300, **args)
        except BaseException:
            host.close(teardown=True)
            raise
        say(f"  {tag}: datapath started in {res['start_s']:.1f} s")
        return host

    def close(self) -> None:
        for host in [*self.hosts.values(), *self.srv_hosts.values()]:
            with contextlib.suppress(Exception):
                host.close(teardown=True)
        self.hosts.clear()
        self.srv_hosts.clear()
        for server in self.servers.values():
            server.stop()
        self.topo.close()

    # -- the data plane --

    def target(self, backend: str, n: int) -> str:
        if backend in BARE:
            return CLIENTS[backend][2]  # the server's real address
        return fleetlib.target_overlay(n)

    def traffic(self, suite: str, n: int) -> None:
        """Repetitions of one suite; each repetition runs every backend back to back
        (the order rotates), so each has a bare measurement seconds away: the
        paired ratios (``<metric>_vs_bare``) cancel slow changes of the load."""
        order = ["bare", *self.backends]
        reps = self.p["stream_reps"] if suite == "stream" else self.p["reps"]
        nice = self.p.get("nice")
        for rep in range(reps):
            k = rep % len(order)
            got: dict[str, dict[str, float]] = {}
            for backend in order[k:] + order[:k]:
                ns, host = self.ns[backend], self.target(backend, n)
                if suite == "conn_setup":
                    out = loadgen(ns, "connect", host=host, port=PORT, seconds=self.p["conn_s"],
                                  cpu=self.client_cpu, nice=nice)
                    if out["errors"]:
                        say(f"    {backend}: {out['errors']} failed connects ({out['first_error']})")
                    got[backend] = {"conn_per_s": out["conn_per_s"]}
                elif suite == "rr":
                    out = loadgen(ns, "rr", host=host, port=PORT + 1, seconds=self.p["rr_s"],
                                  cpu=self.client_cpu, nice=nice, size=self.p["rr_size"],
                                  warmup=500)
                    got[backend] = {"latency_us_p50": out["p50_us"],
                                    "latency_us_p99": out["p99_us"]}
                else:
                    out = loadgen(ns, "stream", host=host, port=PORT + 2,
                                  seconds=self.p["stream_s"], cpu=self.client_cpu, nice=nice)
                    got[backend] = {"gbps": out["gbps"]}
            for backend, metrics in got.items():
                peers = 0 if backend == "bare" else n
                for metric, value in metrics.items():
                    self.sample(suite, backend, peers, metric, value)
                    base = got.get("bare", {}).get(metric)
                    if backend != "bare" and base:
                        self.sample(suite, backend, n, f"{metric}_vs_bare", value / base)
            e, i = got.get("ebpf-tc", {}), got.get("iptables", {})
            if suite == "conn_setup" and e and i and i["conn_per_s"]:
                self.sample(suite, "ebpf-tc", n, "conn_per_s_vs_iptables",
                            e["conn_per_s"] / i["conn_per_s"])
            for before, after in BEFORE.items():
                for metric, value in got.get(after, {}).items():
                    old = got.get(before, {}).get(metric)
                    if old:
                        self.sample(suite, after, n, f"{metric}_vs_before", value / old)
        if suite in ("conn_setup", "rr") and self.p.get("prog_stats_s"):
            for backend in ("ebpf-tc", "ebpf-socket"):
                if backend in self.hosts:
                    self.prog_stats(suite, n, backend)
        summary = []
        for backend in order:
            peers = 0 if backend == "bare" else n
            metric = {"conn_setup": "conn_per_s", "rr": "latency_us_p50", "stream": "gbps"}[suite]
            vals = self.samples.get((suite, backend, peers, metric), [])
            if vals:
                summary.append(f"{backend} {sorted(vals)[len(vals) // 2]:.1f}")
        say(f"  {suite:10s} N={n:<6d} " + ", ".join(summary))

    def prog_stats(self, suite: str, n: int, backend: str = "ebpf-tc") -> None:
        """Where an eBPF connection's (conn_setup) or round trip's (rr) extra time goes: the
        kernel's run time of each tc program, on the client and, with both ends filtering,
        on the server (BPF_ENABLE_STATS, on only for this extra, untimed loop)."""
        ends = {"": self.hosts[backend]}
        if backend in self.srv_hosts:
            ends["server_"] = self.srv_hosts[backend]
        for host in ends.values():
            host.call("prog_stats_begin")
        progs = {}
        try:
            if suite == "conn_setup":
                out = loadgen(self.ns[backend], "connect", host=self.target(backend, n), port=PORT,
                              seconds=self.p["prog_stats_s"], cpu=self.client_cpu,
                              nice=self.p.get("nice"))
            else:
                out = loadgen(self.ns[backend], "rr", host=self.target(backend, n), port=PORT + 1,
                              seconds=self.p["prog_stats_s"], cpu=self.client_cpu,
                              nice=self.p.get("nice"), size=self.p["rr_size"], warmup=500)
        finally:
            for end, host in ends.items():
                progs[end] = host.call("prog_stats_end")["progs"]
        unit = {"conn_setup": "conn", "rr": "rt"}[suite]
        what = {"conn_setup": "connection", "rr": "round trip"}[suite]
        count = max(out["count"], 1)
        total = 0.0
        for end, stats in progs.items():
            for name, st in stats.items():
                per = st["ns_per_run"] * st["runs"] / count
                total += per
                self.results.add(make_row(
                    suite, backend, n, f"{end}{name.removeprefix('prog_')}_ns_per_{unit}", "ns",
                    [per], f"{'server: ' if end else ''}{st['runs'] / count:.2f} runs per {what}, "
                    f"{st['ns_per_run']:.0f} ns per run (BPF_ENABLE_STATS)", digits=1,
                    server_filter=self.filters(backend)))
        rate = f"{out['conn_per_s']:.0f} conn/s" if suite == "conn_setup" else f"p50 {out['p50_us']:.1f} us"
        self.results.add(make_row(suite, backend, n, f"programs_ns_per_{unit}", "ns", [total],
                                  f"sum over the tc programs of {'both ends' if len(ends) > 1 else 'the client'}, "
                                  f"{rate} with stats on", digits=1,
                                  server_filter=self.filters(backend)))

    def control(self, n: int) -> None:
        """Program N peers (full_sync reps), then one-peer updates. The servers' datapaths
        and the other backends only get their N peers (the traffic suites' setting); a
        server's N peers hold its client (the target, a member)."""
        for backend, host in self.srv_hosts.items():
            host.call("program", n=n, target_real=CLIENTS[backend][1], timeout=1800)
        for backend, host in self.hosts.items():
            if backend not in CONTROL_BACKENDS:
                host.call("program", n=n, target_real=CLIENTS[backend][2], timeout=1800)
                continue
            if "full_sync" in self.suites:
                res = host.call("full_sync", n=n, target_real=CLIENTS[backend][2],
                                reps=self.p["full_sync_reps"], timeout=1800)
                self.results.add(make_row("full_sync", backend, n, "ms", "ms", res["ms"],
                                          f"{res['ops']} ops from empty"))
                say(f"  full_sync  N={n:<6d} {backend}: {sorted(res['ms'])[len(res['ms']) // 2]:.2f} ms")
            else:
                host.call("program", n=n, target_real=CLIENTS[backend][2], timeout=1800)
        if "update_one" in self.suites and n >= 2:
            for backend in [b for b in self.backends if b in CONTROL_BACKENDS]:
                host = self.hosts[backend]
                reps = self.p["update_reps"][backend]
                if backend == "iptables" and n >= 50000:
                    reps = self.p["update_reps_50k_iptables"]
                res = host.call("update_one", reps=reps, timeout=1800)
                self.results.add(make_row("update_one", backend, n, "ms", "ms", res["ms"],
                                          f"datapath.apply of {res['ops']} ops"))
                say(f"  update_one N={n:<6d} {backend}: {sorted(res['ms'])[len(res['ms']) // 2]:.3f} ms")
                if backend == "ebpf-tc":
                    res = host.call("update_one_maps", reps=self.p["map_write_reps"])
                    self.results.add(make_row(
                        "update_one", backend, n, "map_write_ms", "ms", res["ms"],
                        "the same ops written straight into the maps (no capacity check)",
                        digits=5))
            host = self.hosts[[b for b in self.backends if b in CONTROL_BACKENDS][0]]
            res = host.call("plan_diff", reps=self.p["plan_diff_reps"], timeout=1800)
            self.results.add(make_row("update_one", "core", n, "plan_diff_ms", "ms", res["ms"],
                                      "the agent's plan + diff over all N peers for one change"))

    def data_plane(self) -> None:
        if not (set(self.suites) & {*DATA_SUITES, *CONTROL_SUITES, "external"}):
            return
        if self.backends:
            self.start_hosts()
        for n in self.p["peers"]:
            self.guarded("control", self.control, n)
            for suite in DATA_SUITES:
                if suite in self.suites:
                    self.guarded(suite, self.traffic, suite, n)
            if "external" in self.suites and n == max(self.p["peers"]):
                self.guarded("external", self.external, n)
        self.results.run["server_counters"] = {
            backend: host.call("counters")["counters"] for backend, host in self.srv_hosts.items()}
        for hosts in (self.srv_hosts, self.hosts):
            for backend in list(hosts):
                hosts.pop(backend).close(teardown=True)

    # -- external tools --

    def external(self, n: int) -> None:
        """sockperf and iperf3 for every backend of the run but the before ones
        (bench/external.py), to each backend's own server (both ends filtering), paired."""
        from bench import external as ext

        missing = ext.available()
        if missing:
            raise BenchError(missing)
        order = [b for b in ["bare", *self.backends] if b not in BEFORE]
        servers = []
        try:
            for where in {self.srv_ns[b].name: self.srv_ns[b] for b in order}.values():
                servers.append(ext.Servers(where))
            time.sleep(0.5)  # the servers listen (bounded; nothing to poll for)
            for rep in range(self.p["reps"]):
                k = rep % len(order)
                got: dict[str, dict[str, float]] = {}
                for backend in order[k:] + order[:k]:
                    ns, host = self.ns[backend], self.target(backend, n)
                    got[backend] = {**ext.sockperf(ns, host, self.p["rr_s"]),
                                    **ext.iperf3(ns, host, self.p["stream_s"])}
                for backend, metrics in got.items():
                    peers = 0 if backend == "bare" else n
                    for metric, value in metrics.items():
                        self.sample("external", backend, peers, metric, value)
                        base = got["bare"].get(metric)
                        if backend != "bare" and base:
                            self.sample("external", backend, n, f"{metric}_vs_bare", value / base)
        finally:
            for srv in servers:
                srv.stop()
        parts = []
        for b in order:
            vals = sorted(self.samples[("external", b, 0 if b == "bare" else n, "rtt_us_p50")])
            parts.append(f"{b} rtt p50 {vals[len(vals) // 2]:.1f} us")
        say(f"  external   N={n:<6d} " + ", ".join(parts))

    # -- memory --

    def memory(self) -> None:
        for backend in [b for b in self.backends if b in CONTROL_BACKENDS]:
            for n in self.p["memory_peers"]:
                self.guarded("memory", self._memory_one, backend, n)

    def _memory_one(self, backend: str, n: int) -> None:
        size = max(n, 16)
        host = self.start_host(backend, sizes={"nat": size, "peers": size})
        try:
            before = host.call("memory")
            host.call("program", n=n, target_real=CLIENTS[backend][2], timeout=1800)
            after = host.call("memory")
            rss = (after["rss"] - before["rss"]) / n
            self.results.add(make_row("memory", backend, n, "rss_bytes_per_peer", "bytes/peer",
                                      [rss], "RSS growth of the process holding the agent's "
                                      "state and the datapath, per peer", digits=1))
            if backend == "ebpf-tc":
                per_peer = ("ovl_nat", "ovl_nat_ext", "ovl_peers")
                maps = after["maps"]
                mine = sum(maps[m]["memlock"] for m in per_peer)
                fixed = sum(v["memlock"] for k, v in maps.items() if k not in per_peer)
                self.results.add(make_row(
                    "memory", backend, n, "kernel_bytes_per_peer", "bytes/peer", [mine / n],
                    f"memlock of ovl_nat ({maps['ovl_nat']['max_entries']:,} slots: the /16 "
                    f"overlay subnet) + ovl_nat_ext (no prealloc, sized {size}, empty: its buckets) "
                    f"+ ovl_peers (sized {size}), / N",
                    digits=1))
                self.results.add(make_row(
                    "memory", backend, n, "kernel_bytes_fixed", "bytes", [fixed],
                    "memlock of every other map (conntrack 262,144 entries, ring buffer, ...)",
                    digits=0))
                say(f"  memory     N={n:<6d} {backend}: {mine / n:.1f} B/peer in maps, "
                    f"{fixed / 1e6:.1f} MB fixed, RSS {rss:.0f} B/peer")
            else:
                deltas = [(after["kmem"]["bytes"] - before["kmem"]["bytes"]) / n]
                for _ in range(self.p["memory_reps"] - 1):
                    host.call("clear", timeout=1800)
                    empty = host.call("memory")
                    host.call("program", n=n, target_real=CLIENTS[backend][2], timeout=1800)
                    full = host.call("memory")
                    deltas.append((full["kmem"]["bytes"] - empty["kmem"]["bytes"]) / n)
                ipset = after.get("ipset_bytes")
                self.results.add(make_row(
                    "memory", backend, n, "kernel_bytes_per_peer", "bytes/peer", deltas,
                    f"growth of kernel memory ({after['kmem']['method']}) from 0 to N peers, / N; "
                    f"ipset alone reports {ipset} bytes", digits=1))
                say(f"  memory     N={n:<6d} {backend}: {sorted(deltas)[len(deltas) // 2]:.1f} "
                    f"B/peer kernel, RSS {rss:.0f} B/peer")
        finally:
            host.close(teardown=True)

    # -- per-packet cost of the programs --

    def prog_cost(self) -> None:
        from bench.progcost import CASES, measure

        self.extract_before()
        got = measure(self.before_root)
        for backend, cases in got.items():
            for case, ns in cases.items():
                self.results.add(make_row("prog_cost", backend, 0, case, "ns", [ns],
                                          f"{CASES[case]}; best of interleaved BPF_PROG_TEST_RUN "
                                          "batches", digits=1))
        before = got.get("ebpf-tc-before", {})
        for case, ns in got["ebpf-tc"].items():
            if before.get(case):
                self.results.add(make_row("prog_cost", "ebpf-tc", 0, f"{case}_vs_before", "x",
                                          [ns / before[case]], f"revision {self.before_rev}"))
        say("  prog_cost  " + ", ".join(
            f"{case.removesuffix('_ns')} {ns:.0f}"
            + (f" (before {before[case]:.0f})" if before.get(case) else "") + " ns"
            for case, ns in got["ebpf-tc"].items()))

    # -- fanout --

    def fanout(self) -> None:
        from bench.fanout import run_fanout

        zk = self.topo.netns("zk")
        run_fanout(self.results, zk, self.p, self.log_dir, say=lambda m: say(m))

    # -- all --

    def run(self) -> ResultSet:
        if set(self.suites) & {*DATA_SUITES, *CONTROL_SUITES, "memory", "fanout", "external"}:
            self.build()
            say(f"==> topology: {', '.join(ns.name for ns in self.topo.made)}")
        say("==> data plane and updates")
        self.data_plane()
        self._rows_from_samples()
        if "memory" in self.suites and self.backends:
            say("==> memory")
            self.memory()
        if "prog_cost" in self.suites and "ebpf-tc" in self.backends:
            say("==> per-packet cost of the tc programs")
            self.guarded("prog_cost", self.prog_cost)
        if "fanout" in self.suites:
            say("==> fanout")
            self.guarded("fanout", self.fanout)
        if "controller_limits" in self.suites:
            say("==> controller_limits")
            from bench.controller_limits import run_suite

            self.guarded("controller_limits", run_suite, self.results, self.p, self.log_dir, say)
        if "controller_fanout" in self.suites:
            say("==> controller_fanout")
            from bench.controller_fanout import run_suite as fanout_suite

            self.guarded("controller_fanout", fanout_suite, self.results, self.p, self.log_dir, say)
        if "agent" in self.suites:
            say("==> agent (agent_change_ms, agent RSS per peer)")
            from bench.agentcost import run_suite as agent_suite

            self.guarded("agent", agent_suite, self.results, self.p, say)
        return self.results


def preflight(backends: list[str]) -> list[str]:
    """Refuse to run without root; drop backends this host cannot run (said so)."""
    if os.geteuid() != 0:
        raise SystemExit("bench: must run as root (network namespaces, eBPF, iptables)")
    if not os.path.ismount("/sys/fs/bpf"):
        raise SystemExit("bench: bpffs is not mounted at /sys/fs/bpf (scripts/bench-setup.sh)")
    ok = []
    for b in backends:
        if DP_BACKEND.get(b) == "ebpf":
            try:
                import bcc  # noqa: F401
            except ImportError:
                say("bench: bcc is not importable: skipping ebpf-tc")
                continue
        if b in SOCKET_MODE and not any(
                len(f) > 2 and f[2] == "cgroup2" for f in (ln.split() for ln in open("/proc/self/mounts"))):
            say(f"bench: no cgroup-v2 hierarchy is mounted: skipping {b} (socket mode needs one)")
            continue
        ok.append(b)
    return ok


def main_run(args) -> int:
    suites = args.suites.split(",") if args.suites else list(ALL_SUITES)
    unknown = set(suites) - set(ALL_SUITES)
    if unknown:
        raise SystemExit(f"bench: unknown suites {sorted(unknown)} (known: {', '.join(ALL_SUITES)})")
    wanted = args.backends.split(",")
    if set(wanted) - set(CLIENTS):
        raise SystemExit(f"bench: unknown backends {sorted(set(wanted) - set(CLIENTS))} "
                         f"(known: {', '.join(CLIENTS)})")
    backends = preflight(wanted)
    build_loadgen()
    removed = remove_stale()
    if removed:
        say(f"bench: removed leftovers of earlier runs: {', '.join(removed)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), "runs",
                           f"{stamp}-{args.profile}")
    os.makedirs(log_dir, exist_ok=True)
    peers = [int(x) for x in args.peers.split(",")] if args.peers else None
    before_rev = None
    if any(b in BEFORE for b in backends):
        from bench.before import DEFAULT_REV

        before_rev = args.before_rev or DEFAULT_REV
    bench = Bench(args.profile, suites, backends, log_dir, peers, before_rev=before_rev,
                  server_filter=args.server_filter == "on")
    say(f"==> bench {args.profile}: suites {', '.join(suites)}; backends bare, "
        f"{', '.join(bench.backends)}; server filter {args.server_filter}; "
        f"logs in {os.path.relpath(log_dir)}")
    say(f"    load average {open('/proc/loadavg').read().split()[:3]} on {os.cpu_count()} CPUs; "
        f"{BIN}")
    old_term = signal.signal(signal.SIGTERM, _on_term)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # even in background
    t0 = time.monotonic()
    finished = False
    try:
        bench.run()
        finished = True
    finally:
        # clean up without being interrupted again: namespaces, pins, processes
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            bench.close()
        finally:
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGINT, old_int)
            # an interrupted run keeps its rows in its log directory, not in latest.json
            out = args.out if finished else os.path.join(log_dir, "partial.json")
            data = bench.results.write(out)
            say(f"==> wrote {os.path.relpath(out)} ({len(data['rows'])} rows, "
                f"{time.monotonic() - t0:.0f} s)")
    if not args.no_plots:
        from bench.plots import plot_all

        files = plot_all(data, os.path.dirname(os.path.abspath(args.out)))
        say(f"==> plots: {', '.join(os.path.relpath(f) for f in files)}")
    if args.report or (args.report is None and args.profile == "full"):
        from bench.report import write_report

        path = write_report(data, os.path.dirname(os.path.abspath(args.out)))
        say(f"==> report: {os.path.relpath(path)}")
    from bench.report import goals_text

    say(goals_text(data))
    if data["run"]["errors"]:
        say(f"==> {len(data['run']['errors'])} suite error(s): see the run's errors.log")
        return 1
    return 0


def main_report(args) -> int:
    from bench.plots import plot_all
    from bench.report import write_report
    from bench.results import load

    data = load(args.json)
    plot_all(data, os.path.dirname(os.path.abspath(args.json)))
    path = write_report(data, os.path.dirname(os.path.abspath(args.json)))
    say(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the benchmarks")
    r.add_argument("--profile", choices=sorted(PROFILES), default="full")
    r.add_argument("--suites", help=f"comma-separated subset of {','.join(ALL_SUITES)}")
    r.add_argument("--backends", default=DEFAULT_BACKENDS,
                   help=f"comma-separated subset of {','.join(CLIENTS)} (default {DEFAULT_BACKENDS})")
    r.add_argument("--server-filter", choices=("on", "off"), default="on",
                   help="on (default): the server of every backend with a datapath runs the same "
                        "datapath with reject_all, its client a member (both ends filtering); "
                        "off: client-only rows, every client to one plain server")
    r.add_argument("--peers", help="comma-separated peer counts (overrides the profile)")
    r.add_argument("--before-rev", default=None,
                   help="revision whose datapath the *-before backends run (default: "
                        "the branch point of issue 11, see bench/before.py)")
    r.add_argument("--out", default=DEFAULT_OUT)
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--report", dest="report", action="store_true", default=None,
                   help="rewrite docs/benchmarks.md (default: only for --profile full)")
    r.add_argument("--no-report", dest="report", action="store_false")
    p = sub.add_parser("report", help="plots and docs/benchmarks.md from a results file")
    p.add_argument("--json", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    try:
        return main_run(args) if args.command == "run" else main_report(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Terminated) as exc:
        print(f"bench: interrupted ({str(exc) or 'Ctrl-C'}); namespaces, pins and processes "
              "removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
