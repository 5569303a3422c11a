"""overlay/datapath/iptables_rules.py from hand tables: rule text, and reading back what
``iptables-save``/``ipset save`` print (the lines below are written as those tools print
them, not produced by the renderer under test)."""

from __future__ import annotations

import pytest

from overlay.datapath import iptables_rules as r
from overlay.ops import NatEntry, PeerEntry

SUBNET = "192.168.0.0/18"
DEFAULT_IN = '-A OVERLAY-IN -m comment --comment "ovl:pass_default" -j RETURN'


def state(**tables) -> dict:
    base = {"nat": {}, "peers": {}, "ports": {}, "failsafe": {}, "config": {}, "self": {}}
    return base | tables


def test_names_of_the_chains_sets_and_reasons():
    assert (r.CHAIN_NAT, r.CHAIN_IN, r.CHAIN_OUT) == ("OVERLAY-NAT", "OVERLAY-IN", "OVERLAY-OUT")
    assert (r.IPSET, r.IPSET_TMP, r.IPSET6, r.IPSET6_TMP) == (
        "OVERLAY-PEERS", "OVERLAY-PEERS-TMP", "OVERLAY-PEERS6", "OVERLAY-PEERS6-TMP")
    assert r.CHAINS == {"nat": (("OUTPUT", "OVERLAY-NAT"),),
                        "filter": (("INPUT", "OVERLAY-IN"), ("OUTPUT", "OVERLAY-OUT")),
                        "filter6": (("INPUT", "OVERLAY-IN"),)}
    assert r.IPT_TABLE == {"nat": "nat", "filter": "filter", "filter6": "filter"}
    assert r.SETS == {"ipset": ("OVERLAY-PEERS", "OVERLAY-PEERS-TMP", "inet"),
                      "ipset6": ("OVERLAY-PEERS6", "OVERLAY-PEERS6-TMP", "inet6")}
    assert r.REASONS == ("drop_no_peer", "drop_not_allowed", "drop_martian", "pass_failsafe",
                         "pass_established", "pass_loopback", "pass_member", "pass_open_port",
                         "pass_default", "pass_ndp")


# -- ports --------------------------------------------------------------------------

@pytest.mark.parametrize(("ports", "runs"), [
    ([], []), ([5], [(5, 5)]), ([3, 1, 2], [(1, 3)]), ([1, 3], [(1, 1), (3, 3)]),
    ([1, 1, 2, 4, 5, 5, 7], [(1, 2), (4, 5), (7, 7)]), ([65534, 65535, 1], [(1, 1), (65534, 65535)]),
])
def test_port_ranges(ports, runs):
    assert r.port_ranges(ports) == runs


@pytest.mark.parametrize(("ports", "groups"), [
    ([], []),
    # exactly 15 single ports fit one match; the 16th opens a second
    (list(range(1, 30, 2)), [[(p, p) for p in range(1, 30, 2)]]),
    (list(range(1, 32, 2)), [[(p, p) for p in range(1, 30, 2)], [(31, 31)]]),
    # 7 ranges (14 slots) and a single port: 15, one match
    ([p for i in range(7) for p in (10 * i, 10 * i + 1)] + [99],
     [[(10 * i, 10 * i + 1) for i in range(7)] + [(99, 99)]]),
    # 14 single ports then a range (2 slots): the range opens a second match
    (list(range(1, 28, 2)) + [40, 41], [[(p, p) for p in range(1, 28, 2)], [(40, 41)]]),
])
def test_port_groups_fill_15_slots(ports, groups):
    assert r.port_groups(ports) == groups


@pytest.mark.parametrize(("proto", "group", "text"), [
    ("tcp", [(22, 22)], "-p tcp -m tcp --dport 22"),
    ("udp", [(1000, 2000)], "-p udp -m udp --dport 1000:2000"),
    ("tcp", [(22, 22), (80, 81)], "-p tcp -m multiport --dports 22,80:81"),
])
def test_port_match(proto, group, text):
    assert r._port_match(proto, group) == text


