"""The iptables datapath without root: rule text, parsing back, and when it reloads.

Rendering is pure. The datapath runs against :class:`FakeKernel`, a small
simulation of ``iptables-restore --noflush``/``iptables-save``/``ipset``
that records every command, so "unchanged state -> no reload" and adoption
after a restart are checked exactly.
"""

from __future__ import annotations

import shlex

import pytest

from overlay.abi import FS_ALL, FS_SSH, ports_bitmap
from overlay.config import config_from_dict
from overlay.datapath import Datapath
from overlay.datapath import iptables as ipt
from overlay.datapath.iptables import IptablesDatapath
from overlay.diff import diff
from overlay.errors import CapacityError, DatapathError, UnsupportedError
from overlay.model import Node
from overlay.ops import NatEntry, Op, PeerEntry, empty_state
from overlay.plan import plan

SUBNET = "192.168.0.0/18"
SELF = Node("h1", "A", "10.0.0.1", "198.18.1.1", "192.168.0.1")
PEERS = [
    Node("h2", "A", "10.0.0.2", "198.18.1.2", "192.168.0.2"),
    Node("h3", "B", "10.0.0.11", "198.18.2.11", "192.168.0.3"),
]


def config(**filt) -> object:
    return config_from_dict({
        "node_id": "h1",
        "network": "A",
        "overlay_subnet": SUBNET,
        "addresses": {"private": "10.0.0.1", "public": "198.18.1.1", "overlay": "192.168.0.1"},
        "registry": {"backend": "zookeeper", "hosts": ["198.18.0.2:2181"]},
        "datapath": {"backend": "iptables", "interface": "eth0"},
        "filter": {"open_ports": [80], "ssh_whitelist": ["198.18.0.0/15"], **filt},
        "nat_overrides": {"192.168.63.1": "10.0.0.250"},
    })


def tables(**filt) -> dict[str, dict]:
    return plan(SELF, PEERS, config(**filt)).tables


# --- a simulated kernel --------------------------------------------------------------------------


