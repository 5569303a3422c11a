"""Table tests of the tc programs through BPF_PROG_TEST_RUN (DESIGN §7.10).

Each case: description, input frame (scapy, or raw bytes for broken ones),
seeded maps, expected verdict, expected output frame, and the exact counters,
conntrack entries and drop events the run must leave behind. Expected frames
are built from scratch by scapy, so a byte-for-byte match also proves the
programs' incremental checksum updates; every IPv4 output is further
re-encoded by scapy with its checksums deleted and must not change.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert, IPOption_RR, fragment
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP
from scapy.packet import Padding, Raw

from overlay import abi
from overlay.abi import CfgIndex, Reason
from overlay.errors import DatapathError

from .tables import (  # noqa: F401
    ADMIN,
    ADMIN_NET,
    AUDIT,
    CLOSED,
    CLOSING,
    EGRESS_NAT,
    EST,
    FAR_OVL,
    FAR_REAL,
    HOST,
    ICMP_P,
    MAC_A,
    NEW,
    OK,
    OUTSIDER,
    PEER_OVL,
    PEER_REAL,
    PLAIN,
    REDIRECT,
    REJECT,
    ROUTER,
    SAME,
    SHOT,
    SYN_SENT,
    TCP_P,
    UDP_P,
    Case,
    check,
    ct6_key,
    ct_key,
    drop,
    echo,
    eth,
    ev_dict,
    frame,
    icmp_error,
    mark,
    param,
    quote,
    raw_ip,
    tcp,
    udp,
    udp_checksum_becomes_zero,
    verify_checksums,
)

# --------------------------------------------------------------- broken and foreign frames

ARP_FRAME = eth() / ARP(op=1, hwsrc=MAC_A, psrc=HOST, pdst=PEER_REAL)
IPV6_FRAME = eth() / IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1, dport=2) / b"six"
_T = IP(src=OUTSIDER, dst=HOST) / TCP(sport=1234, dport=80)
_TO_OVL = IP(src=HOST, dst=PEER_OVL) / TCP(sport=1234, dport=80)
def _cut(l3, length: int, what: str, packet=None) -> dict:
    """``{"frame-cut-inside-<what>": the frame of l3 (or packet) cut to length bytes}``."""
    raw = bytes(eth(0x0800)) + bytes(packet if packet is not None else l3)
    assert 34 <= length < len(raw)   # accepted by the kernel, and really cut
    return {f"frame-cut-inside-{what}": raw[:length]}


BROKEN = {
    # name: frame (addressed to HOST for ingress; the same bytes serve the egress programs)
    "ihl-below-5": raw_ip(_T, lambda b: b.__setitem__(0, 0x44)),
    "version-6-in-ipv4": raw_ip(_T, lambda b: b.__setitem__(0, 0x65)),
    "tot-len-past-frame": raw_ip(_T, lambda b: b.__setitem__(slice(2, 4), struct.pack("!H", 200))),
    "tot-len-below-ihl": raw_ip(_T, lambda b: b.__setitem__(slice(2, 4), struct.pack("!H", 16))),
    "ihl-past-tot-len": raw_ip(_T, lambda b: b.__setitem__(0, 0x4F)),
    "tcp-header-cut": bytes(frame(IP(src=OUTSIDER, dst=HOST, proto=TCP_P) / Raw(b"\0" * 10))),
    "udp-header-cut": bytes(frame(IP(src=OUTSIDER, dst=HOST, proto=UDP_P) / Raw(b"\0" * 4))),
    "icmp-header-cut": bytes(frame(IP(src=OUTSIDER, dst=HOST, proto=ICMP_P) / Raw(b"\x08\0\0\0"))),
    # frames cut short on the wire, their headers unchanged, at lengths the kernel's test run
    # accepts (>= 34: Ethernet and a 20-byte IP header): the IP total length then reaches past
    # the frame, which parse.h refuses before reading any L4 byte
    **_cut(_T, 34, "ip-options", IP(src=OUTSIDER, dst=HOST, options=[IPOption_Router_Alert()]) / TCP()),
    **_cut(_T, 34 + 10, "tcp-header"),
    **_cut(IP(src=OUTSIDER, dst=HOST) / UDP(sport=1234, dport=53), 34 + 4, "udp-header"),
}
BROKEN_TO_OVL = {
    "ihl-below-5": raw_ip(_TO_OVL, lambda b: b.__setitem__(0, 0x44)),
    "tot-len-past-frame": raw_ip(_TO_OVL, lambda b: b.__setitem__(slice(2, 4), struct.pack("!H", 999))),
    "tcp-header-cut": bytes(frame(IP(src=HOST, dst=PEER_OVL, proto=TCP_P) / Raw(b"\0" * 19))),
    "udp-header-cut": bytes(frame(IP(src=HOST, dst=PEER_OVL, proto=UDP_P) / Raw(b"\0" * 7))),
    **_cut(_TO_OVL, 34, "tcp-header-at-34"),
    **_cut(_TO_OVL, 34 + 19, "tcp-header"),
    **_cut(IP(src=HOST, dst=PEER_OVL) / UDP(sport=5353, dport=9999), 34 + 7, "udp-header"),
}


# --------------------------------------------------------------- ovl_overlay_egress (ovl0)

NAT = {"nat": {PEER_OVL: PEER_REAL, FAR_OVL: FAR_REAL}}
_U0_BEFORE, _U0_AFTER = udp_checksum_becomes_zero(HOST, PEER_OVL, PEER_REAL)
_BIG_UDP = IP(src=HOST, dst=PEER_OVL, id=77) / UDP(sport=5353, dport=9999) / (b"0123456789abcdef" * 40)
_BIG_UDP_REAL = IP(src=HOST, dst=PEER_REAL, id=77) / UDP(sport=5353, dport=9999) / (b"0123456789abcdef" * 40)
_FRAGS, _FRAGS_REAL = fragment(_BIG_UDP, 256), fragment(_BIG_UDP_REAL, 256)
_OPTS = [IPOption_RR(routers=["1.2.3.4", "5.6.7.8"])]

OVERLAY_EGRESS = [
    Case("tcp-translated", "overlay_egress", tcp(HOST, PEER_OVL), OK, tcp(HOST, PEER_REAL),
         NAT, {Reason.NAT_EGRESS: 1},
         ct={(PEER_REAL, HOST, 80, 40000, TCP_P): (PEER_OVL, EGRESS_NAT, SYN_SENT)}),
    Case("tcp-redirected-to-uplink", "overlay_egress", tcp(HOST, PEER_OVL), REDIRECT,
         tcp(HOST, PEER_REAL), {**NAT, "cfg": {CfgIndex.EGRESS_IFINDEX: 1}},
         {Reason.NAT_EGRESS: 1}),
    Case("tcp-to-public-address", "overlay_egress", tcp(HOST, FAR_OVL, sport=33333, dport=443),
         OK, tcp(HOST, FAR_REAL, sport=33333, dport=443), NAT, {Reason.NAT_EGRESS: 1},
         ct={(FAR_REAL, HOST, 443, 33333, TCP_P): (FAR_OVL, EGRESS_NAT, SYN_SENT)}),
    Case("udp-translated", "overlay_egress", udp(HOST, PEER_OVL), OK, udp(HOST, PEER_REAL),
         NAT, {Reason.NAT_EGRESS: 1},
         ct={(PEER_REAL, HOST, 9999, 5353, UDP_P): (PEER_OVL, EGRESS_NAT, NEW)}),
    Case("udp-checksum-0-stays-0", "overlay_egress", udp(HOST, PEER_OVL, chksum=0), OK,
         udp(HOST, PEER_REAL, chksum=0), NAT, {Reason.NAT_EGRESS: 1}),
    Case("udp-checksum-becoming-0-is-sent-as-ffff", "overlay_egress", _U0_BEFORE, OK, _U0_AFTER,
         NAT, {Reason.NAT_EGRESS: 1}),
    Case("icmp-echo-request", "overlay_egress", echo(HOST, PEER_OVL), OK, echo(HOST, PEER_REAL),
         NAT, {Reason.NAT_EGRESS: 1},
         ct={(PEER_REAL, HOST, 0x4242, 0, ICMP_P): (PEER_OVL, EGRESS_NAT, NEW)}),
    Case("icmp-echo-reply-no-ct", "overlay_egress", echo(HOST, PEER_OVL, type_=0), OK,
         echo(HOST, PEER_REAL, type_=0), NAT, {Reason.NAT_EGRESS: 1}, ct={}),
    Case("icmp-error-l3-only", "overlay_egress",
         icmp_error(HOST, PEER_OVL, quote(IP(src=PEER_REAL, dst=HOST) / UDP(sport=1, dport=2))),
         OK, icmp_error(HOST, PEER_REAL, quote(IP(src=PEER_REAL, dst=HOST) / UDP(sport=1, dport=2))),
         NAT, {Reason.NAT_EGRESS: 1}, ct={}),
    Case("gre-l3-only", "overlay_egress", frame(IP(src=HOST, dst=PEER_OVL, proto=47) / Raw(b"\0\0\x08\0abcd")),
         OK, frame(IP(src=HOST, dst=PEER_REAL, proto=47) / Raw(b"\0\0\x08\0abcd")), NAT,
         {Reason.NAT_EGRESS: 1}, ct={}),
    Case("ip-options-honoured", "overlay_egress", tcp(HOST, PEER_OVL, options=_OPTS), OK,
         tcp(HOST, PEER_REAL, options=_OPTS), NAT, {Reason.NAT_EGRESS: 1},
         ct={(PEER_REAL, HOST, 80, 40000, TCP_P): (PEER_OVL, EGRESS_NAT, SYN_SENT)}),
    Case("udp-ip-options-router-alert", "overlay_egress",
         udp(HOST, PEER_OVL, options=[IPOption_Router_Alert()]), OK,
         udp(HOST, PEER_REAL, options=[IPOption_Router_Alert()]), NAT, {Reason.NAT_EGRESS: 1}),
    Case("ethernet-padding-kept", "overlay_egress", udp(HOST, PEER_OVL, payload=b"x") / Padding(b"\0" * 17),
         OK, udp(HOST, PEER_REAL, payload=b"x") / Padding(b"\0" * 17), NAT, {Reason.NAT_EGRESS: 1}),
    Case("first-fragment-l3-and-l4", "overlay_egress", frame(_FRAGS[0]), OK, frame(_FRAGS_REAL[0]),
         NAT, {Reason.NAT_EGRESS: 1},
         ct={(PEER_REAL, HOST, 9999, 5353, UDP_P): (PEER_OVL, EGRESS_NAT, NEW)}),
    Case("later-fragment-l3-only", "overlay_egress", frame(_FRAGS[1]), OK, frame(_FRAGS_REAL[1]),
         NAT, {Reason.NAT_EGRESS: 1}, ct={}),
    Case("last-fragment-l3-only", "overlay_egress", frame(_FRAGS[-1]), OK, frame(_FRAGS_REAL[-1]),
         NAT, {Reason.NAT_EGRESS: 1}, ct={}),
    Case("no-peer-dropped", "overlay_egress", tcp(HOST, "192.168.0.99"), SHOT, SAME, NAT,
         {Reason.DROP_NO_PEER: 1}, ct={},
         events=[drop(Reason.DROP_NO_PEER, HOST, "192.168.0.99", 40000, 80, TCP_P, direction=1)]),
    Case("no-peer-audit-passes-untranslated", "overlay_egress", udp(HOST, "192.168.0.99"), OK, SAME,
         {**NAT, "cfg": AUDIT}, {Reason.DROP_NO_PEER: 1}, ct={},
         events=[drop(Reason.DROP_NO_PEER, HOST, "192.168.0.99", 5353, 9999, UDP_P, 1, 1)]),
    # ovl_nat's slots (NAT_SUBNET 192.168.0.0/16: 65,536) and ovl_nat_ext beside them
    *[Case(f"nat-{where}", "overlay_egress", tcp(HOST, addr), OK, tcp(HOST, PEER_REAL),
           {"nat": {addr: PEER_REAL}}, {Reason.NAT_EGRESS: 1},
           ct={(PEER_REAL, HOST, 80, 40000, TCP_P): (addr, EGRESS_NAT, SYN_SENT)})
      for where, addr in (("last-slot", "192.168.255.255"), ("first-slot", "192.168.0.0"),
                          ("ext-past-the-slots", "192.169.0.0"), ("ext-below-the-base", "192.167.255.255"),
                          ("ext-override-outside-the-subnet", "203.0.113.9"))],
    Case("no-peer-ext-miss-dropped", "overlay_egress", tcp(HOST, "203.0.113.10"), SHOT, SAME,
         {"nat": {**NAT["nat"], "203.0.113.9": PEER_REAL}}, {Reason.DROP_NO_PEER: 1}, ct={},
         events=[drop(Reason.DROP_NO_PEER, HOST, "203.0.113.10", 40000, 80, TCP_P, direction=1)]),
    Case("arp-untouched", "overlay_egress", ARP_FRAME, OK, SAME, NAT, {Reason.PASS_UNTOUCHED: 1}),
    Case("ipv6-untouched", "overlay_egress", IPV6_FRAME, OK, SAME, NAT, {Reason.PASS_UNTOUCHED: 1}),
] + [
    Case(f"malformed-{name}", "overlay_egress", raw, SHOT, SAME, NAT, {Reason.DROP_MALFORMED: 1},
         ct={}, events=[drop(Reason.DROP_MALFORMED, None, None, direction=1)], checksums=False)
    for name, raw in {**BROKEN, **{f"to-overlay-{k}": v for k, v in BROKEN_TO_OVL.items()}}.items()
]


@param(OVERLAY_EGRESS)
def test_overlay_egress(dp, case):
    check(dp, case)


def test_overlay_egress_malformed_audit_passes(dp):
    check(dp, Case("malformed-audit", "overlay_egress", BROKEN["ihl-below-5"], OK, SAME,
                   {"cfg": AUDIT}, {Reason.DROP_MALFORMED: 1},
                   events=[drop(Reason.DROP_MALFORMED, None, None, audit=1, direction=1)],
                   checksums=False))


@pytest.mark.parametrize("length", [14, 15, 24, 33])
@pytest.mark.parametrize("prog", ["ingress", "egress", "overlay_egress"])
def test_ipv4_frame_shorter_than_ip_header(dp, prog, length):
    """Newer kernels refuse such frames in BPF_PROG_TEST_RUN (EINVAL): this tests the
    kernel more than the programs. The frames cut inside the IP, TCP and UDP headers at
    lengths the kernel accepts are the ``frame-cut-inside-*`` rows of BROKEN, run
    through every program's table above."""
    packet = (bytes(eth(0x0800)) + bytes(_TO_OVL))[:length]
    try:
        verdict, out = dp.run(prog, packet)
    except DatapathError as e:
        assert "Invalid argument" in str(e)
        return
    assert out == packet
    if prog == "overlay_egress":
        assert verdict == SHOT and dp.counters() == {Reason.DROP_MALFORMED: 1}
    else:
        assert verdict == OK


