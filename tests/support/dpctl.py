"""Run inside a test namespace: drive EbpfDatapath, or be a small client/server.

Usage: python -m tests.support.dpctl ACTION JSON-ARGS (from the repository); prints one
JSON line (the result).
Every network wait is bounded by a timeout.

Datapath actions (args: interface, private, overlay, pin_root, subnet; mode and cgroup for
socket mode):
  start     start (load or adopt), apply ``ops`` (spec below) if given, close
  hold      start, apply ops, print, then sleep until killed (the "daemon")
  apply     start (adopt), apply ops, close
  observe   start (adopt), print observe() and counters(), close
  teardown  EbpfDatapath.remove()
  plan      start (adopt), plan ``node`` (this one), ``peers``, ``policies`` (record JSON) under
            ``config`` (a config mapping), apply the diff against observe(), close

Ops spec: {"nat": {overlay: real}, "peers": {real: identity},
"ports": {"tcp": [port...], "udp": [...]}, "failsafe": {cidr: flags},
"config": {name: value}}; ``"delete": {table: [keys]}`` deletes.

Traffic actions: serve-tcp, serve-udp, serve-lines, connect-tcp, send-udp, udp-connected,
stream-serve, stream-send, syn-flood. Any action with ``join_cgroup`` (a cgroup-v2 directory) first moves
this process into that cgroup.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import socket
import struct
import sys
import time

from tests.support.packets import await_echo_reply, echo_request, icmp_checksum


def _out(obj) -> None:
    print(json.dumps(obj), flush=True)


# -- datapath ---------------------------------------------------------------------


def build_ops(spec: dict):
    from overlay.ops import NatEntry, Op, PeerEntry

    ops = []
    for overlay, real in spec.get("nat", {}).items():  # real, or [real, override]
        ops.append(Op("nat", overlay, NatEntry(*real) if isinstance(real, list) else NatEntry(real)))
    for real, identity in spec.get("peers", {}).items():
        ops.append(Op("peers", real, PeerEntry(identity, 1)))
    words: dict[tuple[int, int], int] = {}
    for slot, proto in enumerate(("tcp", "udp")):
        for port in spec.get("ports", {}).get(proto, []):
            key = (slot, port // 64)
            words[key] = words.get(key, 0) | 1 << (port % 64)
    for key, bits in words.items():
        ops.append(Op("ports", key, bits))
    for cidr, flags in spec.get("failsafe", {}).items():
        ops.append(Op("failsafe", cidr, flags))
    for name, value in spec.get("config", {}).items():
        ops.append(Op("config", name, value))
    for table, keys in spec.get("delete", {}).items():
        for key in keys:
            ops.append(Op(table, tuple(key) if isinstance(key, list) else key, None))
    return ops


def _datapath(a: dict):
    from overlay.datapath.ebpf.datapath import EbpfDatapath

    return EbpfDatapath(
        a.get("interface", "eth0"), a.get("subnet", "192.168.0.0/18"), a["private"],
        a.get("overlay"), pin_root=a["pin_root"], sizes=_sizes(a.get("sizes")),
        mode=a.get("mode", "tc"), cgroup=a.get("cgroup", "/sys/fs/cgroup"),
        extra_routes=a.get("extra_routes", ()),
    )


def _sizes(spec):
    """{"nat": n, ...} -> the config's MapSizes (what the daemon passes); with the
    test-only "nat_slots" (ovl_nat's slot count forced below the subnet's), a mapping
    of the -D names the build takes."""
    if not spec:
        return None
    if "nat_slots" in spec:
        from overlay import abi

        return {abi.SIZE_DEFINES[k]: v for k, v in spec.items()}
    from overlay.config import MapSizes

    return MapSizes(**spec)


def _state(dp) -> dict:
    from overlay.datapath.ebpf.maps import to_jsonable

    return {
        "pin_dir": dp.pin_dir,
        "adopted": dp.adopted,
        "reattached": dp.reattached,
        "attachments": dp.attachments(),
        "observe": to_jsonable(dp.observe()),
        "counters": dp.counters(),
        "ct": len(dp.ct_entries()),
        "fill": dp.fill(),
    }


def act_start(a: dict) -> None:
    dp = _datapath(a)
    t0 = time.monotonic()
    try:
        dp.start()
    except Exception as exc:
        if not a.get("expect_error"):
            raise
        _out({"error": type(exc).__name__, "message": str(exc)})
        return
    elapsed = time.monotonic() - t0
    try:
        if a.get("ops"):
            dp.apply(build_ops(a["ops"]))
        out = _state(dp)
        out["start_s"] = elapsed
        _out(out)
    finally:
        dp.close()


act_apply = act_start
act_observe = act_start


def act_hold(a: dict) -> None:
    dp = _datapath(a)
    dp.start()
    if a.get("ops"):
        dp.apply(build_ops(a["ops"]))
    out = _state(dp)
    out["pid"] = os.getpid()
    _out(out)
    deadline = time.monotonic() + a.get("max_s", 60)
    while time.monotonic() < deadline:  # until killed; bounded
        time.sleep(0.2)
    dp.close()


def act_plan(a: dict) -> None:
    from overlay.config import config_from_dict
    from overlay.diff import diff
    from overlay.model import node_from_dict, policy_from_dict
    from overlay.plan import plan

    dp = _datapath(a)
    dp.start()
    try:
        cfg = config_from_dict(a["config"])
        me = node_from_dict({"v": 2, **a["node"]})
        peers = [node_from_dict({"v": 2, **p}) for p in a.get("peers", [])]
        policies = {pid: policy_from_dict(p, pid) for pid, p in a.get("policies", {}).items()}
        desired = plan(me, peers, cfg, policies=policies)
        ops = diff(desired.tables, dp.observe())
        dp.apply(ops)
        out = _state(dp)
        out["ops"] = len(ops)
        out["selected_by"] = list(desired.selected_by)
        _out(out)
    finally:
        dp.close()


def act_teardown(a: dict) -> None:
    from overlay.datapath.ebpf.datapath import EbpfDatapath

    EbpfDatapath.remove(interface=a.get("interface", "eth0"), pin_root=a["pin_root"])
    _out({"ok": True})


# -- traffic ----------------------------------------------------------------------


def act_serve_tcp(a: dict) -> None:
    """Accept up to ``count`` connections; answer each with the peer's address."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((a.get("bind", "0.0.0.0"), a["port"]))
    srv.listen(16)
    srv.settimeout(a.get("timeout", 20))
    _out({"listening": a["port"]})
    seen = []
    try:
        for _ in range(a.get("count", 1)):
            conn, peer = srv.accept()
            with conn:
                conn.settimeout(5)
                data = conn.recv(100)
                conn.sendall(json.dumps({"peer": peer[0], "got": data.decode()}).encode())
            seen.append(peer[0])
    except TimeoutError:
        pass
    _out({"seen": seen})