class FakeKernel:
    """Just enough iptables-restore/-save and ipset semantics for the datapath."""

    BUILTIN = {"nat": ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
               "filter": ["INPUT", "FORWARD", "OUTPUT"]}

    def __init__(self):
        self.chains = {t: {c: [] for c in cs} for t, cs in self.BUILTIN.items()}
        self.chains6 = {"filter": {c: [] for c in self.BUILTIN["filter"]}}  # ip6tables
        self.counts: dict[str, int] = {}  # comment -> packets (for -c)
        self.sets: dict[str, list[str]] = {}
        self.calls: list[list[str]] = []
        self.fail: str | None = None

    def names(self, tool: str) -> list[list[str]]:
        return [c for c in self.calls if c[0] == tool]

    def __call__(self, argv, stdin):
        self.calls.append(list(argv))
        if self.fail and argv[0] == self.fail:
            return 1, "", f"{argv[0]}: simulated failure"
        if argv[0] in ("iptables-save", "ip6tables-save"):
            chains = self.chains6 if argv[0].startswith("ip6") else self.chains
            return 0, self._save(chains, argv[argv.index("-t") + 1], "-c" in argv), ""
        if argv[0] in ("iptables-restore", "ip6tables-restore"):
            assert "--noflush" in argv
            self._restore(self.chains6 if argv[0].startswith("ip6") else self.chains, stdin)
            return 0, "", ""
        if argv[0] == "ipset":
            return self._ipset(argv[1:], stdin)
        raise AssertionError(argv)

    def _save(self, chains, table, counters):
        out = [f"*{table}"]
        for chain in chains[table]:
            policy = "ACCEPT" if chain in self.BUILTIN[table] else "-"
            out.append(f":{chain} {policy} [0:0]")
        for chain, rules in chains[table].items():
            for rule in rules:
                line = f"-A {chain} {rule}"
                if counters:
                    tag = ipt._rule_fields(line).get("--comment", "")
                    line = f"[{self.counts.get(tag, 0)}:0] {line}"
                out.append(line)
        return "\n".join(out + ["COMMIT", ""])

    def _restore(self, chains, text):
        table = None
        staged = None
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:]
                staged = {c: list(r) for c, r in chains[table].items()}
            elif line.startswith(":"):
                staged[line[1:].split()[0]] = []
            elif line == "COMMIT":
                chains[table] = staged
            elif line:
                toks = shlex.split(line)
                op, chain = toks[0], toks[1]
                rule = line.split(None, 2)[2] if len(toks) > 2 else ""
                if op == "-A":
                    staged[chain].append(rule)
                elif op == "-I":
                    staged[chain].insert(int(toks[2]) - 1, line.split(None, 3)[3])
                elif op == "-D":
                    staged[chain].remove(rule)
                elif op == "-F":
                    staged[chain] = []
                elif op == "-X":
                    assert not staged[chain]
                    del staged[chain]
                else:
                    raise AssertionError(line)

    def _ipset(self, args, stdin):
        if args[:2] == ["list", "-n"]:
            return 0, "".join(f"{n}\n" for n in self.sets), ""
        if args[0] == "save":
            if args[1] not in self.sets:
                return 1, "", "The set with the given name does not exist"
            family = "inet6" if args[1].startswith("OVERLAY-PEERS6") else "inet"
            lines = [f"create {args[1]} hash:ip family {family}"]
            lines += [f"add {args[1]} {a}" for a in self.sets[args[1]]]
            return 0, "\n".join(lines) + "\n", ""
        if args[0] == "restore":
            for line in stdin.splitlines():
                toks = line.split()
                if toks[0] == "create":
                    if toks[1] in self.sets and "-exist" not in toks:
                        return 1, "", "set with the same name already exists"
                    self.sets.setdefault(toks[1], [])
                elif toks[0] == "add":
                    self.sets[toks[1]].append(toks[2])
            return 0, "", ""
        if args[0] == "swap":
            a, b = args[1], args[2]
            self.sets[a], self.sets[b] = self.sets[b], self.sets[a]
            return 0, "", ""
        if args[0] == "destroy":
            if args[1] not in self.sets:
                return 1, "", "The set with the given name does not exist"
            del self.sets[args[1]]
            return 0, "", ""
        raise AssertionError(args)


class FakeFlusher:
    """Records the conntrack flushes asked for (the real one is tested in namespaces)."""

    def __init__(self):
        self.calls: list[tuple[list[str], list[str]]] = []

    def __call__(self, sources, overlays) -> int:
        self.calls.append((sorted(sources), sorted(overlays)))
        return len(self.calls[-1][0]) + len(self.calls[-1][1])


def datapath(kernel: FakeKernel, ipv6: bool = True, flusher=None) -> IptablesDatapath:
    return IptablesDatapath("eth0", SUBNET, self_private="10.0.0.1", self_overlay="192.168.0.1",
                            runner=kernel, manage_route=False, ipv6=ipv6,
                            flusher=flusher if flusher is not None else FakeFlusher())


def program(dp: IptablesDatapath, want: dict[str, dict]) -> list[Op]:
    ops = diff(want, dp.observe())
    dp.apply(ops)
    return ops


# --- rendering ------------------------------------------------------------------------------------


def test_nat_rules_one_dnat_per_peer_and_overrides_verbatim():
    assert ipt.nat_rules(tables(), "192.168.0.1", "10.0.0.1") == [
        '-A OVERLAY-NAT -d 192.168.0.1/32 -m comment --comment "ovl:self" -j DNAT --to-destination 10.0.0.1',
        # same network: private address; other network: public address
        '-A OVERLAY-NAT -d 192.168.0.2/32 -m comment --comment "ovl:peer" -j DNAT --to-destination 10.0.0.2',
        '-A OVERLAY-NAT -d 192.168.0.3/32 -m comment --comment "ovl:peer" -j DNAT --to-destination 198.18.2.11',
        '-A OVERLAY-NAT -d 192.168.63.1/32 -m comment --comment "ovl:override" -j DNAT --to-destination 10.0.0.250',
    ]


