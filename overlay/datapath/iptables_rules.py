"""The iptables backend's rules, pure: rendering a state into rule text, and
parsing installed rules back into a state (no subprocess, no kernel).

Tables of text this module renders (:func:`render`):

``ipset``    the IPv4 member set ``OVERLAY-PEERS`` (family inet), one address a line
``ipset6``   the IPv6 member set ``OVERLAY-PEERS6`` (family inet6)
``nat``      nat ``OVERLAY-NAT`` (jumped to from ``OUTPUT``): one DNAT per peer
``filter``   filter ``OVERLAY-IN`` (from ``INPUT``) and ``OVERLAY-OUT`` (from ``OUTPUT``)
``filter6``  ip6tables filter ``OVERLAY-IN`` (from ``INPUT``)

``OVERLAY-IN`` in both families, in DESIGN §5 order: martians (a loopback
source, or one of this host's own addresses from the ``self`` table,
arriving on the uplink interface: ``drop_martian``), failsafe,
established/related (conntrack; ICMP errors of tracked flows are RELATED),
loopback (``-i lo``), IPv6 only: NDP (ICMPv6 133-137 with hop limit 255) and
MLD (130-132, 143 from a link-local or the unspecified source), members, open
ports, default. Every rule carries a comment ``ovl:<counter name>``.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Iterable, Mapping

from overlay.abi import (
    FS_ALL,
    FS_SSH,
    PEER_F_MEMBER,
    SELF_F_OWN,
    SSH_PORT,
    FilterMode,
    bitmap_ports,
    ports_bitmap,
)
from overlay.ops import NatEntry

CHAIN_NAT = "OVERLAY-NAT"
CHAIN_IN = "OVERLAY-IN"
CHAIN_OUT = "OVERLAY-OUT"
IPSET = "OVERLAY-PEERS"
IPSET_TMP = "OVERLAY-PEERS-TMP"
IPSET6 = "OVERLAY-PEERS6"
IPSET6_TMP = "OVERLAY-PEERS6-TMP"
MULTIPORT_MAX = 15  # iptables multiport: at most 15 ports, a range counts as two
NDP_TYPES = (133, 134, 135, 136, 137)
MLD_TYPES = (130, 131, 132, 143)

# rules table -> [(built-in chain, our chain)], each jumped to once, first.
CHAINS: dict[str, tuple[tuple[str, str], ...]] = {
    "nat": (("OUTPUT", CHAIN_NAT),),
    "filter": (("INPUT", CHAIN_IN), ("OUTPUT", CHAIN_OUT)),
    "filter6": (("INPUT", CHAIN_IN),),
}
# rules table -> the iptables table it lives in
IPT_TABLE = {"nat": "nat", "filter": "filter", "filter6": "filter"}
# set table -> (set name, temporary name, ipset family)
SETS = {"ipset": (IPSET, IPSET_TMP, "inet"), "ipset6": (IPSET6, IPSET6_TMP, "inet6")}

REASONS = (
    "drop_no_peer",
    "drop_not_allowed",
    "drop_martian",
    "pass_failsafe",
    "pass_established",
    "pass_loopback",
    "pass_member",
    "pass_open_port",
    "pass_default",
    "pass_ndp",
)

# --- rendering ------------------------------------------------------------------------------


def _comment(tag: str) -> str:
    return f'-m comment --comment "ovl:{tag}"'


def _ip_key(addr: str):
    ip = ipaddress.ip_address(addr)
    return (ip.version, int(ip))


def _cidr_key(cidr: str):
    net = ipaddress.ip_network(cidr, strict=False)
    return (net.version, int(net.network_address), net.prefixlen)


def _family(text: str) -> int:
    return 6 if ":" in text else 4


def _src(cidr: str) -> str:
    """``-s CIDR `` as iptables-save prints it (nothing for 0.0.0.0/0 or ::/0)."""
    net = ipaddress.ip_network(cidr, strict=False)
    return "" if net.prefixlen == 0 else f"-s {net} "


def _host(addr: str) -> str:
    return f"{addr}/128" if ":" in addr else f"{addr}/32"


def _iface(interface: str | None) -> str:
    return f"-i {interface}" if interface else "! -i lo"


def port_ranges(ports: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted ports -> inclusive (lo, hi) runs."""
    out: list[tuple[int, int]] = []
    for p in sorted(set(ports)):
        if out and p == out[-1][1] + 1:
            out[-1] = (out[-1][0], p)
        else:
            out.append((p, p))
    return out


