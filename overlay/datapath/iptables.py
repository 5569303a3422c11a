"""``datapath.backend: iptables``: the fallback datapath, with the old system's rules.

This backend enforces the same tables as the eBPF one (see :mod:`overlay.ops`)
with the rule shapes of the first system (DESIGN §1), applied with
``iptables-restore`` and ``ipset``:

- nat ``OUTPUT`` jumps to our chain ``OVERLAY-NAT``: one ``DNAT`` rule per
  peer, ``overlay -> real`` (private address in the same network, public
  otherwise), and the ``nat_overrides`` verbatim. Replies are translated back
  by conntrack, so applications only see overlay addresses. A rule
  ``self overlay -> self private`` makes this host's own overlay address work.
- filter ``INPUT`` jumps (first rule) to ``OVERLAY-IN``, in DESIGN §5 order:
  failsafe (SSH from the whitelist, everything from the registry's
  addresses), established/related, loopback, members (the ipset
  ``OVERLAY-PEERS``, ``hash:ip``), open ports (compact ``multiport``
  groups), then the default: ``DROP`` under ``reject_all``, else ``RETURN``
  (the rest of ``INPUT`` and its policy decide, as the old ``ACCEPT`` policy
  did).
- filter ``OUTPUT`` jumps (first rule) to ``OVERLAY-OUT``: a packet still
  addressed to the overlay subnet after nat ``OUTPUT`` has no peer and is
  dropped (``drop_no_peer``); the sender gets ``EPERM`` at once.
- audit mode (``config.mode`` 1): the two drop rules count and ``RETURN``.
- group policies (the ``policy``, ``cidr_ident`` and ``names`` tables and the
  ``policy_*`` config keys) are enforced by the eBPF datapath only: they are
  kept in memory and ignored here, with one warning when a policy selects
  this node (docs/policies.md).

Every rule carries a comment ``ovl:<reason>``; :meth:`IptablesDatapath.counters`
sums the rule counters by reason (names shared with the eBPF datapath). The
counters are kept monotonic across re-applies within a process (they are read
before each filter reload and carried over).

Application is the old system's: every ``apply`` updates the in-memory tables,
renders the WHOLE ruleset and loads it, one ``iptables-restore --noflush``
transaction per table (declaring our chain flushes and refills only that
chain; other chains and rules are never touched), and the peer set is
replaced by ``ipset restore`` of a temporary set, ``ipset swap``, ``ipset
destroy``. A table whose rendered text equals the last one applied is
skipped. This O(N)-per-change behaviour is the baseline the eBPF datapath is
measured against: keep it faithful, do not optimise it.

``observe`` parses back what is installed (``iptables-save``, ``ipset save``),
so a restarted daemon adopts the live rules: when the installed rules are
exactly what we would render for the parsed state, the parsed state is
adopted without a reload; when they differ (rules edited or removed by
someone else, a jump missing), the next apply reloads the table.

The overlay route ``<subnet> dev <interface> src <private>`` (protocol
:data:`ROUTE_PROTO`, which marks it as ours) is added with pyroute2: the
kernel routes a locally generated packet before nat ``OUTPUT`` and
re-routes it after ``DNAT``, so the overlay subnet needs a route for
``connect()`` to proceed. No overlay device is needed.
"""

from __future__ import annotations

import copy
import errno
import ipaddress
import logging
import os
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping

from overlay.diff import apply_ops
from overlay.errors import CapacityError, DatapathError, UnsupportedError
from overlay.ops import (
    FS_ALL,
    FS_SSH,
    MODE_AUDIT,
    PEER_F_MEMBER,
    NatEntry,
    Op,
    PeerEntry,
    empty_state,
)
from overlay.plan import bitmap_ports, ports_bitmap

log = logging.getLogger(__name__)

