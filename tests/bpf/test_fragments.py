"""Fragments through BPF_PROG_TEST_RUN: one verdict per datagram.

Hand table (docs/datapath.md, "Fragments"), for a node that filters
(reject_all or policy default-deny):

- a first fragment without its full L4 header (TCP 20 bytes, UDP 8,
  ICMP/ICMPv6 8; nmap -f: 8 bytes, -ff: 16 bytes) is judged only by the
  steps that need nothing but its addresses and ports (a member's address, a
  policy's or an open port's destination port: TCP and UDP carry their ports
  in their first 4 bytes), never as established; what those steps do not
  admit is dropped, frag_short;
- a first fragment that carries it is judged like a whole datagram; when it
  passes, its verdict (and the overlay source of a translated reply) is
  remembered for (family, proto, id, source, destination);
- a later fragment passes only on a remembered verdict (pass_fragment, with
  the same source translation, L3 checksum only), else frag_orphan; one that
  starts inside the L4 bytes its first fragment carried overlaps it and is
  dropped, frag_short (RFC 1858 "tiny overlap");
- a failsafe range (address only) passes before the fragment rules;
- a node that does not filter passes such fragments untouched.

Outputs are compared byte for byte with frames scapy builds, and the
fragments a program leaves are reassembled by scapy, whose checksums of the
whole datagram must verify.
"""

from __future__ import annotations

import time

import pytest
from scapy.layers.inet import IP, TCP, UDP, defragment, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from overlay import abi
from overlay.abi import CfgIndex, Reason
from overlay.ops import Op

from .tables import (
    ADMIN,
    ADMIN_NET,
    AUDIT,
    EGRESS_NAT,
    HOST,
    OK,
    OUTSIDER,
    PEER_OVL,
    PEER_REAL,
    REJECT,
    SAME,
    SHOT,
    TCP_P,
    UDP_P,
    Case,
    check,
    ct_key,
    drop,
    eth,
    frame,
    param,
)

PAYLOAD = bytes(range(256)) * 3


def frags(l3, size: int) -> list:
    """The fragments of datagram ``l3`` carrying ``size`` bytes each (a multiple of 8)."""
    return fragment(l3, fragsize=size)


def syn(src, dst, dport, sport=40000, ident=4711):
    # what nmap -sS sends: a 24-byte TCP header (MSS option)
    return IP(src=src, dst=dst, id=ident) / TCP(sport=sport, dport=dport, flags="S", seq=7,
                                                 options=[("MSS", 1460)])


def big_udp(src, dst, sport=9999, dport=5353, ident=321):
    return IP(src=src, dst=dst, id=ident) / UDP(sport=sport, dport=dport) / PAYLOAD


def dropped(reason, src, dst, proto, sport=0, dport=0, audit=0):
    return [drop(reason, src, dst, sport, dport, proto, audit)]


_F8 = frags(syn(OUTSIDER, HOST, 8080), 8)    # nmap -f
_F16 = frags(syn(OUTSIDER, HOST, 8080), 16)  # nmap -ff
_F8_OPEN = frags(syn(OUTSIDER, HOST, 80), 8)
_LONG_OPTS = [("MSS", 1460), ("SAckOK", b""), ("WScale", 7), ("NOP", None), ("Timestamp", (1, 0))]


def long_syn(src, dst, dport):
    """A SYN with a 40-byte TCP header (options), so 24-byte fragments split it
    after the fixed 20 bytes."""
    return IP(src=src, dst=dst, id=4712) / TCP(sport=40000, dport=dport, flags="S", options=_LONG_OPTS)


_F24 = frags(long_syn(OUTSIDER, HOST, 80), 24)  # 24 bytes of TCP first: the whole fixed header
_MEMBER = frags(big_udp(PEER_REAL, HOST), 256)
_TCP_BIG = frags(IP(src=PEER_REAL, dst=HOST, id=99) / TCP(sport=40000, dport=5432, flags="PA") / PAYLOAD,
                 64)
