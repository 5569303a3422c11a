"""Typed access to the overlay's eBPF maps, in the vocabulary of overlay.ops.

:class:`MapSet` holds one fd per map (opened from bpffs pins or duplicated
from a ``bcc.BPF``) and translates between the ops tables and the ABI
structures of :mod:`overlay.datapath.ebpf.abi` (the only place layouts are
described):

===========  ==================  ===========================================
ops table    map                 encoding
===========  ==================  ===========================================
nat          ovl_nat (hash)      be32 overlay -> ovl_nat_val{be32 real, flags}
rnat         ovl_rnat (hash)     be32 real -> be32 overlay
peers        ovl_peers (hash)    be32 real -> ovl_peer_val{identity, flags}
ports        ovl_ports (array)   u32 slot*PORT_WORDS+word -> u64 bitmap word
failsafe     ovl_failsafe (lpm)  ovl_lpm_key{prefixlen, be32 addr} -> u32 flags
config       ovl_cfg (array)     u32 enum ovl_cfg_index -> u64
policy       ovl_policy (lpm)    ovl_policy_key{48 + bits, identity, proto, 0,
                                 be16 first port} -> u32 policy index
cidr_ident   ovl_cidr_ident      ovl_lpm_key -> u32 CIDR identity
             (lpm)
names        ovl_names (hash)    ovl_name_key{enum ovl_name_kind, number} ->
                                 ovl_name{NUL-terminated text}
===========  ==================  ===========================================

Arrays have no deletion: deleting a ``ports`` word or a ``config`` key
writes 0, and ``read_all`` reports only non-zero ``ports`` words
(``reject_all`` and ``mode`` are always reported, ``policy_enforced`` and
``policy_default`` only when non-zero, as the planner writes them).

Counter names (:meth:`MapSet.counters`, used by /status and /metrics):
drops as ``drop_`` + their ``abi.DROP_REASONS`` name (``drop_no_peer``,
``drop_not_allowed``, ``drop_malformed``, ``drop_policy``; the agent strips
the prefix for /status ``drops``, and the iptables backend uses the same
names); verdict passes as ``pass_`` + their ``abi.PASS_REASONS`` name
(``pass_failsafe``, ``pass_established``, ``pass_loopback``,
``pass_member``, ``pass_open_port``, ``pass_default``, ``pass_related``,
``pass_untouched``, ``pass_policy``); the two translation counters keep their names
(``nat_egress``, ``nat_ingress``). Each is the sum over CPUs.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Iterable, Mapping

from overlay.datapath.ebpf import abi, bpfsys
from overlay.errors import CapacityError, DatapathError
from overlay.ops import TABLES, NatEntry, Op, PeerEntry

log = logging.getLogger(__name__)

# Map names of the ABI (build.MAPS lists the same names for the loader).
NAT, RNAT, PEERS, PORTS, FAILSAFE, CT, CFG, COUNTERS, EVENTS = (
    "ovl_nat", "ovl_rnat", "ovl_peers", "ovl_ports", "ovl_failsafe", "ovl_ct", "ovl_cfg",
    "ovl_counters", "ovl_events",
)
CIDR_IDENT, POLICY, NAMES = "ovl_cidr_ident", "ovl_policy", "ovl_names"
# The maps this module reads and writes (the ring buffer is read elsewhere).
DATA_MAPS = (NAT, RNAT, PEERS, PORTS, FAILSAFE, CT, CFG, COUNTERS, CIDR_IDENT, POLICY, NAMES)

TABLE_MAP = {
    "nat": NAT, "rnat": RNAT, "peers": PEERS, "ports": PORTS, "failsafe": FAILSAFE,
    "config": CFG, "policy": POLICY, "cidr_ident": CIDR_IDENT, "names": NAMES,
}
CONFIG_INDEX = {
    "reject_all": abi.CfgIndex.REJECT_ALL,
    "mode": abi.CfgIndex.MODE,
    "policy_enforced": abi.CfgIndex.POLICY_ENFORCED,
    "policy_default": abi.CfgIndex.POLICY_DEFAULT,
}
_CONFIG_ALWAYS = ("reject_all", "mode")   # reported even when 0
NAME_KIND = {
    "policy": abi.NameKind.POLICY, "rule": abi.NameKind.RULE,
    "identity": abi.NameKind.IDENTITY, "cidr": abi.NameKind.CIDR,
}
_KIND_NAME = {int(v): k for k, v in NAME_KIND.items()}
# The config size (datapath.sizes.<key>) of each map that can fill up.
SIZE_KEY = {
    NAT: "nat", RNAT: "nat", PEERS: "peers", FAILSAFE: "failsafe", CT: "conntrack",
    POLICY: "policy", CIDR_IDENT: "cidr_ident", NAMES: "names",
}

# Order in which apply() writes, so the datapath never sees a half state
# that is wider or more broken than either end: translations go last on
# the way in and first on the way out; a policy entry is written before the
# identity that uses it (peers, cidr_ident) and deleted after it; config
# (reject_all, policy_enforced) is written once everything else is in place.
_PUT_ORDER = ("failsafe", "names", "policy", "cidr_ident", "peers", "rnat", "ports", "nat", "config")
_DEL_FIRST = ("nat",)
_DEL_LAST = ("rnat", "peers", "ports", "failsafe", "cidr_ident", "policy", "names")
_CAPACITY_TABLES = ("nat", "rnat", "peers", "failsafe", "policy", "cidr_ident", "names")

_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")


def counter_name(reason: int) -> str | None:
    """The public name of a counter slot, or None for an unnamed slot."""
    if reason in abi.DROP_REASONS:
        return f"drop_{abi.DROP_REASONS[reason]}"
    name = abi.PASS_REASONS.get(reason)
    if name is None:
        return None
    return name if name.startswith("nat_") else f"pass_{name}"


_U32 = struct.Struct("=I")


def _addr(value, what: str) -> int:
    # inet_pton takes only the strict dotted quad; it is ~20x cheaper than ipaddress,
    # which matters when a full sync encodes hundreds of thousands of addresses.
    try:
        return _U32.unpack(socket.inet_pton(socket.AF_INET, value))[0]
    except (OSError, TypeError):
        raise DatapathError(f"{what}: not an IPv4 address: {value!r}") from None


def _cidr(value, table: str = "failsafe") -> str:
    try:
        return str(ipaddress.IPv4Network(value, strict=True))
    except (ValueError, TypeError):
        raise DatapathError(f"{table}: not an IPv4 network: {value!r}") from None


def _u(value, bits: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise DatapathError(f"{what}: not a u{bits}: {value!r}")
    return value


# -- encoders (ops -> bytes) ----------------------------------------------------


def encode_key(table: str, key) -> bytes:
    if table in ("nat", "rnat", "peers"):
        return _U32.pack(_addr(key, f"{table} key"))
    if table == "ports":
        try:
            slot, word = key
        except (TypeError, ValueError):
            raise DatapathError(f"ports key: expected (slot, word), got {key!r}") from None
        if slot not in (abi.PortSlot.TCP, abi.PortSlot.UDP) or not (
            isinstance(word, int) and 0 <= word < abi.PORT_WORDS
        ):
            raise CapacityError(
                f"ports key {key!r}: outside ovl_ports ({int(abi.PortSlot.SLOTS)} slots of "
                f"{abi.PORT_WORDS} words)"
            )
        return _U32.pack(int(slot) * abi.PORT_WORDS + word)
    if table in ("failsafe", "cidr_ident"):
        return bytes(abi.lpm_key(_cidr(key, table)))
    if table == "config":
        if key not in CONFIG_INDEX:
            raise DatapathError(f"config key: unknown {key!r} (known: {', '.join(CONFIG_INDEX)})")
        return _U32.pack(int(CONFIG_INDEX[key]))
    if table == "policy":
        try:
            identity, proto, port, bits = key
        except (TypeError, ValueError):
            raise DatapathError(f"policy key: expected (identity, proto, port, bits), got {key!r}") from None
        _u(identity, 32, "policy identity")
        _u(proto, 8, "policy proto")
        _u(port, 16, "policy port")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= 16:
            raise DatapathError(f"policy key {key!r}: port bits must be 0..16")
        if port & ((1 << (16 - bits)) - 1):
            raise DatapathError(f"policy key {key!r}: port {port} has bits past the first {bits}")
        return bytes(abi.policy_key(identity, proto, port, bits))
    if table == "names":
        try:
            kind, number = key
            kind_id = NAME_KIND[kind]
        except (TypeError, ValueError, KeyError):
            raise DatapathError(
                f"names key: expected (kind, number) with kind in {', '.join(NAME_KIND)}, got {key!r}"
            ) from None
        return bytes(abi.OvlNameKey(int(kind_id), _u(number, 32, "names number")))
    raise DatapathError(f"unknown table {table!r}")


def encode_value(table: str, value) -> bytes:
    """The map value for a put; ``value=None`` (delete) only for arrays (0)."""
    if table == "nat":
        if isinstance(value, str):
            value = NatEntry(value)
        if not isinstance(value, NatEntry):
            raise DatapathError(f"nat value: expected NatEntry, got {value!r}")
        flags = abi.NAT_F_OVERRIDE if value.override else 0
        return bytes(abi.OvlNatVal(_addr(value.real, "nat real"), flags))
    if table == "rnat":
        return _U32.pack(_addr(value, "rnat value"))
    if table == "peers":
        if not isinstance(value, PeerEntry):
            raise DatapathError(f"peers value: expected PeerEntry, got {value!r}")
        return bytes(
            abi.OvlPeerVal(_u(value.identity, 32, "peer identity"), _u(value.flags, 32, "peer flags"))
        )
    if table == "ports":
        return _U64.pack(0 if value is None else _u(value, 64, "ports word"))
    if table == "failsafe":
        return _U32.pack(_u(value, 32, "failsafe flags"))
    if table == "config":
        return _U64.pack(0 if value is None else _u(value, 64, "config value"))
    if table == "policy":
        return _U32.pack(_u(value, 32, "policy index"))
    if table == "cidr_ident":
        return _U32.pack(_u(value, 32, "cidr identity"))
    if table == "names":
        if not isinstance(value, str):
            raise DatapathError(f"names value: expected text, got {value!r}")
        raw = value.encode()
        if len(raw) >= abi.NAME_LEN or b"\0" in raw:
            raise DatapathError(f"names value: {len(raw)} bytes (at most {abi.NAME_LEN - 1}, no NUL)")
        return bytes(abi.OvlName(raw))
    raise DatapathError(f"unknown table {table!r}")


# -- decoders (bytes -> ops) ----------------------------------------------------


def decode_item(table: str, key: bytes, value: bytes):
    if table == "nat":
        v = abi.OvlNatVal.from_buffer_copy(value)
        return (
            abi.be32_to_ip(_U32.unpack(key)[0]),
            NatEntry(abi.be32_to_ip(v.real), bool(v.flags & abi.NAT_F_OVERRIDE)),
        )
    if table == "rnat":
        return abi.be32_to_ip(_U32.unpack(key)[0]), abi.be32_to_ip(_U32.unpack(value)[0])
    if table == "peers":
        v = abi.OvlPeerVal.from_buffer_copy(value)
        return abi.be32_to_ip(_U32.unpack(key)[0]), PeerEntry(v.identity, v.flags)
    if table == "ports":
        idx = _U32.unpack(key)[0]
        return (idx // abi.PORT_WORDS, idx % abi.PORT_WORDS), _U64.unpack(value)[0]
    if table in ("failsafe", "cidr_ident"):
        k = abi.OvlLpmKey.from_buffer_copy(key)
        return f"{abi.be32_to_ip(k.addr)}/{k.prefixlen}", _U32.unpack(value[:4])[0]
    if table == "policy":
        k = abi.OvlPolicyKey.from_buffer_copy(key)
        bits = k.prefixlen - abi.POLICY_PORT_BITS
        return (k.identity, k.proto, abi.be16_to_port(k.port), bits), _U32.unpack(value[:4])[0]
    if table == "names":
        k = abi.OvlNameKey.from_buffer_copy(key)
        text = value.split(b"\0", 1)[0].decode(errors="replace")
        return (_KIND_NAME.get(k.kind, str(k.kind)), k.id), text
    raise DatapathError(f"unknown table {table!r}")


def decode_ct(key: bytes, value: bytes) -> dict:
    k = abi.OvlCtKey.from_buffer_copy(key)
    v = abi.OvlCtVal.from_buffer_copy(value)
    return {
        "saddr": abi.be32_to_ip(k.saddr),
        "daddr": abi.be32_to_ip(k.daddr),
        "sport": abi.be16_to_port(k.sport),
        "dport": abi.be16_to_port(k.dport),
        "proto": k.proto,
        "overlay": abi.be32_to_ip(v.overlay) if v.overlay else None,
        "flags": v.flags,
        "last_seen_ns": v.last_seen_ns,
    }


def ports_to_list(words: Mapping[tuple[int, int], int]) -> dict[str, list[int]]:
    """{(slot, word): bitmap} -> {"tcp": [ports], "udp": [ports]} (for humans and JSON)."""
    out: dict[str, list[int]] = {"tcp": [], "udp": []}
    names = {int(abi.PortSlot.TCP): "tcp", int(abi.PortSlot.UDP): "udp"}
    for (slot, word), bits in sorted(words.items()):
        for bit in range(64):
            if bits >> bit & 1:
                out[names.get(slot, str(slot))].append(word * 64 + bit)
    return out


def to_jsonable(state: Mapping[str, Mapping]) -> dict[str, dict]:
    """An ops state (read_all) rendered with JSON types only."""
    return {
        "nat": {k: {"real": v.real, "override": v.override} for k, v in state["nat"].items()},
        "rnat": dict(state["rnat"]),
        "peers": {k: {"identity": v.identity, "flags": v.flags} for k, v in state["peers"].items()},
        "ports": ports_to_list(state["ports"]),
        "failsafe": dict(state["failsafe"]),
        "config": dict(state["config"]),
        "policy": [
            {"identity": i, "proto": p, "port": port, "bits": b, "index": v}
            for (i, p, port, b), v in sorted(state.get("policy", {}).items())
        ],
        "cidr_ident": dict(state.get("cidr_ident", {})),
        "names": {f"{kind}:{n}": text for (kind, n), text in sorted(state.get("names", {}).items())},
    }


class MapSet:
    """One open fd per overlay map. Closing it leaves the maps in place."""

    def __init__(self, fds: Mapping[str, int]):
        missing = [m for m in DATA_MAPS if m not in fds]
        if missing:
            raise DatapathError(f"maps missing: {', '.join(missing)}")
        self._fds = dict(fds)
        self._info = {name: bpfsys.map_info(fd) for name, fd in self._fds.items()}
        # Upper bound of each map's entry count, so the capacity check lists a map
        # only when an apply could come near its capacity (keeps one change O(1)).
        self._count_bound: dict[str, int] = {}

    # -- opening -------------------------------------------------------------

    @classmethod
    def from_pinned(cls, pin_dir: str, names: Iterable[str] = DATA_MAPS) -> MapSet:
        fds: dict[str, int] = {}
        try:
            for name in names:
                fds[name] = bpfsys.obj_get(os.path.join(pin_dir, name))
            return cls(fds)
        except BaseException:
            for fd in fds.values():
                bpfsys.close(fd)
            raise

    @classmethod
    def from_bpf(cls, bpf, names: Iterable[str] = DATA_MAPS) -> MapSet:
        """Duplicate the fds of a ``bcc.BPF``'s tables (independent lifetimes)."""
        fds: dict[str, int] = {}
        try:
            for name in names:
                fds[name] = os.dup(bpf[name.encode()].map_fd)
            return cls(fds)
        except KeyError as exc:
            for fd in fds.values():
                bpfsys.close(fd)
            raise DatapathError(f"compiled programs have no map {exc}") from None
        except BaseException:
            for fd in fds.values():
                bpfsys.close(fd)
            raise

    def close(self) -> None:
        for fd in self._fds.values():
            bpfsys.close(fd)
        self._fds.clear()

    def fd(self, name: str) -> int:
        try:
            return self._fds[name]
        except KeyError:
            raise DatapathError(f"map {name} is not open") from None

    def info(self, name: str) -> bpfsys.MapInfo:
        self.fd(name)
        return self._info[name]

    # -- config --------------------------------------------------------------

    def get_cfg(self, index: int) -> int:
        info = self.info(CFG)
        raw = bpfsys.lookup(self.fd(CFG), _U32.pack(int(index)), 4, info.value_size)
        return 0 if raw is None else _U64.unpack(raw[:8])[0]

    def set_cfg(self, index: int, value: int) -> None:
        info = self.info(CFG)
        bpfsys.update(
            self.fd(CFG), _U32.pack(int(index)), _U64.pack(_u(value, 64, "cfg")), 4,
            info.value_size,
        )

    # -- observe -------------------------------------------------------------

    def _items(self, name: str) -> list[tuple[bytes, bytes]]:
        return bpfsys.items(self.fd(name), self.info(name))

    def read_table(self, table: str) -> dict:
        if table == "config":
            out = {}
            for name, idx in CONFIG_INDEX.items():
                value = self.get_cfg(idx)
                if value or name in _CONFIG_ALWAYS:
                    out[name] = value
            return out
        out = {}
        for k, v in self._items(TABLE_MAP[table]):
            key, value = decode_item(table, k, v)
            if table == "ports" and not value:
                continue
            out[key] = value
        return out

    def read_all(self) -> dict[str, dict]:
        """The state the maps hold, table by table (see overlay.ops)."""
        return {table: self.read_table(table) for table in TABLES}

    def counters(self) -> dict[str, int]:
        info = self.info(COUNTERS)
        slot = (info.value_size + 7) & ~7
        ncpu = info.value_buffer_size // slot
        sums: dict[int, int] = {}
        for k, v in self._items(COUNTERS):
            idx = _U32.unpack(k)[0]
            sums[idx] = sum(_U64.unpack_from(v, c * slot)[0] for c in range(ncpu))
        out = {}
        for reason in list(abi.DROP_REASONS) + list(abi.PASS_REASONS):
            out[counter_name(reason)] = sums.get(int(reason), 0)
        return out

    def ct_entries(self, limit: int | None = None) -> list[dict]:
        info = self.info(CT)
        return [decode_ct(k, v) for k, v in bpfsys.items(self.fd(CT), info, limit)]

    def fill(self) -> dict[str, dict[str, int]]:
        """{map: {"entries": n, "max_entries": m}} for the maps that fill up
        (hash tables, the LPM trie, conntrack; ``ovl_ports`` counts non-zero words)."""
        out = {}
        for name in (NAT, RNAT, PEERS, FAILSAFE, CT, PORTS, POLICY, CIDR_IDENT, NAMES):
            info = self.info(name)
            if name == PORTS:
                n = sum(1 for _, v in self._items(name) if _U64.unpack(v[:8])[0])
            else:
                n = len(bpfsys.keys(self.fd(name), info.key_size, info.max_entries))
            out[name] = {"entries": n, "max_entries": info.max_entries}
        return out

    # -- apply ---------------------------------------------------------------

    def apply(self, ops: Iterable[Op]) -> None:
        """Apply ops (last op per key wins, as applying them in order would).

        Everything is encoded and checked against capacity first: a bad
        value raises DatapathError and an overflow raises CapacityError,
        both before anything is written. Puts go out per map in one
        update batch, deletes in one delete batch."""
        final: dict[tuple[str, object], object] = {}
        for op in ops:
            if op.table not in TABLE_MAP:
                raise DatapathError(f"unknown table {op.table!r}")
            final.pop((op.table, op.key), None)  # keep the position of the last op
            final[(op.table, op.key)] = op.value
        puts: dict[str, list[tuple[bytes, bytes]]] = {t: [] for t in TABLE_MAP}
        dels: dict[str, list[bytes]] = {t: [] for t in TABLE_MAP}
        for (table, key), value in final.items():
            k = encode_key(table, key)
            if value is None and table not in ("ports", "config"):
                dels[table].append(k)
            else:
                puts[table].append((k, encode_value(table, value)))
        self._check_capacity(puts, dels)

        for table in _DEL_FIRST:
            self._delete(table, dels[table])
        for table in _PUT_ORDER:
            self._put(table, puts[table])
        for table in _DEL_LAST:
            self._delete(table, dels[table])

    def _check_capacity(self, puts, dels) -> None:
        """Refuse the whole apply (CapacityError, nothing written) when any map
        would overflow; the message names every map that would.

        The maps are listed only when an upper bound of their size (the last exact
        count plus every put since) says the apply might not fit.
        """
        over = []
        for table in _CAPACITY_TABLES:
            if not puts[table]:
                continue
            name = TABLE_MAP[table]
            info = self.info(name)
            bound = self._count_bound.get(name)
            if bound is not None and bound + len(puts[table]) <= info.max_entries:
                self._count_bound[name] = bound + len(puts[table])
                continue
            current = set(bpfsys.keys(self.fd(name), info.key_size, info.max_entries + 1))
            after = (current - set(dels[table])) | {k for k, _ in puts[table]}
            if len(after) > info.max_entries:
                self._count_bound.pop(name, None)
                over.append(
                    f"{table}: {len(after)} entries would exceed {name} max_entries "
                    f"{info.max_entries} (datapath.sizes.{SIZE_KEY[name]})"
                )
            else:
                self._count_bound[name] = len(after)
        if over:
            raise CapacityError("; ".join(over) + "; nothing applied")

    def _put(self, table: str, items: list[tuple[bytes, bytes]]) -> None:
        if not items:
            return
        name = TABLE_MAP[table]
        info = self.info(name)
        bpfsys.update_batch(self.fd(name), items, info.key_size, info.value_size)
        log.debug("%s: %d put", name, len(items))

    def _delete(self, table: str, keys: list[bytes]) -> None:
        if not keys:
            return
        name = TABLE_MAP[table]
        bpfsys.delete_batch(self.fd(name), keys, self.info(name).key_size)
        log.debug("%s: %d deleted", name, len(keys))
