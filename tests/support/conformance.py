"""Processes for test_conformance.py, run inside a test namespace (``nsenter --net``).

    python -m tests.support.conformance agent          the daemon's reconcile step for one
                                                 host, driven by JSON lines on stdin
                                                 (one JSON answer a line)
    python -m tests.support.conformance probe JSON     a batch of TCP / UDP / ICMP probes,
                                                 run in parallel; prints one JSON line
    conformance echo PORT...                     UDP echo servers (IPv4 and IPv6); one JSON
                                                 line per datagram received {"from", "port", "len"}
    conformance spoof JSON                       send hand-made frames (scapy, at L2): UDP
                                                 datagrams with any source; prints {"sent"}
    conformance fragsyn JSON                     a TCP SYN cut in tiny fragments (nmap -f);
                                                 prints {"answered": a SYN-ACK came back}

Agent commands: ``{"cmd": "start", "config": {...}}`` builds the datapath from
the config as the daemon does (``daemon.make_datapath``: ``registry.create``
with the config's datapath section) and starts it; ``{"cmd": "program"}``
plans (``config_from_dict`` -> ``Node`` -> ``plan`` with the config's static
peers), diffs against ``observe()`` and applies, like ``Agent.reconcile``;
``counters``; ``close``; ``teardown``; ``quit``.

Probe items: ``{"proto": "tcp"|"udp"|"icmp", "host": addr, "port": n}``, IPv4 or
IPv6 (a link-local address with its ``%iface``); optional ``"sport"`` (TCP: bind
that source port; the socket is closed with a RST, so the 4-tuple is free at
once) and ``"size"`` (UDP, also with ``"sport"``: send that many bytes to an echo server, which must
send them all back, fragmented both ways when larger than the MTU).
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
import select
import socket
import struct
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
                       groups=cfg.groups, open_ports=cfg.filter.open_ports,
                       private6=a.private6, public6=a.public6)
        self.dp = make_datapath(cfg, self.me)
        t0 = time.monotonic()
        self.dp.start()
        return {"backend": self.dp.name, "start_s": round(time.monotonic() - t0, 3),
                "adopted": getattr(self.dp, "adopted", None)}

    def program(self, req: dict) -> dict:
        from overlay.diff import diff
        from overlay.plan import plan

        peers = self.config.registry.peers
        if req.get("members") is not None:  # the registry now lists only these
            peers = [p for p in peers if p.node_id in req["members"]]
        desired = plan(self.me, peers, self.config)
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


def _addr(host: str, port: int) -> tuple[int, tuple]:
    """(family, sockaddr) of ``host`` (IPv6 with an optional %scope)."""
    if ":" not in host:
        return socket.AF_INET, (host, port)
    info = socket.getaddrinfo(host, port, socket.AF_INET6, 0, 0, socket.AI_NUMERICHOST)
    return socket.AF_INET6, info[0][4]


def _host(sockaddr) -> str:
    return sockaddr[0].split("%")[0]


def probe_tcp(host: str, port: int, timeout: float, sport: int | None = None) -> dict:
    family, addr = _addr(host, port)
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if sport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", sport))
        s.connect(addr)
        s.sendall(b"hello\n")
        seen = s.recv(64).decode().strip()
        return {"ok": bool(seen), "seen": seen, "peer": _host(s.getpeername()), "error": None}
    except OSError as exc:
        return _failed(exc)
    finally:
        if sport:  # a RST: no TIME_WAIT, the same 4-tuple can be used again at once
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()


def probe_udp(host: str, port: int, timeout: float, size: int = 0, sport: int | None = None) -> dict:
    """Unconnected, so the reply's source is reported as it arrived. With ``size``,
    that many bytes go to an echo server and must all come back."""
    family, addr = _addr(host, port)
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    if sport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", sport))
    payload = bytes(random.Random(size).randrange(256) for _ in range(size)) if size else b"hello\n"
    try:
        s.sendto(payload, addr)
        data, src = s.recvfrom(max(64, size + 64))
        if size:
            ok = data == payload
            return {"ok": ok, "seen": None, "peer": _host(src),
                    "error": None if ok else f"echo of {len(data)} bytes differs"}
        return {"ok": True, "seen": data.decode().strip(), "peer": _host(src), "error": None}
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
                results[i] = probe_tcp(host, item["port"], timeout, item.get("sport"))
            elif proto == "udp":
                results[i] = probe_udp(host, item["port"], timeout, item.get("size", 0), item.get("sport"))
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


# -- echo, spoofed frames, tiny fragments ----------------------------------------------


def echo(ports: list[int]) -> None:
    lock = threading.Lock()

    def line(record: dict) -> None:
        # one write per record under a lock: print() from two threads writes the text
        # and its newline separately, so two records could share a line
        with lock:
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()

    def one(port: int) -> None:
        srv = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        srv.bind(("::", port))
        while True:
            data, peer = srv.recvfrom(65535)
            line({"from": peer[0].removeprefix("::ffff:").split("%")[0], "port": port, "len": len(data)})
            srv.sendto(data, peer)

    for port in ports:
        threading.Thread(target=one, args=(port,), daemon=True).start()
    line({"ready": True})
    threading.Event().wait()


def spoof(args: dict) -> dict:
    """UDP datagrams with the given sources, straight onto the wire of ``iface``
    to ``dst_mac`` (no neighbour lookup: the sources may be anything)."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.sendrecv import sendp

    frames = []
    for d in args["datagrams"]:
        l3 = IPv6(src=d["src"], dst=d["dst"]) if ":" in d["dst"] else IP(src=d["src"], dst=d["dst"])
        frames.append(Ether(dst=args["dst_mac"]) / l3 / UDP(sport=d.get("sport", 40000), dport=d["dport"])
                      / d.get("payload", "spoofed").encode())
    sendp(frames, iface=args["iface"], verbose=False)
    return {"sent": len(frames)}