# -- rendering ----------------------------------------------------------------------

def test_nat_rules_without_self_and_with_half_of_it():
    s = state(nat={"192.168.0.5": NatEntry("10.0.0.5", override=True)})
    want = ['-A OVERLAY-NAT -d 192.168.0.5/32 -m comment --comment "ovl:override" -j DNAT --to-destination 10.0.0.5']
    assert r.nat_rules(s) == want
    assert r.nat_rules(s, "192.168.0.1", None) == want
    assert r.nat_rules(s, None, "10.0.0.1") == want
    assert r.nat_rules({}) == []


def test_the_smallest_filter_of_each_family():
    assert r.filter_rules({}, SUBNET) == [
        '-A OVERLAY-IN -s 127.0.0.0/8 ! -i lo -m comment --comment "ovl:drop_martian" -j DROP',
        '-A OVERLAY-IN -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment "ovl:pass_established" -j ACCEPT',
        '-A OVERLAY-IN -i lo -m comment --comment "ovl:pass_loopback" -j ACCEPT',
        '-A OVERLAY-IN -m set --match-set OVERLAY-PEERS src -m comment --comment "ovl:pass_member" -j ACCEPT',
        DEFAULT_IN,
        '-A OVERLAY-OUT -d 192.168.0.0/18 -m comment --comment "ovl:drop_no_peer" -j DROP',
    ]
    six = r.filter_rules({}, SUBNET, "eth1", 6)
    assert six[0] == '-A OVERLAY-IN -s ::1/128 -i eth1 -m comment --comment "ovl:drop_martian" -j DROP'
    assert six[-1] == DEFAULT_IN
    assert '-A OVERLAY-IN -m set --match-set OVERLAY-PEERS6 src -m comment --comment "ovl:pass_member" -j ACCEPT' in six
    assert len(six) == 1 + 2 + 5 + 8 + 1 + 1   # martian, established+lo, NDP, MLD, member, default


def test_the_out_chain_takes_the_subnet_of_a_host_address():
    assert r.filter_rules({}, "10.1.2.3/16")[-1] == (
        '-A OVERLAY-OUT -d 10.1.0.0/16 -m comment --comment "ovl:drop_no_peer" -j DROP')


def test_own_addresses_are_martians_of_their_family_sorted_by_value():
    s = state(self={"10.0.0.10": 1, "10.0.0.9": 1, "fd00::2": 1, "fd00::10": 1})
    four = [x for x in r.filter_rules(s, SUBNET, "eth0") if "drop_martian" in x]
    assert [x.split()[3] for x in four] == ["127.0.0.0/8", "10.0.0.9/32", "10.0.0.10/32"]
    six = [x for x in r.filter_rules(s, SUBNET, "eth0", 6) if "drop_martian" in x]
    assert [x.split()[3] for x in six] == ["::1/128", "fd00::2/128", "fd00::10/128"]


def test_failsafe_rules_of_each_family_sorted_by_network():
    s = state(failsafe={"10.0.0.0/8": 1, "9.0.0.0/8": 2, "10.0.0.0/16": 1, "::/0": 2, "fd00::/8": 1})
    four = [x for x in r.filter_rules(s, SUBNET) if "pass_failsafe" in x]
    assert four == [
        '-A OVERLAY-IN -s 9.0.0.0/8 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '-A OVERLAY-IN -s 10.0.0.0/8 -p tcp -m tcp --dport 22 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '-A OVERLAY-IN -s 10.0.0.0/16 -p tcp -m tcp --dport 22 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
    ]
    six = [x for x in r.filter_rules(s, SUBNET, None, 6) if "pass_failsafe" in x]
    assert six == [
        '-A OVERLAY-IN -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '-A OVERLAY-IN -s fd00::/8 -p tcp -m tcp --dport 22 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
    ]
    # a flag of neither kind renders nothing
    assert not [x for x in r.filter_rules(state(failsafe={"10.0.0.0/8": 4}), SUBNET) if "pass_failsafe" in x]