CHAIN_NAT = "OVERLAY-NAT"
CHAIN_IN = "OVERLAY-IN"
CHAIN_OUT = "OVERLAY-OUT"
IPSET = "OVERLAY-PEERS"
IPSET_TMP = "OVERLAY-PEERS-TMP"
ROUTE_PROTO = 79  # rtm_protocol of the overlay route: marks it as this backend's
SSH_PORT = 22
MULTIPORT_MAX = 15  # iptables multiport: at most 15 ports, a range counts as two

# iptables table -> [(built-in chain, our chain)], each jumped to once, first.
CHAINS: dict[str, tuple[tuple[str, str], ...]] = {
    "nat": (("OUTPUT", CHAIN_NAT),),
    "filter": (("INPUT", CHAIN_IN), ("OUTPUT", CHAIN_OUT)),
}

REASONS = (
    "drop_no_peer",
    "drop_not_allowed",
    "pass_failsafe",
    "pass_established",
    "pass_loopback",
    "pass_member",
    "pass_open_port",
    "pass_default",
)

TOOLS = ("iptables-restore", "iptables-save", "ipset")
TIMEOUT_S = 60.0

# runner(argv, stdin text or None) -> (returncode, stdout, stderr)
Runner = Callable[[list[str], "str | None"], tuple[int, str, str]]


# --- rendering (pure) ------------------------------------------------------------------------


def _comment(tag: str) -> str:
    return f'-m comment --comment "ovl:{tag}"'


def _ip_key(addr: str):
    return ipaddress.IPv4Address(addr)


def _cidr_key(cidr: str):
    net = ipaddress.IPv4Network(cidr, strict=False)
    return (net.network_address, net.prefixlen)


def _src(cidr: str) -> str:
    """``-s CIDR `` as iptables-save prints it (nothing for 0.0.0.0/0)."""
    net = ipaddress.IPv4Network(cidr, strict=False)
    return "" if net.prefixlen == 0 else f"-s {net} "


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


def filter_rules(state: Mapping[str, Mapping], overlay_subnet: str) -> list[str]:
    """The ``-A OVERLAY-IN`` and ``-A OVERLAY-OUT`` lines, in DESIGN §5 order."""
    cfg = state.get("config", {})
    audit = _mode(state) == MODE_AUDIT
    lines = []
    failsafe = state.get("failsafe", {})
    for cidr in sorted(failsafe, key=_cidr_key):
        flags = failsafe[cidr]
        if flags & FS_ALL:
            lines.append(f"-A {CHAIN_IN} {_src(cidr)}{_comment('pass_failsafe')} -j ACCEPT")
        if flags & FS_SSH:
            lines.append(f"-A {CHAIN_IN} {_src(cidr)}-p tcp -m tcp --dport {SSH_PORT} "
                         f"{_comment('pass_failsafe')} -j ACCEPT")
    lines.append(f"-A {CHAIN_IN} -m conntrack --ctstate RELATED,ESTABLISHED "
                 f"{_comment('pass_established')} -j ACCEPT")
    lines.append(f"-A {CHAIN_IN} -i lo {_comment('pass_loopback')} -j ACCEPT")
    lines.append(f"-A {CHAIN_IN} -m set --match-set {IPSET} src {_comment('pass_member')} -j ACCEPT")
    words = state.get("ports", {})
    for slot, proto in ((0, "tcp"), (1, "udp")):
        for group in port_groups(bitmap_ports(words, slot)):
            lines.append(f"-A {CHAIN_IN} {_port_match(proto, group)} {_comment('pass_open_port')} -j ACCEPT")
    if int(cfg.get("reject_all", 0)):
        if audit:
            lines.append(f"-A {CHAIN_IN} {_comment('drop_not_allowed:audit')} -j RETURN")
        else:
            lines.append(f"-A {CHAIN_IN} {_comment('drop_not_allowed')} -j DROP")
    else:
        lines.append(f"-A {CHAIN_IN} {_comment('pass_default')} -j RETURN")
    subnet = ipaddress.IPv4Network(overlay_subnet, strict=False)
    if audit:
        lines.append(f"-A {CHAIN_OUT} -d {subnet} {_comment('drop_no_peer:audit')} -j RETURN")
    else:
        lines.append(f"-A {CHAIN_OUT} -d {subnet} {_comment('drop_no_peer')} -j DROP")
    return lines


