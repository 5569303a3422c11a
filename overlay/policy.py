"""Group policies -> the ``policy``, ``cidr_ident`` and ``names`` tables (pure).

DESIGN §4.2: a policy allows new flows from the members of a group (or from a
CIDR) to the members of a group, on a protocol and ports. A node that any
policy selects as ``to`` is default-deny for new inbound flows that no policy
(and no failsafe) allows. docs/policies.md explains the encoding; in short:

* **Member identities.** Every distinct set of groups among the applied peers
  gets a number: the first 31 bits of sha256 of the sorted, comma-joined set
  (bit 31 clear; 0 is never used, 1 is a member in no group). The number is
  stateless, so it is the same after a restart and on every node, and a
  change touches only the entries of what changed. Two sets whose hashes
  collide are resolved by linear probing in the sorted order of the sets.
* **CIDR identities.** The eBPF LPM trie answers with the longest matching
  prefix only. Each policy CIDR ``P`` gets a number with bit 31 set (hash of
  ``P``, probed the same way), and the ``policy`` entries of that number cover
  the policies of every policy CIDR that contains ``P``: for an address, the
  policy CIDRs holding it are exactly those that contain its longest match.
* **Policy index.** Each policy that selects this node gets a number (hash of
  its id, 0 never used), the value of its ``policy`` entries, reported in drop
  events and mapped back to the id through ``names``.
* **IPv6.** A member's IPv6 real address gets the identity of its group set
  (ovl_peers6); IPv6 policy CIDRs get CIDR identities like IPv4 ones (an
  IPv4 CIDR never contains an IPv6 one); ``proto: icmp`` covers ICMPv6.
* **Ports.** A range is cut into at most 30 aligned prefixes ``(first port,
  fixed bits)``; no ports means every port ``(0, 0)``; ICMP is ``(0, 16)``,
  looked up with port 0.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from overlay.abi import IDENTITY_CIDR, IDENTITY_MEMBER, NAME_MAX_BYTES, PROTO_NUMBERS
from overlay.model import Policy

MASK31 = 0x7FFFFFFF
PORT_BITS = 16

HashFn = Callable[[str], int]


def hash31(text: str) -> int:
    """The first 31 bits of sha256(text): stable across processes and hosts."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & MASK31


def assign_numbers(names: Iterable[str], *, hash_fn: HashFn = hash31, reserved: Iterable[int] = (),
                   tag: int = 0) -> dict[str, int]:
    """A number per distinct name: ``tag | (hash_fn(name) & MASK31)``, probing
    linearly (in sorted order of the names) past numbers already given or
    ``reserved``. Deterministic for a given set of names."""
    used = set(reserved)
    out: dict[str, int] = {}
    for name in sorted(set(names)):
        low = hash_fn(name) & MASK31
        for _ in range(MASK31 + 1):
            n = tag | low
            if n not in used:
                break
            low = (low + 1) & MASK31
        used.add(n)
        out[name] = n
    return out


def group_set_key(groups: Iterable[str]) -> str:
    """A set of groups as text: sorted, comma-joined ("" for none)."""
    return ",".join(sorted(set(groups)))


def identities(group_sets: Iterable[Iterable[str]], hash_fn: HashFn = hash31) -> dict[str, int]:
    """{group set key: member identity}; the empty set is IDENTITY_MEMBER (1)."""
    keys = {group_set_key(g) for g in group_sets}
    out = assign_numbers((k for k in keys if k), hash_fn=hash_fn, reserved=(0, IDENTITY_MEMBER))
    if "" in keys:
        out[""] = IDENTITY_MEMBER
    return out


def cidr_identities(cidrs: Iterable[str], hash_fn: HashFn = hash31) -> dict[str, int]:
    """{CIDR: CIDR identity (bit 31 set)}."""
    return assign_numbers(cidrs, hash_fn=hash_fn, tag=IDENTITY_CIDR, reserved=(IDENTITY_CIDR,))


def policy_indexes(policy_ids: Iterable[str], hash_fn: HashFn = hash31) -> dict[str, int]:
    """{policy id: index}; 0 means "no policy" in drop events and is never given."""
    return assign_numbers(policy_ids, hash_fn=hash_fn, reserved=(0,))


def port_prefixes(lo: int, hi: int) -> list[tuple[int, int]]:
    """The ports lo..hi as aligned prefixes ``(first port, fixed bits)``: a
    port p is covered by ``(s, b)`` iff ``p >> (16 - b) == s >> (16 - b)``.
    At most 30 prefixes; 0..65535 is ``[(0, 0)]``."""
    if not 0 <= lo <= hi <= 0xFFFF:
        raise ValueError(f"bad port range {lo}-{hi}")
    out = []
    while lo <= hi:
        size = (lo & -lo) if lo else 1 << PORT_BITS
        while lo + size - 1 > hi:
            size >>= 1
        out.append((lo, PORT_BITS - (size.bit_length() - 1)))
        lo += size
    return out


def policy_prefixes(policy: Policy) -> list[tuple[int, int]]:
    """The (first port, fixed bits) entries of one policy."""
    if policy.proto == "icmp":
        return [(0, PORT_BITS)]
    if not policy.ports:
        return [(0, 0)]
    out: list[tuple[int, int]] = []
    for lo, hi in policy.ports:
        out.extend(port_prefixes(lo, hi))
    return sorted(set(out))