MEMBER = {"cfg": REJECT, "peers": {PEER_REAL: abi.PEER_F_MEMBER}}


def _with_offset(l3_frag, offset_units: int, mf: bool = True):
    """A copy of a later fragment moved to another offset (8-byte units)."""
    f = l3_frag.copy()
    f.frag = offset_units
    f.flags = "MF" if mf else 0
    del f.chksum
    return f


FIRST_FRAGMENTS = [
    Case("nmap-f-8-byte-first-fragment", "ingress", frame(_F8[0]), SHOT, SAME, {"cfg": REJECT},
         {Reason.DROP_FRAG_SHORT: 1},
         events=dropped(Reason.DROP_FRAG_SHORT, OUTSIDER, HOST, TCP_P, 40000, 8080)),
    Case("nmap-ff-16-byte-first-fragment", "ingress", frame(_F16[0]), SHOT, SAME, {"cfg": REJECT},
         {Reason.DROP_FRAG_SHORT: 1},
         events=dropped(Reason.DROP_FRAG_SHORT, OUTSIDER, HOST, TCP_P, 40000, 8080)),
    Case("short-first-fragment-to-another-port-than-the-open-one", "ingress", frame(_F8[0]), SHOT, SAME,
         {"cfg": REJECT, "ports": [("tcp", 80)]}, {Reason.DROP_FRAG_SHORT: 1},
         events=dropped(Reason.DROP_FRAG_SHORT, OUTSIDER, HOST, TCP_P, 40000, 8080)),
    Case("short-first-fragment-to-open-port-judged-on-its-port", "ingress", frame(_F8_OPEN[0]), OK, SAME,
         {"cfg": REJECT, "ports": [("tcp", 80)]}, {Reason.PASS_OPEN_PORT: 1}),
    Case("short-first-fragment-from-member-judged-on-its-address", "ingress",
         frame(frags(syn(PEER_REAL, HOST, 22), 8)[0]), OK, SAME, MEMBER, {Reason.PASS_MEMBER: 1}),
    Case("short-first-fragment-never-established", "ingress",
         frame(frags(IP(src=OUTSIDER, dst=HOST, id=77) / TCP(sport=443, dport=40000, flags="SA",
                                                            options=[("MSS", 1460)]), 8)[0]), SHOT, SAME,
         {"cfg": REJECT, "ct": [(ct_key(OUTSIDER, HOST, 443, 40000, TCP_P), None, abi.CT_F_EGRESS)]},
         {Reason.DROP_FRAG_SHORT: 1},
         events=dropped(Reason.DROP_FRAG_SHORT, OUTSIDER, HOST, TCP_P, 443, 40000)),
    Case("short-udp-first-fragment-with-its-ports", "ingress",
         frame(IP(src=OUTSIDER, dst=HOST, proto=UDP_P, flags="MF", id=5) / Raw(b"\0\x35\0\x35")), OK, SAME,
         {"cfg": REJECT, "ports": [("udp", 53)]}, {Reason.PASS_OPEN_PORT: 1}, checksums=False),
    Case("short-udp-first-fragment-to-a-closed-port", "ingress",
         frame(IP(src=OUTSIDER, dst=HOST, proto=UDP_P, flags="MF", id=5) / Raw(b"\0\x35\0\x36")), SHOT, SAME,
         {"cfg": REJECT, "ports": [("udp", 53)]}, {Reason.DROP_FRAG_SHORT: 1},
         events=dropped(Reason.DROP_FRAG_SHORT, OUTSIDER, HOST, UDP_P, 53, 54), checksums=False),
    Case("first-fragment-without-even-its-ports", "ingress",
         frame(IP(src=OUTSIDER, dst=HOST, proto=TCP_P, flags="MF", id=5) / Raw(b"\0\x50")), SHOT, SAME,
         {"cfg": REJECT, "ports": [("tcp", 80)]}, {Reason.DROP_FRAG_SHORT: 1},
         events=dropped(Reason.DROP_FRAG_SHORT, OUTSIDER, HOST, TCP_P), checksums=False),
    Case("short-icmp-first-fragment", "ingress",
         frame(IP(src=OUTSIDER, dst=HOST, proto=1, flags="MF", id=6) / Raw(b"\x08\0\0\0")), SHOT, SAME,
         {"cfg": REJECT}, {Reason.DROP_FRAG_SHORT: 1},
         events=dropped(Reason.DROP_FRAG_SHORT, OUTSIDER, HOST, 1), checksums=False),
    Case("24-byte-first-fragment-judged-on-its-header-open", "ingress", frame(_F24[0]), OK, SAME,
         {"cfg": REJECT, "ports": [("tcp", 80)]}, {Reason.PASS_OPEN_PORT: 1}),
    Case("24-byte-first-fragment-judged-on-its-header-closed", "ingress",
         frame(frags(long_syn(OUTSIDER, HOST, 8080), 24)[0]), SHOT, SAME, {"cfg": REJECT},
         {Reason.DROP_NOT_ALLOWED: 1}, events=dropped(Reason.DROP_NOT_ALLOWED, OUTSIDER, HOST, TCP_P, 40000, 8080)),
    Case("short-first-fragment-audit-passes", "ingress", frame(_F8[0]), OK, SAME, {"cfg": AUDIT},
         {Reason.DROP_FRAG_SHORT: 1},
         events=dropped(Reason.DROP_FRAG_SHORT, OUTSIDER, HOST, TCP_P, 40000, 8080, audit=1)),
    Case("short-first-fragment-untouched-without-filtering", "ingress", frame(_F8[0]), OK, SAME, {},
         {Reason.PASS_UNTOUCHED: 1}),
    Case("failsafe-all-before-fragment-rules", "ingress", frame(frags(syn(ADMIN, HOST, 2181), 8)[0]), OK,
         SAME, {"cfg": REJECT, "failsafe": {ADMIN_NET: abi.FS_ALL}}, {Reason.PASS_FAILSAFE: 1}),
    Case("failsafe-ssh-needs-the-tcp-header", "ingress", frame(frags(syn(ADMIN, HOST, 22), 8)[0]), SHOT,
         SAME, {"cfg": REJECT, "failsafe": {ADMIN_NET: abi.FS_SSH}}, {Reason.DROP_FRAG_SHORT: 1},
         events=dropped(Reason.DROP_FRAG_SHORT, ADMIN, HOST, TCP_P, 40000, 22)),
    Case("gre-first-fragment-has-no-l4-to-require", "ingress",
         frame(IP(src=PEER_REAL, dst=HOST, proto=47, flags="MF", id=8) / Raw(b"\0" * 8)), OK, SAME, MEMBER,
         {Reason.PASS_MEMBER: 1}),
]