# --------------------------------------------------------------- ovl_egress (uplink)

_T_REPLY = ct_key(PEER_REAL, HOST, 80, 40000, TCP_P)  # the reply of HOST:40000 -> PEER_REAL:80
_U_REPLY = ct_key(OUTSIDER, HOST, 9999, 5353, UDP_P)  # the reply of HOST:5353 -> OUTSIDER:9999
# the marker an admitted inbound datagram OUTSIDER:9999 -> HOST:5353 leaves
_U_MARK = ct6_key(4, OUTSIDER, HOST, 9999, 5353, UDP_P)

# Who creates state on the uplink egress (hand table, docs/datapath.md "Conntrack"):
# a bare SYN (new flow), a UDP datagram or ICMP echo request with no live entry and no
# inbound marker; nothing else. FIN and RST step an existing entry.
EGRESS = [
    Case("tcp-syn-creates-syn-sent", "egress", tcp(HOST, PEER_REAL), OK, SAME, {}, {},
         ct={(PEER_REAL, HOST, 80, 40000, TCP_P): (None, PLAIN, SYN_SENT)}),
    Case("tcp-syn-ack-of-inbound-connection-creates-nothing", "egress",
         tcp(HOST, OUTSIDER, 80, 40000, flags="SA"), OK, SAME, {}, {}, ct={}),
    Case("tcp-ack-creates-nothing", "egress", tcp(HOST, PEER_REAL, flags="A"), OK, SAME, {}, {}, ct={}),
    Case("tcp-psh-ack-creates-nothing", "egress", tcp(HOST, PEER_REAL, flags="PA"), OK, SAME, {}, {},
         ct={}),
    Case("tcp-fin-creates-nothing", "egress", tcp(HOST, PEER_REAL, flags="FA"), OK, SAME, {}, {}, ct={}),
    Case("tcp-rst-creates-nothing", "egress", tcp(HOST, PEER_REAL, flags="R"), OK, SAME, {}, {}, ct={}),
    Case("tcp-fin-steps-established-to-closing", "egress", tcp(HOST, PEER_REAL, flags="FA"), OK, SAME,
         {"ct": [(_T_REPLY, None, PLAIN)]}, {},
         ct={(PEER_REAL, HOST, 80, 40000, TCP_P): (None, PLAIN, CLOSING)}),
    Case("tcp-rst-steps-established-to-closed", "egress", tcp(HOST, PEER_REAL, flags="R"), OK, SAME,
         {"ct": [(_T_REPLY, None, PLAIN)]}, {},
         ct={(PEER_REAL, HOST, 80, 40000, TCP_P): (None, PLAIN, CLOSED)}),
    Case("tcp-ack-leaves-syn-sent", "egress", tcp(HOST, PEER_REAL, flags="A"), OK, SAME,
         {"ct": [(_T_REPLY, None, PLAIN, {"state": SYN_SENT})]}, {},
         ct={(PEER_REAL, HOST, 80, 40000, TCP_P): (None, PLAIN, SYN_SENT)}),
    Case("tcp-syn-overwrites-closed-flow", "egress", tcp(HOST, PEER_REAL), OK, SAME,
         {"ct": [(_T_REPLY, None, PLAIN, {"state": CLOSED})]}, {},
         ct={(PEER_REAL, HOST, 80, 40000, TCP_P): (None, PLAIN, SYN_SENT)}),
    Case("tcp-syn-keeps-nat-entry-of-same-syn", "egress", tcp(HOST, PEER_REAL), OK, SAME,
         {"ct": [(_T_REPLY, PEER_OVL, EGRESS_NAT, {"state": SYN_SENT})]}, {},
         ct={(PEER_REAL, HOST, 80, 40000, TCP_P): (PEER_OVL, EGRESS_NAT, SYN_SENT)}),
    Case("tcp-syn-replaces-old-nat-flow", "egress", tcp(HOST, PEER_REAL), OK, SAME,
         {"ct": [(_T_REPLY, PEER_OVL, EGRESS_NAT)]}, {},
         ct={(PEER_REAL, HOST, 80, 40000, TCP_P): (None, PLAIN, SYN_SENT)}),
    Case("udp-tracked", "egress", udp(HOST, OUTSIDER), OK, SAME, {}, {},
         ct={(OUTSIDER, HOST, 9999, 5353, UDP_P): (None, PLAIN, NEW)}),
    Case("udp-checksum-0-tracked", "egress", udp(HOST, OUTSIDER, chksum=0), OK, SAME, {}, {},
         ct={(OUTSIDER, HOST, 9999, 5353, UDP_P): (None, PLAIN, NEW)}),
    Case("udp-reply-of-inbound-flow-creates-nothing", "egress", udp(HOST, OUTSIDER), OK, SAME,
         {"markers": [_U_MARK]}, {}, ct={}),
    Case("udp-nat-entry-never-overwritten", "egress", udp(HOST, OUTSIDER), OK, SAME,
         {"ct": [(_U_REPLY, PEER_OVL, EGRESS_NAT)]}, {},
         ct={(OUTSIDER, HOST, 9999, 5353, UDP_P): (PEER_OVL, EGRESS_NAT, NEW)}),
    Case("icmp-echo-request-tracked-by-id", "egress", echo(HOST, OUTSIDER, ident=7), OK, SAME, {}, {},
         ct={(OUTSIDER, HOST, 7, 0, ICMP_P): (None, PLAIN, NEW)}),
    Case("icmp-echo-reply-not-tracked", "egress", echo(HOST, OUTSIDER, type_=0), OK, SAME, {}, {}, ct={}),
    Case("first-fragment-tracked", "egress", frame(_FRAGS_REAL[0]), OK, SAME, {}, {},
         ct={(PEER_REAL, HOST, 9999, 5353, UDP_P): (None, PLAIN, NEW)}),
    Case("later-fragment-not-tracked", "egress", frame(_FRAGS_REAL[1]), OK, SAME, {}, {}, ct={}),
    Case("ip-options-tracked", "egress", tcp(HOST, PEER_REAL, options=_OPTS), OK, SAME, {}, {},
         ct={(PEER_REAL, HOST, 80, 40000, TCP_P): (None, PLAIN, SYN_SENT)}),
    # the uplink egress tells a TCP segment without SYN/FIN/RST from the flags byte alone,
    # found past the IP options: a FIN with options still steps its flow
    Case("ip-options-fin-steps-established-to-closing", "egress",
         tcp(HOST, PEER_REAL, flags="FA", options=_OPTS), OK, SAME,
         {"ct": [(_T_REPLY, None, PLAIN)]}, {},
         ct={(PEER_REAL, HOST, 80, 40000, TCP_P): (None, PLAIN, CLOSING)}),
    Case("gre-not-tracked", "egress", frame(IP(src=HOST, dst=PEER_REAL, proto=47) / Raw(b"\0" * 8)),
         OK, SAME, {}, {}, ct={}),
    Case("arp-untouched", "egress", ARP_FRAME, OK, SAME, {}, {}, ct={}),
] + [
    Case(f"malformed-{name}", "egress", raw, OK, SAME, {}, {}, ct={}, checksums=False)
    for name, raw in BROKEN.items()
]


