"""``overlay drops`` and ``overlay why``: what dropped my packet, and why.

Both read the live datapath from its pinned maps (no daemon needed; root):

- ``overlay drops`` prints the drop counters by reason; ``--follow`` streams
  the drop events of the ring buffer ``ovl_events`` (source, destination,
  protocol, ports, reason, policy, audit) as text or JSON lines, until
  ``--count`` events or ``--timeout`` seconds (else until Ctrl-C). Events
  already in the buffer when it starts are skipped (``--backlog`` shows them).
  A ring buffer has one consumer position: run one follower per host.
- ``overlay why SRC DST PROTO PORT`` explains the verdict the ingress filter
  would give now to a new flow from SRC to DST (this node) on PROTO/PORT, in
  the order the program uses (DESIGN §5), with the policy and rule that
  decide it. Identities and policies are named through ``ovl_names``, which
  the daemon writes with the plan.

docs/policies.md shows both in use.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from overlay.errors import UnsupportedError

PROTOS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58}
PROTO_NAMES = {v: k for k, v in PROTOS.items()}
SSH_PORT = 22


def _out(text: str = "") -> None:
    print(text, flush=True)


def _pin_dir(args) -> str:
    from overlay.config import datapath_location
    from overlay.datapath.ebpf.datapath import pin_dir_for

    _, iface, root = datapath_location(args.config, args.interface, args.pin_root)
    if os.geteuid() != 0:
        raise UnsupportedError(f"overlay {args.command} reads pinned BPF maps and needs root")
    pin_dir = pin_dir_for(iface, root)
    if not os.path.isdir(pin_dir):
        from overlay.errors import DatapathError

        raise DatapathError(f"nothing pinned at {pin_dir} (is the datapath loaded? see --interface, --pin-root)")
    return pin_dir


def _open_maps(pin_dir: str):
    from overlay.datapath.ebpf.maps import MapSet

    return MapSet.from_pinned(pin_dir)


def proto_name(number: int) -> str:
    return PROTO_NAMES.get(number, str(number))


# --- overlay drops ----------------------------------------------------------------------


class Namer:
    """Policy ids by index, from ``ovl_names`` (re-read when an index is new)."""

    def __init__(self, maps):
        self.maps = maps
        self.cache: dict[int, str | None] = {}

    def policy(self, index: int) -> str | None:
        if not index:
            return None
        if index not in self.cache:
            self.cache[index] = name_of(self.maps, "policy", index)
        return self.cache[index]


def name_of(maps, kind: str, number: int) -> str | None:
    from overlay.datapath.ebpf import bpfsys
    from overlay.datapath.ebpf.maps import NAMES, decode_item, encode_key

    info = maps.info(NAMES)
    raw = bpfsys.lookup(maps.fd(NAMES), encode_key("names", (kind, number)), info.key_size, info.value_size)
    return None if raw is None else decode_item("names", encode_key("names", (kind, number)), raw)[1]


def event_record(ev, namer: Namer, mono_to_wall: Callable[[int], float]) -> dict:
    from overlay.datapath.ebpf import abi

    reason = abi.DROP_REASONS.get(ev.reason, str(ev.reason))
    wall = mono_to_wall(ev.ts_ns)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall * 1000) % 1000:03d}Z"
    return {
        "time": stamp,
        "ts_ns": ev.ts_ns,
        "direction": "egress" if ev.direction else "ingress",
        "reason": reason,
        "audit": bool(ev.audit),
        "proto": proto_name(ev.proto),
        "family": ev.family or None,
        "src": abi.words_to_ip(ev.saddr, ev.family) if ev.family else None,
        "sport": abi.be16_to_port(ev.sport),
        "dst": abi.words_to_ip(ev.daddr, ev.family) if ev.family else None,
        "dport": abi.be16_to_port(ev.dport),
        "policy": namer.policy(ev.policy),
        "policy_index": ev.policy or None,
    }


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


FRAGMENT_NOTES = {
    "frag_short": "a first fragment without its full L4 header, or a later one overlapping it",
    "frag_orphan": "a later fragment whose first fragment was not seen or not allowed",
    "martian": "a loopback or own source address arriving from the wire",
}


def format_event(r: dict) -> str:
    if r["src"] is None:
        flow = "(not parsed)"
    elif r["proto"] in ("tcp", "udp") and r["reason"] not in ("frag_orphan",):
        flow = f"{r['proto']} {_hostport(r['src'], r['sport'])} -> {_hostport(r['dst'], r['dport'])}"
    elif r["proto"] in ("icmp", "icmpv6"):
        flow = f"{r['proto']} {r['src']} -> {r['dst']} (id {r['sport']})"
    else:
        flow = f"{'proto ' + r['proto'] if r['proto'] not in ('tcp', 'udp') else r['proto']} {r['src']} -> {r['dst']}"
    text = f"{r['time']} {r['direction']} {'AUDIT (passed)' if r['audit'] else 'drop'} {r['reason']} {flow}"
    if r["reason"] == "policy":
        text += f"  default-deny: node selected by policy {r['policy'] or '#' + str(r['policy_index'])}"
    elif r["reason"] in FRAGMENT_NOTES:
        text += f"  ({FRAGMENT_NOTES[r['reason']]})"
    return text


def _mono_to_wall() -> Callable[[int], float]:
    offset = time.time() - time.clock_gettime_ns(time.CLOCK_MONOTONIC) / 1e9
    return lambda ts_ns: offset + ts_ns / 1e9


def cmd_drops(args) -> int:
    pin_dir = _pin_dir(args)
    maps = _open_maps(pin_dir)
    try:
        if not args.follow:
            counts = {k[len("drop_"):]: v for k, v in maps.counters().items() if k.startswith("drop_")}
            if args.json:
                _out(json.dumps(counts, sort_keys=True))
            else:
                for reason, n in sorted(counts.items()):
                    _out(f"{reason:<12} {n}")
            return 0
        return _follow(args, pin_dir, maps)
    finally:
        maps.close()


def _follow(args, pin_dir: str, maps) -> int:
    from overlay.datapath.ebpf import abi, bpfsys

    namer = Namer(maps)
    to_wall = _mono_to_wall()
    start_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    seen = 0
    size = ctypes.sizeof(abi.OvlDropEvent)

    class _Done(Exception):
        pass

    def on_event(data: bytes) -> None:
        nonlocal seen
        if len(data) < size:
            return
        ev = abi.OvlDropEvent.from_buffer_copy(data[:size])
        if not args.backlog and ev.ts_ns < start_ns:
            return  # was in the buffer before we started
        rec = event_record(ev, namer, to_wall)
        _out(json.dumps(rec, sort_keys=True) if args.json else format_event(rec))
        seen += 1
        if args.count and seen >= args.count:
            raise _Done

    fd = bpfsys.obj_get(os.path.join(pin_dir, "ovl_events"))
    deadline = time.monotonic() + args.timeout if args.timeout else None
    try:
        with bpfsys.RingBuffer(fd, on_event) as rb:
            print(f"overlay: following drop events of {pin_dir} (Ctrl-C to stop)", file=sys.stderr, flush=True)
            while True:
                wait = 500
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    wait = max(1, min(wait, int(left * 1000)))
                try:
                    rb.poll(wait)
                except _Done:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        bpfsys.close(fd)
    return 0


# --- overlay why ------------------------------------------------------------------------


@dataclass
class Verdict:
    src: str
    dst: str
    proto: str
    port: int
    verdict: str = "allow"             # "allow" | "drop"
    reason: str = ""                   # the counter it lands in: failsafe, policy, member, ...
    rule: str = ""                     # what decided, in words
    policy: str | None = None          # the deciding policy (allow) or the selecting one (default-deny)
    policy_index: int | None = None
    enforced: bool = False             # a policy selects this node: default-deny
    audit: bool = False                # filter.mode audit: a drop is counted and reported, not done
    source: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passes(self) -> bool:
        return self.verdict == "allow" or self.audit

    def line(self) -> str:
        head = self.verdict if self.verdict == "allow" else ("would drop (audit mode: passes)" if self.audit else "drop")
        return f"{head}: {self.rule}"

    def to_dict(self) -> dict:
        return {
            "src": self.src, "dst": self.dst, "proto": self.proto, "port": self.port,
            "verdict": self.verdict, "passes": self.passes, "reason": self.reason, "rule": self.rule,
            "policy": self.policy, "policy_index": self.policy_index, "enforced": self.enforced,
            "audit": self.audit, "source": self.source, "notes": self.notes, "explanation": self.line(),
        }


class LiveMaps:
    """The lookups ``why`` needs, on the pinned maps (the kernel's own LPM matching).
    Addresses may be IPv4 or IPv6: the map of each family is asked."""

    def __init__(self, maps):
        self.maps = maps

    def _get(self, table: str, key) -> bytes | None:
        from overlay.datapath.ebpf import bpfsys
        from overlay.datapath.ebpf.codec import encode_key, map_of

        name = map_of(table, key)
        info = self.maps.info(name)
        return bpfsys.lookup(self.maps.fd(name), encode_key(table, key), info.key_size, info.value_size)

    def cfg(self, key: str) -> int:
        from overlay.datapath.ebpf.maps import CONFIG_INDEX

        return self.maps.get_cfg(CONFIG_INDEX[key])

    def own(self, src: str) -> bool:
        return self._get("self", src) is not None

    def failsafe(self, src: str) -> int:
        raw = self._get("failsafe", _host_cidr(src))
        return 0 if raw is None else int.from_bytes(raw[:4], sys.byteorder)

    def peer(self, src: str):
        from overlay.datapath.ebpf import abi

        raw = self._get("peers", src)
        if raw is None:
            return None
        v = abi.OvlPeerVal.from_buffer_copy(raw)
        return v.identity, v.flags

    def cidr_identity(self, src: str) -> int | None:
        raw = self._get("cidr_ident", _host_cidr(src))
        return None if raw is None else int.from_bytes(raw[:4], sys.byteorder)

    def policy(self, identity: int, proto: int, port: int) -> int | None:
        raw = self._get("policy", (identity, proto, port, 16))
        return None if raw is None else int.from_bytes(raw[:4], sys.byteorder)

    def name(self, kind: str, number: int) -> str | None:
        return name_of(self.maps, kind, number)

    def port_open(self, proto: int, port: int) -> bool:
        slot = {6: 0, 17: 1}.get(proto)
        if slot is None:
            return False
        raw = self._get("ports", (slot, port // 64))
        return raw is not None and bool(int.from_bytes(raw[:8], sys.byteorder) >> (port % 64) & 1)


def _host_cidr(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


ICMPV6 = 58
FRAGMENT_RULE = (
    "fragments share their datagram's verdict: the first fragment is judged like this flow; one "
    "without its whole L4 header (TCP 20 bytes, UDP/ICMP 8) only by the member, policy-port and "
    "open-port steps, never as established, else it is dropped (frag_short); later fragments pass "
    "only on the remembered verdict of their first one (else frag_orphan), and one starting inside "
    "what the first one carried is dropped (frag_short)"
)


def explain(src: str, dst: str, proto: int, port: int, live) -> Verdict:
    """The ingress verdict for a new flow, step by step as bpf/lib/filter.h decides it.

    ``live`` answers lookups (:class:`LiveMaps`, or a fake in tests)."""
    from overlay.ops import FS_ALL, FS_SSH, PEER_F_MEMBER

    pname = proto_name(proto)
    if proto not in (6, 17):
        port = 0
    what = f"{pname}/{port}" if proto in (6, 17) else pname
    v = Verdict(src, dst, pname, port)
    v.audit = live.cfg("mode") == 1
    v.enforced = bool(live.cfg("policy_enforced"))
    filtering = v.enforced or bool(live.cfg("reject_all"))
    v.notes.append("a reply of a flow this host initiated passes as established (conntrack, not "
                   "consulted here); flows other hosts initiate are judged on every packet, as below")
    if filtering:
        v.notes.append(FRAGMENT_RULE)
    six = ipaddress.ip_address(src).version == 6
    if proto == ICMPV6 and six:
        v.notes.append("ICMPv6 neighbour discovery (types 133-137 with hop limit 255) and MLD (130-132, "
                       "143 from a link-local source) always pass (pass_ndp); ICMPv6 errors about a "
                       "tracked or admitted flow pass as related")

    def done(verdict: str, reason: str, rule: str, **kw) -> Verdict:
        v.verdict, v.reason, v.rule = verdict, reason, rule
        for k, val in kw.items():
            setattr(v, k, val)
        return v

    if ipaddress.ip_address(src).is_loopback:
        return done("drop", "martian", f"martian: {src} is a loopback source, never legitimate from the wire")
    if live.own(src):
        return done("drop", "martian", f"martian: {src} is one of this host's own addresses (spoofed)")
    flags = live.failsafe(src)
    # policies: ICMPv6 is looked up as ICMP (a policy `proto: icmp` covers both)
    lookup_proto = 1 if proto == ICMPV6 else proto

    peer = live.peer(src)
    member = peer is not None and bool(peer[1] & PEER_F_MEMBER)
    if member:
        identity = peer[0]
        groups = live.name("identity", identity)
        v.source = {"member": True, "identity": identity,
                    "groups": groups.split(",") if groups else []}
    else:
        v.source = {"member": False}
    cidr_ident = live.cidr_identity(src)
    if cidr_ident is not None:
        v.source["cidr"] = live.name("cidr", cidr_ident) or f"#{cidr_ident:#x}"
        v.source["cidr_identity"] = cidr_ident

    def who() -> str:
        if member:
            gs = v.source.get("groups")
            return f"{src} (member, groups {','.join(gs)})" if gs else f"{src} (member in no group)"
        if cidr_ident is not None:
            return f"{src} (in {v.source['cidr']})"
        return f"{src} (not a member)"

    if member and not v.enforced:
        # decided by the peers hash before the failsafe trie (docs/datapath.md, "The cheap path")
        return done("allow", "member", f"member: {who()} is an overlay member (no policy selects this node)")
    if flags & FS_ALL:
        return done("allow", "failsafe", f"failsafe: {src} is a registry/management address (never blocked)")
    if flags & FS_SSH and proto == 6 and port == SSH_PORT:
        return done("allow", "failsafe", f"failsafe: ssh from {src} (filter.ssh_whitelist, never blocked)")
    if v.enforced:
        for identity, how in ((peer[0] if member else None, "member"), (cidr_ident, "cidr")):
            if identity is None:
                continue
            index = live.policy(identity, lookup_proto, port)
            if index is None:
                continue
            pid = live.name("policy", index) or f"#{index}"
            rule = live.name("rule", index) or ""
            v.source["matched_by"] = how
            return done("allow", "policy", f"policy {pid} ({rule})" if rule else f"policy {pid}",
                        policy=pid, policy_index=index)
        default = live.cfg("policy_default")
        pid = live.name("policy", default) or f"#{default}"
        return done("drop", "policy",
                    f"policy default-deny (node selected by policy {pid}); no policy allows {what} from {who()}",
                    policy=pid, policy_index=default)

    if proto in (6, 17) and live.port_open(proto, port):
        return done("allow", "open_port", f"open port {what} (filter.open_ports)")
    if live.cfg("reject_all"):
        return done("drop", "not_allowed",
                    f"reject_all: {who()} is not a member and {what} is not an open port")
    return done("allow", "default", "default accept (reject_all is off, no policy selects this node)")


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.split("%", 1)[0]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 or IPv6 address") from None


def _proto(text: str) -> int:
    t = text.lower()
    if t in PROTOS:
        return PROTOS[t]
    if t.isdigit() and 0 <= int(t) <= 255:
        return int(t)
    raise argparse.ArgumentTypeError(f"{text!r} is not tcp, udp, icmp, icmpv6 or a protocol number")


def _port(text: str) -> int:
    if text == "-":
        return 0
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535, or - for icmp)")
    return int(text)


def cmd_why(args) -> int:
    if ipaddress.ip_address(args.src).version != ipaddress.ip_address(args.dst).version:
        print(f"overlay why: DST {args.dst} is not of the IP version of SRC {args.src}", file=sys.stderr)
        return 2
    maps = _open_maps(_pin_dir(args))
    try:
        v = explain(args.src, args.dst, args.proto, args.port, LiveMaps(maps))
    finally:
        maps.close()
    if args.json:
        _out(json.dumps(v.to_dict(), sort_keys=True))
    else:
        _out(v.line())
        for note in v.notes:
            _out(f"  note: {note}")
    return 0


# --- registration -----------------------------------------------------------------------


def register(sub, parser_class) -> None:
    def dp_opts(sp):
        sp.add_argument("-c", "--config", help="take interface and pin_root from this config file")
        sp.add_argument("--interface", help="uplink interface (default eth0)")
        sp.add_argument("--pin-root", help="bpffs directory (default /sys/fs/bpf/overlay)")

    def positive(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
        return int(text)

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not 0 < value <= 86400:
            raise argparse.ArgumentTypeError(f"{text!r}: between 0 and 86400 seconds")
        return value

    help_ = "drop counters by reason; --follow streams drop events (reason, policy, flow)"
    sp = sub.add_parser("drops", help=help_, description=help_)
    sp.set_defaults(func=cmd_drops)
    dp_opts(sp)
    sp.add_argument("-f", "--follow", action="store_true", help="stream drop events from the ring buffer")
    sp.add_argument("--json", action="store_true", help="JSON (one object per line with --follow)")
    sp.add_argument("--count", type=positive, help="with --follow: stop after N events")
    sp.add_argument("--timeout", type=seconds, help="with --follow: stop after S seconds")
    sp.add_argument("--backlog", action="store_true",
                    help="with --follow: also print the events already in the buffer")

    help_ = "explain the verdict this node would give a new flow SRC -> DST PROTO/PORT, from the live maps"
    sp = sub.add_parser("why", help=help_, description=help_)
    sp.set_defaults(func=cmd_why)
    sp.add_argument("src", type=_ip, metavar="SRC",
                    help="source address, IPv4 or IPv6 (as it arrives: a peer's real address)")
    sp.add_argument("dst", type=_ip, metavar="DST", help="destination address (this node)")
    sp.add_argument("proto", type=_proto, metavar="PROTO", help="tcp, udp, icmp, icmpv6 or a protocol number")
    sp.add_argument("port", type=_port, metavar="PORT", help="destination port (0 or - for icmp)")
    dp_opts(sp)
    sp.add_argument("--json", action="store_true", help="print JSON")
