"""The ``controller_limits`` suite: one node identity abuses the controller, another node watches.

Loopback only: a standalone ZooKeeper on 127.0.0.1, an ``overlay controller`` process
(default ``controller.limits``), an operator writing one change every ``interval_s``
(``PutGroup``), and a watcher (another node identity) following Watch. Two backends,
measured back to back in one run:

- ``controller-quiet`` (the baseline): nobody else calls;
- ``controller``: meanwhile an abuser process with one node certificate opens
  ``watches`` Watch streams and sends ``registers`` RegisterNode calls in a burst
  (``python -m bench.controller_limits abuse``).

Latency of one change = the time the watcher receives its revision - the time the
operator's write began (same process, same clock). Rows: ``delta_ms_p50``, ``delta_ms_p99``,
``delta_ms_max``, ``deltas_missed`` (revisions the watcher never got, or got out of order:
0 expected), and for the abused run what the abuser got (``abuser_watch_ok``,
``abuser_watch_exhausted``, ``abuser_register_ok``, ``abuser_register_exhausted``,
``abuser_other_errors``, ``abuse_s``).

:func:`measure` is what the behaviour test (tests/integration/test_controller_limits.py)
runs too, asserting on counts and order only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from bench.ctlstack import PYTHON, REPO, client_parser, on_cpu, paced_writes

SUITE = "controller_limits"


def _percentile(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(p * (len(v) - 1)))))]


# --- the abuser (its own process) -----------------------------------------------------------------


def abuse(controller: str, certs: str, node: str, watches: int, registers: int, hold_s: float) -> dict:
    """Open ``watches`` Watch streams, then send ``registers`` RegisterNode calls at once (futures
    on one channel); keep the streams that were accepted open ``hold_s`` seconds. Counts by
    outcome; never raises on a refusal."""
    import grpc

    from overlay.model import Node
    from overlay.rpc import convert
    from overlay.rpc.client import Client
    from overlay.rpc.tls import tls_from_dir

    out = {"watch_ok": 0, "watch_exhausted": 0, "register_ok": 0, "register_exhausted": 0, "other_errors": 0,
           "pushback_ms": [], "other": {}}

    def other(exc) -> None:
        out["other_errors"] += 1
        key = f"{exc.code().name}: {(exc.details() or '')[:80]}"
        out["other"][key] = out["other"].get(key, 0) + 1
    t0 = time.monotonic()
    with Client(controller, tls_from_dir(certs, node), timeout=30) as c:
        ip = c.allocate(node)
        streams = []
        for _ in range(watches):
            call = c.watch(0, timeout=hold_s + 120)
            try:
                next(call)
                out["watch_ok"] += 1
                streams.append(call)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    out["watch_exhausted"] += 1
                else:
                    other(exc)
        req = c.pb2.RegisterNodeRequest(node=convert.node_to_pb(
            c.pb2, Node(node, "abuse", "10.66.0.1", "198.18.66.1", ip, ("admin",), ())))
        futures = [c.stub.RegisterNode.future(req, timeout=120) for _ in range(registers)]
        for f in futures:
            try:
                f.result()
                out["register_ok"] += 1
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    out["register_exhausted"] += 1
                    md = dict(exc.trailing_metadata() or ())
                    if "grpc-retry-pushback-ms" in md and len(out["pushback_ms"]) < 5:
                        out["pushback_ms"].append(int(md["grpc-retry-pushback-ms"]))
                else:
                    other(exc)
        out["abuse_s"] = time.monotonic() - t0
        left = hold_s - (time.monotonic() - t0)
        if left > 0:
            time.sleep(left)
        for s in streams:
            s.cancel()
    return out


# --- the watcher and the writer (this process) -------------------------------------------------


@dataclass
class Watched:
    received: dict[int, float] = field(default_factory=dict)   # revision -> time received
    order_errors: list[str] = field(default_factory=list)
    error: str | None = None


def _watch(client, stop: threading.Event, got: Watched, ready: threading.Event) -> None:
    import grpc

    pb2 = client.pb2
    call = client.watch(0, timeout=600)
    rev = None
    try:
        for msg in call:
            now = time.monotonic()
            if msg.kind == pb2.WatchResponse.SNAPSHOT:
                if msg.last:
                    rev = msg.revision
                    ready.set()
                continue
            if rev is None or msg.base_revision != rev:
                got.order_errors.append(f"delta {msg.base_revision}->{msg.revision} after {rev}")
            for ch in msg.changes:
                got.received[ch.revision] = now
            rev = msg.revision
            if stop.is_set():
                break
    except grpc.RpcError as exc:
        if not stop.is_set():
            got.error = f"{exc.code()}: {exc.details()}"
    finally:
        call.cancel()
        ready.set()


def measure(controller: str, certs: str, *, changes: int, interval_s: float, abuser: dict | None,
            watcher: str = "watcher", log=None, abuser_cpu: int | None = None) -> dict:
    """One run: the operator writes ``changes`` groups ``interval_s`` apart while ``watcher``
    follows Watch (and, with ``abuser`` = {node, watches, registers}, an abuser process
    runs its burst). Returns latencies (ms), misses and the abuser's counts."""
    from overlay.rpc.client import Client
    from overlay.rpc.tls import tls_from_dir

    got, stop, ready = Watched(), threading.Event(), threading.Event()
    with Client(controller, tls_from_dir(certs, watcher), timeout=30) as wc, \
            Client(controller, tls_from_dir(certs, "operator"), timeout=30) as op:
        t = threading.Thread(target=_watch, args=(wc, stop, got, ready), daemon=True)
        t.start()
        if not ready.wait(60):
            raise RuntimeError("the watcher got no snapshot")
        proc = None
        if abuser is not None:
            proc = subprocess.Popen(
                [*on_cpu(abuser_cpu), PYTHON, "-m", "bench.controller_limits", "abuse", "--controller", controller, "--certs", certs,
                 "--node", abuser["node"], "--watches", str(abuser["watches"]), "--registers",
                 str(abuser["registers"]), "--hold-s", str(changes * interval_s + 5)],
                cwd=REPO, stdout=subprocess.PIPE, stderr=log or subprocess.DEVNULL, text=True)
        sent: dict[int, float] = {}
        try:
            sent = paced_writes(op, changes, interval_s, "load", 50)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not set(sent) <= set(got.received):
                time.sleep(0.05)
        finally:
            stop.set()
            abused = None
            if proc is not None:
                try:
                    stdout, _ = proc.communicate(timeout=changes * interval_s + 300)
                    abused = json.loads(stdout.strip().splitlines()[-1])
                except (subprocess.TimeoutExpired, ValueError, IndexError):
                    proc.kill()
                    proc.wait(10)
            op.put_group("load-end", "wake the watcher")   # one more delta ends its loop
            t.join(30)
    lat = [(got.received[r] - s) * 1000.0 for r, s in sent.items() if r in got.received]
    revs = sorted(got.received)
    return {
        "sent": len(sent), "received": len(lat), "missed": len(sent) - len(lat),
        "order_errors": got.order_errors, "watch_error": got.error,
        "gaps": [r for r in range(revs[0], revs[-1] + 1) if r not in got.received] if revs else [],
        "latency_ms": lat, "abuser": abused,
    }


