"""Shared helpers of the BPF_PROG_TEST_RUN tables (DESIGN §7.10): frames,
the Case record, and check(), which runs one case and compares the verdict,
the output frame (byte for byte, IPv4 checksums re-verified by scapy), the
exact counters, conntrack entries, inbound markers and drop events.
"""

from __future__ import annotations

import ctypes
import dataclasses
import struct
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from overlay import abi
from overlay.abi import CfgIndex

OK, SHOT, REDIRECT = 0, 2, 7
TCP_P, UDP_P, ICMP_P = 6, 17, 1
EGRESS_NAT = abi.CT_F_EGRESS | abi.CT_F_NAT
PLAIN = abi.CT_F_EGRESS
NEW, SYN_SENT, EST, CLOSING, CLOSED = (abi.CtState.NEW, abi.CtState.SYN_SENT, abi.CtState.ESTABLISHED,
                                       abi.CtState.CLOSING, abi.CtState.CLOSED)

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
HOST = "10.0.0.11"  # this host's private address: the source of the ovl0 route
PEER_OVL, PEER_REAL = "192.168.0.17", "10.0.0.12"  # a peer in the same network
FAR_OVL, FAR_REAL = "192.168.1.20", "198.18.2.20"  # a peer in the other network (public)
OUTSIDER = "10.0.0.99"  # not a member, no overlay address
ADMIN_NET, ADMIN = "198.18.0.0/15", "198.19.7.7"  # failsafe range
ROUTER = "10.0.0.1"

REJECT = {CfgIndex.REJECT_ALL: 1}
AUDIT = {CfgIndex.REJECT_ALL: 1, CfgIndex.MODE: abi.FilterMode.AUDIT}
SAME = object()


def eth(type_: int | None = None) -> Ether:
    # explicit addresses: scapy must never resolve MACs (that would send ARP)
    if type_ is None:
        return Ether(src=MAC_A, dst=MAC_B)
    return Ether(src=MAC_A, dst=MAC_B, type=type_)


def frame(l3) -> Ether:
    return eth() / l3


def tcp(src, dst, sport=40000, dport=80, payload=b"hello", flags="S", **ip):
    return frame(IP(src=src, dst=dst, **ip) / TCP(sport=sport, dport=dport, flags=flags, seq=1000) / payload)


def udp(src, dst, sport=5353, dport=9999, payload=b"datagram", chksum=None, **ip):
    l4 = UDP(sport=sport, dport=dport) if chksum is None else UDP(sport=sport, dport=dport, chksum=chksum)
    return frame(IP(src=src, dst=dst, **ip) / l4 / payload)


def echo(src, dst, type_=8, ident=0x4242, seq=1, payload=b"ping", **ip):
    return frame(IP(src=src, dst=dst, **ip) / ICMP(type=type_, id=ident, seq=seq) / payload)


def icmp_error(src, dst, quoted: bytes, type_=3, code=3):
    return frame(IP(src=src, dst=dst) / ICMP(type=type_, code=code) / Raw(quoted))


def quote(l3, n: int = 8) -> bytes:
    """What an ICMP error quotes: the IP header and the first n bytes after it."""
    raw = bytes(l3)
    return raw[: (raw[0] & 0xF) * 4 + n]


def raw_ip(l3, mutate) -> bytes:
    """An Ethernet frame whose IPv4 bytes were broken on purpose by mutate(bytearray)."""
    data = bytearray(bytes(l3))
    mutate(data)
    return bytes(eth(0x0800)) + bytes(data)


def udp_checksum_becomes_zero(src, dst_before, dst_after, sport=5353, dport=9999) -> tuple:
    """A UDP datagram to dst_before whose checksum, once translated to
    dst_after, computes to 0 (so it must be sent as 0xffff, RFC 768)."""

    def ones_sum(data: bytes) -> int:
        if len(data) % 2:
            data += b"\0"
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return total

    length = 8 + 2
    ph = bytes(IP(src=src, dst=dst_after))[12:20] + struct.pack("!BBH", 0, UDP_P, length)
    hdr = struct.pack("!HHHH", sport, dport, length, 0)
    s = ones_sum(ph + hdr)
    word = 0xFFFF - s
    payload = struct.pack("!H", word)
    before = udp(src, dst_before, sport, dport, payload)
    after = udp(src, dst_after, sport, dport, payload)
    return before, after