LATER_FRAGMENTS = [
    Case("orphan-later-fragment", "ingress", frame(_MEMBER[1]), SHOT, SAME, MEMBER,
         {Reason.DROP_FRAG_ORPHAN: 1}, events=dropped(Reason.DROP_FRAG_ORPHAN, PEER_REAL, HOST, UDP_P)),
    Case("nmap-f-third-fragment-without-its-first-is-an-orphan", "ingress", frame(_F8[2]), SHOT, SAME,
         {"cfg": REJECT}, {Reason.DROP_FRAG_ORPHAN: 1},
         events=dropped(Reason.DROP_FRAG_ORPHAN, OUTSIDER, HOST, TCP_P)),
    Case("later-tcp-fragment-past-the-header-is-an-orphan", "ingress", frame(_TCP_BIG[1]), SHOT, SAME,
         MEMBER, {Reason.DROP_FRAG_ORPHAN: 1}, events=dropped(Reason.DROP_FRAG_ORPHAN, PEER_REAL, HOST, TCP_P)),
    Case("orphan-untouched-without-filtering", "ingress", frame(_MEMBER[1]), OK, SAME, {},
         {Reason.PASS_UNTOUCHED: 1}),
    Case("failsafe-later-fragment", "ingress", frame(frags(big_udp(ADMIN, HOST), 256)[2]), OK, SAME,
         {"cfg": REJECT, "failsafe": {ADMIN_NET: abi.FS_ALL}}, {Reason.PASS_FAILSAFE: 1}),
]


