"""The ``fanout`` suite: many watchers of one ZooKeeper under churn.

Everything runs in one namespace of the bench (``ovl-bench-<pid>-zk``): a
standalone ZooKeeper on its loopback, a churner and K watcher processes
(``bench.fanout_proc``). For each K, two backends:

- ``bare``: K registries alone (``ZooKeeperRegistry``, persistent recursive
  watch, read and validate the changed record): the time a change takes to
  reach a process, the floor of any agent;
- ``dryrun``: K agents (``overlay.agent.Agent`` with the dry-run datapath):
  registry -> guard -> plan -> diff -> apply, timestamped at apply, with
  ``guard.settle_s: 0``; and once (metrics ``*_default_config``) with the
  default config, whose guard waits ``guard.settle_s`` before applying a
  re-addressed peer on purpose.

Latency of one change at one watcher = its timestamp - the znode's mtime
(ZooKeeper's commit time, milliseconds, same machine clock). Per round of M
changes the p50 and p99 over all K x M samples are taken; rows report the
median of the rounds, with min and max.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import statistics
import subprocess
import tempfile
import time

from bench.netns import Netns
from bench.procs import PYTHON, REPO, BenchError, reap
from bench.results import ResultSet, make_row

PORT = 2181


def _percentile(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(p * (len(v) - 1)))))]


class _Proc:
    def __init__(self, ns: Netns, args: list[str], log):
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = ns.popen(PYTHON, "-m", "bench.fanout_proc", *args, stdin=subprocess.PIPE,
                             stderr=log, text=True, cwd=REPO, env=env)

    def send(self, obj) -> None:
        self.proc.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"fanout process {self.proc.pid}: no answer in {timeout:g} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                raise BenchError(f"fanout process {self.proc.pid} exited ({self.proc.poll()})")
            if line.startswith("{"):
                out = json.loads(line)
                if not out.get("ok"):
                    raise BenchError(f"fanout process {self.proc.pid}: {out.get('error')}")
                return out

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()
        reap(self.proc, 10)


def _wait_all_ready(procs: list[_Proc], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = {p.proc.stdout: p for p in procs}
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"fanout: {len(pending)} of {len(procs)} watchers not in sync "
                             f"after {timeout:g} s")
        ready, _, _ = select.select(list(pending), [], [], left)
        for stream in ready:
            p = pending.pop(stream)
            p.read(5)


def _one(ns: Netns, hosts: str, churner: _Proc, mode: str, k: int, n: int, rounds: int,
         changes: int, rate: float, settle_s: float, log, tag: str,
         guard_settle_s: float | None) -> dict:
    prefix = f"/bench-{tag}"
    churner.send({"cmd": "setup", "prefix": prefix, "n": n})
    churner.read(120)
    watchers: list[_Proc] = []
    extra = [] if guard_settle_s is None else ["--settle-s", f"{guard_settle_s:g}"]
    try:
        for i in range(k):
            watchers.append(_Proc(ns, ["watch", "--hosts", hosts, "--prefix", prefix,
                                       "--id", str(i), "--mode", mode, "--n", str(n), *extra],
                                  log))
        _wait_all_ready(watchers, 60 + 4.0 * k)
        sent: list[list[list]] = []
        for r in range(rounds):
            churner.send({"cmd": "change", "start": r * changes, "count": changes, "rate": rate})
            sent.append(churner.read(changes / rate + 60)["changes"])
            time.sleep(settle_s)
        seen: list[dict[tuple[str, str], float]] = []
        for w in watchers:
            w.send("dump")
            first: dict[tuple[str, str], float] = {}
            for overlay, real, t in w.read(60)["seen"]:
                first.setdefault((overlay, real), t)
            seen.append(first)
    finally:
        for w in watchers:
            w.stop()
    p50s, p99s, missed, total = [], [], 0, 0
    for round_changes in sent:
        lat = []
        for overlay, real, mtime_ms, _sent_ms in round_changes:
            for first in seen:
                total += 1
                t = first.get((overlay, real))
                if t is None:
                    missed += 1
                else:
                    lat.append(max(0.0, t * 1000.0 - mtime_ms))
        if lat:
            p50s.append(_percentile(lat, 0.50))
            p99s.append(_percentile(lat, 0.99))
    return {"p50": p50s, "p99": p99s, "missed": missed, "samples": total}


def run_fanout(results: ResultSet, zk_ns: Netns, params: dict, log_dir: str,
               say=print) -> None:
    from overlay.zk.server import ZooKeeperServer

    data_dir = tempfile.mkdtemp(prefix="ovl-bench-zk-")
    server = ZooKeeperServer(data_dir, "127.0.0.1", PORT, netns=zk_ns.name, fsync=False,
                             die_with_parent=True, heap_mb=512, max_session_ms=60000)
    hosts = f"127.0.0.1:{PORT}"
    log = open(os.path.join(log_dir, "fanout.log"), "a")
    churner = None
    try:
        server.start(timeout=90)
        churner = _Proc(zk_ns, ["churn", "--hosts", hosts], log)
        churner.read(60)
        n, rounds, changes, rate = (params["fanout_peers"], params["fanout_rounds"],
                                    params["fanout_changes"], params["fanout_rate"])
        # (backend, mode, guard.settle_s, metric suffix): the agents run with settle_s 0 (the
        # pipeline's own latency); once more at the smallest K with the default config, whose
        # guard deliberately waits guard.settle_s before applying a re-addressed peer.
        runs = [(k, "bare", "bare", None, "") for k in params["fanout_agents"]]
        runs += [(k, "dryrun", "agent", 0.0, "") for k in params["fanout_agents"]]
        runs.sort(key=lambda r: r[0])
        if params.get("fanout_default_config"):
            runs.append((min(params["fanout_agents"]), "dryrun", "agent", None,
                         "_default_config"))
        for k, backend, mode, guard_settle, suffix in runs:
            t0 = time.monotonic()
            got = _one(zk_ns, hosts, churner, mode, k, n, rounds, changes, rate,
                       params["fanout_settle_s"], log, f"{k}-{mode}{suffix}", guard_settle)
            note = (f"{k} processes, {rounds} rounds of {changes} changes at {rate:g}/s; "
                    f"{got['missed']} of {got['samples']} (change, process) pairs not seen")
            if mode == "agent":
                note += ("; guard.settle_s " + ("0" if guard_settle is not None else
                                                "default (the guard waits before applying)"))
            if got["p99"]:
                for metric, vals in (("event_to_apply_ms_p50", got["p50"]),
                                     ("event_to_apply_ms_p99", got["p99"])):
                    results.add(make_row("fanout", backend, n, metric + suffix, "ms", vals, note,
                                         digits=2, agents=k))
            else:
                results.error("fanout", f"{backend}{suffix} K={k}: no change was seen")
            say(f"  fanout {backend + suffix:22s} K={k:3d}: p50 "
                f"{statistics.median(got['p50']) if got['p50'] else float('nan'):8.1f} ms, p99 "
                f"{statistics.median(got['p99']) if got['p99'] else float('nan'):8.1f} ms "
                f"({got['missed']} missed, {time.monotonic() - t0:.0f} s)")
    finally:
        if churner is not None:
            with contextlib.suppress(Exception):
                churner.send({"cmd": "quit"})
            churner.stop()
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        log.close()