def test_nat_rules_are_sorted_by_address_not_text():
    state = empty_state()
    state["nat"] = {"192.168.0.10": NatEntry("10.0.0.10"), "192.168.0.9": NatEntry("10.0.0.9")}
    assert [r.split()[3] for r in ipt.nat_rules(state)] == ["192.168.0.9/32", "192.168.0.10/32"]


MARTIANS4 = [
    '-A OVERLAY-IN -s 127.0.0.0/8 -i eth0 -m comment --comment "ovl:drop_martian" -j DROP',
    '-A OVERLAY-IN -s 10.0.0.1/32 -i eth0 -m comment --comment "ovl:drop_martian" -j DROP',
    '-A OVERLAY-IN -s 192.168.0.1/32 -i eth0 -m comment --comment "ovl:drop_martian" -j DROP',
    '-A OVERLAY-IN -s 198.18.1.1/32 -i eth0 -m comment --comment "ovl:drop_martian" -j DROP',
]


def test_filter_rules_in_design_order():
    assert ipt.filter_rules(tables(), SUBNET, "eth0") == [
        *MARTIANS4,
        '-A OVERLAY-IN -s 198.18.0.0/15 -p tcp -m tcp --dport 22 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '-A OVERLAY-IN -s 198.18.0.2/32 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '-A OVERLAY-IN -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment "ovl:pass_established" -j ACCEPT',
        '-A OVERLAY-IN -i lo -m comment --comment "ovl:pass_loopback" -j ACCEPT',
        '-A OVERLAY-IN -m set --match-set OVERLAY-PEERS src -m comment --comment "ovl:pass_member" -j ACCEPT',
        '-A OVERLAY-IN -p tcp -m tcp --dport 80 -m comment --comment "ovl:pass_open_port" -j ACCEPT',
        '-A OVERLAY-IN -p udp -m udp --dport 80 -m comment --comment "ovl:pass_open_port" -j ACCEPT',
        '-A OVERLAY-IN -m comment --comment "ovl:pass_default" -j RETURN',
        '-A OVERLAY-OUT -d 192.168.0.0/18 -m comment --comment "ovl:drop_no_peer" -j DROP',
    ]


@pytest.mark.parametrize(
    ("filt", "last_in", "last_out"),
    [
        ({}, '-m comment --comment "ovl:pass_default" -j RETURN',
         '-m comment --comment "ovl:drop_no_peer" -j DROP'),
        ({"reject_all": True}, '-m comment --comment "ovl:drop_not_allowed" -j DROP',
         '-m comment --comment "ovl:drop_no_peer" -j DROP'),
        ({"reject_all": True, "mode": "audit"},
         '-m comment --comment "ovl:drop_not_allowed:audit" -j RETURN',
         '-m comment --comment "ovl:drop_no_peer:audit" -j RETURN'),
        ({"mode": "audit"}, '-m comment --comment "ovl:pass_default" -j RETURN',
         '-m comment --comment "ovl:drop_no_peer:audit" -j RETURN'),
    ],
    ids=["allow-all", "reject_all", "reject_all-audit", "allow-all-audit"],
)
def test_default_verdict(filt, last_in, last_out):
    rules = ipt.filter_rules(tables(**filt), SUBNET)
    ins = [r for r in rules if r.startswith("-A OVERLAY-IN ")]
    outs = [r for r in rules if r.startswith("-A OVERLAY-OUT ")]
    assert ins[-1] == f"-A OVERLAY-IN {last_in}"
    assert outs == [f"-A OVERLAY-OUT -d 192.168.0.0/18 {last_out}"]


SELF6 = Node("h1", "A", "10.0.0.1", "198.18.1.1", "192.168.0.1", private6="2001:db8::1")
PEERS6 = [Node("h2", "A", "10.0.0.2", "198.18.1.2", "192.168.0.2", private6="2001:db8::2"),
          Node("h3", "B", "10.0.0.11", "198.18.2.11", "192.168.0.3", public6="2001:db8:2::11")]


def tables6(**filt) -> dict[str, dict]:
    cfg = config(**filt, ssh_whitelist=["198.18.0.0/15", "2001:db8:ad::/48"])
    return plan(SELF6, PEERS6, cfg).tables


