"""``overlay why`` logic (overlay.datapath.ebpf.why.explain) on fake map lookups built from
a real plan, plus the CLI's argument handling. The same command on live maps
is tested in tests/integration/test_policies_netns.py."""

from __future__ import annotations

import ipaddress

import pytest

from overlay.cli import build_parser
from overlay.config import config_from_dict
from overlay.datapath.ebpf.events import event_record, format_event
from overlay.datapath.ebpf.why import explain
from overlay.model import Node, policy_from_dict
from overlay.plan import plan
from overlay.policy import port_prefixes

HOST = "10.0.0.1"
WEB, APP = "10.0.0.12", "10.0.0.13"
HOST6, WEB6 = "2001:db8::1", "2001:db8::12"


def pol(pid, src, dst, proto="tcp", ports=()):
    endpoint = {"cidr": src} if "/" in src else {"group": src}
    return policy_from_dict({"v": 1, "from": endpoint, "to": {"group": dst}, "proto": proto,
                             "ports": list(ports)}, pid)


def _port_in(start: int, bits: int, port: int) -> bool:
    """The reference LPM match of a port prefix, as a range: ``bits`` fixed bits of 16 from
    ``start`` cover ``start .. start + 2**(16 - bits) - 1`` (not overlay.policy.prefix_covers)."""
    return start <= port < start + (1 << (16 - bits))