def ipset_members(state: Mapping[str, Mapping]) -> list[str]:
    """The peer set: every peer whose flags say member, sorted."""
    peers = state.get("peers", {})
    return sorted((a for a, e in peers.items() if e.flags & PEER_F_MEMBER), key=_ip_key)


def _table_text(table: str, rules: list[str]) -> str:
    chains = [ours for _, ours in CHAINS[table]]
    head = [f"*{table}"] + [f":{c} - [0:0]" for c in chains] + [f"-F {c}" for c in chains]
    return "\n".join(head + rules + ["COMMIT", ""])


def render(state: Mapping[str, Mapping], overlay_subnet: str, self_overlay: str | None = None,
           self_private: str | None = None) -> dict[str, str]:
    """The whole ruleset for ``state``: ``{"ipset": members, "nat": ..., "filter": ...}``.

    The nat and filter texts are ``iptables-restore --noflush`` input that
    declares (and so flushes) only our chains and refills them; jumps are added
    separately, once. The ipset text is the member list, one address a line.
    """
    return {
        "ipset": "".join(f"{a}\n" for a in ipset_members(state)),
        "nat": _table_text("nat", nat_rules(state, self_overlay, self_private)),
        "filter": _table_text("filter", filter_rules(state, overlay_subnet)),
    }


def jump_text(table: str, missing: Iterable[tuple[str, str]]) -> str:
    """Restore input that inserts the missing jumps first in their built-in chains."""
    return "".join(f"-I {builtin} 1 -j {ours}\n" for builtin, ours in missing)


def ipset_script(members: Iterable[str], maxelem: int, create_main: bool) -> str:
    """``ipset restore`` input filling the temporary set (swapped in afterwards)."""
    spec = f"hash:ip family inet hashsize 1024 maxelem {maxelem}"
    lines = []
    if create_main:
        lines.append(f"create {IPSET} {spec} -exist")
    lines.append(f"create {IPSET_TMP} {spec}")
    lines.extend(f"add {IPSET_TMP} {a}" for a in members)
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


def parse_filter(lines: Iterable[str]) -> dict[str, dict]:
    """failsafe, ports and config tables from our filter chains' lines."""
    failsafe: dict[str, int] = {}
    specs: dict[str, list[tuple[int, int]]] = {"tcp": [], "udp": []}
    config = {"reject_all": 0, "mode": 0}
    for line in lines:
        f = _rule_fields(line)
        tag = f.get("--comment", "").removeprefix("ovl:")
        reason, _, audit = tag.partition(":")
        if reason == "pass_failsafe":
            cidr = str(ipaddress.IPv4Network(f.get("-s", "0.0.0.0/0"), strict=False))
            flag = FS_SSH if f.get("--dport") == str(SSH_PORT) and f.get("-p") == "tcp" else FS_ALL
            failsafe[cidr] = failsafe.get(cidr, 0) | flag
        elif reason == "pass_open_port" and f.get("-p") in specs:
            specs[f["-p"]].extend((p, p) for p in _ports_of(f))
        elif reason == "drop_not_allowed":
            config["reject_all"] = 1
        elif reason == "drop_no_peer":
            config["mode"] = MODE_AUDIT if audit == "audit" else 0
    ports = {}
    for proto, spec in specs.items():
        ports.update(ports_bitmap(spec, (proto,)))
    return {"failsafe": failsafe, "ports": ports, "config": config}


def parse_ipset(save_text: str) -> list[str]:
    """Members of our set from ``ipset save OVERLAY-PEERS``."""
    out = []
    for line in save_text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "add" and parts[1] == IPSET:
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