@param(FIRST_FRAGMENTS + LATER_FRAGMENTS)
def test_fragment_rows(dp, case):
    check(dp, case)
    if case.verdict == SHOT or case.counters.get(Reason.PASS_UNTOUCHED):
        assert dp.frags() == {}  # nothing remembered for a refused or unjudged fragment


def test_24_byte_fragments_pass_to_an_open_port(dp):
    """nmap --mtu 24 style: the first fragment holds the fixed TCP header, so the
    SYN is judged; the later fragment (offset 24) follows its verdict."""
    dp.seed({"cfg": REJECT, "ports": [("tcp", 80)]})
    assert len(_F24) == 2 and _F24[0].flags.MF
    assert [v for v, _ in run_all(dp, _F24)] == [OK, OK]
    assert dp.counters() == {Reason.PASS_OPEN_PORT: 1, Reason.PASS_FRAGMENT: 1}
    assert dp.markers() == {(4, OUTSIDER, HOST, 40000, 80, TCP_P)}


def run_all(dp, fragments, prog="ingress"):
    out = []
    for f in fragments:
        verdict, data = dp.run(prog, bytes(frame(f)))
        out.append((verdict, data))
    return out


def reassembled(outputs) -> IP:
    """scapy's reassembly of the IPv4 fragments a program left (checksums recomputed
    only where deleted: a stale one would show)."""
    pkts = [Ether(data)[IP] for _, data in outputs]
    whole = defragment(pkts)
    assert len(whole) == 1, whole
    return whole[0]


def assert_l4_checksum_ok(ip: IP) -> None:
    l4 = ip.payload
    rebuilt = ip.copy()
    del rebuilt.payload.chksum
    rebuilt = IP(bytes(rebuilt))
    assert rebuilt.payload.chksum == l4.chksum, "the reassembled datagram's L4 checksum is wrong"


def test_member_fragmented_udp_passes_in_every_fragment(dp):
    dp.seed(MEMBER)
    outputs = run_all(dp, _MEMBER)
    assert [v for v, _ in outputs] == [OK] * len(_MEMBER)
    assert [d for _, d in outputs] == [bytes(frame(f)) for f in _MEMBER]  # untouched
    assert dp.counters() == {Reason.PASS_MEMBER: 1, Reason.PASS_FRAGMENT: len(_MEMBER) - 1}
    assert dp.frags() == {(4, PEER_REAL, HOST, 321, UDP_P): (Reason.PASS_MEMBER, None)}
    assert_l4_checksum_ok(reassembled(outputs))


def test_member_fragmented_tcp_segment_passes(dp):
    dp.seed(MEMBER)
    assert [v for v, _ in run_all(dp, _TCP_BIG)] == [OK] * len(_TCP_BIG)
    assert dp.counters() == {Reason.PASS_MEMBER: 1, Reason.PASS_FRAGMENT: len(_TCP_BIG) - 1}