def test_reject_all_zero_is_the_default_verdict_and_mode_audit_is_1():
    assert r.filter_rules(state(config={"reject_all": 0}), SUBNET)[-2] == DEFAULT_IN
    assert r.filter_rules(state(config={"reject_all": 1, "mode": 1}), SUBNET)[-2:] == [
        '-A OVERLAY-IN -m comment --comment "ovl:drop_not_allowed:audit" -j RETURN',
        '-A OVERLAY-OUT -d 192.168.0.0/18 -m comment --comment "ovl:drop_no_peer:audit" -j RETURN',
    ]
    assert r.filter_rules(state(config={"reject_all": 1, "mode": 0}), SUBNET)[-2] == (
        '-A OVERLAY-IN -m comment --comment "ovl:drop_not_allowed" -j DROP')


def test_members_are_peers_with_the_member_flag_of_the_family():
    s = state(peers={"10.0.0.2": PeerEntry(5, 1), "10.0.0.3": PeerEntry(5, 0), "10.0.0.4": PeerEntry(1, 3),
                     "fd00::1": PeerEntry(5, 1), "fd00::2": PeerEntry(5, 2)})
    assert r.ipset_members(s) == ["10.0.0.2", "10.0.0.4"]
    assert r.ipset_members(s, 6) == ["fd00::1"]
    assert r.ipset_members({}) == []


def test_render_without_ipv6_and_with_it():
    s = state(peers={"10.0.0.2": PeerEntry(), "fd00::1": PeerEntry()})
    out = r.render(s, SUBNET, ipv6=False)
    assert sorted(out) == ["filter", "ipset", "nat"]
    assert out["ipset"] == "10.0.0.2\n"
    assert out["nat"] == "*nat\n:OVERLAY-NAT - [0:0]\n-F OVERLAY-NAT\nCOMMIT\n"
    out6 = r.render(s, SUBNET, "192.168.0.1", "10.0.0.1", "eth0")
    assert sorted(out6) == ["filter", "filter6", "ipset", "ipset6", "nat"]
    assert out6["ipset6"] == "fd00::1\n"
    assert out6["filter6"].splitlines()[:4] == ["*filter", ":OVERLAY-IN - [0:0]", "-F OVERLAY-IN",
                                                '-A OVERLAY-IN -s ::1/128 -i eth0 -m comment --comment '
                                                '"ovl:drop_martian" -j DROP']
    assert out6["nat"].splitlines()[3] == (
        '-A OVERLAY-NAT -d 192.168.0.1/32 -m comment --comment "ovl:self" -j DNAT --to-destination 10.0.0.1')
    assert r.render({}, SUBNET)["ipset"] == ""


def test_jump_text_and_ipset_script():
    assert r.jump_text("filter", [("INPUT", "OVERLAY-IN"), ("OUTPUT", "OVERLAY-OUT")]) == (
        "-I INPUT 1 -j OVERLAY-IN\n-I OUTPUT 1 -j OVERLAY-OUT\n")
    assert r.jump_text("nat", []) == ""
    assert r.ipset_script([], 10, False) == "create OVERLAY-PEERS-TMP hash:ip family inet hashsize 1024 maxelem 10\n"
    assert r.ipset_script(["fd00::1"], 7, True, "ipset6") == (
        "create OVERLAY-PEERS6 hash:ip family inet6 hashsize 1024 maxelem 7 -exist\n"
        "create OVERLAY-PEERS6-TMP hash:ip family inet6 hashsize 1024 maxelem 7\n"
        "add OVERLAY-PEERS6-TMP fd00::1\n")


# -- reading back -------------------------------------------------------------------