def rnat_of(nat: Mapping[str, NatEntry]) -> dict[str, str]:
    """The reverse table as the planner builds it: peers first, then overrides."""
    rnat = {e.real: o for o, e in nat.items() if not e.override}
    for overlay in sorted(nat, key=_ip_key):
        if nat[overlay].override:
            rnat.setdefault(nat[overlay].real, overlay)
    return rnat


# --- the datapath --------------------------------------------------------------------------------


_SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"


def _which(tool: str) -> str | None:
    """``tool`` on PATH, or in the sbin directories a daemon's PATH may lack."""
    return shutil.which(tool) or shutil.which(tool, path=_SBIN)


def _subprocess_runner(argv: list[str], stdin: str | None) -> tuple[int, str, str]:
    argv = [_which(argv[0]) or argv[0], *argv[1:]]
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S)
    except FileNotFoundError:
        raise UnsupportedError(f"datapath iptables needs {argv[0]}, which is not installed") from None
    except subprocess.TimeoutExpired:
        raise DatapathError(f"{argv[0]} did not finish within {TIMEOUT_S:.0f} s") from None
    return proc.returncode, proc.stdout, proc.stderr


def check_environment() -> None:
    """Raise UnsupportedError (one line) unless root with iptables-restore and ipset."""
    missing = [t for t in TOOLS if _which(t) is None]
    if missing:
        raise UnsupportedError(
            f"datapath iptables needs {', '.join(missing)} (Debian: apt-get install iptables ipset)"
        )
    if os.geteuid() != 0:
        raise UnsupportedError("datapath iptables needs root (iptables-restore and ipset)")