def test_ipv6_filter_rules_in_design_order():
    icmp6 = "-p ipv6-icmp -m icmp6 --icmpv6-type"
    ndp = [f'-A OVERLAY-IN {icmp6} {t} -m hl --hl-eq 255 -m comment --comment "ovl:pass_ndp" -j ACCEPT'
           for t in (133, 134, 135, 136, 137)]
    mld = [f'-A OVERLAY-IN -s {src} {icmp6} {t} -m comment --comment "ovl:pass_ndp" -j ACCEPT'
           for src in ("fe80::/10", "::/128") for t in (130, 131, 132, 143)]
    assert ipt.filter_rules(tables6(reject_all=True), SUBNET, "eth0", 6) == [
        '-A OVERLAY-IN -s ::1/128 -i eth0 -m comment --comment "ovl:drop_martian" -j DROP',
        '-A OVERLAY-IN -s 2001:db8::1/128 -i eth0 -m comment --comment "ovl:drop_martian" -j DROP',
        '-A OVERLAY-IN -s 2001:db8:ad::/48 -p tcp -m tcp --dport 22 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '-A OVERLAY-IN -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment "ovl:pass_established" -j ACCEPT',
        '-A OVERLAY-IN -i lo -m comment --comment "ovl:pass_loopback" -j ACCEPT',
        *ndp, *mld,
        '-A OVERLAY-IN -m set --match-set OVERLAY-PEERS6 src -m comment --comment "ovl:pass_member" -j ACCEPT',
        '-A OVERLAY-IN -p tcp -m tcp --dport 80 -m comment --comment "ovl:pass_open_port" -j ACCEPT',
        '-A OVERLAY-IN -p udp -m udp --dport 80 -m comment --comment "ovl:pass_open_port" -j ACCEPT',
        '-A OVERLAY-IN -m comment --comment "ovl:drop_not_allowed" -j DROP',
    ]
    # the IPv4 rules do not see the IPv6 entries
    assert not [r for r in ipt.filter_rules(tables6(), SUBNET, "eth0") if "2001:db8" in r]
    assert ipt.ipset_members(tables6(), 6) == ["2001:db8::2", "2001:db8:2::11"]
    assert ipt.ipset_members(tables6()) == ["10.0.0.2", "198.18.2.11"]
    assert ipt.ipset_script(["2001:db8::2"], 64, False, "ipset6").splitlines() == [
        "create OVERLAY-PEERS6-TMP hash:ip family inet6 hashsize 1024 maxelem 64",
        "add OVERLAY-PEERS6-TMP 2001:db8::2"]


def test_martians_without_an_interface_and_in_audit_mode():
    rules = ipt.filter_rules(tables(mode="audit"), SUBNET)
    assert rules[0] == '-A OVERLAY-IN -s 127.0.0.0/8 ! -i lo -m comment --comment "ovl:drop_martian:audit" -j RETURN'


def test_whitelist_ssh_all_and_both_flags():
    state = empty_state()
    state["failsafe"] = {"10.0.0.0/8": FS_SSH | FS_ALL, "0.0.0.0/0": FS_SSH, "198.18.0.2/32": FS_ALL}
    fs = [r for r in ipt.filter_rules(state, SUBNET) if "pass_failsafe" in r]
    assert fs == [
        '-A OVERLAY-IN -p tcp -m tcp --dport 22 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '-A OVERLAY-IN -s 10.0.0.0/8 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '-A OVERLAY-IN -s 10.0.0.0/8 -p tcp -m tcp --dport 22 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '-A OVERLAY-IN -s 198.18.0.2/32 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
    ]