@param(EGRESS)
def test_egress(dp, case):
    check(dp, case)


def test_egress_refreshes_udp_last_seen(dp):
    dp.set_ct(_U_REPLY, None, PLAIN, age_s=50)
    before = dp.ct_entries()[(OUTSIDER, HOST, 9999, 5353, UDP_P)][3]
    assert dp.run("egress", udp(HOST, OUTSIDER))[0] == OK
    overlay, flags, state, seen, _ = dp.ct_entries()[(OUTSIDER, HOST, 9999, 5353, UDP_P)]
    assert (overlay, flags, state) == (None, PLAIN, NEW) and seen > before + 49 * 10**9


def test_egress_tcp_data_does_no_work(dp):
    """A TCP data packet of a tracked flow neither refreshes nor creates (no lookup)."""
    dp.set_ct(_T_REPLY, None, PLAIN, age_s=50)
    before = dp.ct_entries()
    assert dp.run("egress", tcp(HOST, PEER_REAL, flags="PA"))[0] == OK
    assert dp.ct_entries() == before


# --------------------------------------------------------------- ovl_ingress (uplink)

_CT_UDP_OUT = ct_key(OUTSIDER, HOST, 9999, 5353, UDP_P)  # we sent HOST:5353 -> OUTSIDER:9999
_CT_PING_OUT = ct_key(OUTSIDER, HOST, 0x4242, 0, ICMP_P)
_CT_TCP_OUT = ct_key(OUTSIDER, HOST, 443, 40000, TCP_P)
_CT_NAT_ADMIN = ct_key(ADMIN, HOST, 443, 40000, TCP_P)
_SENT_UDP = IP(src=HOST, dst=OUTSIDER) / UDP(sport=5353, dport=9999) / b"query"
_SENT_PING = IP(src=HOST, dst=OUTSIDER) / ICMP(type=8, id=0x4242, seq=1) / b"ping"
FS_SSH = {ADMIN_NET: abi.FS_SSH}
FS_ALL = {ADMIN_NET: abi.FS_ALL}