def port_groups(ports: Iterable[int]) -> list[list[tuple[int, int]]]:
    """Ranges chunked so that each chunk fits one ``multiport`` match (15 slots)."""
    groups: list[list[tuple[int, int]]] = []
    used = MULTIPORT_MAX
    for lo, hi in port_ranges(ports):
        weight = 1 if lo == hi else 2
        if used + weight > MULTIPORT_MAX:
            groups.append([])
            used = 0
        groups[-1].append((lo, hi))
        used += weight
    return groups


def _port_text(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}:{hi}"


def _port_match(proto: str, group: list[tuple[int, int]]) -> str:
    if len(group) == 1:
        return f"-p {proto} -m {proto} --dport {_port_text(*group[0])}"
    return f"-p {proto} -m multiport --dports {','.join(_port_text(lo, hi) for lo, hi in group)}"


def _mode(state: Mapping[str, Mapping]) -> int:
    return int(state.get("config", {}).get("mode", 0))


def nat_rules(state: Mapping[str, Mapping], self_overlay: str | None = None,
              self_private: str | None = None) -> list[str]:
    """The ``-A OVERLAY-NAT`` lines: one DNAT per peer and per override, by overlay address."""
    lines = []
    if self_overlay and self_private:
        lines.append(f"-A {CHAIN_NAT} -d {self_overlay}/32 {_comment('self')} "
                     f"-j DNAT --to-destination {self_private}")
    nat = state.get("nat", {})
    for overlay in sorted(nat, key=_ip_key):
        entry = nat[overlay]
        tag = "override" if entry.override else "peer"
        lines.append(f"-A {CHAIN_NAT} -d {overlay}/32 {_comment(tag)} "
                     f"-j DNAT --to-destination {entry.real}")
    return lines


def _drop(tag: str, audit: bool) -> str:
    return f"{_comment(tag + ':audit')} -j RETURN" if audit else f"{_comment(tag)} -j DROP"


def filter_rules(state: Mapping[str, Mapping], overlay_subnet: str, interface: str | None = None,
                 family: int = 4) -> list[str]:
    """The ``-A OVERLAY-IN`` (and, for IPv4, ``-A OVERLAY-OUT``) lines of one
    family, in DESIGN §5 order (see the module doc)."""
    cfg = state.get("config", {})
    audit = _mode(state) == FilterMode.AUDIT
    lines = []
    loopback = "::1/128" if family == 6 else "127.0.0.0/8"
    own = sorted((a for a in state.get("self", {}) if _family(a) == family), key=_ip_key)
    for src in [loopback, *map(_host, own)]:
        lines.append(f"-A {CHAIN_IN} -s {src} {_iface(interface)} {_drop('drop_martian', audit)}")
    failsafe = state.get("failsafe", {})
    for cidr in sorted((c for c in failsafe if _family(c) == family), key=_cidr_key):
        flags = failsafe[cidr]
        if flags & FS_ALL:
            lines.append(f"-A {CHAIN_IN} {_src(cidr)}{_comment('pass_failsafe')} -j ACCEPT")
        if flags & FS_SSH:
            lines.append(f"-A {CHAIN_IN} {_src(cidr)}-p tcp -m tcp --dport {SSH_PORT} "
                         f"{_comment('pass_failsafe')} -j ACCEPT")
    lines.append(f"-A {CHAIN_IN} -m conntrack --ctstate RELATED,ESTABLISHED "
                 f"{_comment('pass_established')} -j ACCEPT")
    lines.append(f"-A {CHAIN_IN} -i lo {_comment('pass_loopback')} -j ACCEPT")
    if family == 6:
        icmp6 = "-p ipv6-icmp -m icmp6 --icmpv6-type"
        for t in NDP_TYPES:
            lines.append(f"-A {CHAIN_IN} {icmp6} {t} -m hl --hl-eq 255 {_comment('pass_ndp')} -j ACCEPT")
        for src in ("fe80::/10", "::/128"):
            for t in MLD_TYPES:
                lines.append(f"-A {CHAIN_IN} -s {src} {icmp6} {t} {_comment('pass_ndp')} -j ACCEPT")
    members = IPSET6 if family == 6 else IPSET
    lines.append(f"-A {CHAIN_IN} -m set --match-set {members} src {_comment('pass_member')} -j ACCEPT")
    words = state.get("ports", {})
    for slot, proto in ((0, "tcp"), (1, "udp")):
        for group in port_groups(bitmap_ports(words, slot)):
            lines.append(f"-A {CHAIN_IN} {_port_match(proto, group)} {_comment('pass_open_port')} -j ACCEPT")
    if int(cfg.get("reject_all", 0)):
        lines.append(f"-A {CHAIN_IN} {_drop('drop_not_allowed', audit)}")
    else:
        lines.append(f"-A {CHAIN_IN} {_comment('pass_default')} -j RETURN")
    if family == 4:
        subnet = ipaddress.IPv4Network(overlay_subnet, strict=False)
        lines.append(f"-A {CHAIN_OUT} -d {subnet} {_drop('drop_no_peer', audit)}")
    return lines


