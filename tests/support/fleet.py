"""Many watching daemons in one process: agents with the dry-run datapath, each following
the controller through its own ``registry.backend: grpc`` (reliability test 5).

Usage: ``python -m tests.support.fleet JSON-ARGS`` with ``{"nodes": [node ids], "controllers":
["host:port"...], "certs": dir (a NODE.crt/.key per node), "subnet", "throttle": [min, max]}``.
Then, one command per line on stdin:

- ``report``: print one JSON line: per node ``ready``, ``digest`` (sha256 of the applied
  peers, sorted ``node_id overlay real`` lines), ``peers``, the registry's ``snapshots``,
  ``resets``, ``reconnects``, ``revision``; and this process's peak RSS (``rss_kb``);
- ``stop``: stop every agent and exit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading

from overlay.agent import Agent
from overlay.config import config_from_dict
from overlay.datapath.dryrun import DryRunDatapath
from overlay.model import Node
from overlay.registry.grpc import GrpcRegistry


def digest(rows: list[tuple[str, str, str]]) -> str:
    """sha256 of ``node_id overlay real`` lines, sorted (the test computes it from its model)."""
    return hashlib.sha256("".join(f"{n} {o} {r}\n" for n, o, r in sorted(rows)).encode()).hexdigest()


def peak_rss_kb(pid: int | str = "self") -> int:
    """Peak resident memory of process ``pid`` (``VmHWM``), in KiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    a = json.loads(sys.argv[1])
    agents: list[tuple[Agent, GrpcRegistry, threading.Event, threading.Thread]] = []
    for i, node_id in enumerate(a["nodes"]):
        private, public = f"10.250.{i // 250}.{i % 250 + 1}", f"198.19.{i // 250}.{i % 250 + 1}"
        config = config_from_dict({
            "node_id": node_id, "network": "ec2", "overlay_subnet": a["subnet"],
            "addresses": {"private": private, "public": public},
            "registry": {"backend": "grpc", "controller": a["controllers"], "timeout_s": 20,
                         "tls": {"ca": f"{a['certs']}/ca.crt", "cert": f"{a['certs']}/{node_id}.crt",
                                 "key": f"{a['certs']}/{node_id}.key"}},
            "datapath": {"backend": "dryrun"},
            "guard": {"max_change": 1_000_000},      # churn of thousands: the guard is not under test
            "throttle": {"min_s": a["throttle"][0], "max_s": a["throttle"][1]},
        })
        registry = GrpcRegistry.from_config(config)
        me = Node(node_id, "ec2", private, public, a["self_overlays"][i], (), ())
        agent = Agent(config, registry, DryRunDatapath(history=1), me, resync_s=3600)
        stop = threading.Event()
        registry.start(agent.notify)
        thread = threading.Thread(target=agent.run, args=(stop,), name=f"agent-{node_id}", daemon=True)
        thread.start()
        agents.append((agent, registry, stop, thread))
    print(json.dumps({"started": len(agents)}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "report":
            out = {}
            for agent, registry, _stop, _t in agents:
                with agent.lock:
                    rows = [(p.node_id, p.overlay, p.real) for p in agent.applied_peers.values()]
                    ready = agent.ready
                out[agent.self_node.node_id] = {
                    "ready": ready, "digest": digest(rows), "peers": len(rows), "snapshots": registry.snapshots,
                    "resets": registry.resets, "reconnects": registry.reconnects,
                    "revision": registry.controller_revision, "view_revision": registry.view().revision}
            print(json.dumps({"agents": out, "rss_kb": peak_rss_kb()}), flush=True)
        elif cmd == "stop":
            break
    for agent, _registry, stop, _t in agents:
        stop.set()
        agent.wake.set()
    for _agent, registry, _stop, thread in agents:
        thread.join(10)
        registry.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