SAVE = """# Generated by iptables-save v1.8.9 (nf_tables) on Mon Nov 30 00:00:00 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [10:600]
:OVERLAY-IN - [0:0]
:OVERLAY-OUT - [0:0]
[3:180] -A INPUT -j OVERLAY-IN
-A OUTPUT -j OVERLAY-OUT
-A OUTPUT -j OVERLAY-OUTPUT-EXTRA
[7:420] -A OVERLAY-IN -s 10.0.0.0/8 -m comment --comment "ovl:pass_failsafe" -j ACCEPT
  -A OVERLAY-IN -i lo -m comment --comment "ovl:pass_loopback" -j ACCEPT
-A OVERLAY-INX -j DROP
-A OVERLAY-OUT -d 192.168.0.0/18 -m comment --comment "ovl:drop_no_peer" -j DROP
COMMIT
"""


def test_chain_lines_strip_counters_and_match_the_chain_exactly():
    assert r.chain_lines(SAVE, "OVERLAY-IN") == [
        '-A OVERLAY-IN -s 10.0.0.0/8 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '-A OVERLAY-IN -i lo -m comment --comment "ovl:pass_loopback" -j ACCEPT',
    ]
    assert r.chain_lines(SAVE, "OVERLAY-NAT") == []


def test_jumps_and_chains_present():
    assert r.jumps_present(SAVE, "filter") == [("INPUT", "OVERLAY-IN"), ("OUTPUT", "OVERLAY-OUT")]
    assert r.jumps_present(SAVE, "filter6") == [("INPUT", "OVERLAY-IN")]
    assert r.jumps_present(SAVE, "nat") == []
    assert r.jumps_present("-A OUTPUT -j OVERLAY-OUT\n", "filter") == [("OUTPUT", "OVERLAY-OUT")]
    assert r.chains_present(SAVE) == {"INPUT", "FORWARD", "OUTPUT", "OVERLAY-IN", "OVERLAY-OUT"}
    assert r.chains_present("") == set()


@pytest.mark.parametrize(("line", "fields"), [
    ('-A OVERLAY-IN -s 10.0.0.0/8 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
     {"-A": "OVERLAY-IN", "-s": "10.0.0.0/8", "-m": "comment", "--comment": "ovl:pass_failsafe", "-j": "ACCEPT"}),
    # the first value of an option wins; a flag without a value is skipped
    ("-A X -m tcp -m comment ! --syn -j DROP", {"-A": "X", "-m": "tcp", "-j": "DROP"}),
    ("-A X -m set --match-set OVERLAY-PEERS src -j ACCEPT",
     {"-A": "X", "-m": "set", "--match-set": "OVERLAY-PEERS", "-j": "ACCEPT"}),
    ("-A X --match-set S", {"-A": "X", "--match-set": "S"}),
    ("-A X --match-set", {"-A": "X"}),
    ("-A X --match-set S src", {"-A": "X", "--match-set": "S"}),
    ("-A X -j", {"-A": "X"}),
    ('-A X -m comment --comment "unclosed', {}),
    ("", {}),
])
def test_rule_fields(line, fields):
    assert r._rule_fields(line) == fields


def test_parse_nat_keeps_only_our_dnat_rules():
    lines = [
        '-A OVERLAY-NAT -d 192.168.0.2/32 -m comment --comment "ovl:peer" -j DNAT --to-destination 10.0.0.2',
        '-A OVERLAY-NAT -d 192.168.0.9/32 -m comment --comment "ovl:override" -j DNAT --to-destination 10.0.0.9',
        '-A OVERLAY-NAT -d 192.168.0.1/32 -m comment --comment "ovl:self" -j DNAT --to-destination 10.0.0.1',
        '-A OVERLAY-NAT -d 192.168.0.3/32 -m comment --comment "ovl:peer" -j SNAT --to-source 10.0.0.3',
        '-A OVERLAY-NAT -d 192.168.0.4/32 -m comment --comment "ovl:peer" -j DNAT',
        '-A OVERLAY-NAT -m comment --comment "ovl:peer" -j DNAT --to-destination 10.0.0.5',
        '-A OVERLAY-NAT -d 192.168.0.6/32 -j DNAT --to-destination 10.0.0.6',
    ]
    assert r.parse_nat(lines) == {"192.168.0.2": NatEntry("10.0.0.2", False),
                                  "192.168.0.9": NatEntry("10.0.0.9", True)}