def ipset_members(state: Mapping[str, Mapping], family: int = 4) -> list[str]:
    """The peer set of one family: every peer whose flags say member, sorted."""
    peers = state.get("peers", {})
    return sorted((a for a, e in peers.items() if e.flags & PEER_F_MEMBER and _family(a) == family),
                  key=_ip_key)


def _table_text(table: str, rules: list[str]) -> str:
    chains = [ours for _, ours in CHAINS[table]]
    head = [f"*{IPT_TABLE[table]}"] + [f":{c} - [0:0]" for c in chains] + [f"-F {c}" for c in chains]
    return "\n".join(head + rules + ["COMMIT", ""])


def render(state: Mapping[str, Mapping], overlay_subnet: str, self_overlay: str | None = None,
           self_private: str | None = None, interface: str | None = None,
           ipv6: bool = True) -> dict[str, str]:
    """The whole ruleset for ``state``: ``{"ipset", "ipset6", "nat", "filter", "filter6"}``
    (without ``ipset6`` and ``filter6`` when ``ipv6`` is off: a host without IPv6).

    The rules texts are ``iptables-restore --noflush`` (``ip6tables-restore`` for
    ``filter6``) input that declares (and so flushes) only our chains and refills
    them; jumps are added separately, once. A set text is the member list, one
    address a line.
    """
    out = {
        "ipset": "".join(f"{a}\n" for a in ipset_members(state)),
        "nat": _table_text("nat", nat_rules(state, self_overlay, self_private)),
        "filter": _table_text("filter", filter_rules(state, overlay_subnet, interface)),
    }
    if ipv6:
        out["ipset6"] = "".join(f"{a}\n" for a in ipset_members(state, 6))
        out["filter6"] = _table_text("filter6", filter_rules(state, overlay_subnet, interface, 6))
    return out


def jump_text(table: str, missing: Iterable[tuple[str, str]]) -> str:
    """Restore input that inserts the missing jumps first in their built-in chains."""
    return "".join(f"-I {builtin} 1 -j {ours}\n" for builtin, ours in missing)


def ipset_script(members: Iterable[str], maxelem: int, create_main: bool, table: str = "ipset") -> str:
    """``ipset restore`` input filling the temporary set (swapped in afterwards)."""
    name, tmp, family = SETS[table]
    spec = f"hash:ip family {family} hashsize 1024 maxelem {maxelem}"
    lines = []
    if create_main:
        lines.append(f"create {name} {spec} -exist")
    lines.append(f"create {tmp} {spec}")
    lines.extend(f"add {tmp} {a}" for a in members)
    return "\n".join(lines) + "\n"


# --- parsing what is installed (pure) -----------------------------------------------------------


def _rule_fields(line: str) -> dict[str, str]:
    """Option -> value for the options our rules use (first value of each)."""
    try:
        toks = shlex.split(line)
    except ValueError:
        return {}
    out: dict[str, str] = {}
    i = 0
    while i < len(toks):
        tok = toks[i]
        if tok == "--match-set" and i + 2 < len(toks):
            out[tok] = toks[i + 1]
            i += 3
            continue
        if tok.startswith("-") and i + 1 < len(toks) and not toks[i + 1].startswith("-"):
            out.setdefault(tok, toks[i + 1])
            i += 2
            continue
        i += 1
    return out