@pytest.mark.parametrize(
    ("ports", "groups"),
    [
        ([22], [[(22, 22)]]),
        ([80, 81, 82], [[(80, 82)]]),
        ([80, 443, 8000, 8001, 8002, 9000], [[(80, 80), (443, 443), (8000, 8002), (9000, 9000)]]),
        (list(range(1, 40, 2)), [[(p, p) for p in range(1, 30, 2)], [(p, p) for p in range(31, 40, 2)]]),
        # ranges weigh two slots: 7 ranges fill 14, the 8th does not fit
        ([p for i in range(8) for p in (10 * i, 10 * i + 1)],
         [[(10 * i, 10 * i + 1) for i in range(7)], [(70, 71)]]),
    ],
    ids=["single", "range", "mixed", "more-than-15", "ranges-weigh-two"],
)
def test_port_groups(ports, groups):
    assert ipt.port_groups(ports) == groups
    for group in groups:
        assert sum(1 if lo == hi else 2 for lo, hi in group) <= ipt.MULTIPORT_MAX


def test_ports_render_compact_multiport():
    state = empty_state()
    state["ports"] = ports_bitmap([(80, 80), (443, 443), (8000, 8100)], ("tcp",))
    state["ports"].update(ports_bitmap([(53, 53)], ("udp",)))
    rules = [r for r in ipt.filter_rules(state, SUBNET) if "pass_open_port" in r]
    assert rules == [
        '-A OVERLAY-IN -p tcp -m multiport --dports 80,443,8000:8100 -m comment --comment "ovl:pass_open_port" -j ACCEPT',
        '-A OVERLAY-IN -p udp -m udp --dport 53 -m comment --comment "ovl:pass_open_port" -j ACCEPT',
    ]


def test_ipset_contents_members_only_sorted():
    state = empty_state()
    state["peers"] = {"10.0.0.10": PeerEntry(), "10.0.0.9": PeerEntry(), "10.0.0.7": PeerEntry(flags=0)}
    assert ipt.ipset_members(state) == ["10.0.0.9", "10.0.0.10"]
    assert ipt.render(tables(), SUBNET)["ipset"] == "10.0.0.2\n198.18.2.11\n"
    script = ipt.ipset_script(["10.0.0.2", "198.18.2.11"], 65536, create_main=True)
    assert script.splitlines() == [
        "create OVERLAY-PEERS hash:ip family inet hashsize 1024 maxelem 65536 -exist",
        "create OVERLAY-PEERS-TMP hash:ip family inet hashsize 1024 maxelem 65536",
        "add OVERLAY-PEERS-TMP 10.0.0.2",
        "add OVERLAY-PEERS-TMP 198.18.2.11",
    ]


def test_restore_text_declares_and_flushes_only_our_chains():
    text = ipt.render(tables(), SUBNET)
    assert text["nat"].splitlines()[:3] == ["*nat", ":OVERLAY-NAT - [0:0]", "-F OVERLAY-NAT"]
    assert text["filter"].splitlines()[:5] == [
        "*filter", ":OVERLAY-IN - [0:0]", ":OVERLAY-OUT - [0:0]", "-F OVERLAY-IN", "-F OVERLAY-OUT"]
    for t in ("nat", "filter"):
        body = text[t].splitlines()
        assert body[-1] == "COMMIT"
        for line in body[1:-1]:
            assert line.split()[1].startswith("OVERLAY-") or line.startswith(":OVERLAY-"), line


# --- parsing back ---------------------------------------------------------------------------------


@pytest.mark.parametrize("filt", [{}, {"reject_all": True}, {"reject_all": True, "mode": "audit"},
                                  {"mode": "audit", "open_ports": list(range(1000, 1040, 2)) + ["2000-2100"]}])
def test_parse_round_trip(filt):
    want = tables(**filt)
    back = ipt.parse_filter(ipt.filter_rules(want, SUBNET, "eth0"))
    assert back == {"failsafe": want["failsafe"], "ports": want["ports"], "config": want["config"],
                    "self": want["self"]}
    want6 = tables6(**filt)
    back6 = ipt.parse_filter(ipt.filter_rules(want6, SUBNET, "eth0", 6), 6)
    assert back6["self"] == {"2001:db8::1": 1}
    assert back6["failsafe"] == {"2001:db8:ad::/48": FS_SSH}
    assert back6["ports"] == want6["ports"] and back6["config"] == want6["config"]
    nat = ipt.parse_nat(ipt.nat_rules(want, "192.168.0.1", "10.0.0.1"))
    assert nat == want["nat"]


