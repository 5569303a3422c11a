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
===========  ==================  ===========================================

Arrays have no deletion: deleting a ``ports`` word or a ``config`` key
writes 0, and ``read_all`` reports only non-zero ``ports`` words (both
``config`` keys are always reported).

Counter names (:meth:`MapSet.counters`, used by /status and /metrics):
drops as ``drop_`` + their ``abi.DROP_REASONS`` name (``drop_no_peer``,
``drop_not_allowed``, ``drop_malformed``, ``drop_policy``; the agent strips
the prefix for /status ``drops``, and the iptables backend uses the same
names); verdict passes as ``pass_`` + their ``abi.PASS_REASONS`` name
(``pass_failsafe``, ``pass_established``, ``pass_loopback``,
``pass_member``, ``pass_open_port``, ``pass_default``, ``pass_related``,
``pass_untouched``); the two translation counters keep their names
(``nat_egress``, ``nat_ingress``). Each is the sum over CPUs.
"""

from __future__ import annotations

import ipaddress
import logging
import os
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
# The maps this module reads and writes (the ring buffer is read elsewhere).
DATA_MAPS = (NAT, RNAT, PEERS, PORTS, FAILSAFE, CT, CFG, COUNTERS)

TABLE_MAP = {
    "nat": NAT, "rnat": RNAT, "peers": PEERS, "ports": PORTS, "failsafe": FAILSAFE,
    "config": CFG,
}
CONFIG_INDEX = {"reject_all": abi.CfgIndex.REJECT_ALL, "mode": abi.CfgIndex.MODE}

# Order in which apply() writes, so the datapath never sees a half state
# that is wider or more broken than either end: translations go last on
# the way in and first on the way out, and config (reject_all) is written
# once peers, ports and the failsafe are in place.
_PUT_ORDER = ("failsafe", "peers", "rnat", "ports", "nat", "config")
_DEL_FIRST = ("nat",)
_DEL_LAST = ("rnat", "peers", "ports", "failsafe")

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


def _addr(value, what: str) -> int:
    try:
        return abi.ip_to_be32(str(ipaddress.IPv4Address(value)))
    except (ValueError, TypeError):
        raise DatapathError(f"{what}: not an IPv4 address: {value!r}") from None


def _cidr(value) -> str:
    try:
        return str(ipaddress.IPv4Network(value, strict=True))
    except (ValueError, TypeError):
        raise DatapathError(f"failsafe: not an IPv4 network: {value!r}") from None


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
    if table == "failsafe":
        return bytes(abi.lpm_key(_cidr(key)))
    if table == "config":
        if key not in CONFIG_INDEX:
            raise DatapathError(f"config key: unknown {key!r} (known: {', '.join(CONFIG_INDEX)})")
        return _U32.pack(int(CONFIG_INDEX[key]))
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
    if table == "failsafe":
        k = abi.OvlLpmKey.from_buffer_copy(key)
        return f"{abi.be32_to_ip(k.addr)}/{k.prefixlen}", _U32.unpack(value[:4])[0]
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
    }


class MapSet:
    """One open fd per overlay map. Closing it leaves the maps in place."""

    def __init__(self, fds: Mapping[str, int]):
        missing = [m for m in DATA_MAPS if m not in fds]
        if missing:
            raise DatapathError(f"maps missing: {', '.join(missing)}")
        self._fds = dict(fds)
        self._info = {name: bpfsys.map_info(fd) for name, fd in self._fds.items()}

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
            return {name: self.get_cfg(idx) for name, idx in CONFIG_INDEX.items()}
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
        for name in (NAT, RNAT, PEERS, FAILSAFE, CT, PORTS):
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
        for table in ("nat", "rnat", "peers", "failsafe"):
            if not puts[table]:
                continue
            name = TABLE_MAP[table]
            info = self.info(name)
            current = set(bpfsys.keys(self.fd(name), info.key_size, info.max_entries + 1))
            after = (current - set(dels[table])) | {k for k, _ in puts[table]}
            if len(after) > info.max_entries:
                raise CapacityError(
                    f"{table}: {len(after)} entries would exceed {name} max_entries "
                    f"{info.max_entries}; nothing applied"
                )

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