def not_allowed(pkt_src, pkt_dst, sport, dport, proto, audit=0):
    return [drop(Reason.DROP_NOT_ALLOWED, pkt_src, pkt_dst, sport, dport, proto, audit, 0)]


def martian(src, dst, sport, dport, proto, family=4):
    return [drop(Reason.DROP_MARTIAN, src, dst, sport, dport, proto) | {"family": family}]


_NAT_SYN_SENT = {"state": SYN_SENT}

INGRESS = [
    # (0) martians: loopback or own sources on the wire, always dropped (before the failsafe)
    Case("martian-loopback", "ingress", udp("127.0.0.1", HOST), SHOT, SAME, {"cfg": REJECT},
         {Reason.DROP_MARTIAN: 1}, events=martian("127.0.0.1", HOST, 5353, 9999, UDP_P)),
    Case("martian-loopback-whole-8", "ingress", tcp("127.200.3.4", HOST), SHOT, SAME, {},
         {Reason.DROP_MARTIAN: 1}, events=martian("127.200.3.4", HOST, 40000, 80, TCP_P)),
    Case("martian-loopback-before-member-and-failsafe", "ingress", udp("127.0.0.1", HOST), SHOT, SAME,
         {"cfg": REJECT, "peers": {"127.0.0.1": abi.PEER_F_MEMBER}, "failsafe": {"127.0.0.0/8": abi.FS_ALL}},
         {Reason.DROP_MARTIAN: 1}, events=martian("127.0.0.1", HOST, 5353, 9999, UDP_P)),
    Case("martian-own-private", "ingress", tcp(HOST, HOST, 40000, 80), SHOT, SAME,
         {"cfg": REJECT, "self": [HOST], "ports": [("tcp", 80)]}, {Reason.DROP_MARTIAN: 1},
         events=martian(HOST, HOST, 40000, 80, TCP_P)),
    Case("martian-own-overlay-even-without-filtering", "ingress", udp("192.168.0.1", HOST), SHOT, SAME,
         {"self": [HOST, "192.168.0.1"]}, {Reason.DROP_MARTIAN: 1},
         events=martian("192.168.0.1", HOST, 5353, 9999, UDP_P)),
    Case("martian-own-public-before-failsafe", "ingress", tcp("198.18.1.11", HOST, 50000, 22), SHOT, SAME,
         {"cfg": REJECT, "self": ["198.18.1.11"], "failsafe": FS_SSH}, {Reason.DROP_MARTIAN: 1},
         events=martian("198.18.1.11", HOST, 50000, 22, TCP_P)),
    Case("own-address-as-destination-is-fine", "ingress", udp(PEER_REAL, HOST), OK, SAME,
         {"cfg": REJECT, "self": [HOST], "peers": {PEER_REAL: abi.PEER_F_MEMBER}},
         {Reason.PASS_MEMBER: 1}),
    Case("128-is-not-loopback", "ingress", udp("128.0.0.1", HOST), SHOT, SAME, {"cfg": REJECT},
         {Reason.DROP_NOT_ALLOWED: 1}, events=not_allowed("128.0.0.1", HOST, 5353, 9999, UDP_P)),
    # (1) failsafe
    Case("failsafe-ssh", "ingress", tcp(ADMIN, HOST, 50000, 22), OK, SAME,
         {"cfg": REJECT, "failsafe": FS_SSH}, {Reason.PASS_FAILSAFE: 1},
         markers={mark(ADMIN, HOST, 50000, 22, TCP_P)}),
    Case("failsafe-ssh-range-other-port-dropped", "ingress", tcp(ADMIN, HOST, 50000, 80), SHOT, SAME,
         {"cfg": REJECT, "failsafe": FS_SSH}, {Reason.DROP_NOT_ALLOWED: 1},
         events=not_allowed(ADMIN, HOST, 50000, 80, TCP_P), markers=set()),
    Case("failsafe-ssh-range-udp-22-dropped", "ingress", udp(ADMIN, HOST, 50000, 22), SHOT, SAME,
         {"cfg": REJECT, "failsafe": FS_SSH}, {Reason.DROP_NOT_ALLOWED: 1},
         events=not_allowed(ADMIN, HOST, 50000, 22, UDP_P)),
    Case("failsafe-all", "ingress", udp(ADMIN, HOST, 50000, 2181), OK, SAME,
         {"cfg": REJECT, "failsafe": FS_ALL}, {Reason.PASS_FAILSAFE: 1}),
    Case("failsafe-all-icmp", "ingress", echo(ADMIN, HOST), OK, SAME,
         {"cfg": REJECT, "failsafe": FS_ALL}, {Reason.PASS_FAILSAFE: 1}),
    # members and established replies are decided by hash lookups before the failsafe
    # trie: same verdict and side effects, counted as member / established
    Case("member-before-failsafe", "ingress", udp(ADMIN, HOST), OK, SAME,
         {"cfg": REJECT, "failsafe": FS_ALL, "peers": {ADMIN: abi.PEER_F_MEMBER}},
         {Reason.PASS_MEMBER: 1}),
    Case("member-syn-before-failsafe-marks", "ingress", tcp(ADMIN, HOST, 40001, 5432, flags="S"), OK, SAME,
         {"cfg": REJECT, "failsafe": FS_ALL, "peers": {ADMIN: abi.PEER_F_MEMBER}},
         {Reason.PASS_MEMBER: 1}, markers={mark(ADMIN, HOST, 40001, 5432, TCP_P)}),
    Case("failsafe-before-member-under-policy", "ingress", udp(ADMIN, HOST), OK, SAME,
         {"cfg": {**REJECT, abi.CfgIndex.POLICY_ENFORCED: 1}, "failsafe": FS_ALL,
          "peers": {ADMIN: abi.PEER_F_MEMBER}},
         {Reason.PASS_FAILSAFE: 1}),
    Case("established-before-failsafe-still-reverse-nats", "ingress", tcp(ADMIN, HOST, 443, 40000, flags="SA"),
         OK, tcp(PEER_OVL, HOST, 443, 40000, flags="SA"),
         {"cfg": REJECT, "failsafe": FS_ALL, "ct": [(_CT_NAT_ADMIN, PEER_OVL, EGRESS_NAT, _NAT_SYN_SENT)]},
         {Reason.PASS_ESTABLISHED: 1, Reason.NAT_INGRESS: 1},
         ct={(ADMIN, HOST, 443, 40000, TCP_P): (PEER_OVL, EGRESS_NAT, EST)}),
    Case("failsafe-not-covering-source", "ingress", tcp("198.20.0.1", HOST, 50000, 22), SHOT, SAME,
         {"cfg": REJECT, "failsafe": FS_SSH}, {Reason.DROP_NOT_ALLOWED: 1},
         events=not_allowed("198.20.0.1", HOST, 50000, 22, TCP_P)),
    # (2) established: flows this host initiated, in every state
    Case("established-tcp", "ingress", tcp(OUTSIDER, HOST, 443, 40000, flags="A"), OK, SAME,
         {"cfg": REJECT, "ct": [(_CT_TCP_OUT, None, PLAIN)]}, {Reason.PASS_ESTABLISHED: 1},
         ct={(OUTSIDER, HOST, 443, 40000, TCP_P): (None, PLAIN, EST)}, markers=set()),
    Case("syn-ack-establishes", "ingress", tcp(OUTSIDER, HOST, 443, 40000, flags="SA"), OK, SAME,
         {"cfg": REJECT, "ct": [(_CT_TCP_OUT, None, PLAIN, _NAT_SYN_SENT)]}, {Reason.PASS_ESTABLISHED: 1},
         ct={(OUTSIDER, HOST, 443, 40000, TCP_P): (None, PLAIN, EST)}),
    Case("rst-in-syn-sent-closes", "ingress", tcp(OUTSIDER, HOST, 443, 40000, flags="RA"), OK, SAME,
         {"cfg": REJECT, "ct": [(_CT_TCP_OUT, None, PLAIN, _NAT_SYN_SENT)]}, {Reason.PASS_ESTABLISHED: 1},
         ct={(OUTSIDER, HOST, 443, 40000, TCP_P): (None, PLAIN, CLOSED)}),
    Case("fin-closing", "ingress", tcp(OUTSIDER, HOST, 443, 40000, flags="FA"), OK, SAME,
         {"cfg": REJECT, "ct": [(_CT_TCP_OUT, None, PLAIN)]}, {Reason.PASS_ESTABLISHED: 1},
         ct={(OUTSIDER, HOST, 443, 40000, TCP_P): (None, PLAIN, CLOSING)}),
    Case("closing-stays-closing-on-ack", "ingress", tcp(OUTSIDER, HOST, 443, 40000, flags="A"), OK, SAME,
         {"cfg": REJECT, "ct": [(_CT_TCP_OUT, None, PLAIN, {"state": CLOSING})]},
         {Reason.PASS_ESTABLISHED: 1}, ct={(OUTSIDER, HOST, 443, 40000, TCP_P): (None, PLAIN, CLOSING)}),
    Case("rst-after-fin-closed", "ingress", tcp(OUTSIDER, HOST, 443, 40000, flags="R"), OK, SAME,
         {"cfg": REJECT, "ct": [(_CT_TCP_OUT, None, PLAIN, {"state": CLOSING})]},
         {Reason.PASS_ESTABLISHED: 1}, ct={(OUTSIDER, HOST, 443, 40000, TCP_P): (None, PLAIN, CLOSED)}),
    Case("bare-syn-never-matches", "ingress", tcp(OUTSIDER, HOST, 443, 40000, flags="S"), SHOT, SAME,
         {"cfg": REJECT, "ct": [(_CT_TCP_OUT, None, PLAIN)]}, {Reason.DROP_NOT_ALLOWED: 1},
         ct={(OUTSIDER, HOST, 443, 40000, TCP_P): (None, PLAIN, EST)},
         events=not_allowed(OUTSIDER, HOST, 443, 40000, TCP_P)),
    Case("bare-syn-never-matches-closed-entry", "ingress", tcp(OUTSIDER, HOST, 443, 40000, flags="S"), SHOT,
         SAME, {"cfg": REJECT, "ct": [(_CT_TCP_OUT, None, PLAIN, {"state": CLOSED})]},
         {Reason.DROP_NOT_ALLOWED: 1}, events=not_allowed(OUTSIDER, HOST, 443, 40000, TCP_P)),
    Case("established-udp", "ingress", udp(OUTSIDER, HOST, 9999, 5353), OK, SAME,
         {"cfg": REJECT, "ct": [(_CT_UDP_OUT, None, PLAIN)]}, {Reason.PASS_ESTABLISHED: 1}),
    Case("established-wrong-port-dropped", "ingress", udp(OUTSIDER, HOST, 9999, 5354), SHOT, SAME,
         {"cfg": REJECT, "ct": [(_CT_UDP_OUT, None, PLAIN)]}, {Reason.DROP_NOT_ALLOWED: 1},
         events=not_allowed(OUTSIDER, HOST, 9999, 5354, UDP_P)),
    Case("established-wrong-proto-dropped", "ingress", tcp(OUTSIDER, HOST, 9999, 5353, flags="A"), SHOT,
         SAME, {"cfg": REJECT, "ct": [(_CT_UDP_OUT, None, PLAIN)]}, {Reason.DROP_NOT_ALLOWED: 1},
         events=not_allowed(OUTSIDER, HOST, 9999, 5353, TCP_P)),
    Case("established-echo-reply", "ingress", echo(OUTSIDER, HOST, type_=0), OK, SAME,
         {"cfg": REJECT, "ct": [(_CT_PING_OUT, None, PLAIN)]}, {Reason.PASS_ESTABLISHED: 1}),
    Case("echo-request-does-not-match-echo-entry", "ingress", echo(OUTSIDER, HOST, type_=8), SHOT, SAME,
         {"cfg": REJECT, "ct": [(_CT_PING_OUT, None, PLAIN)]}, {Reason.DROP_NOT_ALLOWED: 1},
         events=not_allowed(OUTSIDER, HOST, 0x4242, 0, ICMP_P)),
    Case("established-before-member", "ingress", udp(OUTSIDER, HOST, 9999, 5353), OK, SAME,
         {"cfg": REJECT, "ct": [(_CT_UDP_OUT, None, PLAIN)],
          "peers": {OUTSIDER: abi.PEER_F_MEMBER}}, {Reason.PASS_ESTABLISHED: 1}, markers=set()),
    Case("inbound-marker-never-admits", "ingress", udp(OUTSIDER, HOST, 9999, 5353), SHOT, SAME,
         {"cfg": REJECT, "markers": [_U_MARK]}, {Reason.DROP_NOT_ALLOWED: 1},
         events=not_allowed(OUTSIDER, HOST, 9999, 5353, UDP_P)),
    # related: ICMP errors about a flow we opened, or about our reply in an admitted inbound flow
    Case("related-port-unreachable", "ingress", icmp_error(OUTSIDER, HOST, quote(_SENT_UDP)), OK, SAME,
         {"cfg": REJECT, "ct": [(_CT_UDP_OUT, None, PLAIN)]}, {Reason.PASS_RELATED: 1}),
    Case("related-time-exceeded-from-router", "ingress",
         icmp_error(ROUTER, HOST, quote(_SENT_UDP), type_=11, code=0), OK, SAME,
         {"cfg": REJECT, "ct": [(_CT_UDP_OUT, None, PLAIN)]}, {Reason.PASS_RELATED: 1}),
    Case("related-parameter-problem-full-quote", "ingress",
         icmp_error(ROUTER, HOST, bytes(_SENT_UDP), type_=12, code=0), OK, SAME,
         {"cfg": REJECT, "ct": [(_CT_UDP_OUT, None, PLAIN)]}, {Reason.PASS_RELATED: 1}),
    Case("related-about-our-ping", "ingress", icmp_error(ROUTER, HOST, quote(_SENT_PING), type_=11, code=0),
         OK, SAME, {"cfg": REJECT, "ct": [(_CT_PING_OUT, None, PLAIN)]},
         {Reason.PASS_RELATED: 1}),
    Case("related-about-reply-of-admitted-inbound-flow", "ingress",
         icmp_error(ROUTER, HOST, quote(_SENT_UDP), type_=3, code=4), OK, SAME,
         {"cfg": REJECT, "markers": [_U_MARK]}, {Reason.PASS_RELATED: 1}),
    Case("icmp-error-about-unknown-flow-dropped", "ingress",
         icmp_error(OUTSIDER, HOST, quote(IP(src=HOST, dst=OUTSIDER) / UDP(sport=1, dport=2))), SHOT, SAME,
         {"cfg": REJECT, "ct": [(_CT_UDP_OUT, None, PLAIN)]}, {Reason.DROP_NOT_ALLOWED: 1},
         events=not_allowed(OUTSIDER, HOST, 0, 0, ICMP_P)),
    Case("icmp-error-with-cut-quote-dropped", "ingress", icmp_error(OUTSIDER, HOST, quote(_SENT_UDP, 2)),
         SHOT, SAME, {"cfg": REJECT, "ct": [(_CT_UDP_OUT, None, PLAIN)]},
         {Reason.DROP_NOT_ALLOWED: 1}, events=not_allowed(OUTSIDER, HOST, 0, 0, ICMP_P)),
    Case("icmp-error-default-accept", "ingress", icmp_error(OUTSIDER, HOST, quote(_SENT_UDP)), OK, SAME,
         {}, {Reason.PASS_DEFAULT: 1}),
    # (4) members: a new inbound flow leaves a marker (TCP SYN, UDP)
    Case("member", "ingress", tcp(PEER_REAL, HOST, 40000, 5432), OK, SAME,
         {"cfg": REJECT, "peers": {PEER_REAL: abi.PEER_F_MEMBER}}, {Reason.PASS_MEMBER: 1},
         ct={}, markers={mark(PEER_REAL, HOST, 40000, 5432, TCP_P)}),
    Case("member-tcp-ack-no-marker", "ingress", tcp(PEER_REAL, HOST, 40000, 5432, flags="A"), OK, SAME,
         {"cfg": REJECT, "peers": {PEER_REAL: abi.PEER_F_MEMBER}}, {Reason.PASS_MEMBER: 1},
         ct={}, markers=set()),
    Case("member-udp-marker", "ingress", udp(PEER_REAL, HOST, 9999, 5353), OK, SAME,
         {"cfg": REJECT, "peers": {PEER_REAL: abi.PEER_F_MEMBER}}, {Reason.PASS_MEMBER: 1},
         markers={mark(PEER_REAL, HOST, 9999, 5353, UDP_P)}),
    Case("member-icmp", "ingress", echo(PEER_REAL, HOST), OK, SAME,
         {"cfg": REJECT, "peers": {PEER_REAL: abi.PEER_F_MEMBER}}, {Reason.PASS_MEMBER: 1}, markers=set()),
    Case("member-before-open-port", "ingress", tcp(PEER_REAL, HOST, 40000, 80), OK, SAME,
         {"cfg": REJECT, "peers": {PEER_REAL: abi.PEER_F_MEMBER}, "ports": [("tcp", 80)]},
         {Reason.PASS_MEMBER: 1}),
    Case("peer-without-member-flag-dropped", "ingress", tcp(PEER_REAL, HOST, 40000, 5432), SHOT, SAME,
         {"cfg": REJECT, "peers": {PEER_REAL: 0}}, {Reason.DROP_NOT_ALLOWED: 1},
         events=not_allowed(PEER_REAL, HOST, 40000, 5432, TCP_P), markers=set()),
    # (5) open ports
    Case("open-tcp-port", "ingress", tcp(OUTSIDER, HOST, 40000, 80), OK, SAME,
         {"cfg": REJECT, "ports": [("tcp", 80)]}, {Reason.PASS_OPEN_PORT: 1},
         ct={}, markers={mark(OUTSIDER, HOST, 40000, 80, TCP_P)}),
    Case("open-udp-port", "ingress", udp(OUTSIDER, HOST, 40000, 53), OK, SAME,
         {"cfg": REJECT, "ports": [("udp", 53)]}, {Reason.PASS_OPEN_PORT: 1}),
    Case("open-port-65535", "ingress", tcp(OUTSIDER, HOST, 40000, 65535), OK, SAME,
         {"cfg": REJECT, "ports": [("tcp", 65535)]}, {Reason.PASS_OPEN_PORT: 1}),
    Case("open-port-0", "ingress", udp(OUTSIDER, HOST, 40000, 0), OK, SAME,
         {"cfg": REJECT, "ports": [("udp", 0)]}, {Reason.PASS_OPEN_PORT: 1}),
    Case("udp-port-open-tcp-dropped", "ingress", tcp(OUTSIDER, HOST, 40000, 53), SHOT, SAME,
         {"cfg": REJECT, "ports": [("udp", 53)]}, {Reason.DROP_NOT_ALLOWED: 1},
         events=not_allowed(OUTSIDER, HOST, 40000, 53, TCP_P)),
    Case("neighbour-port-closed", "ingress", tcp(OUTSIDER, HOST, 40000, 81), SHOT, SAME,
         {"cfg": REJECT, "ports": [("tcp", 80), ("tcp", 82)]}, {Reason.DROP_NOT_ALLOWED: 1},
         events=not_allowed(OUTSIDER, HOST, 40000, 81, TCP_P)),
    Case("open-port-bit-in-same-word", "ingress", tcp(OUTSIDER, HOST, 40000, 127), OK, SAME,
         {"cfg": REJECT, "ports": [("tcp", 64), ("tcp", 127)]}, {Reason.PASS_OPEN_PORT: 1}),
    # (6) default
    Case("default-accept", "ingress", tcp(OUTSIDER, HOST, 40000, 8080), OK, SAME, {},
         {Reason.PASS_DEFAULT: 1}),
    Case("default-drop-under-reject-all", "ingress", tcp(OUTSIDER, HOST, 40000, 8080), SHOT, SAME,
         {"cfg": REJECT}, {Reason.DROP_NOT_ALLOWED: 1},
         events=not_allowed(OUTSIDER, HOST, 40000, 8080, TCP_P)),
    Case("default-drop-icmp-echo", "ingress", echo(OUTSIDER, HOST, ident=9), SHOT, SAME,
         {"cfg": REJECT}, {Reason.DROP_NOT_ALLOWED: 1}, events=not_allowed(OUTSIDER, HOST, 9, 0, ICMP_P)),
    Case("default-drop-gre", "ingress", frame(IP(src=OUTSIDER, dst=HOST, proto=47) / Raw(b"\0" * 8)),
         SHOT, SAME, {"cfg": REJECT}, {Reason.DROP_NOT_ALLOWED: 1},
         events=not_allowed(OUTSIDER, HOST, 0, 0, 47)),
    Case("audit-passes-but-counts", "ingress", tcp(OUTSIDER, HOST, 40000, 8080), OK, SAME,
         {"cfg": AUDIT}, {Reason.DROP_NOT_ALLOWED: 1},
         events=not_allowed(OUTSIDER, HOST, 40000, 8080, TCP_P, audit=1)),
    Case("audit-mode-without-reject-all-is-default-accept", "ingress", tcp(OUTSIDER, HOST), OK, SAME,
         {"cfg": {CfgIndex.MODE: abi.FilterMode.AUDIT}}, {Reason.PASS_DEFAULT: 1}),
    Case("ip-options-open-port", "ingress", tcp(OUTSIDER, HOST, 40000, 80, options=_OPTS), OK, SAME,
         {"cfg": REJECT, "ports": [("tcp", 80)]}, {Reason.PASS_OPEN_PORT: 1}),
    Case("ip-options-dropped-with-right-ports", "ingress", udp(OUTSIDER, HOST, 1111, 2222, options=_OPTS),
         SHOT, SAME, {"cfg": REJECT}, {Reason.DROP_NOT_ALLOWED: 1},
         events=not_allowed(OUTSIDER, HOST, 1111, 2222, UDP_P)),
    # not ours
    Case("arp-untouched", "ingress", ARP_FRAME, OK, SAME, {"cfg": REJECT}, {Reason.PASS_UNTOUCHED: 1}),
] + [
    # cannot be parsed far enough to judge: dropped when the node filters ...
    Case(f"malformed-{name}-dropped-when-filtering", "ingress", raw, SHOT, SAME, {"cfg": REJECT},
         {Reason.DROP_MALFORMED: 1}, events=[drop(Reason.DROP_MALFORMED, None, None)], checksums=False)
    for name, raw in BROKEN.items()
] + [
    # ... else passed untouched, as the default would pass anything
    Case(f"malformed-{name}-passes-untouched-without-filtering", "ingress", raw, OK, SAME, {},
         {Reason.PASS_UNTOUCHED: 1}, checksums=False)
    for name, raw in BROKEN.items()
]


