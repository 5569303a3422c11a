"""``overlay why``: the verdict the ingress filter would give a new flow now, explained.

:func:`explain` walks the steps of ``bpf/lib/filter.h`` (DESIGN §5) in the program's
order, asking a lookup object for each map it needs: :class:`LiveMaps` asks the pinned
maps through :meth:`MapSet.lookup <overlay.datapath.ebpf.maps.MapSet.lookup>` (the
codec's encoders and decoders, the kernel's own LPM matching); the unit tests answer
from planned tables. The command is wired in :mod:`overlay.cli.node`; docs/policies.md
shows it in use.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from overlay import abi
from overlay.abi import FS_ALL, FS_SSH, PEER_F_MEMBER, SSH_PORT, proto_name


@dataclass
class Verdict:
    src: str
    dst: str
    proto: str
    port: int
    verdict: str = "allow"             # "allow" | "drop"
    reason: str = ""                   # the counter it lands in: failsafe, policy, member, ...
    rule: str = ""                     # what decided, in words
    policy: str | None = None          # the deciding policy (allow) or the selecting one (default-deny)
    policy_index: int | None = None
    enforced: bool = False             # a policy selects this node: default-deny
    audit: bool = False                # filter.mode audit: a drop is counted and reported, not done
    source: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passes(self) -> bool:
        return self.verdict == "allow" or self.audit

    def line(self) -> str:
        head = self.verdict if self.verdict == "allow" else ("would drop (audit mode: passes)" if self.audit else "drop")
        return f"{head}: {self.rule}"

    def to_dict(self) -> dict:
        return {
            "src": self.src, "dst": self.dst, "proto": self.proto, "port": self.port,
            "verdict": self.verdict, "passes": self.passes, "reason": self.reason, "rule": self.rule,
            "policy": self.policy, "policy_index": self.policy_index, "enforced": self.enforced,
            "audit": self.audit, "source": self.source, "notes": self.notes, "explanation": self.line(),
        }


class LiveMaps:
    """The lookups :func:`explain` needs, on the pinned maps (a ``MapSet``). Addresses
    may be IPv4 or IPv6: the map of each family is asked."""

    def __init__(self, maps):
        self.maps = maps

    def cfg(self, key: str) -> int:
        from overlay.datapath.ebpf.codec import CONFIG_INDEX

        return self.maps.get_cfg(CONFIG_INDEX[key])

    def own(self, src: str) -> bool:
        return self.maps.lookup("self", src) is not None

    def failsafe(self, src: str) -> int:
        return self.maps.lookup("failsafe", host_cidr(src)) or 0

    def peer(self, src: str) -> tuple[int, int] | None:
        entry = self.maps.lookup("peers", src)
        return None if entry is None else (entry.identity, entry.flags)

    def cidr_identity(self, src: str) -> int | None:
        return self.maps.lookup("cidr_ident", host_cidr(src))

    def policy(self, identity: int, proto: int, port: int) -> int | None:
        return self.maps.lookup("policy", (identity, proto, port, 16))

    def name(self, kind: str, number: int) -> str | None:
        return self.maps.lookup("names", (kind, number))

    def port_open(self, proto: int, port: int) -> bool:
        bit = abi.port_bit(proto, port)
        return bit is not None and bool((self.maps.lookup("ports", bit[0]) or 0) & bit[1])


def host_cidr(ip: str) -> str:
    """The host prefix of ``ip`` (an LPM key matching the longest prefix that holds it)."""
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


FRAGMENT_RULE = (
    "fragments share their datagram's verdict: the first fragment is judged like this flow; one "
    "without its whole L4 header (TCP 20 bytes, UDP/ICMP 8) only by the member, policy-port and "
    "open-port steps, never as established, else it is dropped (frag_short); later fragments pass "
    "only on the remembered verdict of their first one (else frag_orphan), and one starting inside "
    "what the first one carried is dropped (frag_short)"
)


def explain(src: str, dst: str, proto: int, port: int, live) -> Verdict:
    """The ingress verdict for a new flow, step by step as bpf/lib/filter.h decides it.

    ``live`` answers lookups (:class:`LiveMaps`, or a fake in tests)."""
    pname = proto_name(proto)
    ported = proto in abi.PROTO_SLOT  # tcp, udp: the protocols with ports
    if not ported:
        port = 0
    what = f"{pname}/{port}" if ported else pname
    v = Verdict(src, dst, pname, port)
    v.audit = live.cfg("mode") == abi.FilterMode.AUDIT
    v.enforced = bool(live.cfg("policy_enforced"))
    filtering = v.enforced or bool(live.cfg("reject_all"))
    v.notes.append("a reply of a flow this host initiated passes as established (conntrack, not "
                   "consulted here); flows other hosts initiate are judged on every packet, as below")
    if filtering:
        v.notes.append(FRAGMENT_RULE)
    six = ipaddress.ip_address(src).version == 6
    if proto == abi.IPPROTO_ICMPV6 and six:
        v.notes.append("ICMPv6 neighbour discovery (types 133-137 with hop limit 255) and MLD (130-132, "
                       "143 from a link-local source) always pass (pass_ndp); ICMPv6 errors about a "
                       "tracked or admitted flow pass as related")

    def done(verdict: str, reason: str, rule: str, **kw) -> Verdict:
        v.verdict, v.reason, v.rule = verdict, reason, rule
        for k, val in kw.items():
            setattr(v, k, val)
        return v

    if ipaddress.ip_address(src).is_loopback:
        return done("drop", "martian", f"martian: {src} is a loopback source, never legitimate from the wire")
    if live.own(src):
        return done("drop", "martian", f"martian: {src} is one of this host's own addresses (spoofed)")
    flags = live.failsafe(src)
    # policies: ICMPv6 is looked up as ICMP (a policy `proto: icmp` covers both)
    lookup_proto = abi.IPPROTO_ICMP if proto == abi.IPPROTO_ICMPV6 else proto

    peer = live.peer(src)
    member = peer is not None and bool(peer[1] & PEER_F_MEMBER)
    if member:
        identity = peer[0]
        groups = live.name("identity", identity)
        v.source = {"member": True, "identity": identity,
                    "groups": groups.split(",") if groups else []}
    else:
        v.source = {"member": False}
    cidr_ident = live.cidr_identity(src)
    if cidr_ident is not None:
        v.source["cidr"] = live.name("cidr", cidr_ident) or f"#{cidr_ident:#x}"
        v.source["cidr_identity"] = cidr_ident

    def who() -> str:
        if member:
            gs = v.source.get("groups")
            return f"{src} (member, groups {','.join(gs)})" if gs else f"{src} (member in no group)"
        if cidr_ident is not None:
            return f"{src} (in {v.source['cidr']})"
        return f"{src} (not a member)"

    if member and not v.enforced:
        # decided by the peers hash before the failsafe trie (docs/datapath.md, "The cheap path")
        return done("allow", "member", f"member: {who()} is an overlay member (no policy selects this node)")
    if flags & FS_ALL:
        return done("allow", "failsafe", f"failsafe: {src} is a registry/management address (never blocked)")
    if flags & FS_SSH and proto == abi.IPPROTO_TCP and port == SSH_PORT:
        return done("allow", "failsafe", f"failsafe: ssh from {src} (filter.ssh_whitelist, never blocked)")
    if v.enforced:
        for identity, how in ((peer[0] if member else None, "member"), (cidr_ident, "cidr")):
            if identity is None:
                continue
            index = live.policy(identity, lookup_proto, port)
            if index is None:
                continue
            pid = live.name("policy", index) or f"#{index}"
            rule = live.name("rule", index) or ""
            v.source["matched_by"] = how
            return done("allow", "policy", f"policy {pid} ({rule})" if rule else f"policy {pid}",
                        policy=pid, policy_index=index)
        default = live.cfg("policy_default")
        pid = live.name("policy", default) or f"#{default}"
        return done("drop", "policy",
                    f"policy default-deny (node selected by policy {pid}); no policy allows {what} from {who()}",
                    policy=pid, policy_index=default)

    if ported and live.port_open(proto, port):
        return done("allow", "open_port", f"open port {what} (filter.open_ports)")
    if live.cfg("reject_all"):
        return done("drop", "not_allowed",
                    f"reject_all: {who()} is not a member and {what} is not an open port")
    return done("allow", "default", "default accept (reject_all is off, no policy selects this node)")