def test_parse_counters_by_reason():
    save = "\n".join([
        "*filter",
        ":INPUT ACCEPT [0:0]",
        "[5:300] -A INPUT -j OVERLAY-IN",
        '[7:420] -A OVERLAY-IN -s 198.18.0.0/15 -p tcp -m tcp --dport 22 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '[2:120] -A OVERLAY-IN -s 198.18.0.2/32 -m comment --comment "ovl:pass_failsafe" -j ACCEPT',
        '[9:540] -A OVERLAY-IN -m comment --comment "ovl:drop_not_allowed:audit" -j RETURN',
        '[4:240] -A OVERLAY-OUT -d 192.168.0.0/18 -m comment --comment "ovl:drop_no_peer" -j DROP',
        '[100:1] -A OTHER -m comment --comment "ovl:pass_member" -j ACCEPT',
        "COMMIT",
    ])
    got = ipt.parse_counters(save)
    assert got["pass_failsafe"] == 9
    assert got["drop_not_allowed"] == 9
    assert got["drop_no_peer"] == 4
    assert got["pass_member"] == 0  # not our chain
    assert set(got) == set(ipt.REASONS)


# --- the datapath against the fake kernel ----------------------------------------------------------


def test_is_a_datapath():
    assert isinstance(datapath(FakeKernel()), Datapath)


def test_first_apply_installs_set_chains_and_jumps_once():
    k = FakeKernel()
    dp = datapath(k)
    program(dp, tables(reject_all=True))
    assert dp.stats["iptables_restores"] == 3 and dp.stats["ipset_swaps"] == 2
    assert k.chains["nat"]["OUTPUT"] == ["-j OVERLAY-NAT"]
    assert k.chains["filter"]["INPUT"] == ["-j OVERLAY-IN"]
    assert k.chains["filter"]["OUTPUT"] == ["-j OVERLAY-OUT"]
    assert k.chains6["filter"]["INPUT"] == ["-j OVERLAY-IN"]
    assert "OVERLAY-OUT" not in k.chains6["filter"]
    assert k.sets == {"OVERLAY-PEERS": ["10.0.0.2", "198.18.2.11"], "OVERLAY-PEERS6": []}
    assert len(k.chains["nat"]["OVERLAY-NAT"]) == 4
    # a change: chains refilled, jumps not added again
    program(dp, tables(open_ports=[80, 443]))
    assert k.chains["filter"]["INPUT"] == ["-j OVERLAY-IN"]
    assert k.chains["nat"]["OUTPUT"] == ["-j OVERLAY-NAT"]


def test_unchanged_state_runs_no_restore():
    k = FakeKernel()
    dp = datapath(k)
    program(dp, tables())
    n = len(k.calls)
    dp.apply([])
    dp.apply(diff(tables(), dp.observe()))
    assert [c for c in k.calls[n:] if c[0].endswith("-restore") or c[1:2] in (["restore"], ["swap"])] == []
    assert dp.stats["iptables_restores"] == 3 and dp.stats["ipset_swaps"] == 2
    assert dp.stats["tables_skipped"] == 10


def test_only_changed_tables_are_reloaded():
    k = FakeKernel()
    dp = datapath(k)
    program(dp, tables())
    restores = len(k.names("iptables-restore"))
    dp.apply([Op("ports", (0, 443 >> 6), ports_bitmap([(443, 443)], ("tcp",))[(0, 6)])])
    new = k.names("iptables-restore")[restores:]
    assert len(new) == 1 and len(k.names("ip6tables-restore")) == 2 and dp.stats["ipset_swaps"] == 2
    assert "-p tcp -m multiport --dports 80,443 " in "\n".join(k.chains["filter"]["OVERLAY-IN"])
    assert "-p tcp -m multiport --dports 80,443 " in "\n".join(k.chains6["filter"]["OVERLAY-IN"])
    # a peer's real address changes: set and nat reloaded, filters not
    dp.apply([Op("peers", "10.0.0.2"), Op("peers", "10.0.0.22", PeerEntry()),
              Op("nat", "192.168.0.2", NatEntry("10.0.0.22"))])
    assert dp.stats["ipset_swaps"] == 3
    assert dp.stats["iptables_restores"] == 6
    assert k.sets["OVERLAY-PEERS"] == ["10.0.0.22", "198.18.2.11"]
    assert "OVERLAY-PEERS-TMP" not in k.sets


