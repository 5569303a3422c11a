"""Processes for test_conformance.py, run inside a test namespace (``nsenter --net``).

    python -m tests.support.conformance agent          the daemon's reconcile step for one
                                                 host, driven by JSON lines on stdin
                                                 (one JSON answer a line)
    python -m tests.support.conformance probe JSON     a batch of TCP / UDP / ICMP probes,
                                                 run in parallel; prints one JSON line

Agent commands: ``{"cmd": "start", "config": {...}}`` builds the datapath from
the config as the daemon does (``daemon.make_datapath``: ``registry.create``
with the config's datapath section) and starts it; ``{"cmd": "program"}``
plans (``config_from_dict`` -> ``Node`` -> ``plan`` with the config's static
peers), diffs against ``observe()`` and applies, like ``Agent.reconcile``;
``counters``; ``close``; ``teardown``; ``quit``.

Probe items: ``{"proto": "tcp"|"udp"|"icmp", "host": addr, "port": n}``.
Results, in order: ``{"ok", "seen", "peer", "error"}``: ``seen`` is the
client address the server reported (servers are ``tests.support.iptctl serve``,
which answer ``"<peer ip>\\n"``), ``peer`` the client's view of the other
end (TCP ``getpeername``; UDP and ICMP the source of the reply). Every wait
is bounded by ``timeout`` (default 2 s). Tests only.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import threading
import time
import traceback

from tests.support.packets import await_echo_reply, echo_request

TIMEOUT_S = 2.0


# -- the agent -------------------------------------------------------------------------


class AgentProcess:
    """One host's control loop, reduced to what the daemon does per reconcile."""

    def __init__(self):
        self.config = None
        self.me = None
        self.dp = None

    def start(self, req: dict) -> dict:
        from overlay.config import config_from_dict
        from overlay.daemon import make_datapath
        from overlay.model import Node

        cfg = config_from_dict(req["config"])
        a = cfg.addresses
        self.config = cfg
        self.me = Node(cfg.node_id, cfg.network, a.private, a.public, a.overlay,
                       groups=cfg.groups, open_ports=cfg.filter.open_ports)
        self.dp = make_datapath(cfg, self.me)
        t0 = time.monotonic()
        self.dp.start()
        return {"backend": self.dp.name, "start_s": round(time.monotonic() - t0, 3),
                "adopted": getattr(self.dp, "adopted", None)}

    def program(self, req: dict) -> dict:
        from overlay.diff import diff
        from overlay.plan import plan

        desired = plan(self.me, self.config.registry.peers, self.config)
        ops = diff(desired.tables, self.dp.observe())
        if ops:
            self.dp.apply(ops)
        return {"ops": [f"{op.table} {op.key!r} {op.value!r}" for op in ops],
                "peers": sorted(p.node_id for p in desired.peers),
                "excluded": [list(e) for e in desired.excluded]}

    def counters(self, req: dict) -> dict:
        return {"counters": self.dp.counters()}

    def close(self, req: dict) -> dict:
        self.dp.close()
        return {}

    def teardown(self, req: dict) -> dict:
        self.dp.teardown()
        return {}


def agent_loop() -> None:
    agent = AgentProcess()
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        try:
            if cmd == "quit":
                print(json.dumps({"ok": True}), flush=True)
                return
            out = getattr(agent, cmd)(req)
            print(json.dumps({"ok": True, **out}), flush=True)
        except Exception as exc:  # report, keep serving
            print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}",
                              "trace": traceback.format_exc()}), flush=True)


# -- probes ----------------------------------------------------------------------------


def _failed(exc: BaseException) -> dict:
    return {"ok": False, "seen": None, "peer": None, "error": f"{type(exc).__name__}: {exc}"}


def probe_tcp(host: str, port: int, timeout: float) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        s.sendall(b"hello\n")
        seen = s.recv(64).decode().strip()
        return {"ok": bool(seen), "seen": seen, "peer": s.getpeername()[0], "error": None}
    except OSError as exc:
        return _failed(exc)
    finally:
        s.close()


def probe_udp(host: str, port: int, timeout: float) -> dict:
    """Unconnected, so the reply's source is reported as it arrived."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(b"hello\n", (host, port))
        data, src = s.recvfrom(64)
        return {"ok": True, "seen": data.decode().strip(), "peer": src[0], "error": None}
    except OSError as exc:
        return _failed(exc)
    finally:
        s.close()


def probe_icmp(host: str, ident: int, timeout: float) -> dict:
    """One echo request over a raw socket; the first matching echo reply wins."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        s.sendto(echo_request(ident, 1, b"overlay-conformance"), (host, 0))
        src = await_echo_reply(s, ident, 1, timeout)
        if src is not None:
            return {"ok": True, "seen": None, "peer": src, "error": None}
        return {"ok": False, "seen": None, "peer": None, "error": "no echo reply"}
    except OSError as exc:
        return _failed(exc)
    finally:
        s.close()


def run_probes(items: list[dict], timeout: float = TIMEOUT_S) -> list[dict]:
    results: list[dict | None] = [None] * len(items)
    idents = random.Random(os.getpid()).sample(range(1, 0xFFFF), len(items))

    def one(i: int, item: dict) -> None:
        proto, host = item["proto"], item["host"]
        try:
            if proto == "tcp":
                results[i] = probe_tcp(host, item["port"], timeout)
            elif proto == "udp":
                results[i] = probe_udp(host, item["port"], timeout)
            else:
                results[i] = probe_icmp(host, idents[i], timeout)
        except Exception as exc:  # a probe never takes the batch down
            results[i] = _failed(exc)

    threads = [threading.Thread(target=one, args=(i, it), daemon=True) for i, it in enumerate(items)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout + 5
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [r if r is not None else {"ok": False, "seen": None, "peer": None, "error": "hung"}
            for r in results]


def main(argv: list[str]) -> int:
    if argv and argv[0] == "agent":
        agent_loop()
    elif argv and argv[0] == "probe":
        args = json.loads(argv[1])
        print(json.dumps(run_probes(args["probes"], args.get("timeout", TIMEOUT_S))), flush=True)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
