"""The ``agent`` suite: what the agent itself spends per change and per peer (issue 14).

Pure Python, no namespaces: an :class:`overlay.agent.Agent` on a registry whose view is a
real :class:`overlay.registry.ViewState` (with its change feed, like the built-in
registries) and a datapath that keeps nothing (the kernel's share is ``update_one`` /
``ebpf-tc``). N peers in two networks, four group sets, two policies selecting this node.

- ``agent_change_ms_p50`` / ``_p99`` (suite ``update_one``, backend ``core``): one peer's
  private address moves (and back, alternately); the time from the write into the view
  (the registry's watch thread) through the listener and ``Agent.reconcile`` (feed, guard,
  incremental plan, diff of the touched keys) to the ops handed to the datapath.
- ``agent_rss_bytes_per_peer`` (suite ``memory``, backend ``core``): RSS growth of a fresh
  process from an agent with no peers to the same agent with N peers (registry view,
  planner state and the agent's copy of the applied tables), after 20 incremental changes,
  / N (``python -m bench.agentcost rss N``, one process per N).
"""

from __future__ import annotations

import gc
import ipaddress
import json
import os
import subprocess
import sys
import time

from bench.dphost import rss_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUP_SETS = [("web",), ("db",), ("web", "ops"), ()]


def _percentile(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(p * (len(v) - 1)))))]


class _NullDatapath:
    """Counts ops, keeps nothing (the kernel keeps the state)."""

    name = "null"

    def __init__(self):
        self.ops = 0

    def observe(self) -> dict:
        from overlay.ops import empty_state

        return empty_state()

    def apply(self, ops) -> None:
        self.ops += len(ops)

    def counters(self) -> dict:
        return {}


class _FeedRegistry:
    """A registry whose view the bench writes, as a registry's watch thread does."""

    name = "bench"

    def __init__(self):
        from overlay.registry import ViewState

        self.v = ViewState(connected=True, synced=True)
        self.listener = None

    def start(self, listener) -> None:
        self.listener = listener

    def view(self):
        return self.v.snapshot()

    def changes(self, since: int):
        return self.v.changes(since)

    def write(self, nodes: dict) -> None:
        with self.v.lock:
            for node_id, node in nodes.items():
                self.v.nodes[node_id] = node
                self.v.order.setdefault(node_id, len(self.v.order) + 1)
            self.v.revision += 1
        if self.listener is not None:
            self.listener()


def fleet(n: int) -> dict:
    from overlay.model import Node

    out = {}
    base = int(ipaddress.IPv4Address("192.168.0.10"))
    for i in range(n):
        net = "ec2" if i % 2 else "vpc"
        private = str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.16.0.0")) + i))
        public = str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.16.0")) + i))
        out[f"n{i}"] = Node(f"n{i}", net, private, public, str(ipaddress.IPv4Address(base + i)),
                            GROUP_SETS[i % len(GROUP_SETS)])
    return out


def make_agent(n: int):
    from overlay.agent import Agent
    from overlay.config import config_from_dict
    from overlay.model import Node, policy_from_dict

    cfg = config_from_dict({
        "node_id": "self", "network": "ec2", "overlay_subnet": "192.168.0.0/14", "groups": ["db"],
        "addresses": {"private": "10.0.0.1", "public": "198.18.0.1", "overlay": "192.168.0.1"},
        "registry": {"backend": "static"}, "datapath": {"backend": "dryrun"},
        "guard": {"max_change": 20, "settle_s": 0},
    })
    me = Node("self", "ec2", "10.0.0.1", "198.18.0.1", "192.168.0.1", ("db",))
    reg = _FeedRegistry()
    with reg.v.lock:
        for pid, src in (("web-db", "web"), ("ops-db", "ops")):
            reg.v.policies[pid] = policy_from_dict({"v": 1, "from": {"group": src}, "to": {"group": "db"},
                                                   "proto": "tcp", "ports": [5432]}, pid)
    nodes = fleet(n)
    reg.write(nodes)
    del nodes
    agent = Agent(cfg, reg, _NullDatapath(), me)
    reg.start(agent.notify)
    agent.reconcile()          # the full sync
    return agent, reg


def change_ms(n: int, reps: int) -> list[float]:
    """``reps`` one-peer changes among ``n``: ms each, event in to ops out."""
    from dataclasses import replace

    agent, reg = make_agent(n)
    times = []
    for r in range(reps):
        i = (r * 7919) % n
        node = reg.v.nodes[f"n{i}"]
        moved = replace(node, private=f"10.250.{(r >> 8) & 255}.{r & 255}",
                        public=f"198.19.{(r >> 8) & 255}.{r & 255}")
        t0 = time.perf_counter()
        reg.write({node.node_id: moved})
        ops = agent.reconcile()
        times.append((time.perf_counter() - t0) * 1000)
        if not ops or agent.feed_seq is None:
            raise RuntimeError(f"change {r}: no ops or no feed ({len(ops)} ops)")
    return times


def rss_per_peer(n: int) -> float:
    """In this process: RSS growth from 0 to ``n`` peers, / n."""
    from dataclasses import replace

    warm, _ = make_agent(1)
    del warm
    gc.collect()
    before = rss_bytes()
    agent, reg = make_agent(n)
    for r in range(20):
        node = reg.v.nodes[f"n{r}"]
        reg.write({node.node_id: replace(node, private=f"10.251.0.{r}", public=f"198.19.251.{r}")})
        agent.reconcile()
    gc.collect()
    return (rss_bytes() - before) / n


def run_suite(results, p: dict, say) -> None:
    from bench.results import make_row

    reps = p.get("agent_change_reps", 200)
    for n in p.get("agent_peers", [1000, 10000, 50000]):
        times = change_ms(n, reps)
        p50, p99 = _percentile(times, 0.5), _percentile(times, 0.99)
        note = f"{reps} one-peer real-address changes, feed -> guard -> incremental plan -> diff -> ops"
        results.add(make_row("update_one", "core", n, "agent_change_ms_p50", "ms", [p50], note, digits=5))
        results.add(make_row("update_one", "core", n, "agent_change_ms_p99", "ms", [p99], note, digits=5))
        say(f"  agent_change N={n:<6d}: p50 {p50:.3f} ms, p99 {p99:.3f} ms")
        out = subprocess.run([sys.executable, "-m", "bench.agentcost", "rss", str(n)], cwd=REPO,
                             capture_output=True, text=True, timeout=1800, check=True)
        rss = json.loads(out.stdout)["rss_bytes_per_peer"]
        results.add(make_row("memory", "core", n, "agent_rss_bytes_per_peer", "bytes/peer", [rss],
                             "RSS growth of a process holding the agent (registry view, planner, "
                             "applied tables) from 0 to N peers, / N", digits=1))
        say(f"  agent_rss    N={n:<6d}: {rss:.0f} B/peer")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "rss":
        print(json.dumps({"rss_bytes_per_peer": rss_per_peer(int(sys.argv[2]))}))
    elif len(sys.argv) == 4 and sys.argv[1] == "change":
        t = change_ms(int(sys.argv[2]), int(sys.argv[3]))
        print(json.dumps({"p50": _percentile(t, 0.5), "p99": _percentile(t, 0.99)}))
    else:
        raise SystemExit("usage: python -m bench.agentcost rss N | change N REPS")