def test_restart_adopts_without_reload():
    k = FakeKernel()
    program(datapath(k), tables(reject_all=True))
    n = len(k.calls)
    dp2 = datapath(k)
    dp2.start()
    assert diff(tables(reject_all=True), dp2.observe()) == []
    dp2.apply([])
    assert [c for c in k.calls[n:] if c[0].endswith("-restore") or c[1] in ("restore", "swap")] == []


def test_restart_adopts_ipv6_state_without_reload():
    k = FakeKernel()
    program(datapath(k), tables6(reject_all=True))
    assert k.sets["OVERLAY-PEERS6"] == ["2001:db8::2", "2001:db8:2::11"]
    n = len(k.calls)
    dp2 = datapath(k)
    dp2.start()
    assert diff(tables6(reject_all=True), dp2.observe()) == []
    assert [c for c in k.calls[n:] if c[0].endswith("-restore") or c[1] in ("restore", "swap")] == []


def test_host_without_ipv6_renders_and_runs_no_ipv6():
    k = FakeKernel()
    dp = datapath(k, ipv6=False)
    program(dp, tables6(reject_all=True))
    assert k.names("ip6tables-restore") == [] and k.names("ip6tables-save") == []
    assert set(k.sets) == {"OVERLAY-PEERS"}
    assert set(dp.rules()) == {"ipset", "nat", "filter"}


def test_removed_peer_and_nat_entry_flush_their_conntrack_entries():
    k = FakeKernel()
    flush = FakeFlusher()
    dp = datapath(k, flusher=flush)
    program(dp, tables6())
    assert flush.calls == []
    dp.apply([Op("peers", "10.0.0.2"), Op("peers", "2001:db8::2"), Op("nat", "192.168.0.2")])
    assert flush.calls == [(["10.0.0.2", "2001:db8::2"], ["192.168.0.2"])]
    assert dp.flushed == 3
    dp.apply([Op("nat", "192.168.0.3", NatEntry("198.18.2.99"))])  # re-pointed
    assert flush.calls[-1] == ([], ["192.168.0.3"])
    dp.apply([Op("ports", (0, 7), 1)])  # nothing revoked: no flush
    assert len(flush.calls) == 2


def test_drift_is_repaired_on_next_apply():
    k = FakeKernel()
    dp = datapath(k)
    program(dp, tables())
    k.chains["filter"]["INPUT"].clear()  # someone removed our jump
    k.chains["nat"]["OVERLAY-NAT"].pop()  # and a rule
    ops = program(dp, tables())
    assert ops  # the missing NAT entry is seen
    assert k.chains["filter"]["INPUT"] == ["-j OVERLAY-IN"]
    assert len(k.chains["nat"]["OVERLAY-NAT"]) == 4


def test_a_missing_jump_alone_makes_ops_and_is_repaired():
    k = FakeKernel()
    dp = datapath(k)
    program(dp, tables())
    k.chains["filter"]["INPUT"].clear()
    k.chains["filter"]["OVERLAY-IN"].pop(2)  # parses to the same tables
    assert program(dp, tables())  # the observation reports the drift
    assert k.chains["filter"]["INPUT"] == ["-j OVERLAY-IN"]
    assert [f"-A OVERLAY-IN {r}" for r in k.chains["filter"]["OVERLAY-IN"]] == [
        r for r in ipt.filter_rules(tables(), SUBNET, "eth0") if r.startswith("-A OVERLAY-IN ")]
    assert program(dp, tables()) == []