class FakeMaps:
    """LiveMaps' lookups, answered from planned tables (LPM done in Python)."""

    def __init__(self, tables):
        self.t = tables

    def cfg(self, key):
        return self.t["config"].get(key, 0)

    def _lpm(self, table, src):
        best = None
        ip = ipaddress.ip_address(src)
        for cidr, value in self.t[table].items():
            net = ipaddress.ip_network(cidr)
            if net.version == ip.version and ip in net and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, value)
        return None if best is None else best[1]

    def own(self, src):
        return src in self.t["self"]

    def failsafe(self, src):
        return self._lpm("failsafe", src) or 0

    def peer(self, src):
        e = self.t["peers"].get(src)
        return None if e is None else (e.identity, e.flags)

    def cidr_identity(self, src):
        return self._lpm("cidr_ident", src)

    def policy(self, identity, proto, port):
        best = None
        for (i, p, start, bits), index in self.t["policy"].items():
            if i == identity and p == proto and _port_in(start, bits, port):
                if best is None or bits > best[0]:
                    best = (bits, index)
        return None if best is None else best[1]

    def name(self, kind, number):
        return self.t["names"].get((kind, number))

    def port_open(self, proto, port):
        slot = {6: 0, 17: 1}[proto]
        return bool(self.t["ports"].get((slot, port // 64), 0) >> (port % 64) & 1)


def live(groups=("db",), policies=(), **filt):
    cfg = config_from_dict({"node_id": "self", "network": "n", "groups": list(groups),
                            "registry": {"hosts": ["198.18.0.10:2181"]}, "filter": filt})
    me = Node("self", "n", HOST, "198.18.0.1", "192.168.0.1", tuple(groups), private6=HOST6)
    peers = [Node("web-1", "n", WEB, "198.18.1.12", "192.168.0.12", ("web",), private6=WEB6),
             Node("app-1", "n", APP, "198.18.1.13", "192.168.0.13", ("app",))]
    return FakeMaps(plan(me, peers, cfg, policies=policies).tables)


POLICIES = [pol("web-db-5432", "web", "db", "tcp", [5432]), pol("ops", "198.51.100.0/24", "db", "tcp", [22, 9000]),
            pol("ops6", "2001:db8:0:5::/64", "db", "udp", [53]), pol("ping", "web", "db", "icmp")]

CASES = [
    # (id, maps kwargs, src, proto, port, verdict, reason, rule text (exact))
    ("policy-allows-member", {}, WEB, 6, 5432, "allow", "policy",
     "policy web-db-5432 (tcp 5432 from group web to group db)"),
    ("default-deny-other-port", {}, WEB, 6, 22, "drop", "policy",
     "policy default-deny (node selected by policy ops); no policy allows tcp/22 from 10.0.0.12 "
     "(member, groups web)"),
    ("default-deny-other-group", {}, APP, 6, 5432, "drop", "policy",
     "policy default-deny (node selected by policy ops); no policy allows tcp/5432 from 10.0.0.13 "
     "(member, groups app)"),
    ("policy-allows-cidr", {}, "198.51.100.7", 6, 9000, "allow", "policy",
     "policy ops (tcp 22,9000 from 198.51.100.0/24 to group db)"),
    ("cidr-other-proto", {}, "198.51.100.7", 17, 9000, "drop", "policy",
     "policy default-deny (node selected by policy ops); no policy allows udp/9000 from 198.51.100.7 "
     "(in 198.51.100.0/24)"),
    ("outsider-icmp", {}, "203.0.113.9", 1, 0, "drop", "policy",
     "policy default-deny (node selected by policy ops); no policy allows icmp from 203.0.113.9 "
     "(not a member)"),
    ("registry-failsafe", {}, "198.18.0.10", 6, 2181, "allow", "failsafe",
     "failsafe: 198.18.0.10 is a registry/management address (never blocked)"),
    ("ssh-failsafe", {"ssh_whitelist": ["198.19.0.0/16"]}, "198.19.3.3", 6, 22, "allow", "failsafe",
     "failsafe: ssh from 198.19.3.3 (filter.ssh_whitelist, never blocked)"),
    ("loopback-is-martian", {}, "127.0.0.1", 6, 1, "drop", "martian",
     "martian: 127.0.0.1 is a loopback source, never legitimate from the wire"),
    ("own-address-is-martian", {}, "198.18.0.1", 6, 5432, "drop", "martian",
     "martian: 198.18.0.1 is one of this host's own addresses (spoofed)"),
    ("ipv6-loopback-is-martian", {}, "::1", 6, 22, "drop", "martian",
     "martian: ::1 is a loopback source, never legitimate from the wire"),
    ("ipv6-own-address-is-martian", {}, HOST6, 17, 53, "drop", "martian",
     "martian: 2001:db8::1 is one of this host's own addresses (spoofed)"),
    ("ipv6-member-policy", {}, WEB6, 6, 5432, "allow", "policy",
     "policy web-db-5432 (tcp 5432 from group web to group db)"),
    ("ipv6-member-icmpv6-under-icmp-policy", {}, WEB6, 58, 0, "allow", "policy",
     "policy ping (icmp from group web to group db)"),
    ("ipv6-cidr-policy", {}, "2001:db8:0:5::9", 17, 53, "allow", "policy",
     "policy ops6 (udp 53 from 2001:db8:0:5::/64 to group db)"),
    ("ipv6-outsider", {}, "2001:db8:7::9", 17, 53, "drop", "policy",
     "policy default-deny (node selected by policy ops); no policy allows udp/53 from 2001:db8:7::9 "
     "(not a member)"),
    ("ipv6-ssh-failsafe", {"ssh_whitelist": ["2001:db8:ad::/48"]}, "2001:db8:ad::7", 6, 22, "allow",
     "failsafe", "failsafe: ssh from 2001:db8:ad::7 (filter.ssh_whitelist, never blocked)"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_explain_under_policies(case):
    _id, filt, src, proto, port, verdict, reason, rule = case
    v = explain(src, HOST, proto, port, live(policies=POLICIES, **filt))
    assert (v.verdict, v.reason, v.rule) == (verdict, reason, rule)
    assert v.enforced and not v.audit
    assert v.line() == f"{verdict}: {rule}"
    assert any("established" in n for n in v.notes)
    assert any("frag_short" in n and "frag_orphan" in n for n in v.notes)  # the node filters
    assert any("neighbour discovery" in n for n in v.notes) == (proto == 58)
    d = v.to_dict()
    assert d["explanation"] == v.line() and d["passes"] == (verdict == "allow")


def test_explain_audit():
    v = explain(APP, HOST, 6, 5432, live(policies=POLICIES, mode="audit"))
    assert (v.verdict, v.audit, v.passes) == ("drop", True, True)
    assert v.line().startswith("would drop (audit mode: passes): policy default-deny")


@pytest.mark.parametrize(
    ("groups", "filt", "src", "verdict", "reason"),
    [
        (("web",), {}, APP, "allow", "member"),
        (("web",), {"reject_all": True}, "203.0.113.9", "drop", "not_allowed"),
        (("web",), {"reject_all": True, "open_ports": [5432]}, "203.0.113.9", "allow", "open_port"),
        ((), {}, "203.0.113.9", "allow", "default"),
    ],
)
def test_explain_without_policies_selecting_this_node(groups, filt, src, verdict, reason):
    v = explain(src, HOST, 6, 5432, live(groups=groups, policies=POLICIES, **filt))
    assert (v.verdict, v.reason, v.enforced) == (verdict, reason, False)


def test_member_in_a_failsafe_range_is_credited_as_the_kernel_does():
    """ssh from a member inside the whitelist: the kernel decides members by the peers hash
    before the failsafe trie (counter member), except when a policy selects this node."""
    wl = {"reject_all": True, "ssh_whitelist": ["10.0.0.0/24"]}
    assert explain(APP, HOST, 6, 22, live(groups=("web",), policies=POLICIES, **wl)).reason == "member"
    assert explain("10.0.0.99", HOST, 6, 22, live(groups=("web",), policies=POLICIES, **wl)).reason == "failsafe"
    assert explain(APP, HOST, 6, 22, live(groups=("db",), policies=POLICIES, **wl)).reason == "failsafe"


def test_explain_ipv6_without_policies():
    v = explain(WEB6, HOST6, 6, 5432, live(groups=("web",), reject_all=True))
    assert (v.verdict, v.reason) == ("allow", "member")
    v = explain("fe80::99", "fe80::1", 6, 8080, live(groups=("web",), reject_all=True, open_ports=[80]))
    assert (v.verdict, v.reason) == ("drop", "not_allowed")
    v = explain("fe80::99", "fe80::1", 6, 80, live(groups=("web",), reject_all=True, open_ports=[80]))
    assert (v.verdict, v.reason) == ("allow", "open_port")
    v = explain("fe80::99", "fe80::1", 6, 80, live(groups=("web",)))  # allow-all: no fragment note
    assert not any("frag_short" in n for n in v.notes)


def test_fake_lpm_matches_planned_prefixes():
    # the fake's policy lookup agrees with the planner's range cover
    m = live(policies=[pol("r", "web", "db", "udp", ["8000-8100"])])
    ident = m.peer(WEB)[0]
    for port in (7999, 8000, 8063, 8064, 8100, 8101):
        assert (m.policy(ident, 17, port) is not None) == (8000 <= port <= 8100)
    assert len(port_prefixes(8000, 8100)) == 4


def test_cli_arguments():
    p = build_parser()
    args = p.parse_args(["why", "10.0.0.12", "10.0.0.1", "TCP", "5432", "--json", "--interface", "eth1"])
    assert (args.src, args.dst, args.proto, args.port, args.json, args.interface) == (
        "10.0.0.12", "10.0.0.1", 6, 5432, True, "eth1")
    assert p.parse_args(["why", "10.0.0.12", "10.0.0.1", "icmp", "-"]).port == 0
    args = p.parse_args(["drops", "--follow", "--json", "--count", "3", "--timeout", "2.5"])
    assert (args.follow, args.json, args.count, args.timeout) == (True, True, 3, 2.5)
    args = p.parse_args(["why", "fe80::9%eth0", "2001:db8::1", "icmpv6", "-"])
    assert (args.src, args.dst, args.proto, args.port) == ("fe80::9", "2001:db8::1", 58, 0)
    for bad in (["why", "10.0.0", "10.0.0.1", "tcp", "1"], ["why", "10.0.0.1", "10.0.0.1", "sctp", "1"],
                ["why", "fe80::zz", "10.0.0.1", "tcp", "1"],
                ["why", "10.0.0.1", "10.0.0.1", "tcp", "70000"], ["drops", "--count", "0"]):
        with pytest.raises(SystemExit) as exc:
            p.parse_args(bad)
        assert exc.value.code == 2


def test_event_formatting():
    import ctypes

    from overlay import abi

    def a16(ip):
        return (ctypes.c_uint32 * 4)(*abi.ip_to_words(ip))

    ev = abi.OvlDropEvent(10**9, a16(APP), a16(HOST), abi.port_to_be16(40000),
                          abi.port_to_be16(5432), 6, abi.Reason.DROP_POLICY, 1, 0, 77, 4)

    class Namer:
        def policy(self, index):
            return {77: "web-db-5432"}.get(index)

    rec = event_record(ev, Namer(), lambda ns: 1_700_000_000 + ns / 1e9)
    assert rec == {
        "time": "2023-11-14T22:13:21.000Z", "ts_ns": 10**9, "direction": "ingress", "reason": "policy",
        "audit": True, "proto": "tcp", "src": APP, "sport": 40000, "dst": HOST, "dport": 5432,
        "policy": "web-db-5432", "policy_index": 77, "family": 4,
    }
    assert format_event(rec) == (
        "2023-11-14T22:13:21.000Z ingress AUDIT (passed) policy tcp 10.0.0.13:40000 -> 10.0.0.1:5432"
        "  default-deny: node selected by policy web-db-5432"
    )
    six = abi.OvlDropEvent(2 * 10**9, a16("2001:db8::9"), a16("fe80::1"), abi.port_to_be16(5000),
                           abi.port_to_be16(22), 6, abi.Reason.DROP_MARTIAN, 0, 0, 0, 6)
    rec = event_record(six, Namer(), lambda ns: 1_700_000_000 + ns / 1e9)
    assert (rec["family"], rec["src"], rec["dst"], rec["reason"]) == (6, "2001:db8::9", "fe80::1", "martian")
    assert format_event(rec) == (
        "2023-11-14T22:13:22.000Z ingress drop martian tcp [2001:db8::9]:5000 -> [fe80::1]:22"
        "  (a loopback or own source address arriving from the wire)"
    )
    orphan = abi.OvlDropEvent(10**9, a16("10.0.0.99"), a16(HOST), 0, 0, 17, abi.Reason.DROP_FRAG_ORPHAN,
                              0, 0, 0, 4)
    assert format_event(event_record(orphan, Namer(), lambda ns: 1_700_000_000 + ns / 1e9)) == (
        "2023-11-14T22:13:21.000Z ingress drop frag_orphan udp 10.0.0.99 -> 10.0.0.1"
        "  (a later fragment whose first fragment was not seen or not allowed)"
    )
    bad = abi.OvlDropEvent(10**9, a16("::"), a16("::"), 0, 0, 0, abi.Reason.DROP_MALFORMED, 0, 0, 0, 0)
    rec = event_record(bad, Namer(), lambda ns: 1_700_000_000 + ns / 1e9)
    assert rec["src"] is None and format_event(rec).endswith("drop malformed (not parsed)")


def test_cli_mixed_families_is_a_usage_error(capsys):
    from overlay.cli import main

    assert main(["why", "10.0.0.12", "2001:db8::1", "tcp", "22"]) == 2
    assert "not of the IP version" in capsys.readouterr().err