def describe(policy: Policy) -> str:
    """The rule in words: ``tcp 5432,8000-8100 from group web to group db``."""
    if policy.proto == "icmp":
        what = "icmp"
    elif not policy.ports:
        what = f"{policy.proto} (all ports)"
    else:
        what = policy.proto + " " + ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in policy.ports)
    src = f"group {policy.src.group}" if policy.src.group is not None else str(policy.src.cidr)
    return f"{what} from {src} to group {policy.dst.group}"


def cut(text: str, limit: int = NAME_MAX_BYTES) -> str:
    """``text`` cut to ``limit`` UTF-8 bytes (at a character boundary, marked '...')."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode(errors="ignore") + "..."


@dataclass(frozen=True)
class PolicyTables:
    """What the planner adds for policies (see the module docstring)."""

    policy: dict[tuple[int, int, int, int], int] = field(default_factory=dict)
    cidr_ident: dict[str, int] = field(default_factory=dict)
    names: dict[tuple[str, int], str] = field(default_factory=dict)
    config: dict[str, int] = field(default_factory=dict)
    identity_of: dict[str, int] = field(default_factory=dict)  # group set key -> identity
    selected_by: tuple[str, ...] = ()                          # policy ids selecting this node
    index_of: dict[str, int] = field(default_factory=dict)     # policy id -> index


def _policies_by_id(policies: Iterable[Policy] | Mapping[str, Policy]) -> list[Policy]:
    """Policies sorted by id; a mapping's keys name policies that carry no id."""
    if isinstance(policies, Mapping):
        items = [p if p.policy_id else replace(p, policy_id=pid) for pid, p in policies.items()]
    else:
        items = list(policies)
    return sorted(items, key=lambda p: p.policy_id)


def _containing(cidr: str, present: set[tuple[int, int, int]]) -> list[str]:
    """The CIDRs of ``present`` ((IP version, network int, prefix length)) that
    contain ``cidr`` (of the same family: an IPv4 CIDR never holds an IPv6 one)."""
    net = ipaddress.ip_network(cidr)
    bits = net.max_prefixlen
    full = (1 << bits) - 1
    addr, plen = int(net.network_address), net.prefixlen
    make = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
    out = []
    for b in range(plen + 1):
        mask = (full << (bits - b)) & full
        if (net.version, addr & mask, b) in present:
            out.append(f"{make(addr & mask)}/{b}")
    return out


def plan_policies(self_groups: Iterable[str], peer_groups: Iterable[Iterable[str]],
                  policies: Iterable[Policy] | Mapping[str, Policy], *,
                  hash_fn: HashFn = hash31) -> PolicyTables:
    """The policy tables for a node in ``self_groups`` whose applied peers are in
    ``peer_groups`` (one group list per peer), under ``policies``."""
    mine = set(self_groups)
    ident = identities(list(peer_groups), hash_fn)
    selecting = [p for p in _policies_by_id(policies) if p.dst.group in mine]
    index = policy_indexes([p.policy_id for p in selecting], hash_fn)

    table: dict[tuple[int, int, int, int], int] = {}

    def add(identity: int, pol: Policy) -> None:
        proto = PROTO_NUMBERS[pol.proto]
        for start, bits in policy_prefixes(pol):
            # the same key from two policies: the first by id names it (both allow)
            table.setdefault((identity, proto, start, bits), index[pol.policy_id])

    by_group: dict[str, list[Policy]] = defaultdict(list)
    by_cidr: dict[str, list[Policy]] = defaultdict(list)
    for pol in selecting:
        if pol.src.group is not None:
            by_group[pol.src.group].append(pol)
        else:
            by_cidr[str(pol.src.cidr)].append(pol)

    for key, identity in ident.items():
        if not key:
            continue
        pols = sorted((p for g in key.split(",") for p in by_group.get(g, ())), key=lambda p: p.policy_id)
        for pol in pols:
            add(identity, pol)

    cidr_ident = cidr_identities(by_cidr, hash_fn)
    present = {(n.version, int(n.network_address), n.prefixlen) for n in map(ipaddress.ip_network, by_cidr)}
    for cidr, identity in cidr_ident.items():
        pols = sorted((p for c in _containing(cidr, present) for p in by_cidr[c]), key=lambda p: p.policy_id)
        for pol in pols:
            add(identity, pol)

    names: dict[tuple[str, int], str] = {}
    for pol in selecting:
        names[("policy", index[pol.policy_id])] = cut(pol.policy_id)
        names[("rule", index[pol.policy_id])] = cut(describe(pol))
    for key, identity in ident.items():
        if key:
            names[("identity", identity)] = cut(key)
    for cidr, identity in cidr_ident.items():
        names[("cidr", identity)] = cidr

    config = {}
    if selecting:
        config = {"policy_enforced": 1, "policy_default": index[selecting[0].policy_id]}
    return PolicyTables(table, cidr_ident, names, config, ident,
                        tuple(p.policy_id for p in selecting), index)