def test_parse_filter_by_hand():
    lines = [
        '-A OVERLAY-IN -s 127.0.0.0/8 -i eth0 -m comment --comment "ovl:drop_martian:audit" -j RETURN',
        '-A OVERLAY-IN -s 10.0.0.1/32 -i eth0 -m comment --comment "ovl:drop_martian:audit" -j RETURN',
        '-A OVERLAY-IN -s 127.0.0.1/32 -i eth0 -m comment --comment "ovl:drop_martian:audit" -j RETURN',
        '-A OVERLAY-IN -p tcp -m tcp --dport 22 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '-A OVERLAY-IN -s 10.0.0.0/8 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '-A OVERLAY-IN -s 10.0.0.0/8 -p tcp -m tcp --dport 22 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        # port 22 of UDP, or another TCP port: an accept-all entry, not the SSH flag
        '-A OVERLAY-IN -s 9.0.0.0/8 -p udp -m udp --dport 22 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '-A OVERLAY-IN -s 8.0.0.0/8 -p tcp -m tcp --dport 2222 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '-A OVERLAY-IN -p tcp -m multiport --dports 80,8000:8002 -m comment --comment "ovl:pass_open_port" -j ACCEPT',
        '-A OVERLAY-IN -p udp -m udp --dport 53 -m comment --comment "ovl:pass_open_port" -j ACCEPT',
        '-A OVERLAY-IN -p sctp -m sctp --dport 99 -m comment --comment "ovl:pass_open_port" -j ACCEPT',
        '-A OVERLAY-IN -m comment --comment "ovl:drop_not_allowed:audit" -j RETURN',
        '-A OVERLAY-IN -m comment --comment "something else" -j ACCEPT',
    ]
    assert r.parse_filter(lines) == {
        "failsafe": {"0.0.0.0/0": 1, "10.0.0.0/8": 3, "9.0.0.0/8": 2, "8.0.0.0/8": 2},
        "ports": {(0, 1): 1 << (80 - 64), (0, 125): (1 << 0) | (1 << 1) | (1 << 2), (1, 0): 1 << 53},
        "config": {"reject_all": 1, "mode": 1},
        "self": {"10.0.0.1": 1},
    }


def test_parse_filter_of_ipv6_and_the_mode_of_drop_no_peer():
    lines6 = [
        '-A OVERLAY-IN -s ::1/128 ! -i lo -m comment --comment "ovl:drop_martian" -j DROP',
        '-A OVERLAY-IN -s fd00::1/128 ! -i lo -m comment --comment "ovl:drop_martian" -j DROP',
        '-A OVERLAY-IN -p tcp -m tcp --dport 22 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
    ]
    assert r.parse_filter(lines6, 6) == {"failsafe": {"::/0": 1}, "ports": {},
                                        "config": {"reject_all": 0, "mode": 0}, "self": {"fd00::1": 1}}
    out = ['-A OVERLAY-OUT -d 192.168.0.0/18 -m comment --comment "ovl:drop_no_peer:audit" -j RETURN']
    assert r.parse_filter(out)["config"] == {"reject_all": 0, "mode": 1}
    enforce = ['-A OVERLAY-OUT -d 192.168.0.0/18 -m comment --comment "ovl:drop_no_peer" -j DROP']
    assert r.parse_filter(out + enforce)["config"] == {"reject_all": 0, "mode": 0}
    assert r.parse_filter([]) == {"failsafe": {}, "ports": {}, "config": {"reject_all": 0, "mode": 0}, "self": {}}


