"""Processes of the ``fanout`` suite, run inside the bench's ZooKeeper namespace.

    python -m bench.fanout_proc churn  --hosts H --prefix P
        JSON lines on stdin: {"cmd": "setup", "n": N} creates the layout and N
        peer records; {"cmd": "change", "start": i, "count": M, "rate": r} moves
        the real address of peers i..i+M-1, one every 1/r s, and answers each
        change's (overlay, new real, znode mtime in ms); {"cmd": "quit"}.
    python -m bench.fanout_proc watch  --hosts H --prefix P --id ID --mode agent|bare --n N
                                       [--settle-s S]
        agent: the daemon's Agent (ZooKeeper registry, dry-run datapath that
               timestamps every applied NAT entry; guard.settle_s S if given);
        bare:  the registry alone, timestamping every record change it sees.
        Prints {"ready": ...} once it holds all N peers, then on stdin "dump"
        prints {"seen": [[overlay, real, unix time], ...]}; exits on EOF.

Every wait is bounded; nothing here lives longer than its stdin.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys
import threading
import time

SUBNET = "192.168.0.0/18"
NETWORK = "bench"


def peer_node(i: int, private: str | None = None):
    from overlay.model import Node

    net = ipaddress.IPv4Network(SUBNET)
    return Node(
        node_id=f"peer-{i}",
        network=NETWORK,
        private=private or str(ipaddress.IPv4Address("10.201.0.0") + 1 + i),
        public=str(ipaddress.IPv4Address("198.19.0.0") + 1 + i),
        overlay=str(net.network_address + 1 + i),
    )


def moved_private(i: int) -> str:
    return str(ipaddress.IPv4Address("10.208.0.0") + 1 + i)


# -- churn ----------------------------------------------------------------------------------


def churn(args) -> int:
    from kazoo.client import KazooClient

    from overlay.model import serialise_node

    zk = KazooClient(hosts=args.hosts, timeout=10)
    zk.start(timeout=30)
    p = args.prefix.rstrip("/")
    try:
        print(json.dumps({"ok": True}), flush=True)
        for line in sys.stdin:
            req = json.loads(line)
            if req["cmd"] == "quit":
                break
            if req["cmd"] == "setup":
                p = req.get("prefix", p).rstrip("/")
                for path in ("nodes", "policies", "config", "alloc/id-to-ip", "alloc/ip-to-id"):
                    zk.ensure_path(f"{p}/{path}")
                nodes = [peer_node(i) for i in range(req["n"])]
                for k in range(0, len(nodes), 300):
                    tx = zk.transaction()
                    for node in nodes[k:k + 300]:
                        tx.create(f"{p}/alloc/ip-to-id/{node.overlay}", node.node_id.encode())
                        tx.create(f"{p}/alloc/id-to-ip/{node.node_id}", node.overlay.encode())
                        tx.create(f"{p}/nodes/{node.node_id}", serialise_node(node))
                    results = tx.commit()
                    bad = [r for r in results if isinstance(r, Exception)]
                    if bad:
                        raise RuntimeError(f"creating peer records: {bad[0]!r}")
                print(json.dumps({"ok": True, "n": len(nodes)}), flush=True)
            elif req["cmd"] == "change":
                out = []
                period = 1.0 / req["rate"]
                t0 = time.monotonic()
                for j in range(req["count"]):
                    i = req["start"] + j
                    delay = t0 + j * period - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    node = peer_node(i, moved_private(i))
                    sent = time.time()
                    stat = zk.set(f"{p}/nodes/{node.node_id}", serialise_node(node))
                    out.append([node.overlay, node.private, stat.mtime, sent * 1000.0])
                print(json.dumps({"ok": True, "changes": out}), flush=True)
    finally:
        zk.stop()
        zk.close()
    return 0


# -- watchers -------------------------------------------------------------------------------


def _config(args):
    from overlay.config import config_from_dict

    k = int(args.id)
    guard: dict = {"max_change": 1000000}  # the churn is intended: never hold it
    if args.settle_s is not None:
        guard["settle_s"] = args.settle_s
    return config_from_dict({
        "node_id": f"watcher-{k}",
        "network": NETWORK,
        "overlay_subnet": SUBNET,
        "addresses": {
            "private": str(ipaddress.IPv4Address("10.209.0.0") + 1 + k),
            "public": str(ipaddress.IPv4Address("198.18.200.0") + 1 + k),
            "overlay": str(ipaddress.IPv4Network(SUBNET).broadcast_address - 1 - k),
        },
        "registry": {"backend": "zookeeper", "hosts": [args.hosts], "prefix": args.prefix},
        "datapath": {"backend": "dryrun"},
        "guard": guard,
        "throttle": {"min_s": 0, "max_s": 0},
    })


def watch(args) -> int:
    from overlay.datapath.dryrun import DryRunDatapath
    from overlay.model import Node
    from overlay.registry.zookeeper import ZooKeeperRegistry

    cfg = _config(args)
    seen: list[list] = []
    lock = threading.Lock()
    ready = threading.Event()
    registry = ZooKeeperRegistry(cfg.registry, cfg.overlay_subnet, cfg.node_id)
    stop = threading.Event()
    agent_thread = None

    if args.mode == "agent":
        from overlay.agent import Agent

        class Recording(DryRunDatapath):
            def apply(self, ops):
                super().apply(ops)
                now = time.time()
                with lock:
                    for op in ops:
                        if op.table == "nat" and op.value is not None:
                            seen.append([op.key, op.value.real, now])
                if len(self.state["nat"]) >= args.n:
                    ready.set()

        dp = Recording()
        a = cfg.addresses
        me = Node(cfg.node_id, cfg.network, a.private, a.public, a.overlay)
        agent = Agent(cfg, registry, dp, me, resync_s=3600.0)
        registry.start(agent.notify)
        agent_thread = threading.Thread(target=agent.run, args=(stop, 0.5), daemon=True)
        agent_thread.start()
    else:
        last: dict[str, str] = {}

        def on_change():
            view = registry.view()
            now = time.time()
            changed = []
            for node in view.nodes.values():
                if last.get(node.overlay) != node.private:
                    last[node.overlay] = node.private
                    changed.append([node.overlay, node.private, now])
            with lock:
                seen.extend(changed)
            if len(last) >= args.n:
                ready.set()

        registry.start(on_change)

    try:
        if not ready.wait(args.ready_timeout):
            print(json.dumps({"ok": False, "error": "not in sync in time"}), flush=True)
            return 1
        with lock:
            seen.clear()  # the initial sync is not churn
        print(json.dumps({"ok": True, "ready": args.id}), flush=True)
        for line in sys.stdin:
            if line.strip() == "dump":
                with lock:
                    print(json.dumps({"ok": True, "seen": seen}), flush=True)
    finally:
        stop.set()
        registry.close()
        if agent_thread is not None:
            agent_thread.join(5)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fanout_proc")
    ap.add_argument("role", choices=("churn", "watch"))
    ap.add_argument("--hosts", required=True)
    ap.add_argument("--prefix", default="/bench")
    ap.add_argument("--id", default="0")
    ap.add_argument("--mode", choices=("agent", "bare"), default="agent")
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--ready-timeout", type=float, default=180.0)
    ap.add_argument("--settle-s", type=float, default=None,
                    help="guard.settle_s of the agents (default: the config's default)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {args.role}-{args.id} %(name)s: %(message)s")
    logging.getLogger("kazoo").setLevel(logging.ERROR)
    return churn(args) if args.role == "churn" else watch(args)


if __name__ == "__main__":
    sys.exit(main())
