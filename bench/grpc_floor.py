"""The floor under the ``controller_fanout`` suite: a bare grpc.aio server in the controller's place.

Same harness as the suite (bench/controller_fanout.py ``measure``: S Watch streams from 4
client processes on CPU 0, each its own TCP+TLS connection; an operator's ``PutGroup``
changes 0.5 s apart), same mutual TLS, server options and pinning (the server alone on
CPU 1). The server does nothing but gRPC: ``Watch`` sends one pre-serialized snapshot,
then the pre-serialized delta of each new revision; ``PutGroup`` only counts a revision
and wakes the streams (no ZooKeeper, journal, authorisation or limits). Its CPU per
delivery is what grpc.aio, gRPC's C core with BoringSSL, and the kernel cost per message
sent; the controller's figure minus this one is the controller's own work.

    python -m bench.grpc_floor [--streams 1000] [--changes 10] [--reps 1]

A diagnostic, not a suite: it writes no result rows (docs/benchmarks.md quotes its figures).
Bounded like the suite: every wait has a deadline; the server exits with its parent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile

from bench.ctlstack import PYTHON, REPO, free_port, on_cpu, reap, wait_port

EPOCH = "floor"


async def _serve(certs: str, port: int) -> None:
    import grpc

    from overlay.controller.fanout import Hub
    from overlay.controller.server import SERVER_OPTIONS
    from overlay.rpc.proto import SERVICE, modules
    from overlay.rpc.tls import read_tls, tls_from_dir

    pb2, _ = modules()
    loop = asyncio.get_running_loop()
    hub = Hub(loop)
    state = {"revision": 1}
    deltas: dict[int, bytes] = {}
    snapshot = pb2.WatchResponse(kind=pb2.WatchResponse.SNAPSHOT, epoch=EPOCH, revision=1, last=True).SerializeToString()

    async def watch(request, context):
        yield snapshot
        seen = 1
        while True:
            if seen < state["revision"]:
                seen += 1
                yield deltas[seen]
            else:
                await hub.sleep(30.0)

    async def put_group(request, context):
        rev = state["revision"] + 1
        deltas[rev] = pb2.WatchResponse(
            kind=pb2.WatchResponse.DELTA, epoch=EPOCH, revision=rev, base_revision=rev - 1,
            changes=[pb2.Change(revision=rev, kind=pb2.Change.GROUP, id=request.group.name, group=request.group)],
        ).SerializeToString()
        state["revision"] = rev
        hub._fire()
        return pb2.PutGroupResponse(revision=rev)

    handlers = {
        "Watch": grpc.unary_stream_rpc_method_handler(watch, request_deserializer=pb2.WatchRequest.FromString),
        "PutGroup": grpc.unary_unary_rpc_method_handler(
            put_group, request_deserializer=pb2.PutGroupRequest.FromString,
            response_serializer=pb2.PutGroupResponse.SerializeToString),
    }
    server = grpc.aio.server(options=list(SERVER_OPTIONS))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    ca, cert, key = read_tls(tls_from_dir(certs, "controller"), "floor")
    server.add_secure_port(f"127.0.0.1:{port}",
                           grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True))
    await server.start()
    # until the parent closes our stdin (or at most an hour)
    await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.read), 3600)
    await server.stop(0.5)


def run(streams: int, changes: int, reps: int) -> list[dict]:
    from bench import controller_fanout as cf
    from overlay.controller import certs as certlib

    procs = 4
    work = tempfile.mkdtemp(prefix="ovl-bench-grpc-floor-")
    server = None
    try:
        certs = os.path.join(work, "certs")
        certlib.init(certs)
        for i in range(procs):
            certlib.issue(certs, f"fan-{i}")
        port = free_port()
        two = (os.cpu_count() or 1) >= 2
        server = subprocess.Popen([*on_cpu(1 if two else None), PYTHON, "-m", "bench.grpc_floor", "serve",
                                   "--certs", certs, "--port", str(port)], cwd=REPO, stdin=subprocess.PIPE)
        wait_port(port, 60)
        out = []
        for _ in range(reps):
            m = cf.measure(f"127.0.0.1:{port}", certs, streams=streams, procs=procs, changes=changes,
                           interval_s=0.5, client_cpu=0 if two else None, server_pid=server.pid)
            lat = m["latency_ms"]
            print(f"grpc floor {streams} streams: delivery p50 {cf._percentile(lat, 0.5):.1f} ms, "
                  f"p99 {cf._percentile(lat, 0.99):.1f} ms, missed {m['missed']}, "
                  f"server CPU {cf._cpu_per_delivery_us(m):.0f} us per delivery"
                  + (f"; errors {m['errors'][:2]}" if m["errors"] else ""), flush=True)
            out.append(m)
        return out
    finally:
        if server is not None:
            server.stdin.close()
            reap(server, 10)
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.grpc_floor", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="(internal) the bare server")
    s.add_argument("--certs", required=True)
    s.add_argument("--port", type=int, required=True)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args(argv)
    if args.command == "serve":
        asyncio.run(_serve(args.certs, args.port))
        return 0
    from bench.controller_fanout import MAX_STREAMS

    run(max(1, min(args.streams, MAX_STREAMS)), max(1, min(args.changes, 100)), max(1, min(args.reps, 10)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    sys.exit(main())