def act_serve_udp(a: dict) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((a.get("bind", "0.0.0.0"), a["port"]))
    sock.settimeout(a.get("timeout", 20))
    _out({"listening": a["port"]})
    seen = []
    try:
        for _ in range(a.get("count", 1)):
            data, peer = sock.recvfrom(2048)
            sock.sendto(json.dumps({"peer": peer[0], "got": data.decode()}).encode(), peer)
            seen.append(peer[0])
    except TimeoutError:
        pass
    _out({"seen": seen})


def act_serve_lines(a: dict) -> None:
    """Echo every line of every TCP connection back on it (long-lived connections), for
    ``timeout`` seconds in all; a thread per connection."""
    import threading

    srv = socket.create_server((a.get("bind", "0.0.0.0"), a["port"]), reuse_port=False)
    end = time.monotonic() + a.get("timeout", 120)

    def echo(conn) -> None:
        with conn, conn.makefile("rb") as lines:
            conn.settimeout(max(0.1, end - time.monotonic()))
            try:
                for line in lines:
                    conn.sendall(line)
            except OSError:
                pass

    _out({"listening": a["port"]})
    while (left := end - time.monotonic()) > 0:
        srv.settimeout(left)
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            break
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
    _out({"done": True})


def act_connect_tcp(a: dict) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(a.get("timeout", 3))
    try:
        if a.get("bind"):
            s.bind((a["bind"], 0))  # the source address to connect from
        s.connect((a["host"], a["port"]))
        s.sendall(b"hello")
        reply = json.loads(s.recv(1000).decode())
        _out({"ok": True, "server_saw": reply["peer"], "peer": s.getpeername()[0],
              "local": s.getsockname()[0]})
    except OSError as exc:
        _out({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        s.close()


def act_send_udp(a: dict) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(a.get("timeout", 3))
    try:
        s.sendto(b"hello", (a["host"], a["port"]))
        data, src = s.recvfrom(2048)  # unconnected: src is what the packet carried
        reply = json.loads(data.decode())
        _out({"ok": True, "server_saw": reply["peer"], "reply_from": src[0]})
    except OSError as exc:
        _out({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        s.close()


def act_udp_connected(a: dict) -> None:
    """A connected UDP socket: connect, send, receive; what getpeername and recvfrom show."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(a.get("timeout", 3))
    try:
        s.connect((a["host"], a["port"]))
        s.send(b"hello")
        data, src = s.recvfrom(2048)
        reply = json.loads(data.decode())
        _out({"ok": True, "server_saw": reply["peer"], "reply_from": src[0], "peer": s.getpeername()[0]})
    except OSError as exc:
        _out({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        s.close()


def act_stream_serve(a: dict) -> None:
    """Receive exactly ``nbytes`` on one connection; report count and sha256."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", a["port"]))
    srv.listen(1)
    srv.settimeout(a.get("timeout", 30))
    _out({"listening": a["port"]})
    h, n, error, peer = hashlib.sha256(), 0, None, None
    try:
        conn, peer = srv.accept()
        conn.settimeout(a.get("timeout", 30))
        with conn:
            while n < a["nbytes"]:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                h.update(chunk)
                n += len(chunk)
            conn.sendall(h.hexdigest().encode())
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    _out({"received": n, "sha256": h.hexdigest(), "error": error, "peer": peer and peer[0]})


def act_stream_send(a: dict) -> None:
    """Send ``nbytes`` of deterministic data, paced over ``seconds``; report
    the sha256, the server's echo of its own and any error (a reset shows here).
    With ``pause_after`` and ``pause_s``: idle for ``pause_s`` once that many bytes
    are out (printing {"paused": bytes}); with ``resume_file`` too, the pause ends as soon
    as that file exists (``pause_s`` is then its bound)."""
    nbytes, seconds, chunks = a["nbytes"], a.get("seconds", 5.0), a.get("chunks", 100)
    data = random.Random(a.get("seed", 1)).randbytes(nbytes)
    h = hashlib.sha256(data).hexdigest()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(a.get("timeout", 20))
    step = -(-nbytes // chunks)
    error, echo, sent = None, None, 0
    try:
        s.connect((a["host"], a["port"]))
        print(json.dumps({"connected": True}), flush=True)
        t0 = time.monotonic()
        paused = a.get("pause_s", 0.0) <= 0
        for i in range(chunks):
            piece = data[i * step:(i + 1) * step]
            if not piece:
                break
            s.sendall(piece)
            sent += len(piece)
            if not paused and sent >= a.get("pause_after", nbytes):
                # the flow goes idle (what an LRU evicts first); bounded
                print(json.dumps({"paused": sent}), flush=True)
                began = time.monotonic()
                until = began + a["pause_s"]
                resume = a.get("resume_file")
                while time.monotonic() < until and not (resume and os.path.exists(resume)):
                    time.sleep(0.05 if resume else max(0.0, until - time.monotonic()))
                paused = True
                t0 += time.monotonic() - began
            delay = t0 + (i + 1) * seconds / chunks - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        r, _, _ = select.select([s], [], [], a.get("timeout", 20))
        echo = s.recv(100).decode() if r else None
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        s.close()
    _out({"sent": sent, "sha256": h, "echo": echo, "error": error})


def act_syn_flood(a: dict) -> None:
    """``count`` TCP SYNs to ``host``:``port`` from this host's ``src`` address and
    random source ports (raw socket), within ``max_s`` seconds; reports how many went."""
    src, dst = socket.inet_aton(a["src"]), socket.inet_aton(a["host"])
    rng = random.Random(a.get("seed", 7))
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sent, deadline = 0, time.monotonic() + a.get("max_s", 30)
    try:
        for i in range(a["count"]):
            if time.monotonic() > deadline:
                break
            sport = rng.randrange(1024, 65536)
            tcp = struct.pack("!HHIIBBHHH", sport, a["port"], rng.getrandbits(32), 0, 5 << 4, 0x02, 65535, 0, 0)
            pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
            tcp = tcp[:16] + struct.pack("!H", icmp_checksum(pseudo + tcp)) + tcp[18:]
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), i & 0xFFFF, 0, 64, 6, 0, src, dst)
            ip = ip[:10] + struct.pack("!H", icmp_checksum(ip)) + ip[12:]
            try:
                s.sendto(ip + tcp, (a["host"], 0))
                sent += 1
            except BlockingIOError:
                time.sleep(0.001)
    finally:
        s.close()
    _out({"sent": sent})


def act_ping(a: dict) -> None:
    """ICMP echo over a raw socket (no ping binary needed): ``count`` requests,
    each waiting up to ``wait`` s; reports the source address of each reply."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = (os.getpid() ^ a.get("salt", 0)) & 0xFFFF
    replies = []
    try:
        for seq in range(1, a.get("count", 3) + 1):
            payload = b"overlay-ping" + struct.pack("!d", time.time())
            s.sendto(echo_request(ident, seq, payload), (a["host"], 0))
            src = await_echo_reply(s, ident, seq, a.get("wait", 2.0))
            if src is not None:
                replies.append(src)
    finally:
        s.close()
    _out({"ok": bool(replies), "replies": len(replies), "from": sorted(set(replies))})


ACTIONS = {
    "start": act_start, "apply": act_apply, "observe": act_observe, "hold": act_hold,
    "teardown": act_teardown, "plan": act_plan, "serve-tcp": act_serve_tcp, "serve-udp": act_serve_udp,
    "serve-lines": act_serve_lines,
    "connect-tcp": act_connect_tcp, "send-udp": act_send_udp, "udp-connected": act_udp_connected,
    "stream-serve": act_stream_serve, "ping": act_ping, "stream-send": act_stream_send,
    "syn-flood": act_syn_flood,
}

if __name__ == "__main__":
    args = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    if args.get("join_cgroup"):
        with open(os.path.join(args["join_cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    ACTIONS[sys.argv[1]](args)