def test_later_fragment_overlapping_what_the_first_carried_is_dropped(dp):
    dp.seed(MEMBER)
    first = frags(IP(src=PEER_REAL, dst=HOST, id=99) / TCP(sport=1, dport=2, flags="PA") / PAYLOAD, 64)
    assert dp.run("ingress", frame(first[0]))[0] == OK                      # 64 bytes of TCP
    assert dp.run("ingress", frame(_with_offset(first[1], 1)))[0] == SHOT   # offset 8: the flags again
    assert dp.run("ingress", frame(_with_offset(first[1], 2)))[0] == SHOT   # offset 16
    assert dp.run("ingress", frame(_with_offset(first[1], 7)))[0] == SHOT   # offset 56: still inside
    assert dp.run("ingress", frame(_with_offset(first[1], 8)))[0] == OK     # offset 64: right after it
    assert dp.counters() == {Reason.PASS_MEMBER: 1, Reason.DROP_FRAG_SHORT: 3, Reason.PASS_FRAGMENT: 1}


def test_dropped_first_fragment_leaves_later_ones_orphans(dp):
    dp.seed({"cfg": REJECT})
    outs = run_all(dp, frags(big_udp(OUTSIDER, HOST), 256))
    assert [v for v, _ in outs] == [SHOT] * len(outs)
    assert dp.counters() == {Reason.DROP_NOT_ALLOWED: 1, Reason.DROP_FRAG_ORPHAN: len(outs) - 1}
    assert dp.frags() == {}


def test_translated_reply_is_source_translated_in_every_fragment(dp):
    """A reply of a flow this host opened through the overlay arrives from the
    peer's real address in fragments: every fragment comes out from the overlay
    address (the first with its UDP checksum fixed, the later ones L3 only), and
    the reassembled datagram's checksum verifies."""
    dp.seed({"cfg": REJECT, "nat": {PEER_OVL: PEER_REAL}})
    dp.set_ct(ct_key(PEER_REAL, HOST, 9999, 5353, UDP_P), PEER_OVL, EGRESS_NAT)
    wire = frags(big_udp(PEER_REAL, HOST), 256)
    want = frags(big_udp(PEER_OVL, HOST), 256)
    outputs = run_all(dp, wire)
    assert [v for v, _ in outputs] == [OK] * len(wire)
    for (_, got), w in zip(outputs, want, strict=True):
        assert got == bytes(frame(w))
    assert dp.counters() == {Reason.PASS_ESTABLISHED: 1, Reason.PASS_FRAGMENT: len(wire) - 1,
                             Reason.NAT_INGRESS: len(wire)}
    assert dp.frags() == {(4, PEER_REAL, HOST, 321, UDP_P): (Reason.PASS_ESTABLISHED, PEER_OVL)}
    whole = reassembled(outputs)
    assert whole.src == PEER_OVL
    assert_l4_checksum_ok(whole)


def test_translated_reply_fragments_translated_without_filtering(dp):
    """Later fragments need the overlay source back even when nothing is filtered."""
    dp.seed({"nat": {PEER_OVL: PEER_REAL}})
    dp.set_ct(ct_key(PEER_REAL, HOST, 9999, 5353, UDP_P), PEER_OVL, EGRESS_NAT)
    outputs = run_all(dp, frags(big_udp(PEER_REAL, HOST), 256))
    assert [d for _, d in outputs] == [bytes(frame(w)) for w in frags(big_udp(PEER_OVL, HOST), 256)]


def test_overlay_egress_translates_every_fragment(dp):
    """ovl0 egress translates by destination: every fragment of a datagram to an
    overlay address goes out to the real address; the whole verifies."""
    dp.seed({"nat": {PEER_OVL: PEER_REAL}})
    outputs = run_all(dp, frags(big_udp(HOST, PEER_OVL, 5353, 9999), 256), prog="overlay_egress")
    want = frags(big_udp(HOST, PEER_REAL, 5353, 9999), 256)
    assert [d for _, d in outputs] == [bytes(frame(w)) for w in want]
    assert dp.counters() == {Reason.NAT_EGRESS: len(want)}
    assert_l4_checksum_ok(reassembled(outputs))