class IptablesDatapath:
    """The iptables/ipset datapath; see the module docstring."""

    name = "iptables"

    def __init__(self, interface: str, overlay_subnet: str, self_private: str | None = None,
                 self_overlay: str | None = None, sizes=None, pin_root: str | None = None,
                 overlay_device: str | None = None, runner: Runner | None = None,
                 manage_route: bool = True, **_):
        self.interface = interface
        self.overlay_subnet = str(ipaddress.IPv4Network(overlay_subnet, strict=False))
        self.self_private = self_private
        self.self_overlay = self_overlay
        self.maxelem = max(int(getattr(sizes, "peers", 65536) or 65536), 16)
        self.manage_route = manage_route
        if runner is None:
            check_environment()
            runner = _subprocess_runner
        self._runner = runner
        self._lock = threading.RLock()
        self.state: dict[str, dict] = empty_state()
        # last text applied (or adopted) per table; None: unknown, reload on next apply
        self._last: dict[str, str | None] = {"ipset": None, "nat": None, "filter": None}
        self._missing_jumps: dict[str, list[tuple[str, str]] | None] = {"nat": None, "filter": None}
        self._ipset_exists: bool | None = None
        self._counter_base = dict.fromkeys(REASONS, 0)
        self._observed_once = False
        self._policy_warned = False
        self.stats = {"applies": 0, "iptables_restores": 0, "ipset_swaps": 0, "tables_skipped": 0}

    # -- subprocesses --

    def _run(self, argv: list[str], stdin: str | None = None, ok: Iterable[int] = (0,)) -> str:
        rc, out, err = self._runner(argv, stdin)
        if rc not in tuple(ok):
            first = (err or out).strip().splitlines()
            raise DatapathError(f"{' '.join(argv)} failed ({rc}): {first[0] if first else 'no output'}")
        return out

    def _restore(self, text: str) -> None:
        self._run(["iptables-restore", "--noflush", "-w", "10"], text)

    def _save(self, table: str, counters: bool = False) -> str:
        return self._run(["iptables-save", *(["-c"] if counters else []), "-t", table])

    def _ipset_names(self) -> set[str]:
        return set(self._run(["ipset", "list", "-n"]).split())

    # -- protocol --

    def start(self) -> None:
        """Add the overlay route and adopt what is installed. Disturbs no live rule."""
        with self._lock:
            if self.manage_route:
                add_route(self.interface, self.overlay_subnet, self.self_private)
            self.observe()

    def _render(self, state: Mapping[str, Mapping]) -> dict[str, str]:
        return render(state, self.overlay_subnet, self.self_overlay, self.self_private)

    def observe(self) -> dict[str, dict]:
        """Parse back the installed rules and set; adopt them when they are exactly ours."""
        with self._lock:
            known = any(v is not None for v in self._last.values())
            nat_save = self._save("nat")
            filter_save = self._save("filter")
            names = self._ipset_names()
            self._ipset_exists = IPSET in names
            members = parse_ipset(self._run(["ipset", "save", IPSET])) if self._ipset_exists else []

            parsed = empty_state()
            parsed["nat"] = parse_nat(chain_lines(nat_save, CHAIN_NAT))
            parsed["rnat"] = rnat_of(parsed["nat"])
            parsed["peers"] = {a: self.state.get("peers", {}).get(a, PeerEntry()) for a in members}
            installed = {
                "nat": chain_lines(nat_save, CHAIN_NAT),
                "filter": chain_lines(filter_save, CHAIN_IN) + chain_lines(filter_save, CHAIN_OUT),
            }
            present = {
                "nat": chains_present(nat_save) >= {CHAIN_NAT},
                "filter": chains_present(filter_save) >= {CHAIN_IN, CHAIN_OUT},
            }
            if present["filter"]:
                parsed.update(parse_filter(installed["filter"]))
            for table, save in (("nat", nat_save), ("filter", filter_save)):
                have = jumps_present(save, table)
                self._missing_jumps[table] = [j for j in CHAINS[table] if j not in have]

            # The installed text is trusted only when it is exactly what we render for it.
            expect = self._render(parsed)
            want = {
                "nat": nat_rules(parsed, self.self_overlay, self.self_private),
                "filter": filter_rules(parsed, self.overlay_subnet),
            }
            clean = {t: present[t] and installed[t] == want[t] for t in ("nat", "filter")}
            clean["ipset"] = self._ipset_exists
            for table in self._last:
                self._last[table] = expect[table] if clean[table] else None
            drift = [t for t in ("ipset", "nat", "filter") if not clean[t]]
            if drift and (known or any(present.values()) or self._ipset_exists):
                log.warning("iptables: %s not as rendered (changed by someone else?); reloading "
                            "on the next apply", ", ".join(drift))
                # Report no config, so the caller's diff has ops and the next apply
                # happens, even when the drift is invisible in the tables (a jump gone).
                parsed["config"] = {}

            mine = self._render(self.state)
            if all(clean.values()) and mine == expect:
                parsed = copy.deepcopy(self.state)  # exact, including what rules cannot show
            elif not self._observed_once and any(present.values()):
                log.info("iptables: adopted %d NAT entries and %d peers from the installed rules",
                         len(parsed["nat"]), len(parsed["peers"]))
            self.state = copy.deepcopy(parsed)
            self._observed_once = True
            return parsed

    def apply(self, ops: list[Op]) -> None:
        """Update the in-memory tables, render everything, load the tables that changed."""
        with self._lock:
            if not self._observed_once:
                self.observe()
            before = copy.deepcopy(self.state)
            apply_ops(self.state, ops)
            self.stats["applies"] += 1
            self._warn_policies()
            texts = self._render(self.state)
            members = texts["ipset"].count("\n")
            if members > self.maxelem:
                self.state = before
                raise CapacityError(f"{members} peers do not fit the peer set (maxelem {self.maxelem}, "
                                    "datapath.sizes.peers); nothing was applied")
            try:
                self._apply_ipset(texts["ipset"])
                for table in ("nat", "filter"):
                    self._apply_table(table, texts[table])
            except Exception:
                self.state = before
                self._last = dict.fromkeys(self._last)
                raise

    def _warn_policies(self) -> None:
        """Group policies are enforced by the eBPF datapath only: the ``policy``,
        ``cidr_ident`` and ``names`` tables are kept in memory and ignored here."""
        enforced = bool(self.state.get("config", {}).get("policy_enforced"))
        if enforced and not self._policy_warned:
            log.warning("iptables: policies select this node, but group policies are enforced by the "
                        "ebpf datapath only; this node keeps the members / reject_all behaviour")
        self._policy_warned = enforced

    def _apply_ipset(self, text: str) -> None:
        if text == self._last["ipset"]:
            self.stats["tables_skipped"] += 1
            return
        members = text.split()
        script = ipset_script(members, self.maxelem, create_main=not self._ipset_exists)
        try:
            self._run(["ipset", "restore"], script)
        except DatapathError:
            # a temporary set left behind by a crash: remove it and try once more
            self._run(["ipset", "destroy", IPSET_TMP], ok=(0, 1))
            self._run(["ipset", "restore"], script)
        self._ipset_exists = True
        self._run(["ipset", "swap", IPSET_TMP, IPSET])
        self._run(["ipset", "destroy", IPSET_TMP])
        self.stats["ipset_swaps"] += 1
        self._last["ipset"] = text
        log.debug("iptables: peer set swapped in (%d members)", len(members))

    def _apply_table(self, table: str, text: str) -> None:
        missing = self._missing_jumps.get(table)
        if missing is None:
            have = jumps_present(self._save(table), table)
            missing = [j for j in CHAINS[table] if j not in have]
        if text == self._last[table] and not missing:
            self.stats["tables_skipped"] += 1
            return
        if table == "filter":
            self._carry_counters()
        body = text.removesuffix("COMMIT\n") + jump_text(table, missing) + "COMMIT\n"
        self._restore(body)
        self.stats["iptables_restores"] += 1
        self._missing_jumps[table] = []
        self._last[table] = text
        log.debug("iptables: %s table reloaded (%d rules)", table, body.count("\n-A "))

    def _carry_counters(self) -> None:
        """Reloading our chains resets their counters: keep what they counted."""
        try:
            now = parse_counters(self._save("filter", counters=True))
        except DatapathError as exc:
            log.debug("iptables: counters before reload unavailable: %s", exc)
            return
        for reason, n in now.items():
            self._counter_base[reason] = self._counter_base.get(reason, 0) + n

    def counters(self) -> dict[str, int]:
        """Packets by reason (rule counters of our filter chains, carried over reloads)."""
        with self._lock:
            now = parse_counters(self._save("filter", counters=True))
            return {r: self._counter_base.get(r, 0) + now.get(r, 0)
                    for r in sorted(set(now) | set(self._counter_base))}

    def rules(self) -> dict[str, str]:
        """The full rendered ruleset for the current in-memory state (for dry runs)."""
        with self._lock:
            return self._render(self.state)

    def close(self) -> None:
        """Nothing to release: the rules, set and route stay and keep working."""
        return None

    def teardown(self) -> None:
        """Remove our jumps, chains, sets and the overlay route; touch nothing else."""
        with self._lock:
            remove_installed(self._run, self.interface if self.manage_route else None,
                             route=self.manage_route)
            self.state = empty_state()
            self._last = dict.fromkeys(self._last)
            self._missing_jumps = {"nat": None, "filter": None}
            self._ipset_exists = False
            self._counter_base = dict.fromkeys(REASONS, 0)

    @classmethod
    def remove(cls, interface: str | None = None, **_) -> None:
        """``overlay datapath teardown`` without a running datapath (no subnet needed)."""
        check_environment()

        def run(argv, stdin=None, ok=(0,)):
            rc, out, err = _subprocess_runner(argv, stdin)
            if rc not in tuple(ok):
                first = (err or out).strip().splitlines()
                raise DatapathError(f"{' '.join(argv)} failed ({rc}): {first[0] if first else ''}")
            return out

        remove_installed(run, interface)


