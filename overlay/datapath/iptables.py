"""``datapath.backend: iptables``: the fallback datapath, with the old system's rules.

This backend enforces the same tables as the eBPF one (see :mod:`overlay.ops`)
with the rule shapes of the first system (DESIGN §1), applied with
``iptables-restore``, ``ip6tables-restore`` and ``ipset``; the rules themselves
(and their parsing back) are in :mod:`overlay.datapath.iptables_rules`:

- nat ``OUTPUT`` jumps to our chain ``OVERLAY-NAT``: one ``DNAT`` rule per
  peer, ``overlay -> real`` (private address in the same network, public
  otherwise), and the ``nat_overrides`` verbatim. Replies are translated back
  by conntrack, so applications only see overlay addresses. A rule
  ``self overlay -> self private`` makes this host's own overlay address work.
- filter ``INPUT`` jumps (first rule) to ``OVERLAY-IN``, in both families
  (ip6tables for IPv6, unless the host has no IPv6), in DESIGN §5 order:
  martians, failsafe (SSH from the whitelist, everything from the registry's
  addresses), established/related, loopback, IPv6 neighbour discovery and
  MLD, members (the ipsets ``OVERLAY-PEERS`` and ``OVERLAY-PEERS6``,
  ``hash:ip``), open ports (compact ``multiport`` groups), then the default:
  ``DROP`` under ``reject_all``, else ``RETURN`` (the rest of ``INPUT`` and
  its policy decide, as the old ``ACCEPT`` policy did).
- filter ``OUTPUT`` jumps (first rule) to ``OVERLAY-OUT``: a packet still
  addressed to the overlay subnet after nat ``OUTPUT`` has no peer and is
  dropped (``drop_no_peer``); the sender gets ``EPERM`` at once.
- audit mode (``config.mode`` 1): the drop rules count and ``RETURN``.
- group policies (the ``policy``, ``cidr_ident`` and ``names`` tables and the
  ``policy_*`` config keys) and the conntrack lifetimes (``ct_*``,
  ``frag_s``) are enforced by the eBPF datapath only: they are kept in memory
  and ignored here, with one warning when a policy selects this node
  (docs/policies.md). The kernel's own conntrack applies its own timeouts.
- fragments: the ``conntrack`` match loads the kernel's defragmentation,
  which reassembles a datagram before the filter table sees it, so every rule
  judges whole datagrams (docs/datapath.md).
- revocation: after an apply that removes a peer (or a NAT entry), the
  kernel's conntrack entries of that peer's inbound flows (and of the flows
  translated to it) are deleted through conntrack netlink (pyroute2), so its
  established flows stop within the apply, not when they end.

Every rule carries a comment ``ovl:<reason>``; :meth:`IptablesDatapath.counters`
sums the rule counters by reason (names shared with the eBPF datapath). The
counters are kept monotonic across re-applies within a process (they are read
before each filter reload and carried over).

Application is the old system's: every ``apply`` updates the in-memory tables,
renders the WHOLE ruleset and loads it, one ``iptables-restore --noflush``
transaction per table (declaring our chain flushes and refills only that
chain; other chains and rules are never touched), and a peer set is
replaced by ``ipset restore`` of a temporary set, ``ipset swap``, ``ipset
destroy``. A table whose rendered text equals the last one applied is
skipped. This O(N)-per-change behaviour is the baseline the eBPF datapath is
measured against: keep it faithful, do not optimise it.

``observe`` parses back what is installed (``iptables-save``,
``ip6tables-save``, ``ipset save``), so a restarted daemon adopts the live
rules: when the installed rules are exactly what we would render for the
parsed state, the parsed state is adopted without a reload; when they differ
(rules edited or removed by someone else, a jump missing), the next apply
reloads the table.

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
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping

from overlay.datapath.iptables_rules import (  # noqa: F401  (re-exported: the rules used to live here)
    CHAIN_IN,
    CHAIN_NAT,
    CHAIN_OUT,
    CHAINS,
    IPSET,
    IPSET6,
    IPSET6_TMP,
    IPSET_TMP,
    IPT_TABLE,
    MULTIPORT_MAX,
    REASONS,
    SETS,
    SSH_PORT,
    _rule_fields,
    _table_text,
    chain_lines,
    chains_present,
    filter_rules,
    ipset_members,
    ipset_script,
    jump_text,
    jumps_present,
    nat_rules,
    parse_counters,
    parse_filter,
    parse_ipset,
    parse_nat,
    port_groups,
    port_ranges,
    render,
)
from overlay.diff import apply_ops
from overlay.errors import CapacityError, DatapathError, UnsupportedError
from overlay.ops import Op, PeerEntry, empty_state

log = logging.getLogger(__name__)

ROUTE_PROTO = 79  # rtm_protocol of the overlay route: marks it as this backend's
TOOLS = ("iptables-restore", "iptables-save", "ipset")
TOOLS6 = ("ip6tables-restore", "ip6tables-save")
TIMEOUT_S = 60.0
RULE_TABLES = ("nat", "filter", "filter6")
SET_TABLES = ("ipset", "ipset6")

# runner(argv, stdin text or None) -> (returncode, stdout, stderr)
Runner = Callable[[list[str], "str | None"], tuple[int, str, str]]
# flusher(addresses whose inbound flows end, overlay addresses whose translated flows end) -> deleted
Flusher = Callable[[Iterable[str], Iterable[str]], int]


def _tool(table: str, kind: str) -> str:  # iptables-save, ip6tables-restore, ...
    return f"{'ip6tables' if table == 'filter6' else 'iptables'}-{kind}"


def host_has_ipv6() -> bool:
    """Is IPv6 enabled in this kernel (ipv6.disable=1 leaves no /proc/net/if_inet6)?"""
    return os.path.exists("/proc/net/if_inet6")


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


def check_environment(ipv6: bool = True) -> None:
    """Raise UnsupportedError (one line) unless root with the iptables tools and ipset."""
    missing = [t for t in (*TOOLS, *(TOOLS6 if ipv6 else ())) if _which(t) is None]
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
                 manage_route: bool = True, ipv6: bool | None = None,
                 flusher: Flusher | None = None, **_):
        self.interface = interface
        self.overlay_subnet = str(ipaddress.IPv4Network(overlay_subnet, strict=False))
        self.self_private = self_private
        self.self_overlay = self_overlay
        self.maxelem = max(int(getattr(sizes, "peers", 65536) or 65536), 16)
        self.manage_route = manage_route
        self.ipv6 = host_has_ipv6() if ipv6 is None else ipv6
        if runner is None:
            check_environment(self.ipv6)
            runner = _subprocess_runner
        self._runner = runner
        self._flusher = flusher if flusher is not None else flush_conntrack
        self._lock = threading.RLock()
        self.state: dict[str, dict] = empty_state()
        self._tables = RULE_TABLES if self.ipv6 else ("nat", "filter")
        self._sets = SET_TABLES if self.ipv6 else ("ipset",)
        # last text applied (or adopted) per table; None: unknown, reload on next apply
        self._last: dict[str, str | None] = dict.fromkeys((*self._sets, *self._tables))
        self._missing_jumps: dict[str, list[tuple[str, str]] | None] = dict.fromkeys(self._tables)
        self._set_exists: dict[str, bool | None] = dict.fromkeys(self._sets)
        self._counter_base = dict.fromkeys(REASONS, 0)
        self._observed_once = False
        self._policy_warned = False
        self.flushed = 0
        self.stats = {"applies": 0, "iptables_restores": 0, "ipset_swaps": 0, "tables_skipped": 0}

    # -- subprocesses --

    def _run(self, argv: list[str], stdin: str | None = None, ok: Iterable[int] = (0,)) -> str:
        rc, out, err = self._runner(argv, stdin)
        if rc not in tuple(ok):
            first = (err or out).strip().splitlines()
            raise DatapathError(f"{' '.join(argv)} failed ({rc}): {first[0] if first else 'no output'}")
        return out

    def _restore(self, table: str, text: str) -> None:
        self._run([_tool(table, "restore"), "--noflush", "-w", "10"], text)

    def _save(self, table: str, counters: bool = False) -> str:
        return self._run([_tool(table, "save"), *(["-c"] if counters else []), "-t", IPT_TABLE[table]])

    # -- protocol --

    def start(self) -> None:
        """Add the overlay route and adopt what is installed. Disturbs no live rule."""
        with self._lock:
            if self.manage_route:
                add_route(self.interface, self.overlay_subnet, self.self_private)
            self.observe()

    def _render(self, state: Mapping[str, Mapping]) -> dict[str, str]:
        return render(state, self.overlay_subnet, self.self_overlay, self.self_private,
                      self.interface, self.ipv6)

    def _chain_lines(self, table: str, save: str) -> list[str]:
        return [line for _, ours in CHAINS[table] for line in chain_lines(save, ours)]

    def observe(self) -> dict[str, dict]:
        """Parse back the installed rules and sets; adopt them when they are exactly ours."""
        with self._lock:
            known = any(v is not None for v in self._last.values())
            saves = {t: self._save(t) for t in self._tables}
            names = set(self._run(["ipset", "list", "-n"]).split())
            members: list[str] = []
            for table in self._sets:
                name = SETS[table][0]
                self._set_exists[table] = name in names
                if name in names:
                    members += parse_ipset(self._run(["ipset", "save", name]), name)

            parsed = empty_state()
            installed = {t: self._chain_lines(t, saves[t]) for t in self._tables}
            parsed["nat"] = parse_nat(installed["nat"])
            parsed["peers"] = {a: self.state.get("peers", {}).get(a, PeerEntry()) for a in members}
            present = {t: chains_present(saves[t]) >= {ours for _, ours in CHAINS[t]} for t in self._tables}
            for table, family in (("filter", 4), ("filter6", 6)):
                if table not in self._tables or not present[table]:
                    continue
                got = parse_filter(installed[table], family)
                for key in ("failsafe", "ports", "self"):
                    parsed[key].update(got[key])
                if table == "filter":
                    parsed["config"] = got["config"]
            for table in self._tables:
                have = jumps_present(saves[table], table)
                self._missing_jumps[table] = [j for j in CHAINS[table] if j not in have]

            # The installed text is trusted only when it is exactly what we render for it.
            expect = self._render(parsed)
            clean = {t: present[t] and expect[t] == _table_text(t, installed[t]) for t in self._tables}
            clean.update({t: bool(self._set_exists[t]) for t in self._sets})
            for table in self._last:
                self._last[table] = expect[table] if clean[table] else None
            drift = [t for t in self._last if not clean[t]]
            if drift and (known or any(present.values()) or any(self._set_exists.values())):
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
        """Update the in-memory tables, render everything, load the tables that changed,
        then end the conntrack entries of what the change revoked."""
        with self._lock:
            if not self._observed_once:
                self.observe()
            before = copy.deepcopy(self.state)
            apply_ops(self.state, ops)
            self.stats["applies"] += 1
            self._warn_policies()
            texts = self._render(self.state)
            for table in self._sets:
                members = texts[table].count("\n")
                if members > self.maxelem:
                    self.state = before
                    raise CapacityError(f"{members} peers do not fit the peer set {SETS[table][0]} "
                                        f"(maxelem {self.maxelem}, datapath.sizes.peers); nothing was applied")
            try:
                for table in self._sets:
                    self._apply_set(table, texts[table])
                for table in self._tables:
                    self._apply_table(table, texts[table])
            except Exception:
                self.state = before
                self._last = dict.fromkeys(self._last)
                raise
            self._flush_revoked(before, self.state)

    def _flush_revoked(self, before: Mapping[str, Mapping], after: Mapping[str, Mapping]) -> None:
        """Delete the kernel's conntrack entries of the peers the apply removed (their
        inbound flows) and of the NAT entries it removed or re-pointed (translated flows):
        the rules stop their next packets, whatever state conntrack had."""
        gone = [a for a, e in before.get("peers", {}).items() if a not in after.get("peers", {})]
        nat_after = after.get("nat", {})
        repointed = [o for o, e in before.get("nat", {}).items() if nat_after.get(o) != e]
        if not gone and not repointed:
            return
        try:
            n = self._flusher(gone, repointed)
        except DatapathError as exc:
            log.warning("iptables: could not flush conntrack entries of removed peers: %s", exc)
            return
        self.flushed += n
        log.info("iptables: ended %d conntrack entries of %d removed peers and %d removed NAT entries",
                 n, len(gone), len(repointed))

    def _warn_policies(self) -> None:
        """Group policies are enforced by the eBPF datapath only: the ``policy``,
        ``cidr_ident`` and ``names`` tables are kept in memory and ignored here."""
        enforced = bool(self.state.get("config", {}).get("policy_enforced"))
        if enforced and not self._policy_warned:
            log.warning("iptables: policies select this node, but group policies are enforced by the "
                        "ebpf datapath only; this node keeps the members / reject_all behaviour")
        self._policy_warned = enforced

    def _apply_set(self, table: str, text: str) -> None:
        if text == self._last[table]:
            self.stats["tables_skipped"] += 1
            return
        name, tmp, _family = SETS[table]
        members = text.split()
        script = ipset_script(members, self.maxelem, not self._set_exists[table], table)
        try:
            self._run(["ipset", "restore"], script)
        except DatapathError:
            # a temporary set left behind by a crash: remove it and try once more
            self._run(["ipset", "destroy", tmp], ok=(0, 1))
            self._run(["ipset", "restore"], script)
        self._set_exists[table] = True
        self._run(["ipset", "swap", tmp, name])
        self._run(["ipset", "destroy", tmp])
        self.stats["ipset_swaps"] += 1
        self._last[table] = text
        log.debug("iptables: peer set %s swapped in (%d members)", name, len(members))

    def _apply_table(self, table: str, text: str) -> None:
        missing = self._missing_jumps.get(table)
        if missing is None:
            have = jumps_present(self._save(table), table)
            missing = [j for j in CHAINS[table] if j not in have]
        if text == self._last[table] and not missing:
            self.stats["tables_skipped"] += 1
            return
        if table.startswith("filter"):
            self._carry_counters(table)
        body = text.removesuffix("COMMIT\n") + jump_text(table, missing) + "COMMIT\n"
        self._restore(table, body)
        self.stats["iptables_restores"] += 1
        self._missing_jumps[table] = []
        self._last[table] = text
        log.debug("iptables: %s table reloaded (%d rules)", table, body.count("\n-A "))

    def _filter_counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for table in ("filter", "filter6"):
            if table in self._tables:
                for reason, n in parse_counters(self._save(table, counters=True)).items():
                    out[reason] = out.get(reason, 0) + n
        return out

    def _carry_counters(self, table: str) -> None:
        """Reloading our chains resets their counters: keep what they counted."""
        try:
            now = parse_counters(self._save(table, counters=True))
        except DatapathError as exc:
            log.debug("iptables: counters before reload unavailable: %s", exc)
            return
        for reason, n in now.items():
            self._counter_base[reason] = self._counter_base.get(reason, 0) + n

    def counters(self) -> dict[str, int]:
        """Packets by reason (rule counters of our filter chains, both families, carried
        over reloads)."""
        with self._lock:
            now = self._filter_counters()
            return {r: self._counter_base.get(r, 0) + now.get(r, 0)
                    for r in sorted(set(now) | set(self._counter_base))}

    def rules(self) -> dict[str, str]:
        """The full rendered ruleset for the current in-memory state (for dry runs)."""
        with self._lock:
            return self._render(self.state)

    def close(self) -> None:
        """Nothing to release: the rules, sets and route stay and keep working."""
        return None

    def teardown(self) -> None:
        """Remove our jumps, chains, sets and the overlay route; touch nothing else."""
        with self._lock:
            remove_installed(self._run, self.interface if self.manage_route else None,
                             route=self.manage_route, tables=self._tables)
            self.state = empty_state()
            self._last = dict.fromkeys(self._last)
            self._missing_jumps = dict.fromkeys(self._tables)
            self._set_exists = dict.fromkeys(self._sets, False)
            self._counter_base = dict.fromkeys(REASONS, 0)

    @classmethod
    def remove(cls, interface: str | None = None, **_) -> None:
        """``overlay datapath teardown`` without a running datapath (no subnet needed)."""
        ipv6 = host_has_ipv6()
        check_environment(ipv6)

        def run(argv, stdin=None, ok=(0,)):
            rc, out, err = _subprocess_runner(argv, stdin)
            if rc not in tuple(ok):
                first = (err or out).strip().splitlines()
                raise DatapathError(f"{' '.join(argv)} failed ({rc}): {first[0] if first else ''}")
            return out

        remove_installed(run, interface, tables=RULE_TABLES if ipv6 else ("nat", "filter"))


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
    return "\n".join([f"*{IPT_TABLE[table]}", *lines, "COMMIT", ""])


def remove_installed(run, interface: str | None, route: bool = True,
                     tables: Iterable[str] = ("filter", "filter6", "nat")) -> None:
    """Remove jumps, chains, sets (in that order: rules reference the sets) and our routes."""
    for table in sorted(tables, key=lambda t: t == "nat"):  # filter chains first
        text = teardown_text(table, run([_tool(table, "save"), "-t", IPT_TABLE[table]]))
        if text:
            run([_tool(table, "restore"), "--noflush", "-w", "10"], text)
    names = set(run(["ipset", "list", "-n"]).split())
    for name in (IPSET, IPSET_TMP, IPSET6, IPSET6_TMP):
        if name in names:
            run(["ipset", "destroy", name])
    if route:
        remove_routes(interface)
    log.info("iptables: removed chains %s, %s, %s, sets %s, %s and the overlay route",
             CHAIN_NAT, CHAIN_IN, CHAIN_OUT, IPSET, IPSET6)


# --- conntrack (pyroute2, conntrack netlink) -------------------------------------------------------


def flush_conntrack(sources: Iterable[str], overlays: Iterable[str]) -> int:
    """Delete the kernel's conntrack entries whose original source is one of
    ``sources`` (flows those hosts opened to us) or whose original destination is
    one of ``overlays`` (flows we opened through a DNAT to them). Returns how many.

    One dump per address family, matched here: the kernel's dump filter by
    address does not match IPv6 tuples (pyroute2 0.9, kernel 6.18). Only called
    after an apply that removed something, so the full dump is rare."""
    import socket

    try:
        from pyroute2 import Conntrack
        from pyroute2.netlink.exceptions import NetlinkError
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise UnsupportedError(f"pyroute2 is not installed: {exc}") from None
    srcs = {ipaddress.ip_address(a) for a in sources}
    dsts = {ipaddress.ip_address(a) for a in overlays}
    deleted = 0
    for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
        if not any(a.version == version for a in srcs | dsts):
            continue
        try:
            ct = Conntrack(nfgen_family=family)
        except (OSError, NetlinkError) as exc:
            raise DatapathError(f"conntrack netlink: {exc}") from None
        try:
            try:
                entries = list(ct.dump_entries())
            except NetlinkError as exc:
                raise DatapathError(f"conntrack dump: {exc}") from None
            for entry in entries:
                orig = entry.tuple_orig
                if not (_ip_or_none(orig.saddr) in srcs or _ip_or_none(orig.daddr) in dsts):
                    continue
                try:
                    ct.delete(entry)
                    deleted += 1
                except NetlinkError as exc:
                    if exc.code != errno.ENOENT:  # gone meanwhile: fine
                        raise DatapathError(f"conntrack delete: {exc}") from None
        finally:
            ct.close()
    return deleted


def _ip_or_none(text):
    try:
        return ipaddress.ip_address(text)
    except (TypeError, ValueError):
        return None


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
