"""Test programs of test_iptables_netns.py and the conformance suite, run inside a test
namespace as ``python -m tests.support.iptctl`` (from the repository).

    iptctl serve PORT [PORT...]       TCP and UDP servers (IPv4 and IPv6) answering "<peer ip>\\n"
    iptctl connect tcp|udp HOST PORT  one exchange; prints JSON {"ok", "peer", "reply", "error"}
    iptctl datapath                   the iptables datapath, driven by JSON lines on stdin,
                                      one JSON answer a line

Datapath commands: {"cmd": "start", "kwargs": {...}};
{"cmd": "program", "config": {...}, "peers": [{node fields}], "force_apply": bool}
(plan, diff against observe(), apply); "counters"; "stats"; "teardown";
{"cmd": "remove", "kwargs": {...}} (the classmethod); "quit".
Tests only: nothing here runs outside a namespace the test created.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import traceback

TIMEOUT_S = 2.0


def _dual_stack(kind: int) -> socket.socket:
    """A socket on :: that takes IPv4 too (IPv4-mapped), or on 0.0.0.0 without IPv6."""
    try:
        s = socket.socket(socket.AF_INET6, kind)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        return s
    except OSError:
        return socket.socket(socket.AF_INET, kind)


def _peer_text(peer) -> str:
    """The client's address as it would be seen over IPv4 or IPv6 (no ::ffff: prefix,
    no scope)."""
    return peer[0].removeprefix("::ffff:").split("%")[0]


def serve(ports: list[int]) -> None:
    def tcp(port: int) -> None:
        srv = _dual_stack(socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("::" if srv.family == socket.AF_INET6 else "0.0.0.0", port))
        srv.listen(64)
        while True:
            conn, peer = srv.accept()
            with conn:
                conn.settimeout(TIMEOUT_S)
                try:
                    conn.recv(64)
                    conn.sendall(f"{_peer_text(peer)}\n".encode())
                except OSError:
                    pass

    def udp(port: int) -> None:
        srv = _dual_stack(socket.SOCK_DGRAM)
        srv.bind(("::" if srv.family == socket.AF_INET6 else "0.0.0.0", port))
        while True:
            _, peer = srv.recvfrom(64)
            srv.sendto(f"{_peer_text(peer)}\n".encode(), peer)

    for port in ports:
        for fn in (tcp, udp):
            threading.Thread(target=fn, args=(port,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


def connect(proto: str, host: str, port: int) -> dict:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind)
    s.settimeout(TIMEOUT_S)
    try:
        s.connect((host, port))
        s.sendall(b"hello\n")
        reply = s.recv(64).decode().strip()
        return {"ok": True, "peer": s.getpeername()[0], "reply": reply, "error": None}
    except OSError as exc:
        return {"ok": False, "peer": None, "reply": None, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        s.close()


def datapath_loop() -> None:
    from overlay.config import config_from_dict
    from overlay.datapath.iptables import IptablesDatapath
    from overlay.diff import diff
    from overlay.model import Node
    from overlay.plan import plan

    dp = None
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        try:
            if cmd == "start":
                dp = IptablesDatapath(**req["kwargs"])
                dp.start()
                out = {"stats": dp.stats}
            elif cmd == "program":
                cfg = config_from_dict(req["config"])
                a = cfg.addresses
                me = Node(cfg.node_id, cfg.network, a.private, a.public, a.overlay,
                          open_ports=cfg.filter.open_ports)
                peers = [Node(**p) for p in req["peers"]]
                desired = plan(me, peers, cfg)
                ops = diff(desired.tables, dp.observe())
                if ops or req.get("force_apply"):
                    dp.apply(ops)
                out = {"ops": len(ops), "stats": dp.stats}
            elif cmd == "counters":
                out = {"counters": dp.counters()}
            elif cmd == "stats":
                out = {"stats": dp.stats}
            elif cmd == "teardown":
                dp.teardown()
                out = {}
            elif cmd == "remove":  # as `overlay datapath teardown` does, with no datapath running
                IptablesDatapath.remove(**req["kwargs"])
                out = {}
            elif cmd == "quit":
                dp.close()
                print(json.dumps({"ok": True}), flush=True)
                return
            else:
                raise ValueError(f"unknown command {cmd!r}")
            print(json.dumps({"ok": True, **out}), flush=True)
        except Exception as exc:  # report, keep serving
            print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}",
                              "trace": traceback.format_exc()}), flush=True)


def main(argv: list[str]) -> int:
    if argv[0] == "serve":
        serve([int(p) for p in argv[1:]])
    elif argv[0] == "connect":
        print(json.dumps(connect(argv[1], argv[2], int(argv[3]))))
    elif argv[0] == "datapath":
        datapath_loop()
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