@dataclasses.dataclass
class Case:
    id: str
    prog: str  # "ingress" | "egress" | "overlay_egress"
    packet: Any
    verdict: int
    expect: Any = SAME  # the frame after the program; SAME: unaltered
    seed: dict = dataclasses.field(default_factory=dict)
    counters: dict = dataclasses.field(default_factory=dict)  # exact, all non-zero counters
    ct: dict | None = None  # exact ovl_ct/6 afterwards {(s, d, sp, dp, proto): (overlay, flags, state)}
    markers: set | None = None  # exact ovl_ct_in afterwards {(family, s, d, sp, dp, proto)}
    events: list = dataclasses.field(default_factory=list)  # exact, as dicts of fields
    checksums: bool = True  # re-verify the output's checksums with scapy


def verify_checksums(out: bytes) -> None:
    pkt = Ether(out)
    if IP not in pkt:
        return
    rebuilt = pkt.copy()
    ip = rebuilt[IP]
    del ip.chksum
    fragment_ = ip.flags.MF or ip.frag
    if not fragment_:
        l4 = ip.payload
        if isinstance(l4, TCP):
            del l4.chksum
        elif isinstance(l4, UDP) and l4.chksum != 0:
            del l4.chksum
        elif isinstance(l4, ICMP):
            del l4.chksum
    assert bytes(rebuilt) == out, "checksums differ from scapy's:\n" + pkt.show2(dump=True)


def check(dp, case: Case) -> None:
    dp.seed(case.seed)
    packet = bytes(case.packet)
    verdict, out = dp.run(case.prog, packet)
    want = packet if case.expect is SAME else bytes(case.expect)
    assert verdict == case.verdict, f"verdict {verdict}, want {case.verdict}"
    assert out == want, (
        "output frame differs\n got: " + out.hex() + "\nwant: " + want.hex()
        + "\n" + Ether(out).show2(dump=True)
    )
    if case.checksums and verdict != SHOT:
        verify_checksums(out)
    assert dp.counters() == case.counters
    if case.ct is not None:
        got = {k: v[:3] for k, v in dp.ct_entries().items()}
        assert got == case.ct
    if case.markers is not None:
        assert dp.markers() == case.markers
    events = dp.drain_events()
    assert len(events) == len(case.events), [ev_dict(e) for e in events]
    for ev, want_ev in zip(events, case.events, strict=True):
        got_ev = ev_dict(ev)
        assert {k: got_ev[k] for k in want_ev} == want_ev
        assert ev.ts_ns > 0 and ev.policy == 0


def ev_dict(ev: abi.OvlDropEvent) -> dict:
    return {
        "family": ev.family,
        "saddr": abi.words_to_ip(ev.saddr, ev.family),
        "daddr": abi.words_to_ip(ev.daddr, ev.family),
        "sport": abi.be16_to_port(ev.sport),
        "dport": abi.be16_to_port(ev.dport),
        "proto": ev.proto,
        "reason": ev.reason,
        "audit": ev.audit,
        "direction": ev.direction,
    }


def drop(reason, saddr, daddr, sport=0, dport=0, proto=0, audit=0, direction=0) -> dict:
    out = {"reason": reason, "audit": audit, "direction": direction}
    if saddr is not None:
        out.update(saddr=saddr, daddr=daddr, sport=sport, dport=dport, proto=proto)
    return out


def ct_key(saddr: str, daddr: str, sport: int, dport: int, proto: int) -> abi.OvlCtKey:
    return abi.OvlCtKey(
        abi.ip_to_be32(saddr), abi.ip_to_be32(daddr), abi.port_to_be16(sport), abi.port_to_be16(dport), proto
    )


def ct6_key(family, saddr, daddr, sport, dport, proto) -> abi.OvlCt6Key:
    """A struct ovl_ct6_key: an ovl_ct6 key (family 6) or an ovl_ct_in marker (either family)."""
    words = ctypes.c_uint32 * 4
    return abi.OvlCt6Key(words(*abi.ip_to_words(saddr)), words(*abi.ip_to_words(daddr)),
                         abi.port_to_be16(sport), abi.port_to_be16(dport), proto, family)


def mark(saddr, daddr, sport, dport, proto, family=4) -> tuple:
    """An expected ovl_ct_in entry (see Datapath.markers)."""
    return (family, saddr, daddr, sport, dport, proto)


def param(cases):
    return pytest.mark.parametrize("case", cases, ids=[c.id for c in cases])
