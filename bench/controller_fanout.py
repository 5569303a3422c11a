"""The ``controller_fanout`` suite: one controller delivers a change to S Watch streams.

Loopback only (bench/ctlstack.py: a standalone ZooKeeper on 127.0.0.1, an ``overlay
controller`` process on CPU 1). S Watch streams come from a few client processes on
CPU 0 (``python -m bench.controller_fanout client``), each an asyncio program
(grpc.aio) holding S / procs streams, each stream on its own channel and TCP+TLS
connection (a local subchannel pool), as S daemons would hold them; one node identity
per process (``controller.limits.watch_streams`` raised to the streams of one process).

Once every stream has its snapshot, an operator writes ``changes`` changes
(``PutGroup``), ``interval_s`` apart. Latency of a delivery = the time a stream
receives the change's revision - the time the operator's write began (CLOCK_MONOTONIC,
one clock for every process of the machine). Rows (backend ``controller``, ``peers``
= streams; the same harness with one stream is the baseline, measured in the same
run): ``delivery_ms_p50`` / ``_p99`` / ``_max`` over every (stream, change),
``all_streams_ms_p50`` / ``_p99`` (per change, until the last stream had it),
``controller_cpu_us_per_delivery`` (the controller process's CPU from the first write until
every client had the last change, / deliveries; includes its ZooKeeper reads and the
writes' handling), ``deliveries_missed`` (0 expected) and ``streams`` (opened with a snapshot).

Bounded: at most ``MAX_STREAMS`` streams, every wait has a deadline, the clients exit
when told (stdin) or after ``hold_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

from bench.ctlstack import PYTHON, REPO, client_parser, controller_stack, on_cpu, paced_writes

SUITE = "controller_fanout"
MAX_STREAMS = 20_000


def _percentile(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(p * (len(v) - 1)))))] if v else float("nan")


# --- a client process ------------------------------------------------------------------------


async def _client(controller: str, certs: str, node: str, streams: int, hold_s: float) -> dict:
    import grpc

    from overlay.rpc.client import CLIENT_OPTIONS
    from overlay.rpc.proto import modules
    from overlay.rpc.tls import read_tls, tls_from_dir

    pb2, pb2_grpc = modules()
    ca, cert, key = read_tls(tls_from_dir(certs, node), "registry.tls")
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = [*CLIENT_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]   # a connection per channel
    received: dict[int, list[float]] = {}   # revision -> receipt times (one per stream)
    errors: list[str] = []
    ready = [asyncio.Event() for _ in range(streams)]
    last = [0] * streams
    opened = [False] * streams
    channels = [grpc.aio.secure_channel(controller, creds, options=options) for _ in range(streams)]

    async def follow(i: int) -> None:
        call = pb2_grpc.RegistryStub(channels[i]).Watch(pb2.WatchRequest(from_revision=0), timeout=hold_s + 60)
        try:
            async for msg in call:
                now = time.monotonic()
                if msg.kind == pb2.WatchResponse.SNAPSHOT:
                    if msg.last:
                        last[i], opened[i] = msg.revision, True
                        ready[i].set()
                    continue
                for ch in msg.changes:
                    received.setdefault(ch.revision, []).append(now)
                last[i] = msg.revision
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                errors.append(f"{exc.code().name}: {(exc.details() or '')[:80]}")
        finally:
            ready[i].set()

    tasks = [asyncio.create_task(follow(i)) for i in range(streams)]
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 120)
        print(json.dumps({"ready": sum(opened), "errors": errors[:5]}), flush=True)
        line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), hold_s)
        until = int(line.split()[1]) if line.startswith("until ") else 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and min(last) < until and not all(t.done() for t in tasks):
            await asyncio.sleep(0.02)
    except TimeoutError:
        errors.append("timed out")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in channels:
            await c.close()
    return {"received": {str(r): ts for r, ts in received.items()}, "errors": errors[:20]}


# --- the orchestrator ------------------------------------------------------------------------


def measure(address: str, certs: str, *, streams: int, procs: int, changes: int, interval_s: float,
            log=None, client_cpu: int | None = None, nodes: list[str] | None = None,
            server_pid: int | None = None) -> dict:
    """One run against a controller at ``address``: ``streams`` Watch streams over ``procs``
    client processes (identities ``nodes``, default ``fan-<i>``), then ``changes`` writes.
    Returns the deliveries' latencies (ms), what was missed and, given the controller's
    ``server_pid``, its CPU seconds from the first write until every client had the last."""
    from bench.ctlstack import cpu_s
    from overlay.rpc.client import Client
    from overlay.rpc.tls import tls_from_dir

    streams = max(1, min(streams, MAX_STREAMS))
    procs = max(1, min(procs, streams))
    nodes = nodes or [f"fan-{i}" for i in range(procs)]
    share = [streams // procs + (1 if i < streams % procs else 0) for i in range(procs)]
    hold_s = 120 + changes * interval_s
    clients = [subprocess.Popen(
        [*on_cpu(client_cpu), PYTHON, "-m", "bench.controller_fanout", "client", "--controller", address,
         "--certs", certs, "--node", nodes[i], "--streams", str(share[i]), "--hold-s", str(hold_s)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log or subprocess.DEVNULL, text=True)
        for i in range(procs)]
    sent: dict[int, float] = {}
    opened, errors, outs = 0, [], []
    try:
        for c in clients:   # every stream has its snapshot before the first change
            line = c.stdout.readline()
            if not line:
                raise RuntimeError(f"a fan-out client exited before its streams were open (rc {c.wait(10)})")
            got = json.loads(line)
            opened += got["ready"]
            errors += got["errors"]
        cpu0 = cpu_s(server_pid) if server_pid else None
        with Client(address, tls_from_dir(certs, "operator"), timeout=30) as op:
            sent = paced_writes(op, changes, interval_s, "fan", 20)
        until = max(sent) if sent else 0
        for c in clients:
            c.stdin.write(f"until {until}\n")
            c.stdin.flush()
        for c in clients:
            out, _ = c.communicate(timeout=120)
            outs.append(json.loads(out.strip().splitlines()[-1]))
        cpu = cpu_s(server_pid) - cpu0 if cpu0 is not None else None
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait(10)
    per_change: dict[int, list[float]] = {r: [] for r in sent}
    for o in outs:
        errors += o["errors"]
        for r, ts in o["received"].items():
            if int(r) in per_change:
                per_change[int(r)] += [(t - sent[int(r)]) * 1000.0 for t in ts]
    deliveries = [ms for v in per_change.values() for ms in v]
    return {
        "streams": opened, "sent": len(sent), "deliveries": len(deliveries),
        "missed": len(sent) * streams - len(deliveries), "errors": errors[:20],
        "latency_ms": deliveries,
        "all_streams_ms": [max(v) for v in per_change.values() if len(v) == streams],
        "server_cpu_s": cpu,
    }


def run_suite(results, p: dict, log_dir: str, say) -> None:
    """Rows of the suite into ``results`` (bench.results.ResultSet): one stream (the baseline),
    then each of ``ctlfan_streams``; each ``ctlfan_reps`` times (one row per metric, a sample
    per repetition)."""
    from bench.results import make_row

    procs = p["ctlfan_procs"]
    sizes = sorted({1, *p["ctlfan_streams"]})
    per_node = max(4, -(-max(sizes) // procs))
    with controller_stack(log_dir, SUITE, [f"fan-{i}" for i in range(procs)],
                          limits={"watch_streams": per_node}) as st:
        for n in sizes:
            runs = []
            for _ in range(p["ctlfan_reps"]):
                m = measure(st.address, st.certs, streams=n, procs=min(procs, n), changes=p["ctlfan_changes"],
                            interval_s=p["ctlfan_interval_s"], log=st.log,
                            client_cpu=0 if st.two_cpus else None, server_pid=st.pid)
                runs.append(m)
                say(f"  controller_fanout {n:5d} streams: delivery p50 "
                    f"{_percentile(m['latency_ms'], 0.5):.1f} ms, p99 {_percentile(m['latency_ms'], 0.99):.1f} ms, "
                    f"all streams p99 {_percentile(m['all_streams_ms'], 0.99):.1f} ms, missed {m['missed']}, "
                    f"controller CPU {_cpu_per_delivery_us(m):.0f} us per delivery"
                    + (f"; errors {m['errors'][:2]}" if m["errors"] else ""))
            rows(results, make_row, n, runs, min(procs, n))


def _cpu_per_delivery_us(m: dict) -> float:
    """The controller's CPU per delivered delta, us (nan without its pid or a delivery)."""
    if m.get("server_cpu_s") is None or not m["deliveries"]:
        return float("nan")
    return m["server_cpu_s"] * 1e6 / m["deliveries"]