def test_foreign_rules_are_kept():
    k = FakeKernel()
    k.chains["filter"]["INPUT"] = ["-s 1.2.3.4/32 -j ACCEPT"]
    k.chains["nat"]["OUTPUT"] = ["-d 9.9.9.9/32 -j DNAT --to-destination 8.8.8.8"]
    dp = datapath(k)
    program(dp, tables())
    assert k.chains["filter"]["INPUT"] == ["-j OVERLAY-IN", "-s 1.2.3.4/32 -j ACCEPT"]
    assert k.chains["nat"]["OUTPUT"] == ["-j OVERLAY-NAT", "-d 9.9.9.9/32 -j DNAT --to-destination 8.8.8.8"]
    dp.teardown()
    assert k.chains["filter"] == {"INPUT": ["-s 1.2.3.4/32 -j ACCEPT"], "FORWARD": [], "OUTPUT": []}
    assert k.chains["nat"]["OUTPUT"] == ["-d 9.9.9.9/32 -j DNAT --to-destination 8.8.8.8"]
    assert "OVERLAY-NAT" not in k.chains["nat"] and k.sets == {}


def test_counters_survive_reload():
    k = FakeKernel()
    dp = datapath(k)
    program(dp, tables(reject_all=True))
    k.counts = {"ovl:drop_not_allowed": 3, "ovl:pass_member": 5}
    # the fake counts per comment, so both families' rules count: 2 x
    assert dp.counters()["drop_not_allowed"] == 6
    program(dp, tables(reject_all=True, open_ports=[80, 81]))  # reload resets rule counters
    k.counts = {"ovl:drop_not_allowed": 1}
    c = dp.counters()
    assert c["drop_not_allowed"] == 8 and c["pass_member"] == 10 and c["pass_failsafe"] == 0


def test_failed_reload_is_retried_in_full():
    k = FakeKernel()
    dp = datapath(k)
    program(dp, tables())
    k.fail = "iptables-restore"
    with pytest.raises(DatapathError, match="simulated failure"):
        dp.apply([Op("config", "reject_all", 1)])
    assert dp.state["config"]["reject_all"] == 0  # rolled back
    k.fail = None
    dp.apply([Op("config", "reject_all", 1)])
    assert k.chains["filter"]["OVERLAY-IN"][-1].endswith("-j DROP")


def test_too_many_peers_is_refused_before_anything_runs():
    k = FakeKernel()
    dp = IptablesDatapath("eth0", SUBNET, sizes=type("S", (), {"peers": 16})(), runner=k,
                          manage_route=False, ipv6=False)
    dp.observe()
    n = len(k.calls)
    ops = [Op("peers", f"10.0.1.{i}", PeerEntry()) for i in range(1, 18)]
    with pytest.raises(CapacityError, match="17 peers"):
        dp.apply(ops)
    assert k.calls[n:] == [] and dp.state["peers"] == {}


def test_teardown_text_removes_every_copy_of_a_jump():
    save = "*filter\n:INPUT ACCEPT [0:0]\n:OVERLAY-IN - [0:0]\n-A INPUT -j OVERLAY-IN\n-A INPUT -j OVERLAY-IN\nCOMMIT\n"
    assert ipt.teardown_text("filter", save).splitlines() == [
        "*filter", "-D INPUT -j OVERLAY-IN", "-D INPUT -j OVERLAY-IN", "-F OVERLAY-IN", "-X OVERLAY-IN", "COMMIT"]
    assert ipt.teardown_text("nat", "*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n") is None


def test_unsupported_without_tools_or_root(monkeypatch):
    monkeypatch.setattr(ipt, "_which", lambda tool: None if tool == "ipset" else f"/usr/sbin/{tool}")
    with pytest.raises(UnsupportedError, match="needs ipset"):
        IptablesDatapath("eth0", SUBNET)
    monkeypatch.setattr(ipt, "_which", lambda tool: None if tool.startswith("ip6") else f"/usr/sbin/{tool}")
    with pytest.raises(UnsupportedError, match="needs ip6tables-restore, ip6tables-save"):
        IptablesDatapath("eth0", SUBNET, ipv6=True)
    monkeypatch.setattr(ipt, "_which", lambda tool: f"/usr/sbin/{tool}")
    monkeypatch.setattr(ipt.os, "geteuid", lambda: 1000)
    with pytest.raises(UnsupportedError, match="needs root"):
        IptablesDatapath("eth0", SUBNET)