def test_overlay_egress_refuses_a_short_first_fragment(dp):
    dp.seed({"nat": {PEER_OVL: PEER_REAL}})
    f = frags(syn(HOST, PEER_OVL, 80), 8)[0]
    assert dp.run("overlay_egress", frame(f))[0] == SHOT
    assert dp.counters() == {Reason.DROP_MALFORMED: 1}


def test_remembered_verdict_expires(dp):
    dp.seed(MEMBER)
    dp.set_cfg(CfgIndex.FRAG_S, 1)
    assert dp.run("ingress", frame(_MEMBER[0]))[0] == OK
    time.sleep(1.3)
    assert dp.run("ingress", frame(_MEMBER[1]))[0] == SHOT
    assert dp.counters() == {Reason.PASS_MEMBER: 1, Reason.DROP_FRAG_ORPHAN: 1}
    assert dp.frags() == {}


def test_verdicts_are_per_datagram(dp):
    """Another IP id, source or protocol is another datagram."""
    dp.seed(MEMBER)
    assert dp.run("ingress", frame(_MEMBER[0]))[0] == OK
    other_id = frags(big_udp(PEER_REAL, HOST, ident=322), 256)[1]
    other_src = frags(big_udp(OUTSIDER, HOST), 256)[1]
    for f in (other_id, other_src):
        assert dp.run("ingress", frame(f))[0] == SHOT
    assert dp.run("ingress", frame(_MEMBER[1]))[0] == OK


# --------------------------------------------------------------- IPv6

V6_HOST, V6_PEER, V6_OUT = "2001:db8::11", "2001:db8::12", "2001:db8::99"