@param(INGRESS)
def test_ingress(dp, case):
    check(dp, case)


def test_audit_reports_a_refused_flow_once(dp):
    """Audit mode passes a would-be-dropped inbound flow: its first packet is counted
    and reported (and the flow marked), its later packets are not; a new flow (another
    SYN, another tuple) is. ICMP has no flows: each packet is reported."""
    dp.seed({"cfg": AUDIT})
    for pkt in (tcp(OUTSIDER, HOST, 40000, 8080), tcp(OUTSIDER, HOST, 40000, 8080, flags="A"),
                tcp(OUTSIDER, HOST, 40000, 8080, flags="PA"), udp(OUTSIDER, HOST, 1, 2), udp(OUTSIDER, HOST, 1, 2),
                tcp(OUTSIDER, HOST, 40000, 8080), tcp(OUTSIDER, HOST, 40001, 8080, flags="A"),
                echo(OUTSIDER, HOST), echo(OUTSIDER, HOST)):
        assert dp.run("ingress", pkt)[0] == OK
    events = [ev_dict(e) for e in dp.drain_events()]
    assert [(e["sport"], e["dport"], e["proto"]) for e in events] == [
        (40000, 8080, TCP_P), (1, 2, UDP_P), (40000, 8080, TCP_P), (40001, 8080, TCP_P),
        (0x4242, 0, ICMP_P), (0x4242, 0, ICMP_P)]
    assert dp.counters() == {Reason.DROP_NOT_ALLOWED: 6}