# --- the suite ------------------------------------------------------------------------------------


def run_suite(results, p: dict, log_dir: str, say) -> None:
    """Rows of the suite into ``results`` (bench.results.ResultSet)."""
    from bench.ctlstack import controller_stack
    from bench.results import make_row

    with controller_stack(log_dir, SUITE, ["watcher", "abuser"]) as st:
        abuser = {"node": "abuser", "watches": p["limits_watches"], "registers": p["limits_registers"]}
        for rep in range(p["limits_reps"]):
            for backend, who in (("controller-quiet", None), ("controller", abuser)):
                m = measure(st.address, st.certs, changes=p["limits_changes"], interval_s=p["limits_interval_s"],
                            abuser=who, log=st.log, abuser_cpu=0 if st.two_cpus else None)
                _rows(results, make_row, backend, m, rep)
                a = m["abuser"] or {}
                say(f"  controller_limits {backend:16s} p50 {_percentile(m['latency_ms'], 0.5):.1f} ms, "
                    f"p99 {_percentile(m['latency_ms'], 0.99):.1f} ms, missed {m['missed']}"
                    + (f"; abuser: watch {a.get('watch_ok')} ok / {a.get('watch_exhausted')} refused, "
                       f"register {a.get('register_ok')} ok / {a.get('register_exhausted')} refused "
                       f"in {a.get('abuse_s', 0):.1f} s" if who else ""))


def _rows(results, make_row, backend: str, m: dict, rep: int) -> None:
    lat = m["latency_ms"] or [float("nan")]
    note = f"{m['sent']} changes, one Watch; repetition {rep + 1}"
    for metric, value in (("delta_ms_p50", _percentile(lat, 0.5)), ("delta_ms_p99", _percentile(lat, 0.99)),
                          ("delta_ms_max", max(lat))):
        results.add(make_row(SUITE, backend, 1, metric, "ms", [value], note, digits=2))
    results.add(make_row(SUITE, backend, 1, "deltas_missed", "count",
                         [m["missed"] + len(m["order_errors"]) + len(m["gaps"])], note))
    a = m["abuser"]
    if a:
        for key in ("watch_ok", "watch_exhausted", "register_ok", "register_exhausted", "other_errors"):
            results.add(make_row(SUITE, backend, 1, f"abuser_{key}", "count", [a[key]], "one node identity"))
        results.add(make_row(SUITE, backend, 1, "abuse_s", "s", [a["abuse_s"]], "the abuser's burst", digits=2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.controller_limits")
    sub = ap.add_subparsers(dest="command", required=True)
    a = client_parser(sub, "abuse", "one identity's burst of Watch streams and RegisterNode calls (prints JSON)",
                      ("--watches", 1000))
    a.add_argument("--registers", type=int, default=10000)
    a.add_argument("--hold-s", type=float, default=10.0)
    args = ap.parse_args(argv)
    out = abuse(args.controller, args.certs, args.node, min(args.watches, 100_000), min(args.registers, 1_000_000),
                min(args.hold_s, 3600))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