def frags6(src, dst, l4, size: int, ident: int = 0xABCDEF01) -> list:
    """IPv6 fragments of ``l4`` (built by hand: ``size`` bytes of the fragmentable part each)."""
    raw = bytes(l4)
    nh = {TCP: 6, UDP: 17}.get(type(l4), 58)
    out = []
    for off in range(0, len(raw), size):
        part = raw[off:off + size]
        more = off + size < len(raw)
        out.append(IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(nh=nh, offset=off // 8, m=int(more), id=ident)
                   / Raw(part))
    return out


def _udp6(src, dst):
    return UDP(sport=9999, dport=5353) / PAYLOAD


def _l4_bytes(src, dst, l4):
    """``l4`` with its checksum computed over the IPv6 pseudo-header."""
    return bytes((IPv6(src=src, dst=dst) / l4)[IPv6].payload)


def test_ipv6_tiny_first_fragment_and_orphans(dp):
    dp.seed({"cfg": REJECT})
    tcp6 = TCP(sport=40000, dport=8080, flags="S", options=[("MSS", 1440)])
    fs = frags6(V6_OUT, V6_HOST, Raw(_l4_bytes(V6_OUT, V6_HOST, tcp6)), 8)
    for f in fs:
        f[IPv6ExtHdrFragment].nh = 6
    verdicts = [dp.run("ingress", bytes(eth(0x86DD) / f))[0] for f in fs]
    assert verdicts == [SHOT] * len(fs) and len(fs) == 3
    # the first is short and its port is not open; the later two are orphans then
    assert dp.counters() == {Reason.DROP_FRAG_SHORT: 1, Reason.DROP_FRAG_ORPHAN: 2}
    payload = frags6(V6_OUT, V6_HOST, Raw(_l4_bytes(V6_OUT, V6_HOST, tcp6 / PAYLOAD)), 64)
    for f in payload:
        f[IPv6ExtHdrFragment].nh = 6
    assert dp.run("ingress", bytes(eth(0x86DD) / payload[3]))[0] == SHOT  # offset 192: an orphan
    assert dp.counters()[Reason.DROP_FRAG_ORPHAN] == 3


def test_ipv6_member_fragmented_udp_passes(dp):
    dp.seed({"cfg": REJECT})
    dp.set_peer6(V6_PEER)
    fs = frags6(V6_PEER, V6_HOST, Raw(_l4_bytes(V6_PEER, V6_HOST, _udp6(V6_PEER, V6_HOST))), 256)
    for f in fs:
        f[IPv6ExtHdrFragment].nh = 17
    assert [dp.run("ingress", bytes(eth(0x86DD) / f))[0] for f in fs] == [OK] * len(fs)
    assert dp.counters() == {Reason.PASS_MEMBER: 1, Reason.PASS_FRAGMENT: len(fs) - 1}
    assert dp.frags() == {(6, V6_PEER, V6_HOST, 0xABCDEF01, UDP_P): (Reason.PASS_MEMBER, None)}


def test_ipv6_outsider_fragmented_udp_dropped(dp):
    dp.seed({"cfg": REJECT})
    fs = frags6(V6_OUT, V6_HOST, Raw(_l4_bytes(V6_OUT, V6_HOST, _udp6(V6_OUT, V6_HOST))), 256)
    for f in fs:
        f[IPv6ExtHdrFragment].nh = 17
    assert [dp.run("ingress", bytes(eth(0x86DD) / f))[0] for f in fs] == [SHOT] * len(fs)
    assert dp.counters() == {Reason.DROP_NOT_ALLOWED: 1, Reason.DROP_FRAG_ORPHAN: len(fs) - 1}


@pytest.mark.parametrize("size", [8, 16])
def test_nmap_style_fragmented_syn_to_an_open_port_passes_whole(dp, size):
    """nmap -f / -ff to an open port: the first fragment is judged on its port, the
    later ones follow it, and the kernel would reassemble the very SYN that was sent."""
    dp.seed({"cfg": REJECT, "ports": [("tcp", 8080)]})
    fs = frags(syn(OUTSIDER, HOST, 8080), size)
    outs = run_all(dp, fs)
    assert [v for v, _ in outs] == [OK] * len(fs) and len(fs) == -(-24 // size)  # a 24-byte header
    assert dp.counters() == {Reason.PASS_OPEN_PORT: 1, Reason.PASS_FRAGMENT: len(fs) - 1}
    whole = IP(bytes(reassembled(outs)))
    assert bytes(whole[TCP]) == bytes(syn(OUTSIDER, HOST, 8080)[TCP])


@pytest.mark.parametrize("size", [8, 16])
def test_nmap_style_fragmented_syn_to_a_closed_port_is_dropped_whole(dp, size):
    dp.seed({"cfg": REJECT, "ports": [("tcp", 80)]})
    fs = frags(syn(OUTSIDER, HOST, 8080), size)
    assert [v for v, _ in run_all(dp, fs)] == [SHOT] * len(fs)
    assert dp.counters() == {Reason.DROP_FRAG_SHORT: 1, Reason.DROP_FRAG_ORPHAN: len(fs) - 1}
    assert dp.frags() == {}


@pytest.mark.parametrize("dport,verdicts,counters", [
    (5432, [OK, OK, OK], {Reason.PASS_POLICY: 1, Reason.PASS_FRAGMENT: 2}),
    (5433, [SHOT, SHOT, SHOT], {Reason.DROP_FRAG_SHORT: 1, Reason.DROP_FRAG_ORPHAN: 2}),
], ids=["policy-port", "another-port"])
def test_short_first_fragment_under_default_deny_judged_on_the_policy_port(dp, maps, dport, verdicts,
                                                                             counters):
    """A policy allows web -> this node tcp/5432 (default-deny): a member of web sending
    its SYN in 8-byte fragments (as nmap -f would) gets the policy's verdict."""
    web = 0x1234
    maps.apply([Op("policy", (web, TCP_P, 5432, 16), 7), Op("config", "policy_enforced", 1),
                Op("config", "policy_default", 7), Op("config", "reject_all", 1)])
    dp.set_peer(PEER_REAL, identity=web)
    fs = frags(syn(PEER_REAL, HOST, dport), 8)
    assert [v for v, _ in run_all(dp, fs)] == verdicts
    assert dp.counters() == counters