def test_ingress_refreshes_last_seen(dp):
    dp.set_ct(_CT_UDP_OUT, None, PLAIN, age_s=60)
    before = dp.ct_entries()[(OUTSIDER, HOST, 9999, 5353, UDP_P)][3]
    assert dp.run("ingress", udp(OUTSIDER, HOST, 9999, 5353))[0] == OK
    assert dp.ct_entries()[(OUTSIDER, HOST, 9999, 5353, UDP_P)][3] > before + 59 * 10**9


# --------------------------------------------------------------- both directions


@dataclasses.dataclass
class Flow:
    id: str
    request: Any  # (src, dst) -> IP packet this host sends
    reply: Any  # (src, dst) -> IP packet the peer answers with
    key: tuple  # ct key ports/proto: (reply sport, reply dport, proto)
    overlay: str = PEER_OVL
    real: str = PEER_REAL
    states: tuple = (NEW, NEW)  # the entry's state after the request, after the reply


FLOWS = [
    Flow("tcp", lambda s, d: IP(src=s, dst=d) / TCP(sport=40000, dport=80, flags="S") / b"GET",
         lambda s, d: IP(src=s, dst=d) / TCP(sport=80, dport=40000, flags="SA") / b"200",
         (80, 40000, TCP_P), states=(SYN_SENT, EST)),
    Flow("udp", lambda s, d: IP(src=s, dst=d) / UDP(sport=5353, dport=53) / b"query",
         lambda s, d: IP(src=s, dst=d) / UDP(sport=53, dport=5353) / b"answer",
         (53, 5353, UDP_P)),
    Flow("udp-checksum-0", lambda s, d: IP(src=s, dst=d) / UDP(sport=5353, dport=53, chksum=0) / b"q",
         lambda s, d: IP(src=s, dst=d) / UDP(sport=53, dport=5353, chksum=0) / b"a",
         (53, 5353, UDP_P)),
    Flow("icmp-echo", lambda s, d: IP(src=s, dst=d) / ICMP(type=8, id=0x77, seq=3) / b"ping",
         lambda s, d: IP(src=s, dst=d) / ICMP(type=0, id=0x77, seq=3) / b"ping",
         (0x77, 0, ICMP_P)),
    Flow("tcp-ip-options", lambda s, d: IP(src=s, dst=d, options=[IPOption_Router_Alert()])
         / TCP(sport=40001, dport=22, flags="S"),
         lambda s, d: IP(src=s, dst=d, options=_OPTS) / TCP(sport=22, dport=40001, flags="SA"),
         (22, 40001, TCP_P), states=(SYN_SENT, EST)),
    Flow("tcp-other-network-public-address",
         lambda s, d: IP(src=s, dst=d) / TCP(sport=40002, dport=443, flags="S"),
         lambda s, d: IP(src=s, dst=d) / TCP(sport=443, dport=40002, flags="SA"),
         (443, 40002, TCP_P), FAR_OVL, FAR_REAL, (SYN_SENT, EST)),
]