METRICS = {   # metric -> (unit, its value in one run)
    "delivery_ms_p50": ("ms", lambda m: _percentile(m["latency_ms"], 0.5)),
    "delivery_ms_p99": ("ms", lambda m: _percentile(m["latency_ms"], 0.99)),
    "delivery_ms_max": ("ms", lambda m: max(m["latency_ms"] or [float("nan")])),
    "all_streams_ms_p50": ("ms", lambda m: _percentile(m["all_streams_ms"], 0.5)),
    "all_streams_ms_p99": ("ms", lambda m: _percentile(m["all_streams_ms"], 0.99)),
    "controller_cpu_us_per_delivery": ("us", _cpu_per_delivery_us),
    "deliveries_missed": ("count", lambda m: m["missed"]),
    "streams": ("count", lambda m: m["streams"]),
}


def rows(results, make_row, n: int, runs: list[dict], procs: int) -> None:
    """One row per metric of :data:`METRICS`, a sample per run."""
    note = (f"{runs[0]['sent']} changes to {n} Watch streams per repetition ({procs} client "
            f"processes, a connection per stream)")
    for metric, (unit, value) in METRICS.items():
        results.add(make_row(SUITE, "controller", n, metric, unit, [value(m) for m in runs], note,
                             digits=2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.controller_fanout")
    sub = ap.add_subparsers(dest="command", required=True)
    c = client_parser(sub, "client", "hold Watch streams, print receipt times of every revision (JSON)",
                      ("--streams", 250))
    c.add_argument("--hold-s", type=float, default=300.0)
    args = ap.parse_args(argv)
    out = asyncio.run(_client(args.controller, args.certs, args.node, max(1, min(args.streams, MAX_STREAMS)),
                              min(args.hold_s, 3600)))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    sys.exit(main())