def teardown_text(table: str, save_text: str) -> str | None:
    """Restore input deleting our jumps (every copy) and chains, or None if none is there."""
    lines = []
    all_lines = [ln.partition("] ")[2] if ln.startswith("[") else ln for ln in save_text.splitlines()]
    for builtin, ours in CHAINS[table]:
        jump = f"-A {builtin} -j {ours}"
        lines.extend(f"-D {builtin} -j {ours}" for ln in all_lines if ln.strip() == jump)
    present = chains_present(save_text)
    for _, ours in CHAINS[table]:
        if ours in present:
            lines += [f"-F {ours}", f"-X {ours}"]
    if not lines:
        return None
    return "\n".join([f"*{table}", *lines, "COMMIT", ""])


def remove_installed(run, interface: str | None, route: bool = True) -> None:
    """Remove jumps, chains, sets (in that order: rules reference the set) and our routes."""
    for table in ("filter", "nat"):
        text = teardown_text(table, run(["iptables-save", "-t", table]))
        if text:
            run(["iptables-restore", "--noflush", "-w", "10"], text)
    names = set(run(["ipset", "list", "-n"]).split())
    for name in (IPSET, IPSET_TMP):
        if name in names:
            run(["ipset", "destroy", name])
    if route:
        remove_routes(interface)
    log.info("iptables: removed chains %s, %s, %s, set %s and the overlay route",
             CHAIN_NAT, CHAIN_IN, CHAIN_OUT, IPSET)


