"""IPv6 through BPF_PROG_TEST_RUN: every step of the ingress filter, the
uplink egress's tracking, extension headers and broken headers.

Hand table of the order (docs/datapath.md, "IPv6"): martian (::1, own
addresses) -> failsafe6 -> fragments -> established (ovl_ct6) -> related
(ICMPv6 errors 1-4 quoting a tracked or admitted flow) -> NDP (133-137, hop
limit 255) and MLD (130-132, 143, link-local or unspecified source) ->
members (ovl_peers6) / policies (ovl_peers6 identity, ovl_cidr_ident6, the
shared ovl_policy; `proto: icmp` covers ICMPv6) -> open ports -> default.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6MLQuery,
    ICMPv6MLReport2,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_Redirect,
    ICMPv6ND_RS,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Raw

from overlay import abi
from overlay.abi import CfgIndex, Reason
from overlay.ops import Op

from .tables import (
    AUDIT,
    EST,
    NEW,
    OK,
    PLAIN,
    REJECT,
    SAME,
    SHOT,
    SYN_SENT,
    TCP_P,
    UDP_P,
    Case,
    check,
    ct6_key,
    drop,
    eth,
    mark,
    param,
)

ICMP6 = 58
HOST6 = "2001:db8::11"        # this host's private6
PUBLIC6 = "2001:db8:1::11"    # this host's public6
PEER6 = "2001:db8::12"        # a member's real IPv6 address
OUT6 = "2001:db8::99"         # an outsider
LL_OUT, LL_HOST = "fe80::99", "fe80::11"
ADMIN6_NET, ADMIN6 = "2001:db8:ad::/48", "2001:db8:ad::7"
ROUTER6 = "2001:db8::1"


def f6(l3):
    return eth(0x86DD) / l3


def tcp6(src, dst, sport=40000, dport=80, flags="S", hlim=64, payload=b"hello"):
    return f6(IPv6(src=src, dst=dst, hlim=hlim) / TCP(sport=sport, dport=dport, flags=flags, seq=1) / payload)


def udp6(src, dst, sport=5353, dport=9999, payload=b"datagram"):
    return f6(IPv6(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload)


def icmp6(src, dst, msg, hlim=255):
    return f6(IPv6(src=src, dst=dst, hlim=hlim) / msg)


def six(reason, src, dst, sport=0, dport=0, proto=0, audit=0) -> list:
    return [drop(reason, src, dst, sport, dport, proto, audit) | {"family": 6}]


_CT_TCP = ct6_key(6, OUT6, HOST6, 443, 40000, TCP_P)   # HOST6:40000 opened a flow to OUT6:443
_CT_UDP = ct6_key(6, OUT6, HOST6, 53, 5353, UDP_P)
_CT_PING = ct6_key(6, OUT6, HOST6, 0x77, 0, ICMP6)
_MARK_UDP = ct6_key(6, PEER6, HOST6, 9999, 5353, UDP_P)  # PEER6 sent to our 5353, admitted
_SENT_TCP = IPv6(src=HOST6, dst=OUT6) / TCP(sport=40000, dport=443, flags="A")
_SENT_REPLY = IPv6(src=HOST6, dst=PEER6) / UDP(sport=5353, dport=9999) / b"reply"
FS6 = {"failsafe6": {ADMIN6_NET: abi.FS_ALL}}
SSH6 = {"failsafe6": {ADMIN6_NET: abi.FS_SSH}}
MEMBER6 = {"cfg": REJECT, "peers6": {PEER6: abi.PEER_F_MEMBER}}


def na(src, dst, sport, dport, proto):
    return six(Reason.DROP_NOT_ALLOWED, src, dst, sport, dport, proto)


def quoted(l3, n=8) -> bytes:
    raw = bytes(l3)
    return raw[: 40 + n]


INGRESS6 = [
    # martians
    Case("martian-loopback", "ingress", udp6("::1", HOST6), SHOT, SAME, {}, {Reason.DROP_MARTIAN: 1},
         events=six(Reason.DROP_MARTIAN, "::1", HOST6, 5353, 9999, UDP_P)),
    Case("martian-own-private6", "ingress", tcp6(HOST6, HOST6), SHOT, SAME,
         {"cfg": REJECT, "self": [HOST6, PUBLIC6], "ports": [("tcp", 80)]}, {Reason.DROP_MARTIAN: 1},
         events=six(Reason.DROP_MARTIAN, HOST6, HOST6, 40000, 80, TCP_P)),
    Case("martian-own-public6-before-failsafe", "ingress", udp6(PUBLIC6, HOST6), SHOT, SAME,
         {"self": [HOST6, PUBLIC6], "failsafe6": {"2001:db8::/32": abi.FS_ALL}}, {Reason.DROP_MARTIAN: 1},
         events=six(Reason.DROP_MARTIAN, PUBLIC6, HOST6, 5353, 9999, UDP_P)),
    Case("own-ipv4-address-never-matches-ipv6", "ingress", udp6(OUT6, HOST6), OK, SAME,
         {"self": ["10.0.0.11"]}, {Reason.PASS_DEFAULT: 1}),
    # failsafe6
    Case("failsafe6-all", "ingress", udp6(ADMIN6, HOST6, 5000, 2181), OK, SAME, {"cfg": REJECT, **FS6},
         {Reason.PASS_FAILSAFE: 1}),
    Case("failsafe6-ssh", "ingress", tcp6(ADMIN6, HOST6, 50000, 22), OK, SAME, {"cfg": REJECT, **SSH6},
         {Reason.PASS_FAILSAFE: 1}),
    Case("failsafe6-ssh-range-other-port", "ingress", tcp6(ADMIN6, HOST6, 50000, 80), SHOT, SAME,
         {"cfg": REJECT, **SSH6}, {Reason.DROP_NOT_ALLOWED: 1}, events=na(ADMIN6, HOST6, 50000, 80, TCP_P)),
    Case("failsafe4-does-not-cover-ipv6", "ingress", udp6(ADMIN6, HOST6), SHOT, SAME,
         {"cfg": REJECT, "failsafe": {"0.0.0.0/0": abi.FS_ALL}}, {Reason.DROP_NOT_ALLOWED: 1},
         events=na(ADMIN6, HOST6, 5353, 9999, UDP_P)),
    # established (flows this host opened)
    Case("established6-tcp", "ingress", tcp6(OUT6, HOST6, 443, 40000, flags="A"), OK, SAME,
         {"cfg": REJECT, "ct": [(_CT_TCP, None, PLAIN)]}, {Reason.PASS_ESTABLISHED: 1},
         ct={(OUT6, HOST6, 443, 40000, TCP_P): (None, PLAIN, EST)}),
    Case("established6-syn-ack", "ingress", tcp6(OUT6, HOST6, 443, 40000, flags="SA"), OK, SAME,
         {"cfg": REJECT, "ct": [(_CT_TCP, None, PLAIN, {"state": SYN_SENT})]}, {Reason.PASS_ESTABLISHED: 1},
         ct={(OUT6, HOST6, 443, 40000, TCP_P): (None, PLAIN, EST)}),
    Case("established6-bare-syn-never-matches", "ingress", tcp6(OUT6, HOST6, 443, 40000, flags="S"), SHOT,
         SAME, {"cfg": REJECT, "ct": [(_CT_TCP, None, PLAIN)]}, {Reason.DROP_NOT_ALLOWED: 1},
         events=na(OUT6, HOST6, 443, 40000, TCP_P)),
    Case("established6-udp", "ingress", udp6(OUT6, HOST6, 53, 5353), OK, SAME,
         {"cfg": REJECT, "ct": [(_CT_UDP, None, PLAIN)]}, {Reason.PASS_ESTABLISHED: 1}),
    Case("established6-echo-reply", "ingress", icmp6(OUT6, HOST6, ICMPv6EchoReply(id=0x77, seq=1), 64), OK,
         SAME, {"cfg": REJECT, "ct": [(_CT_PING, None, PLAIN)]}, {Reason.PASS_ESTABLISHED: 1}),
    Case("ipv4-entry-never-matches-ipv6", "ingress", udp6(OUT6, HOST6, 53, 5353), SHOT, SAME,
         {"cfg": REJECT, "ct": [(ct6_key(4, "10.0.0.99", "10.0.0.11", 53, 5353, UDP_P), None, PLAIN)]},
         {Reason.DROP_NOT_ALLOWED: 1}, events=na(OUT6, HOST6, 53, 5353, UDP_P)),
    # related
    Case("related6-packet-too-big", "ingress",
         icmp6(ROUTER6, HOST6, ICMPv6PacketTooBig(mtu=1280) / Raw(quoted(_SENT_TCP)), 64), OK, SAME,
         {"cfg": REJECT, "ct": [(_CT_TCP, None, PLAIN)]}, {Reason.PASS_RELATED: 1}),
    Case("related6-about-reply-of-admitted-inbound-flow", "ingress",
         icmp6(ROUTER6, HOST6, ICMPv6DestUnreach(code=3) / Raw(quoted(_SENT_REPLY)), 64), OK, SAME,
         {"cfg": REJECT, "markers": [_MARK_UDP]}, {Reason.PASS_RELATED: 1}),
    Case("related6-unknown-flow-dropped", "ingress",
         icmp6(ROUTER6, HOST6, ICMPv6DestUnreach(code=3) / Raw(quoted(_SENT_TCP)), 64), SHOT, SAME,
         {"cfg": REJECT}, {Reason.DROP_NOT_ALLOWED: 1}, events=na(ROUTER6, HOST6, 0, 0, ICMP6)),
    Case("marker-never-admits-the-flow-itself", "ingress", udp6(PEER6, HOST6, 9999, 5353), SHOT, SAME,
         {"cfg": REJECT, "markers": [_MARK_UDP]}, {Reason.DROP_NOT_ALLOWED: 1},
         events=na(PEER6, HOST6, 9999, 5353, UDP_P)),
    # NDP and MLD
    Case("ndp-ns", "ingress", icmp6(LL_OUT, "ff02::1:ff00:11", ICMPv6ND_NS(tgt=HOST6)), OK, SAME,
         {"cfg": REJECT}, {Reason.PASS_NDP: 1}),
    Case("ndp-ns-dad-from-unspecified", "ingress", icmp6("::", "ff02::1:ff00:99", ICMPv6ND_NS(tgt=OUT6)), OK,
         SAME, {"cfg": REJECT}, {Reason.PASS_NDP: 1}),
    Case("ndp-na", "ingress", icmp6(LL_OUT, LL_HOST, ICMPv6ND_NA(tgt=OUT6)), OK, SAME, {"cfg": REJECT},
         {Reason.PASS_NDP: 1}),
    Case("ndp-rs", "ingress", icmp6(LL_OUT, "ff02::2", ICMPv6ND_RS()), OK, SAME, {"cfg": REJECT},
         {Reason.PASS_NDP: 1}),
    Case("ndp-ra", "ingress", icmp6("fe80::1", "ff02::1", ICMPv6ND_RA()), OK, SAME, {"cfg": REJECT},
         {Reason.PASS_NDP: 1}),
    Case("ndp-redirect", "ingress", icmp6("fe80::1", LL_HOST, ICMPv6ND_Redirect(tgt="fe80::2", dst=OUT6)), OK,
         SAME, {"cfg": REJECT}, {Reason.PASS_NDP: 1}),
    Case("ndp-hop-limit-64-is-not-ndp", "ingress", icmp6(OUT6, HOST6, ICMPv6ND_NS(tgt=HOST6), 64), SHOT,
         SAME, {"cfg": REJECT}, {Reason.DROP_NOT_ALLOWED: 1}, events=na(OUT6, HOST6, 0, 0, ICMP6)),
    Case("ndp-hop-limit-254-is-not-ndp", "ingress", icmp6(LL_OUT, LL_HOST, ICMPv6ND_NA(tgt=OUT6), 254), SHOT,
         SAME, {"cfg": REJECT}, {Reason.DROP_NOT_ALLOWED: 1}, events=na(LL_OUT, LL_HOST, 0, 0, ICMP6)),
    Case("mld-report-link-local", "ingress", icmp6(LL_OUT, "ff02::16", ICMPv6MLReport2(), 1), OK, SAME,
         {"cfg": REJECT}, {Reason.PASS_NDP: 1}),
    Case("mld-report-unspecified", "ingress", icmp6("::", "ff02::16", ICMPv6MLReport2(), 1), OK, SAME,
         {"cfg": REJECT}, {Reason.PASS_NDP: 1}),
    Case("mld-query-link-local", "ingress", icmp6("fe80::1", "ff02::1", ICMPv6MLQuery(), 1), OK, SAME,
         {"cfg": REJECT}, {Reason.PASS_NDP: 1}),
    Case("mld-from-global-source-is-not-mld", "ingress", icmp6(OUT6, "ff02::16", ICMPv6MLReport2(), 1),
         SHOT, SAME, {"cfg": REJECT}, {Reason.DROP_NOT_ALLOWED: 1}, events=na(OUT6, "ff02::16", 0, 0, ICMP6)),
    # members
    Case("member6-tcp", "ingress", tcp6(PEER6, HOST6, 40000, 5432), OK, SAME, MEMBER6,
         {Reason.PASS_MEMBER: 1}, markers={mark(PEER6, HOST6, 40000, 5432, TCP_P, 6)}),
    Case("member6-udp", "ingress", udp6(PEER6, HOST6, 9999, 5353), OK, SAME, MEMBER6,
         {Reason.PASS_MEMBER: 1}, markers={mark(PEER6, HOST6, 9999, 5353, UDP_P, 6)}),
    Case("member6-echo", "ingress", icmp6(PEER6, HOST6, ICMPv6EchoRequest(id=5), 64), OK, SAME, MEMBER6,
         {Reason.PASS_MEMBER: 1}, markers=set()),
    Case("member6-link-local-is-not-the-member", "ingress", tcp6("fe80::12", LL_HOST, 40000, 5432), SHOT, SAME,
         MEMBER6, {Reason.DROP_NOT_ALLOWED: 1}, events=na("fe80::12", LL_HOST, 40000, 5432, TCP_P)),
    Case("peer6-without-member-flag", "ingress", tcp6(PEER6, HOST6, 40000, 5432), SHOT, SAME,
         {"cfg": REJECT, "peers6": {PEER6: 0}}, {Reason.DROP_NOT_ALLOWED: 1},
         events=na(PEER6, HOST6, 40000, 5432, TCP_P)),
    Case("member4-does-not-cover-ipv6", "ingress", tcp6(PEER6, HOST6, 40000, 5432), SHOT, SAME,
         {"cfg": REJECT, "peers": {"10.0.0.12": abi.PEER_F_MEMBER}}, {Reason.DROP_NOT_ALLOWED: 1},
         events=na(PEER6, HOST6, 40000, 5432, TCP_P)),
    # open ports, default
    Case("open-port6", "ingress", tcp6(OUT6, LL_HOST, 40000, 80), OK, SAME,
         {"cfg": REJECT, "ports": [("tcp", 80)]}, {Reason.PASS_OPEN_PORT: 1}),
    Case("open-udp-port6", "ingress", udp6(OUT6, HOST6, 5000, 53), OK, SAME,
         {"cfg": REJECT, "ports": [("udp", 53)]}, {Reason.PASS_OPEN_PORT: 1}),
    Case("closed-port6-link-local", "ingress", tcp6(LL_OUT, LL_HOST, 40000, 8080), SHOT, SAME,
         {"cfg": REJECT, "ports": [("tcp", 80)]}, {Reason.DROP_NOT_ALLOWED: 1},
         events=na(LL_OUT, LL_HOST, 40000, 8080, TCP_P)),
    Case("default6-accept", "ingress", tcp6(OUT6, HOST6, 40000, 8080), OK, SAME, {}, {Reason.PASS_DEFAULT: 1}),
    Case("reject-all6", "ingress", udp6(OUT6, HOST6, 1, 2), SHOT, SAME, {"cfg": REJECT},
         {Reason.DROP_NOT_ALLOWED: 1}, events=na(OUT6, HOST6, 1, 2, UDP_P)),
    Case("reject-all6-echo", "ingress", icmp6(OUT6, HOST6, ICMPv6EchoRequest(id=9), 64), SHOT, SAME,
         {"cfg": REJECT}, {Reason.DROP_NOT_ALLOWED: 1}, events=na(OUT6, HOST6, 9, 0, ICMP6)),
    Case("audit6", "ingress", udp6(OUT6, HOST6, 1, 2), OK, SAME, {"cfg": AUDIT}, {Reason.DROP_NOT_ALLOWED: 1},
         events=[drop(Reason.DROP_NOT_ALLOWED, OUT6, HOST6, 1, 2, UDP_P, 1) | {"family": 6}]),
    # extension headers
    Case("ext-hop-by-hop-and-dest-opts-then-tcp", "ingress",
         f6(IPv6(src=OUT6, dst=HOST6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
            / TCP(sport=40000, dport=80, flags="S")), OK, SAME,
         {"cfg": REJECT, "ports": [("tcp", 80)]}, {Reason.PASS_OPEN_PORT: 1}),
    Case("ext-routing-then-udp-closed", "ingress",
         f6(IPv6(src=OUT6, dst=HOST6) / IPv6ExtHdrRouting(addresses=[]) / UDP(sport=1, dport=8080)), SHOT,
         SAME, {"cfg": REJECT, "ports": [("tcp", 8080)]}, {Reason.DROP_NOT_ALLOWED: 1},
         events=na(OUT6, HOST6, 1, 8080, UDP_P)),
    Case("ext-too-many-headers-malformed", "ingress",
         f6(IPv6(src=OUT6, dst=HOST6) / (IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
            / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
            / IPv6ExtHdrDestOpt()) / TCP(sport=40000, dport=80)), SHOT, SAME,
         {"cfg": REJECT, "ports": [("tcp", 80)]}, {Reason.DROP_MALFORMED: 1},
         events=[drop(Reason.DROP_MALFORMED, None, None)]),
    Case("ext-header-past-the-payload-malformed", "ingress",
         f6(IPv6(src=OUT6, dst=HOST6, nh=60, plen=8) / Raw(bytes([6, 4]) + b"\0" * 6)), SHOT, SAME,
         {"cfg": REJECT}, {Reason.DROP_MALFORMED: 1}, events=[drop(Reason.DROP_MALFORMED, None, None)],
         checksums=False),
    Case("tcp6-header-cut-malformed", "ingress",
         f6(IPv6(src=OUT6, dst=HOST6, nh=6) / Raw(b"\0" * 12)), SHOT, SAME, {"cfg": REJECT},
         {Reason.DROP_MALFORMED: 1}, events=[drop(Reason.DROP_MALFORMED, None, None)]),
    Case("tcp6-header-cut-untouched-without-filtering", "ingress",
         f6(IPv6(src=OUT6, dst=HOST6, nh=6) / Raw(b"\0" * 12)), OK, SAME, {}, {Reason.PASS_UNTOUCHED: 1}),
    Case("payload-length-past-frame-malformed", "ingress",
         f6(IPv6(src=OUT6, dst=HOST6, nh=17, plen=500) / UDP(sport=1, dport=2)), SHOT, SAME, {"cfg": REJECT},
         {Reason.DROP_MALFORMED: 1}, events=[drop(Reason.DROP_MALFORMED, None, None)], checksums=False),
    Case("version-4-in-ipv6-frame-malformed", "ingress",
         bytes(eth(0x86DD)) + bytes([0x45]) + bytes(IPv6(src=OUT6, dst=HOST6) / UDP())[1:], SHOT, SAME,
         {"cfg": REJECT}, {Reason.DROP_MALFORMED: 1}, events=[drop(Reason.DROP_MALFORMED, None, None)],
         checksums=False),
    Case("no-next-header", "ingress", f6(IPv6(src=OUT6, dst=HOST6, nh=59)), SHOT, SAME, {"cfg": REJECT},
         {Reason.DROP_NOT_ALLOWED: 1}, events=na(OUT6, HOST6, 0, 0, 59)),
]


@param(INGRESS6)
def test_ingress6(dp, case):
    check(dp, case)


EGRESS6 = [
    Case("syn6-creates-syn-sent", "egress", tcp6(HOST6, OUT6, 40000, 443), OK, SAME, {}, {},
         ct={(OUT6, HOST6, 443, 40000, TCP_P): (None, PLAIN, SYN_SENT)}),
    Case("syn-ack6-of-inbound-creates-nothing", "egress", tcp6(HOST6, PEER6, 5432, 40000, flags="SA"), OK,
         SAME, {}, {}, ct={}),
    Case("ack6-creates-nothing", "egress", tcp6(HOST6, OUT6, 40000, 443, flags="A"), OK, SAME, {}, {}, ct={}),
    Case("udp6-creates", "egress", udp6(HOST6, OUT6, 5353, 53), OK, SAME, {}, {},
         ct={(OUT6, HOST6, 53, 5353, UDP_P): (None, PLAIN, NEW)}),
    Case("udp6-reply-of-inbound-creates-nothing", "egress", udp6(HOST6, PEER6, 5353, 9999), OK, SAME,
         {"markers": [_MARK_UDP]}, {}, ct={}),
    Case("echo6-request-creates", "egress", icmp6(HOST6, OUT6, ICMPv6EchoRequest(id=0x77), 64), OK, SAME,
         {}, {}, ct={(OUT6, HOST6, 0x77, 0, ICMP6): (None, PLAIN, NEW)}),
    Case("ndp6-not-tracked", "egress", icmp6(LL_HOST, LL_OUT, ICMPv6ND_NA(tgt=HOST6)), OK, SAME, {}, {},
         ct={}),
    Case("overlay-egress-leaves-ipv6-alone", "overlay_egress", udp6(HOST6, OUT6), OK, SAME, {},
         {Reason.PASS_UNTOUCHED: 1}, ct={}),
]


@param(EGRESS6)
def test_egress6(dp, case):
    check(dp, case)


def test_flow6_both_directions(dp):
    """A flow this host opens over IPv6 under reject_all: its replies pass, a
    new SYN from the same remote does not."""
    dp.seed({"cfg": REJECT})
    assert dp.run("egress", tcp6(HOST6, OUT6, 40000, 443))[0] == OK
    assert dp.run("ingress", tcp6(OUT6, HOST6, 443, 40000, flags="SA"))[0] == OK
    assert dp.run("ingress", tcp6(OUT6, HOST6, 443, 40000, flags="A"))[0] == OK
    assert dp.run("ingress", tcp6(OUT6, HOST6, 443, 40001, flags="S"))[0] == SHOT
    assert dp.counters() == {Reason.PASS_ESTABLISHED: 2, Reason.DROP_NOT_ALLOWED: 1}


# --------------------------------------------------------------- policies over IPv6


WEB_ID, CIDR_ID, POLICY_IDX = 0x1234, 0x80000042, 7


@pytest.mark.parametrize("src,packet_fn,verdict,reason", [
    (PEER6, lambda: tcp6(PEER6, HOST6, 40000, 5432), OK, Reason.PASS_POLICY),
    (PEER6, lambda: tcp6(PEER6, HOST6, 40000, 5433), SHOT, Reason.DROP_POLICY),
    (PEER6, lambda: icmp6(PEER6, HOST6, ICMPv6EchoRequest(id=1), 64), OK, Reason.PASS_POLICY),
    ("2001:db8:c::5", lambda: udp6("2001:db8:c::5", HOST6, 1, 53), OK, Reason.PASS_POLICY),
    ("2001:db8:d::5", lambda: udp6("2001:db8:d::5", HOST6, 1, 53), SHOT, Reason.DROP_POLICY),
    (OUT6, lambda: tcp6(OUT6, HOST6, 40000, 80), SHOT, Reason.DROP_POLICY),  # open ports no longer apply
], ids=["member-identity", "member-other-port", "icmp-covers-icmpv6-echo", "cidr6", "outside-cidr6",
        "open-port-under-default-deny"])
def test_policy6(dp, maps, src, packet_fn, verdict, reason):
    maps.apply([
        Op("policy", (WEB_ID, 6, 5432, 16), POLICY_IDX),
        Op("policy", (WEB_ID, 1, 0, 16), POLICY_IDX),        # proto icmp
        Op("policy", (CIDR_ID, 17, 53, 16), POLICY_IDX),
        Op("cidr_ident", "2001:db8:c::/48", CIDR_ID),
        Op("ports", (0, 1), 1 << 16),                        # tcp 80 open
        Op("config", "policy_enforced", 1),
        Op("config", "policy_default", POLICY_IDX),
    ])
    dp.set_peer6(PEER6, identity=WEB_ID)
    got, out = dp.run("ingress", packet_fn())
    assert (got, out) == (verdict, bytes(packet_fn()))
    assert dp.counters() == {reason: 1}
    events = dp.drain_events()
    if verdict == SHOT:
        assert len(events) == 1 and events[0].family == 6 and events[0].policy == POLICY_IDX
        assert abi.words_to_ip(events[0].saddr, 6) == src
    else:
        assert events == []


def test_cfg_audit_mode_index_unused_by_ipv6_nothing_else(dp):
    """The IPv4 config slots drive IPv6 too (one filter): reject_all off passes."""
    dp.set_cfg(CfgIndex.REJECT_ALL, 0)
    assert dp.run("ingress", udp6(OUT6, HOST6))[0] == OK
    assert dp.counters() == {Reason.PASS_DEFAULT: 1}