@pytest.mark.parametrize("flow", FLOWS, ids=[f.id for f in FLOWS])
def test_nat_both_directions(dp, flow):
    """overlay egress translates and tracks; the reply, which reject_all would
    drop otherwise, passes as established and comes back from the overlay address."""
    dp.seed({"cfg": REJECT, "nat": {flow.overlay: flow.real}})
    sport, dport, proto = flow.key
    key = (flow.real, HOST, sport, dport, proto)

    verdict, out = dp.run("overlay_egress", frame(flow.request(HOST, flow.overlay)))
    assert verdict == OK
    assert out == bytes(frame(flow.request(HOST, flow.real)))
    verify_checksums(out)
    sent = {key: (flow.overlay, EGRESS_NAT, flow.states[0])}
    assert {k: v[:3] for k, v in dp.ct_entries().items()} == sent

    # the translated packet then leaves through the uplink: untouched, NAT entry kept
    verdict, out2 = dp.run("egress", out)
    assert (verdict, out2) == (OK, out)
    assert {k: v[:3] for k, v in dp.ct_entries().items()} == sent

    verdict, back = dp.run("ingress", frame(flow.reply(flow.real, HOST)))
    assert verdict == OK
    assert back == bytes(frame(flow.reply(flow.overlay, HOST)))
    verify_checksums(back)
    assert {k: v[:3] for k, v in dp.ct_entries().items()} == {
        key: (flow.overlay, EGRESS_NAT, flow.states[1])}
    assert dp.counters() == {
        Reason.NAT_EGRESS: 1,
        Reason.NAT_INGRESS: 1,
        Reason.PASS_ESTABLISHED: 1,
    }
    assert dp.drain_events() == []