def fragsyn(args: dict) -> dict:
    """A SYN to ``dst``:``dport`` in fragments of ``size`` bytes (nmap -f: 8, -ff: 16);
    waits for a SYN-ACK (bounded by ``timeout``)."""
    from scapy.layers.inet import IP, TCP, fragment

    sport = args.get("sport", 41000 + os.getpid() % 1000)
    syn = IP(dst=args["dst"], id=os.getpid() & 0xFFFF) / TCP(sport=sport, dport=args["dport"], flags="S",
                                                          seq=12345, options=[("MSS", 1460)])
    rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        for frag in fragment(syn, fragsize=args["size"]):
            tx.sendto(bytes(frag), (args["dst"], 0))
        deadline = time.monotonic() + args.get("timeout", TIMEOUT_S)
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([rx], [], [], left)
            if not ready:
                break
            pkt, src = rx.recvfrom(2048)
            ihl = (pkt[0] & 0x0F) * 4
            s_port, d_port = struct.unpack("!HH", pkt[ihl:ihl + 4])
            flags = pkt[ihl + 13]
            if src[0] == args["dst"] and s_port == args["dport"] and d_port == sport and flags & 0x12 == 0x12:
                return {"answered": True}
        return {"answered": False}
    finally:
        rx.close()
        tx.close()


def main(argv: list[str]) -> int:
    if argv and argv[0] == "agent":
        agent_loop()
    elif argv and argv[0] == "probe":
        args = json.loads(argv[1])
        print(json.dumps(run_probes(args["probes"], args.get("timeout", TIMEOUT_S))), flush=True)
    elif argv and argv[0] == "echo":
        echo([int(p) for p in argv[1:]])
    elif argv and argv[0] in ("spoof", "fragsyn"):
        print(json.dumps(globals()[argv[0]](json.loads(argv[1]))), flush=True)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