def chain_lines(save_text: str, chain: str) -> list[str]:
    """The ``-A CHAIN`` lines of ``iptables-save`` output (counters stripped)."""
    out = []
    prefix = f"-A {chain} "
    for raw in save_text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            line = line.partition("] ")[2]
        if line.startswith(prefix):
            out.append(line)
    return out


def jumps_present(save_text: str, table: str) -> list[tuple[str, str]]:
    """The (built-in, ours) jumps of ``table`` that ``save_text`` has."""
    lines = set()
    for raw in save_text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            line = line.partition("] ")[2]
        lines.add(line)
    return [(b, o) for b, o in CHAINS[table] if f"-A {b} -j {o}" in lines]


def chains_present(save_text: str) -> set[str]:
    return {line[1:].split()[0] for line in save_text.splitlines() if line.startswith(":")}


def parse_nat(lines: Iterable[str]) -> dict[str, NatEntry]:
    nat = {}
    for line in lines:
        f = _rule_fields(line)
        tag = f.get("--comment", "")
        if tag not in ("ovl:peer", "ovl:override") or f.get("-j") != "DNAT":
            continue
        overlay = f.get("-d", "").removesuffix("/32")
        real = f.get("--to-destination")
        if overlay and real:
            nat[overlay] = NatEntry(real, override=tag == "ovl:override")
    return nat


def _ports_of(f: Mapping[str, str]) -> list[int]:
    text = f.get("--dport") or f.get("--dports") or ""
    ports = []
    for item in filter(None, text.split(",")):
        lo, _, hi = item.partition(":")
        ports.extend(range(int(lo), int(hi or lo) + 1))
    return ports


def parse_filter(lines: Iterable[str], family: int = 4) -> dict[str, dict]:
    """failsafe, ports, config and self tables from one family's filter chain lines."""
    failsafe: dict[str, int] = {}
    own: dict[str, int] = {}
    specs: dict[str, list[tuple[int, int]]] = {"tcp": [], "udp": []}
    config = {"reject_all": 0, "mode": 0}
    anywhere = "::/0" if family == 6 else "0.0.0.0/0"
    for line in lines:
        f = _rule_fields(line)
        tag = f.get("--comment", "").removeprefix("ovl:")
        reason, _, audit = tag.partition(":")
        mode = int(FilterMode.AUDIT if audit == "audit" else FilterMode.ENFORCE)
        if reason == "pass_failsafe":
            cidr = str(ipaddress.ip_network(f.get("-s", anywhere), strict=False))
            flag = FS_SSH if f.get("--dport") == str(SSH_PORT) and f.get("-p") == "tcp" else FS_ALL
            failsafe[cidr] = failsafe.get(cidr, 0) | flag
        elif reason == "drop_martian":
            net = ipaddress.ip_network(f.get("-s", anywhere), strict=False)
            if net.num_addresses == 1 and not net.network_address.is_loopback:
                own[str(net.network_address)] = SELF_F_OWN
            config["mode"] = mode
        elif reason == "pass_open_port" and f.get("-p") in specs:
            specs[f["-p"]].extend((p, p) for p in _ports_of(f))
        elif reason == "drop_not_allowed":
            config["reject_all"] = 1
        elif reason == "drop_no_peer":
            config["mode"] = mode
    ports = {}
    for proto, spec in specs.items():
        ports.update(ports_bitmap(spec, (proto,)))
    return {"failsafe": failsafe, "ports": ports, "config": config, "self": own}


def parse_ipset(save_text: str, name: str = IPSET) -> list[str]:
    """Members of our set from ``ipset save <name>``."""
    out = []
    for line in save_text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "add" and parts[1] == name:
            out.append(parts[2])
    return out


def parse_counters(save_text: str) -> dict[str, int]:
    """Packets by reason from ``iptables-save -c -t filter`` (our chains' comments)."""
    out = dict.fromkeys(REASONS, 0)
    for raw in save_text.splitlines():
        line = raw.strip()
        if not line.startswith("["):
            continue
        counts, _, rule = line.partition("] ")
        if not (rule.startswith(f"-A {CHAIN_IN} ") or rule.startswith(f"-A {CHAIN_OUT} ")):
            continue
        tag = _rule_fields(rule).get("--comment", "")
        if not tag.startswith("ovl:"):
            continue
        reason = tag[4:].partition(":")[0]
        try:
            packets = int(counts.lstrip("[").partition(":")[0])
        except ValueError:
            continue
        out[reason] = out.get(reason, 0) + packets
    return out