def test_direct_connection_to_real_address_is_not_translated(dp):
    """A flow to a peer's real address, though the peer has an overlay address:
    tracked without NAT, the reply keeps the real source."""
    dp.seed({"cfg": REJECT, "nat": {PEER_OVL: PEER_REAL}})
    request = tcp(HOST, PEER_REAL, 40000, 80)
    assert dp.run("egress", request) == (OK, bytes(request))
    reply = tcp(PEER_REAL, HOST, 80, 40000, flags="SA")
    assert dp.run("ingress", reply) == (OK, bytes(reply))
    assert dp.counters() == {Reason.PASS_ESTABLISHED: 1}


def test_drop_event_from_ring_buffer(dp):
    dp.seed({"cfg": REJECT})
    assert dp.run("ingress", udp("203.0.113.9", HOST, 1234, 4321))[0] == SHOT
    assert dp.run("overlay_egress", tcp(HOST, "192.168.3.3", 40000, 8443))[0] == SHOT
    events = dp.drain_events()
    assert [ev_dict(e) for e in events] == [
        {"family": 4, "saddr": "203.0.113.9", "daddr": HOST, "sport": 1234, "dport": 4321,
         "proto": UDP_P, "reason": Reason.DROP_NOT_ALLOWED, "audit": 0, "direction": 0},
        {"family": 4, "saddr": HOST, "daddr": "192.168.3.3", "sport": 40000, "dport": 8443,
         "proto": TCP_P, "reason": Reason.DROP_NO_PEER, "audit": 0, "direction": 1},
    ]
    # ports are carried in network order, as in the ABI
    assert events[0].sport == abi.port_to_be16(1234)
    assert events[1].ts_ns >= events[0].ts_ns > 0
    assert dp.counters() == {Reason.DROP_NOT_ALLOWED: 1, Reason.DROP_NO_PEER: 1}


def test_counters_accumulate(dp):
    dp.seed({"cfg": REJECT, "peers": {PEER_REAL: abi.PEER_F_MEMBER}})
    for _ in range(5):
        dp.run("ingress", udp(PEER_REAL, HOST))
    for _ in range(3):
        dp.run("ingress", udp(OUTSIDER, HOST))
    assert dp.counters() == {Reason.PASS_MEMBER: 5, Reason.DROP_NOT_ALLOWED: 3}
    assert len(dp.drain_events()) == 3


# --------------------------------------------------------------- property: checksums


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    proto=st.sampled_from(["tcp", "udp", "udp0", "icmp"]),
    sport=st.integers(0, 65535),
    dport=st.integers(0, 65535),
    payload=st.binary(max_size=300),
    src=st.integers(1, 2**32 - 1),
    real=st.integers(1, 2**32 - 1),
    options=st.booleans(),
)
def test_nat_checksums_property(compiled, proto, sport, dport, payload, src, real, options):
    import ipaddress

    compiled.reset()
    src_ip = str(ipaddress.IPv4Address(src))
    real_ip = str(ipaddress.IPv4Address(real))
    compiled.set_nat(PEER_OVL, real_ip)
    ipkw = {"options": _OPTS} if options else {}

    def build(dst):
        if proto == "tcp":
            l4 = TCP(sport=sport, dport=dport, flags="PA")
        elif proto == "udp":
            l4 = UDP(sport=sport, dport=dport)
        elif proto == "udp0":
            l4 = UDP(sport=sport, dport=dport, chksum=0)
        else:
            l4 = ICMP(type=8, id=sport, seq=dport)
        return frame(IP(src=src_ip, dst=dst, **ipkw) / l4 / payload)

    verdict, out = compiled.run("overlay_egress", build(PEER_OVL))
    assert verdict == OK
    assert out == bytes(build(real_ip))
    verify_checksums(out)
