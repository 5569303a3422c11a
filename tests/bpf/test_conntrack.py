"""Conntrack lifetimes, NAT generations and the sweep, through BPF_PROG_TEST_RUN.

Entries are seeded with ``last_seen_ns`` offsets from now (bpf_ktime_get_ns
is CLOCK_MONOTONIC), just inside or just outside the lifetime of their state.
The lifetimes come from a hand table (docs/datapath.md, "Conntrack"), not
from the code: the kernel-like defaults, and a second set written to ovl_cfg
the way the planner writes datapath.conntrack.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, UDP

from overlay import abi
from overlay.abi import CfgIndex, Reason
from overlay.ops import NatEntry, Op
from tests.support.wait import now_ns

from .tables import (
    EGRESS_NAT,
    HOST,
    ICMP_P,
    OK,
    OUTSIDER,
    PEER_OVL,
    PEER_REAL,
    PLAIN,
    REJECT,
    SHOT,
    TCP_P,
    UDP_P,
    ct6_key,
    ct_key,
    echo,
    frame,
    tcp,
    udp,
)

S = abi.CtState
DEFAULTS = {  # seconds, docs/config.md datapath.conntrack
    (TCP_P, S.SYN_SENT): 120, (TCP_P, S.ESTABLISHED): 432000, (TCP_P, S.CLOSING): 120,
    (TCP_P, S.CLOSED): 10, (UDP_P, S.NEW): 120, (ICMP_P, S.NEW): 30,
}
CONFIGURED = {  # written to ovl_cfg as the planner writes them
    (TCP_P, S.SYN_SENT): 40, (TCP_P, S.ESTABLISHED): 300, (TCP_P, S.CLOSING): 50,
    (TCP_P, S.CLOSED): 7, (UDP_P, S.NEW): 60, (ICMP_P, S.NEW): 15,
}
CFG_SLOT = {
    (TCP_P, S.SYN_SENT): CfgIndex.CT_TCP_SYN_S, (TCP_P, S.ESTABLISHED): CfgIndex.CT_TCP_ESTABLISHED_S,
    (TCP_P, S.CLOSING): CfgIndex.CT_TCP_FIN_S, (TCP_P, S.CLOSED): CfgIndex.CT_TCP_RST_S,
    (UDP_P, S.NEW): CfgIndex.CT_UDP_S, (ICMP_P, S.NEW): CfgIndex.CT_ICMP_S,
}
# the reply of a flow HOST opened to OUTSIDER, per protocol: (ct key, packet, ct tuple)
REPLY = {
    TCP_P: (ct_key(OUTSIDER, HOST, 443, 40000, TCP_P), tcp(OUTSIDER, HOST, 443, 40000, flags="A"),
            (OUTSIDER, HOST, 443, 40000, TCP_P)),
    UDP_P: (ct_key(OUTSIDER, HOST, 53, 5353, UDP_P), udp(OUTSIDER, HOST, 53, 5353),
            (OUTSIDER, HOST, 53, 5353, UDP_P)),
    ICMP_P: (ct_key(OUTSIDER, HOST, 0x4242, 0, ICMP_P), echo(OUTSIDER, HOST, type_=0),
             (OUTSIDER, HOST, 0x4242, 0, ICMP_P)),
}
MARGIN_S = 2


def _cases(table: dict, configured: bool):
    for (proto, state), life in table.items():
        for inside in (True, False):
            yield pytest.param(proto, state, life, inside, configured,
                               id=f"{'cfg' if configured else 'default'}-{proto}-{state.name.lower()}-"
                                  f"{'inside' if inside else 'outside'}")


@pytest.mark.parametrize("proto,state,life,inside,configured",
                         [*_cases(DEFAULTS, False), *_cases(CONFIGURED, True)])
def test_lifetime_per_state(dp, proto, state, life, inside, configured):
    """An entry last seen just inside its state's lifetime passes (refreshed);
    just outside it is a miss: deleted, counted, and the packet judged as new."""
    age = life - MARGIN_S if inside else life + MARGIN_S  # may be older than the clock: see set_ct
    dp.seed({"cfg": REJECT})
    if configured:
        for (p, st), seconds in CONFIGURED.items():
            dp.set_cfg(CFG_SLOT[(p, st)], seconds)
    key, packet, tup = REPLY[proto]
    dp.set_ct(key, None, PLAIN, state=state, age_s=age)
    verdict, _ = dp.run("ingress", packet)
    if inside:
        assert verdict == OK
        assert dp.counters() == {Reason.PASS_ESTABLISHED: 1}
        _, _, got_state, seen, _ = dp.ct_entries()[tup]
        want = S.ESTABLISHED if state == S.SYN_SENT else state  # the ACK of a SYN_SENT flow
        assert got_state == want and now_ns() - seen < 10**9
    else:
        assert verdict == SHOT
        assert dp.counters() == {Reason.CT_EXPIRED: 1, Reason.DROP_NOT_ALLOWED: 1}
        assert dp.ct_entries() == {}


def test_expired_udp_entry_is_renewed_by_the_next_datagram_out(dp):
    key, _, tup = REPLY[UDP_P]
    dp.set_ct(key, None, PLAIN, age_s=DEFAULTS[(UDP_P, S.NEW)] + MARGIN_S)
    assert dp.run("egress", udp(HOST, OUTSIDER, 5353, 53))[0] == OK
    _, flags, state, seen, _ = dp.ct_entries()[tup]
    assert (flags, state) == (PLAIN, S.NEW) and now_ns() - seen < 10**9


def test_expired_entry_is_not_related(dp):
    """An ICMP error quoting a flow whose entry expired is not related."""
    key, _, _ = REPLY[UDP_P]
    dp.seed({"cfg": REJECT})
    dp.set_ct(key, None, PLAIN, age_s=DEFAULTS[(UDP_P, S.NEW)] + MARGIN_S)
    sent = IP(src=HOST, dst=OUTSIDER) / UDP(sport=5353, dport=53) / b"q"
    err = frame(IP(src="10.0.0.1", dst=HOST) / ICMP(type=3, code=3) / bytes(sent)[:28])
    assert dp.run("ingress", err)[0] == SHOT
    assert dp.counters() == {Reason.CT_EXPIRED: 1, Reason.DROP_NOT_ALLOWED: 1}


def test_ipv6_entry_expires_too(dp):
    key = ct6_key(6, "2001:db8::2", "2001:db8::1", 53, 5353, UDP_P)
    dp.seed({"cfg": REJECT})
    dp.set_cfg(CfgIndex.CT_UDP_S, 5)
    dp.set_ct(key, None, PLAIN, age_s=5 + MARGIN_S)
    from .test_ipv6 import udp6

    assert dp.run("ingress", udp6("2001:db8::2", "2001:db8::1", 53, 5353))[0] == SHOT
    assert dp.counters() == {Reason.CT_EXPIRED: 1, Reason.DROP_NOT_ALLOWED: 1}


# --------------------------------------------------------------- NAT generation

_NAT_KEY = ct_key(PEER_REAL, HOST, 80, 40000, TCP_P)
_NAT_REPLY = tcp(PEER_REAL, HOST, 80, 40000, flags="A")
_NAT_TUPLE = (PEER_REAL, HOST, 80, 40000, TCP_P)


@pytest.mark.parametrize("entry_gen,cfg_gen,nat,verdict,translated,counters,kept_gen", [
    # same generation: no check at all (the window of one apply)
    (3, 3, None, OK, True, {Reason.PASS_ESTABLISHED: 1, Reason.NAT_INGRESS: 1}, 3),
    # stale, NAT entry unchanged: verified, generation refreshed
    (2, 3, PEER_REAL, OK, True, {Reason.PASS_ESTABLISHED: 1, Reason.NAT_INGRESS: 1}, 3),
    # stale, peer removed: deleted, judged as new (dropped under reject_all)
    (2, 3, None, SHOT, False, {Reason.CT_NAT_STALE: 1, Reason.DROP_NOT_ALLOWED: 1}, None),
    # stale, re-pointed to another real address: deleted
    (2, 3, "10.0.0.77", SHOT, False, {Reason.CT_NAT_STALE: 1, Reason.DROP_NOT_ALLOWED: 1}, None),
    # the generation counter wraps: 0xffffffff -> 0 is a change too
    (0xFFFFFFFF, 0, PEER_REAL, OK, True, {Reason.PASS_ESTABLISHED: 1, Reason.NAT_INGRESS: 1}, 0),
], ids=["same-gen", "stale-verified", "stale-removed", "stale-repointed", "wrapped"])
@pytest.mark.parametrize("overlay", [PEER_OVL, "203.0.113.9"], ids=["slot", "ext"])
def test_nat_generation(dp, entry_gen, cfg_gen, nat, verdict, translated, counters, kept_gen, overlay):
    """The re-check reads the NAT entry where it lives: an ovl_nat slot (PEER_OVL, in the
    conftest's NAT_SUBNET) or ovl_nat_ext (an override outside the subnet)."""
    dp.seed({"cfg": {**REJECT, CfgIndex.NAT_GEN: cfg_gen}})
    if nat:
        dp.set_nat(overlay, nat)
    dp.set_ct(_NAT_KEY, overlay, EGRESS_NAT, gen=entry_gen)
    got, out = dp.run("ingress", _NAT_REPLY)
    assert got == verdict
    want = tcp(overlay, HOST, 80, 40000, flags="A") if translated else _NAT_REPLY
    assert out == bytes(want)
    assert dp.counters() == counters
    entries = dp.ct_entries()
    if kept_gen is None:
        assert entries == {}
    else:
        assert entries[_NAT_TUPLE][4] == kept_gen


def test_overlay_egress_verifies_the_generation(dp):
    """A packet out through ovl0 has just read the NAT entry: its flow's entry
    takes the current generation."""
    dp.seed({"cfg": {CfgIndex.NAT_GEN: 9}, "nat": {PEER_OVL: PEER_REAL}})
    dp.set_ct(_NAT_KEY, PEER_OVL, EGRESS_NAT, gen=4)
    assert dp.run("overlay_egress", tcp(HOST, PEER_OVL, 40000, 80, flags="A"))[0] == OK
    assert dp.ct_entries()[_NAT_TUPLE][4] == 9


def test_apply_bumps_the_generation_after_nat_writes(dp, maps):
    gen = abi.CfgIndex.NAT_GEN
    assert maps.get_cfg(gen) == 0
    maps.apply([Op("nat", PEER_OVL, NatEntry(PEER_REAL))])
    assert maps.get_cfg(gen) == 1
    maps.apply([Op("ports", (0, 1), 1), Op("peers", "2001:db8::9", None)])  # no nat op
    assert maps.get_cfg(gen) == 1
    maps.apply([Op("nat", PEER_OVL, None)])
    assert maps.get_cfg(gen) == 2
    maps.set_cfg(gen, 0xFFFFFFFF)
    maps.apply([Op("nat", PEER_OVL, NatEntry("10.0.0.5"))])
    assert maps.get_cfg(gen) == 0


def test_removed_peer_reply_is_dropped_after_one_apply(dp, maps):
    """End to end on the maps: a translated flow's reply passes; the apply that
    removes the peer makes the very next reply a miss."""
    maps.apply([Op("nat", PEER_OVL, NatEntry(PEER_REAL)), Op("config", "reject_all", 1)])
    assert dp.run("overlay_egress", tcp(HOST, PEER_OVL, 40000, 80))[0] == OK
    assert dp.run("ingress", tcp(PEER_REAL, HOST, 80, 40000, flags="SA"))[0] == OK
    maps.apply([Op("nat", PEER_OVL, None)])
    assert dp.run("ingress", _NAT_REPLY)[0] == SHOT
    assert dp.ct_entries() == {}


# --------------------------------------------------------------- the sweep


def test_sweep_deletes_expired_entries_in_bounded_rounds(dp, maps):
    dp.set_cfg(CfgIndex.CT_UDP_S, 30)
    dp.set_cfg(CfgIndex.FRAG_S, 5)
    live, dead = set(), set()
    for i in range(300):
        key = ct_key(OUTSIDER, HOST, 1000 + i, 5353, UDP_P)
        old = i % 3 == 0
        dp.set_ct(key, None, PLAIN, age_s=90 if old else 1)
        (dead if old else live).add((OUTSIDER, HOST, 1000 + i, 5353, UDP_P))
    for i in range(10):
        dp.set_ct(ct6_key(6, "2001:db8::2", "2001:db8::1", 2000 + i, 53, UDP_P), None, PLAIN,
                  age_s=90 if i < 4 else 1)
        dp.set_marker(ct6_key(4, OUTSIDER, HOST, 3000 + i, 53, UDP_P), age_s=90 if i < 5 else 1)
    removed = {"ovl_ct": 0, "ovl_ct6": 0, "ovl_ct_in": 0, "ovl_frag": 0}
    rounds = 0
    while True:
        rounds += 1
        got = maps.sweep(budget=64)
        for name, n in got.items():
            removed[name] += n
        if all(maps._sweep_cursor.get(n) is None for n in removed) and rounds > 1:
            break
        assert rounds < 50
    assert rounds >= 300 // 64  # bounded work: several rounds for 300 entries
    assert removed == {"ovl_ct": 100, "ovl_ct6": 4, "ovl_ct_in": 5, "ovl_frag": 0}
    left = {k for k in dp.ct_entries() if k[0] == OUTSIDER}
    assert left == live
    assert len(dp.markers()) == 5


# --------------------------------------------------------------- own addresses: the hint


def _bit(addr: str) -> int:
    """The header's formula, written out again: ((w0^w1^w2^w3) * 0x9E3779B1 mod 2^32) >> 26."""
    import ipaddress
    import struct

    ip = ipaddress.ip_address(addr)
    raw = ip.packed if ip.version == 6 else b"\0" * 10 + b"\xff\xff" + ip.packed
    w = struct.unpack("=4I", raw)
    return (((w[0] ^ w[1] ^ w[2] ^ w[3]) * 0x9E3779B1) % (1 << 32)) >> 26


def test_self_hint_follows_the_self_table(dp, maps):
    hint = abi.CfgIndex.SELF_HINT
    own = [HOST, "192.168.0.1", "2001:db8::11"]
    maps.apply([Op("self", a, 1) for a in own])
    assert maps.get_cfg(hint) == sum({1 << _bit(a) for a in own})
    dp.seed({"cfg": REJECT})
    for a in own:
        pkt = udp(a, HOST) if ":" not in a else None
        if pkt is not None:
            assert dp.run("ingress", pkt)[0] == SHOT
    assert dp.counters() == {Reason.DROP_MARTIAN: 2}
    maps.apply([Op("self", a) for a in own])
    assert maps.get_cfg(hint) == 0 and maps.read_table("self") == {}
