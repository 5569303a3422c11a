"""Encoding between the ops vocabulary (:mod:`overlay.ops`) and the map bytes of the ABI.

Pure (no kernel). :class:`~overlay.datapath.ebpf.maps.MapSet` uses it to read
and write the maps; ``overlay why`` and the bench use the same encoders.

===========  ==================  ===========================================
ops table    map                 encoding
===========  ==================  ===========================================
nat          ovl_nat (array)     u32 slot (NatLayout) -> ovl_nat_val{be32 real, flags}
             ovl_nat_ext (hash)  be32 overlay -> ovl_nat_val (addresses outside the slots)
peers        ovl_peers (hash)    IPv4: be32 real -> ovl_peer_val{identity, flags}
             ovl_peers6 (hash)   IPv6: ovl_addr6 -> ovl_peer_val
ports        ovl_ports (array)   u32 slot*PORT_WORDS+word -> u64 bitmap word
failsafe     ovl_failsafe (lpm)  IPv4: ovl_lpm_key{prefixlen, be32 addr} -> u32 flags
             ovl_failsafe6       IPv6: ovl_lpm6_key{prefixlen, addr[4]} -> u32 flags
config       ovl_cfg (array)     u32 enum ovl_cfg_index -> u64
policy       ovl_policy (lpm)    ovl_policy_key{48 + bits, identity, proto, 0,
                                 be16 first port} -> u32 policy index
cidr_ident   ovl_cidr_ident /6   like failsafe -> u32 CIDR identity
names        ovl_names (hash)    ovl_name_key{enum ovl_name_kind, number} ->
                                 ovl_name{NUL-terminated text}
self         ovl_self (hash)     ovl_addr6 (IPv4 mapped) -> u32 OVL_SELF_F_*
===========  ==================  ===========================================

A ``nat`` entry lives in the slot of ``ovl_nat`` at its overlay address's offset
from the overlay subnet's network address (:class:`NatLayout`: the base in
``OVL_CFG_NAT_BASE``, the slot count ``ovl_nat``'s max_entries) when that offset is
below the slot count, else in ``ovl_nat_ext``; an empty slot (real 0) is no entry, so
deleting an entry of the array writes the zero value.

An ops key names its family by its form ("10.0.0.1" or "fd00::1"), so the
tables with IPv6 entries (``peers``, ``failsafe``, ``cidr_ident``, ``self``)
keep one vocabulary for both families; :func:`map_of` says which map an entry
lives in.

Counter names (:func:`counter_name`, used by /status and /metrics): drops
as ``drop_`` + their ``abi.DROP_REASONS`` name; verdict passes as ``pass_``
+ their ``abi.PASS_REASONS`` name; the translation and conntrack counters
keep their names (``nat_egress``, ``nat_ingress``, ``ct_expired``,
``ct_nat_stale``). Since ABI 3 the eBPF datapath never counts
``pass_loopback`` (loopback sources on the uplink are ``drop_martian``); the
name stays for the iptables backend's ``-i lo`` rule.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
import sys
from array import array
from collections.abc import Mapping
from functools import partial
from itertools import compress, repeat
from operator import and_, attrgetter, is_, lt, not_, sub
from typing import NamedTuple

from overlay import abi
from overlay.errors import CapacityError, DatapathError
from overlay.ops import NatEntry, PeerEntry

# Map names of the ABI (build.MAPS lists the same names for the loader).
NAT, NAT_EXT, PEERS, PORTS, FAILSAFE, CT, CFG, COUNTERS, EVENTS = (
    "ovl_nat", "ovl_nat_ext", "ovl_peers", "ovl_ports", "ovl_failsafe", "ovl_ct", "ovl_cfg",
    "ovl_counters", "ovl_events",
)
CIDR_IDENT, POLICY, NAMES = "ovl_cidr_ident", "ovl_policy", "ovl_names"
PEERS6, FAILSAFE6, CIDR_IDENT6, SELF = "ovl_peers6", "ovl_failsafe6", "ovl_cidr_ident6", "ovl_self"
CT6, CT_IN, FRAG = "ovl_ct6", "ovl_ct_in", "ovl_frag"
SOCK = "ovl_sock"   # socket mode: per-socket reverse translation (written by the programs only)
CT_MAPS = (CT, CT6, CT_IN, FRAG)

# table -> (its IPv4 map, its IPv6 map or None)
TABLE_MAPS = {
    "nat": (NAT, None), "peers": (PEERS, PEERS6), "ports": (PORTS, None),
    "failsafe": (FAILSAFE, FAILSAFE6), "config": (CFG, None), "policy": (POLICY, None),
    "cidr_ident": (CIDR_IDENT, CIDR_IDENT6), "names": (NAMES, None), "self": (SELF, SELF),
}
TABLE_MAP = {t: m for t, (m, _) in TABLE_MAPS.items()}  # the first (IPv4) map of each table
# table -> every map holding its entries (nat: the array and the hash beside it)
STORE_MAPS = {t: (NAT, NAT_EXT) if t == "nat" else tuple(dict.fromkeys(m for m in ms if m))
              for t, ms in TABLE_MAPS.items()}
CONFIG_INDEX = {
    "reject_all": abi.CfgIndex.REJECT_ALL,
    "mode": abi.CfgIndex.MODE,
    "policy_enforced": abi.CfgIndex.POLICY_ENFORCED,
    "policy_default": abi.CfgIndex.POLICY_DEFAULT,
    "ct_tcp_syn_s": abi.CfgIndex.CT_TCP_SYN_S,
    "ct_tcp_established_s": abi.CfgIndex.CT_TCP_ESTABLISHED_S,
    "ct_tcp_fin_s": abi.CfgIndex.CT_TCP_FIN_S,
    "ct_tcp_rst_s": abi.CfgIndex.CT_TCP_RST_S,
    "ct_udp_s": abi.CfgIndex.CT_UDP_S,
    "ct_icmp_s": abi.CfgIndex.CT_ICMP_S,
    "frag_s": abi.CfgIndex.FRAG_S,
}
NAME_KIND = {
    "policy": abi.NameKind.POLICY, "rule": abi.NameKind.RULE,
    "identity": abi.NameKind.IDENTITY, "cidr": abi.NameKind.CIDR,
}
_KIND_NAME = {int(v): k for k, v in NAME_KIND.items()}
# The config size (datapath.sizes.<key>) of each map that can fill up.
SIZE_KEY = {
    NAT_EXT: "nat", PEERS: "peers", FAILSAFE: "failsafe", CT: "conntrack",
    POLICY: "policy", CIDR_IDENT: "cidr_ident", NAMES: "names", PEERS6: "peers6",
    FAILSAFE6: "failsafe6", CIDR_IDENT6: "cidr_ident6", SELF: "(fixed)", CT6: "conntrack6",
    CT_IN: "conntrack_in", FRAG: "frag",
}

_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")


def counter_name(reason: int) -> str | None:
    """The public name of a counter slot, or None for an unnamed slot."""
    if reason in abi.DROP_REASONS:
        return f"drop_{abi.DROP_REASONS[reason]}"
    name = abi.PASS_REASONS.get(reason)
    if name is None:
        return None
    return name if name.startswith(("nat_", "ct_", "sock_")) else f"pass_{name}"


def is_v6(text) -> bool:
    """An address or CIDR in IPv6 form (the family of an ops key)."""
    return isinstance(text, str) and ":" in text


def map_of(table: str, key) -> str:
    """The map holding ``table[key]``."""
    try:
        v4, v6 = TABLE_MAPS[table]
    except KeyError:
        raise DatapathError(f"unknown table {table!r}") from None
    return v6 if v6 is not None and is_v6(key) else v4


def _addr(value, what: str) -> int:
    # inet_pton takes only the strict dotted quad; it is ~20x cheaper than ipaddress,
    # which matters when a full sync encodes hundreds of thousands of addresses.
    try:
        return _U32.unpack(socket.inet_pton(socket.AF_INET, value))[0]
    except (OSError, TypeError):
        raise DatapathError(f"{what}: not an IPv4 address: {value!r}") from None


def _addr16(value, what: str) -> bytes:
    """The 16-byte form of an address of either family (IPv4 mapped)."""
    try:
        return bytes(abi.addr6(value))
    except (ValueError, TypeError):
        raise DatapathError(f"{what}: not an IP address: {value!r}") from None


def _cidr(value, table: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except (ValueError, TypeError):
        raise DatapathError(f"{table}: not an IP network: {value!r}") from None


def _u(value, bits: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise DatapathError(f"{what}: not a u{bits}: {value!r}")
    return value


# -- encoders (ops -> bytes) ----------------------------------------------------


def encode_key(table: str, key) -> bytes:
    if table == "nat" or (table == "peers" and not is_v6(key)):
        return _U32.pack(_addr(key, f"{table} key"))
    if table in ("peers", "self"):
        return _addr16(key, f"{table} key")
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
        cidr = _cidr(key, table)
        return bytes(abi.lpm6_key(cidr) if is_v6(cidr) else abi.lpm_key(cidr))
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
    if table == "peers":
        if not isinstance(value, PeerEntry):
            raise DatapathError(f"peers value: expected PeerEntry, got {value!r}")
        return bytes(
            abi.OvlPeerVal(_u(value.identity, 32, "peer identity"), _u(value.flags, 32, "peer flags"))
        )
    if table == "ports":
        return _U64.pack(0 if value is None else _u(value, 64, "ports word"))
    if table in ("failsafe", "self"):
        return _U32.pack(_u(value, 32, f"{table} flags"))
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


# -- bulk encoders (a whole table's entries -> one key and one value buffer) ------
#
# A full sync puts tens of thousands of nat and peers entries. Encoded one by one
# (encode_key/encode_value) they cost more than the kernel's batch write, so these
# build each map's buffers with C-level iterators (map, zip, compress, b"".join,
# array): no Python frame per entry. They accept exactly what the per-entry encoders
# accept or answer None ("encode one by one"), which then names the entry that is
# wrong; they take no IPv6 entry (peers6 goes one by one). An IPv4 address's bytes
# are its inet_pton form, the be32 of the ABI.

_PTON4 = partial(socket.inet_pton, socket.AF_INET)
_NAT_FLAGS = {False: _U32.pack(0), True: _U32.pack(abi.NAT_F_OVERRIDE)}
_REAL = attrgetter("real")
_OVERRIDE = attrgetter("override")
_IDENTITY, _FLAGS = attrgetter("identity"), attrgetter("flags")
_U32_ARRAY = next(t for t in "IL" if array(t).itemsize == 4)
_BULK_MAP = {"nat": NAT_EXT, "peers": PEERS}


class NatLayout(NamedTuple):
    """Where ``nat`` entries live: ``ovl_nat`` slot ``ntohl(overlay) - base`` when that is
    below ``slots``, else ``ovl_nat_ext`` (the programs' ovl_nat_lookup)."""

    base: int    # OVL_CFG_NAT_BASE: the overlay subnet's network address, host order
    slots: int   # ovl_nat's max_entries (abi.nat_slots of the subnet)

    @classmethod
    def of_subnet(cls, subnet: str) -> NatLayout:
        return cls(abi.nat_base(subnet), abi.nat_slots(subnet))

    def slot(self, overlay: str) -> int | None:
        """The slot of an overlay address, or None (ovl_nat_ext)."""
        offset = (int.from_bytes(_PTON4(overlay), "big") - self.base) & 0xFFFFFFFF
        return offset if offset < self.slots else None

    def address(self, slot: int) -> str:
        return socket.inet_ntop(socket.AF_INET, ((self.base + slot) & 0xFFFFFFFF).to_bytes(4, "big"))

    def offsets(self, be32_keys: bytes) -> list[int]:
        """The offset from ``base`` (mod 2**32) of every be32 address of a key buffer."""
        words = array(_U32_ARRAY, be32_keys)
        if sys.byteorder == "little":
            words.byteswap()  # network order -> host order
        return list(map(and_, map(sub, words, repeat(self.base)), repeat(0xFFFFFFFF)))


def _interleave(first: bytes, second: bytes) -> bytes:
    """Two buffers of u32 words as one of (first[i], second[i]) pairs (a struct of two u32)."""
    out = bytearray(len(first) + len(second))
    for j in range(4):  # byte j of every word: strided copies in C
        out[j::8] = first[j::4]
        out[4 + j::8] = second[j::4]
    return bytes(out)


def _nat_values(values: list) -> bytes | None:
    """The ovl_nat_val of every NatEntry back to back, or None (one is not encodable)."""
    if not all(map(isinstance, values, repeat(NatEntry))):
        return None
    try:
        return _interleave(b"".join(map(_PTON4, map(_REAL, values))),
                           b"".join(map(_NAT_FLAGS.__getitem__, map(_OVERRIDE, values))))
    except (OSError, TypeError, KeyError):
        return None


def encode_keys_bulk(table: str, keys: list) -> tuple[str, bytes] | None:
    """(map, the keys back to back) for the hash keys of ``nat`` (ovl_nat_ext) and IPv4
    ``peers``; else None."""
    if table not in _BULK_MAP:
        return None
    try:
        return _BULK_MAP[table], b"".join(map(_PTON4, keys))
    except (OSError, TypeError):
        return None


def encode_bulk(table: str, keys: list, values: list) -> tuple[str, bytes, bytes] | None:
    """(map, keys buffer, values buffer) for puts into ``ovl_nat_ext`` (``nat``, every key
    taken as outside the slots) or IPv4 ``peers``, the same bytes encode_key/encode_value
    give entry by entry; None when the table has no bulk encoder or an entry needs the
    per-entry path (to be refused by name)."""
    enc = encode_keys_bulk(table, keys)
    if enc is None:
        return None
    name, kbuf = enc
    try:
        if table == "nat":
            vbuf = _nat_values(values)
            if vbuf is None:
                return None
        else:
            if not all(map(isinstance, values, repeat(PeerEntry))):
                return None
            idents, flags = list(map(_IDENTITY, values)), list(map(_FLAGS, values))
            if bool in set(map(type, idents)) | set(map(type, flags)):  # refused one by one
                return None
            vbuf = _interleave(array(_U32_ARRAY, idents).tobytes(), array(_U32_ARRAY, flags).tobytes())
    except (OSError, TypeError, KeyError, OverflowError):
        return None
    return name, kbuf, vbuf


def encode_nat_bulk(layout: NatLayout, keys: list, values: list):
    """``nat`` puts and deletes (value None) of distinct keys in bulk: ``(puts, deletes)``
    as ``{map: (keys buffer, values buffer, count)}`` and ``{map: (keys buffer, count)}``.
    ``ovl_nat`` is keyed by slot index (host-order u32): its puts carry the entries' values,
    its deletes only the slots (``MapSet`` empties them by writing the zero value);
    ``ovl_nat_ext`` is keyed by be32 address. None when an entry needs the per-entry path."""
    try:
        kbuf = b"".join(map(_PTON4, keys))
    except (OSError, TypeError):
        return None
    gone = list(map(is_, values, repeat(None)))
    offsets = layout.offsets(kbuf)
    inside = list(map(lt, offsets, repeat(layout.slots)))
    if not any(gone) and all(inside):  # a full sync: every entry a put into its slot
        vbuf = _nat_values(values)
        return None if vbuf is None else (
            {NAT: (array(_U32_ARRAY, offsets).tobytes(), vbuf, len(keys))}, {})
    puts: dict[str, tuple[bytes, bytes, int]] = {}
    dels: dict[str, tuple[bytes, int]] = {}
    kept = list(map(not_, gone))
    if any(inside):
        put_at = list(map(and_, inside, kept))
        del_at = list(map(and_, inside, gone))
        idx = list(compress(offsets, put_at))
        if idx:
            vbuf = _nat_values(list(compress(values, put_at)))
            if vbuf is None:
                return None
            puts[NAT] = (array(_U32_ARRAY, idx).tobytes(), vbuf, len(idx))
        emptied = list(compress(offsets, del_at))
        if emptied:
            dels[NAT] = (array(_U32_ARRAY, emptied).tobytes(), len(emptied))
    if not all(inside):
        outside = list(map(not_, inside))
        ext_put = list(map(and_, outside, kept))
        ext_keys = list(compress(keys, ext_put))
        if ext_keys:
            enc = encode_bulk("nat", ext_keys, list(compress(values, ext_put)))
            if enc is None:
                return None
            puts[NAT_EXT] = (enc[1], enc[2], len(ext_keys))
        ext_del = list(compress(keys, map(and_, outside, gone)))
        if ext_del:
            dels[NAT_EXT] = (encode_keys_bulk("nat", ext_del)[1], len(ext_del))
    return puts, dels


def nat_slot_used(value: bytes) -> bool:
    """Whether an ``ovl_nat`` slot's value is an entry: an empty slot has real 0."""
    return value[:4] != b"\0\0\0\0"


def decode_nat_slots(layout: NatLayout, items: list[tuple[bytes, bytes]]) -> dict:
    """The ``nat`` entries of ``ovl_nat``'s slots (empty slots skipped)."""
    out = {}
    for key, value in items:
        if nat_slot_used(value):
            out[layout.address(_U32.unpack(key)[0])] = decode_item("nat", b"", value)[1]
    return out


# -- decoders (bytes -> ops) ----------------------------------------------------


def _lpm_text(key: bytes) -> str:
    if len(key) == ctypes.sizeof(abi.OvlLpm6Key):
        k6 = abi.OvlLpm6Key.from_buffer_copy(key)
        return f"{abi.words_to_ip(k6.addr, 6)}/{k6.prefixlen}"
    k = abi.OvlLpmKey.from_buffer_copy(key)
    return f"{abi.be32_to_ip(k.addr)}/{k.prefixlen}"


def decode_item(table: str, key: bytes, value: bytes):
    if table == "nat":  # the ovl_nat_ext form (be32 key); decode_nat_slots reads ovl_nat
        v = abi.OvlNatVal.from_buffer_copy(value)
        return (
            abi.be32_to_ip(_U32.unpack(key)[0]) if key else None,
            NatEntry(abi.be32_to_ip(v.real), bool(v.flags & abi.NAT_F_OVERRIDE)),
        )
    if table == "peers":
        v = abi.OvlPeerVal.from_buffer_copy(value)
        if len(key) == 16:
            addr = abi.words_to_ip(struct.unpack("=4I", key), 6)
        else:
            addr = abi.be32_to_ip(_U32.unpack(key)[0])
        return addr, PeerEntry(v.identity, v.flags)
    if table == "self":
        return abi.words_to_ip(struct.unpack("=4I", key)), _U32.unpack(value[:4])[0]
    if table == "ports":
        idx = _U32.unpack(key)[0]
        return (idx // abi.PORT_WORDS, idx % abi.PORT_WORDS), _U64.unpack(value)[0]
    if table in ("failsafe", "cidr_ident"):
        return _lpm_text(key), _U32.unpack(value[:4])[0]
    if table == "policy":
        k = abi.OvlPolicyKey.from_buffer_copy(key)
        bits = k.prefixlen - abi.POLICY_PORT_BITS
        return (k.identity, k.proto, abi.be16_to_port(k.port), bits), _U32.unpack(value[:4])[0]
    if table == "names":
        k = abi.OvlNameKey.from_buffer_copy(key)
        text = value.split(b"\0", 1)[0].decode(errors="replace")
        return (_KIND_NAME.get(k.kind, str(k.kind)), k.id), text
    raise DatapathError(f"unknown table {table!r}")


_STATE_NAMES = {int(s): s.name.lower() for s in abi.CtState}


def decode_ct(key: bytes, value: bytes) -> dict:
    """An ovl_ct or ovl_ct6 entry (told apart by the key size) as a dict."""
    if len(key) == ctypes.sizeof(abi.OvlCtKey):
        k4 = abi.OvlCtKey.from_buffer_copy(key)
        saddr, daddr, family = abi.be32_to_ip(k4.saddr), abi.be32_to_ip(k4.daddr), 4
        sport, dport, proto = k4.sport, k4.dport, k4.proto
    else:
        k6 = abi.OvlCt6Key.from_buffer_copy(key)
        family = k6.family
        saddr, daddr = abi.words_to_ip(k6.saddr, family), abi.words_to_ip(k6.daddr, family)
        sport, dport, proto = k6.sport, k6.dport, k6.proto
    v = abi.OvlCtVal.from_buffer_copy(value)
    return {
        "family": family,
        "saddr": saddr,
        "daddr": daddr,
        "sport": abi.be16_to_port(sport),
        "dport": abi.be16_to_port(dport),
        "proto": proto,
        "overlay": abi.be32_to_ip(v.overlay) if v.overlay else None,
        "state": _STATE_NAMES.get(v.state, str(v.state)),
        "flags": v.flags,
        "nat_gen": v.nat_gen,
        "last_seen_ns": v.last_seen_ns,
    }


def to_jsonable(state: Mapping[str, Mapping]) -> dict[str, dict]:
    """An ops state (read_all) rendered with JSON types only."""
    return {
        "nat": {k: {"real": v.real, "override": v.override} for k, v in state["nat"].items()},
        "peers": {k: {"identity": v.identity, "flags": v.flags} for k, v in state["peers"].items()},
        "ports": abi.ports_by_proto(state["ports"]),
        "failsafe": dict(state["failsafe"]),
        "config": dict(state["config"]),
        "policy": [
            {"identity": i, "proto": p, "port": port, "bits": b, "index": v}
            for (i, p, port, b), v in sorted(state.get("policy", {}).items())
        ],
        "cidr_ident": dict(state.get("cidr_ident", {})),
        "names": {f"{kind}:{n}": text for (kind, n), text in sorted(state.get("names", {}).items())},
        "self": dict(state.get("self", {})),
    }