def test_parse_ipset():
    save = ("create OVERLAY-PEERS hash:ip family inet hashsize 1024 maxelem 65536\n"
            "add OVERLAY-PEERS 10.0.0.2\nadd OVERLAY-PEERS-TMP 10.0.0.3\nadd OVERLAY-PEERS\n"
            "del OVERLAY-PEERS 10.0.0.4\nadd OVERLAY-PEERS 10.0.0.5 timeout 0\n")
    assert r.parse_ipset(save) == ["10.0.0.2", "10.0.0.5"]
    assert r.parse_ipset(save, "OVERLAY-PEERS-TMP") == ["10.0.0.3"]


def test_parse_counters_by_hand():
    save = "\n".join([
        "*filter",
        '[7:420] -A OVERLAY-IN -s 10.0.0.0/8 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '[3:1] -A OVERLAY-IN -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '[5:300] -A OVERLAY-OUT -d 192.168.0.0/18 -m comment --comment "ovl:drop_no_peer:audit" -j RETURN',
        '[11:0] -A OVERLAY-IN -m comment --comment "ovl:pass_ndp" -j ACCEPT',
        '[2:0] -A OVERLAY-IN -m comment --comment "ovl:custom" -j ACCEPT',
        '[9:0] -A OVERLAY-IN -m comment --comment "mine" -j ACCEPT',
        '[x:0] -A OVERLAY-IN -m comment --comment "ovl:pass_member" -j ACCEPT',
        '[8:0] -A OVERLAY-INPUT -m comment --comment "ovl:pass_member" -j ACCEPT',
        '-A OVERLAY-IN -m comment --comment "ovl:pass_member" -j ACCEPT',
        "COMMIT",
    ])
    want = dict.fromkeys(r.REASONS, 0) | {"pass_failsafe": 10, "drop_no_peer": 5, "pass_ndp": 11, "custom": 2}
    assert r.parse_counters(save) == want


def test_a_failsafe_network_with_host_bits_renders_as_iptables_prints_it():
    """iptables itself stores -s 10.0.0.1/8 as 10.0.0.0/8; the renderer does the same."""
    s = state(failsafe={"10.0.0.1/8": 2, "9.9.9.9/32": 2})
    assert [x for x in r.filter_rules(s, SUBNET) if "pass_failsafe" in x] == [
        '-A OVERLAY-IN -s 9.9.9.9/32 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '-A OVERLAY-IN -s 10.0.0.0/8 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
    ]


def test_an_open_port_rule_without_ports_adds_none():
    lines = ['-A OVERLAY-IN -p tcp -m comment --comment "ovl:pass_open_port" -j ACCEPT',
             '-A OVERLAY-IN -p udp -m udp --dport 53 -m comment --comment "ovl:pass_open_port" -j ACCEPT']
    assert r.parse_filter(lines)["ports"] == {(1, 0): 1 << 53}


def test_counters_after_a_foreign_or_broken_line_still_count():
    save = "\n".join([
        '[9:0] -A OVERLAY-IN -m comment --comment "mine" -j ACCEPT',
        '[4:0] -A OVERLAY-IN -m comment --comment "ovl:pass_member" -j ACCEPT',
        '[x:0] -A OVERLAY-IN -m comment --comment "ovl:pass_member" -j ACCEPT',
        '[X7:0] -A OVERLAY-IN -m comment --comment "ovl:pass_ndp" -j ACCEPT',
        '[3:0] -A OVERLAY-IN -m comment --comment "ovl:pass_default" -j RETURN',
    ])
    assert r.parse_counters(save) == dict.fromkeys(r.REASONS, 0) | {"pass_member": 4, "pass_default": 3}


def test_parse_filter_reads_a_source_with_host_bits_as_its_network():
    lines = ['-A OVERLAY-IN -s 10.0.0.1/8 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
             '-A OVERLAY-IN -s 10.0.0.1/8 ! -i lo -m comment --comment "ovl:drop_martian" -j DROP']
    got = r.parse_filter(lines)
    assert (got["failsafe"], got["self"]) == ({"10.0.0.0/8": 2}, {})