# --- the overlay route (pyroute2) ----------------------------------------------------------------


def _iproute():
    try:
        from pyroute2 import IPRoute
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise UnsupportedError(f"pyroute2 is not installed: {exc}") from None
    return IPRoute()


def add_route(interface: str, subnet: str, self_private: str | None) -> None:
    """``<subnet> dev <interface> [src <private>] proto 79``, idempotent (replace)."""
    from pyroute2.netlink.exceptions import NetlinkError

    net = ipaddress.IPv4Network(subnet, strict=False)
    ipr = _iproute()
    try:
        found = ipr.link_lookup(ifname=interface)
        if not found:
            raise UnsupportedError(f"datapath.interface: no interface named {interface!r}")
        kwargs = {"dst": str(net.network_address), "dst_len": net.prefixlen, "oif": found[0],
                  "scope": 253, "proto": ROUTE_PROTO}
        if self_private:
            kwargs["prefsrc"] = self_private
        try:
            ipr.route("replace", **kwargs)
        except NetlinkError as exc:
            raise DatapathError(
                f"route {net} dev {interface} src {self_private}: {os.strerror(exc.code) if exc.code > 0 else exc}"
            ) from None
    finally:
        ipr.close()


def remove_routes(interface: str | None = None) -> int:
    """Delete every IPv4 route of protocol ROUTE_PROTO (on ``interface`` if given)."""
    from pyroute2.netlink.exceptions import NetlinkError

    ipr = _iproute()
    removed = 0
    try:
        oif = None
        if interface:
            found = ipr.link_lookup(ifname=interface)
            if not found:
                return 0
            oif = found[0]
        for msg in list(ipr.get_routes(family=2)):
            if msg["proto"] != ROUTE_PROTO:
                continue
            if oif is not None and msg.get_attr("RTA_OIF") != oif:
                continue
            try:
                ipr.route("del", dst=msg.get_attr("RTA_DST"), dst_len=msg["dst_len"],
                          oif=msg.get_attr("RTA_OIF"), proto=ROUTE_PROTO, scope=msg["scope"],
                          table=msg.get_attr("RTA_TABLE") or msg["table"])
                removed += 1
            except NetlinkError as exc:
                if exc.code not in (errno.ESRCH, errno.ENOENT):
                    raise DatapathError(f"remove overlay route: {exc}") from None
    finally:
        ipr.close()
    return removed
