"""Typed access to the overlay's eBPF maps, in the vocabulary of overlay.ops.

:class:`MapSet` holds one fd per map (opened from bpffs pins or duplicated
from a ``bcc.BPF``) and translates between the ops tables and the ABI
structures through :mod:`overlay.datapath.ebpf.codec` (its table says which
map and encoding each table uses; tables with IPv6 entries span two maps).

Arrays have no deletion: deleting a ``ports`` word or a ``config`` key
writes 0, and ``read_all`` reports only non-zero ``ports`` words and
``config`` keys (``reject_all`` and ``mode`` are always reported). The ``nat``
table spans the ``ovl_nat`` array (a slot per overlay subnet address; deleting
writes the zero value, empty slots are not reported) and the ``ovl_nat_ext``
hash (:class:`~overlay.datapath.ebpf.codec.NatLayout`, read from the maps).

After an apply that wrote or deleted ``nat`` entries, :meth:`MapSet.apply`
bumps ``OVL_CFG_NAT_GEN`` (after the writes: a translated conntrack entry
then re-checks its NAT entry on its next reply; docs/datapath.md).

:meth:`MapSet.sweep` deletes expired conntrack, marker and fragment entries,
a bounded number per call, resuming where the last call stopped.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Iterable, Mapping
from itertools import compress, groupby, repeat
from operator import attrgetter, is_, not_

from overlay import abi
from overlay.datapath.ebpf import batch, bpfsys
from overlay.datapath.ebpf.batch import Batch
from overlay.datapath.ebpf.codec import (  # noqa: F401  (re-exported: the historic home of these names)
    CFG,
    CIDR_IDENT,
    CIDR_IDENT6,
    CONFIG_INDEX,
    COUNTERS,
    CT,
    CT6,
    CT_IN,
    CT_MAPS,
    EVENTS,
    FAILSAFE,
    FAILSAFE6,
    FRAG,
    NAME_KIND,
    NAMES,
    NAT,
    NAT_EXT,
    PEERS,
    PEERS6,
    POLICY,
    PORTS,
    SELF,
    SIZE_KEY,
    SOCK,
    STORE_MAPS,
    TABLE_MAP,
    TABLE_MAPS,
    NatLayout,
    counter_name,
    decode_ct,
    decode_item,
    decode_nat_slots,
    encode_bulk,
    encode_key,
    encode_keys_bulk,
    encode_nat_bulk,
    encode_value,
    map_of,
    nat_slot_used,
    to_jsonable,
)
from overlay.errors import CapacityError, DatapathError
from overlay.ops import TABLES, Op

log = logging.getLogger(__name__)

# The maps this module reads and writes (the ring buffer is read elsewhere).
DATA_MAPS = (NAT, NAT_EXT, PEERS, PORTS, FAILSAFE, CT, CFG, COUNTERS, CIDR_IDENT, POLICY, NAMES,
             PEERS6, FAILSAFE6, CIDR_IDENT6, SELF, CT6, CT_IN, FRAG, SOCK)
_CONFIG_ALWAYS = ("reject_all", "mode")   # reported even when 0

# Order in which apply() writes, so the datapath never sees a half state
# that is wider or more broken than either end: own addresses (martians)
# first in and last out; translations go last on the way in and first on the
# way out; a policy entry is written before the identity that uses it
# (peers, cidr_ident) and deleted after it; config (reject_all,
# policy_enforced) is written once everything else is in place.
_PUT_ORDER = ("self", "failsafe", "names", "policy", "cidr_ident", "peers", "ports", "nat", "config")
_DEL_FIRST = ("nat",)
_DEL_LAST = ("peers", "ports", "failsafe", "cidr_ident", "policy", "names", "self")
# The maps that can overflow, by table (ovl_nat, an array of every subnet address, cannot).
_CAPACITY_MAPS = {t: (NAT_EXT,) if t == "nat" else STORE_MAPS[t]
                  for t in ("nat", "peers", "failsafe", "policy", "cidr_ident", "names", "self")}
_FILL_MAPS = (NAT, NAT_EXT, PEERS, PEERS6, FAILSAFE, FAILSAFE6, CT, CT6, CT_IN, FRAG, PORTS, POLICY,
              CIDR_IDENT, CIDR_IDENT6, NAMES, SELF, SOCK)

_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")


def _u(value, bits: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise DatapathError(f"{what}: not a u{bits}: {value!r}")
    return value


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
        self._sweep_cursor: dict[str, bytes | None] = {}

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

    def nat_layout(self) -> NatLayout:
        """Where ``nat`` entries live, as the programs see it: the base the loader wrote
        into OVL_CFG_NAT_BASE and ovl_nat's slot count."""
        return NatLayout(self.get_cfg(abi.CfgIndex.NAT_BASE), self.info(NAT).max_entries)

    def set_nat_base(self, base: int) -> None:
        """Write OVL_CFG_NAT_BASE (the loader, at start). When entries would be misplaced
        (another base pinned: the overlay subnet moved; or an ovl_nat_ext entry that now
        has a slot: the subnet grew), every NAT entry is written again in the new layout:
        each keeps its overlay address."""
        old = self.get_cfg(abi.CfgIndex.NAT_BASE)
        new = NatLayout(base, self.info(NAT).max_entries)
        ext = dict(decode_item("nat", k, v) for k, v in self._items(NAT_EXT))
        if old == base and all(new.slot(overlay) is None for overlay in ext):
            return
        used = [(k, v) for k, v in self._items(NAT) if nat_slot_used(v)]
        entries = {**decode_nat_slots(NatLayout(old, new.slots), used), **ext}  # as read_table
        if entries:
            log.warning("overlay subnet changed (NAT base %s -> %s): moving %d NAT entries",
                        NatLayout(old, 0).address(0), new.address(0), len(entries))
            # emptied where they are (not where a layout would look for them)
            batch.update_pairs(self.fd(NAT), [(k, _ZERO_NAT) for k, _ in used], 4, len(_ZERO_NAT))
            batch.delete_keys(self.fd(NAT_EXT), [encode_key("nat", o) for o in ext], 4)
        self.set_cfg(abi.CfgIndex.NAT_BASE, base)
        if entries:
            self.apply([Op("nat", k, v) for k, v in entries.items()])

    # -- observe -------------------------------------------------------------

    def _items(self, name: str) -> list[tuple[bytes, bytes]]:
        return bpfsys.items(self.fd(name), self.info(name))

    def lookup(self, table: str, key):
        """The value of ``key`` in ``table`` (ops vocabulary, the map of its family, the
        kernel's own LPM matching for a CIDR key), or None."""
        name, raw_key = _locate(table, key, self.nat_layout() if table == "nat" else None)
        info = self.info(name)
        raw = bpfsys.lookup(self.fd(name), raw_key, info.key_size, info.value_size)
        if raw is None or (name == NAT and not nat_slot_used(raw)):
            return None
        return decode_item(table, raw_key, raw)[1]

    def read_table(self, table: str) -> dict:
        if table == "config":
            out = {}
            for name, idx in CONFIG_INDEX.items():
                value = self.get_cfg(idx)
                if value or name in _CONFIG_ALWAYS:
                    out[name] = value
            return out
        out = {}
        if table == "nat":
            out = decode_nat_slots(self.nat_layout(), self._items(NAT))
        for name in STORE_MAPS[table]:
            if name == NAT:
                continue
            for k, v in self._items(name):
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
        """The entries of ovl_ct and ovl_ct6 (flows this host initiated)."""
        out = []
        for name in (CT, CT6):
            left = None if limit is None else limit - len(out)
            if left is not None and left <= 0:
                break
            out += [decode_ct(k, v) for k, v in bpfsys.items(self.fd(name), self.info(name), left)]
        return out

    def fill(self) -> dict[str, dict[str, int]]:
        """{map: {"entries": n, "max_entries": m}} for the maps that fill up
        (hash tables, LPM tries, conntrack, markers, fragments; ``ovl_ports``
        counts non-zero words)."""
        out = {}
        for name in _FILL_MAPS:
            info = self.info(name)
            if name in (PORTS, NAT):  # arrays: the words or slots in use
                n = sum(1 for _, v in self._items(name) if any(v[:8]))
            else:
                n = len(bpfsys.keys(self.fd(name), info.key_size, info.max_entries))
            out[name] = {"entries": n, "max_entries": info.max_entries}
        return out

    # -- expiry --------------------------------------------------------------

    def lifetimes_ns(self) -> dict[str, int]:
        """The lifetimes the programs use now (ovl_cfg; 0 means the default), in ns."""
        def get(index: int, default_s: int) -> int:
            return (self.get_cfg(index) or default_s) * 1_000_000_000

        c = abi.CfgIndex
        return {
            "tcp_syn": get(c.CT_TCP_SYN_S, abi.CT_DEFAULT_TCP_SYN_S),
            "tcp_established": get(c.CT_TCP_ESTABLISHED_S, abi.CT_DEFAULT_TCP_ESTABLISHED_S),
            "tcp_fin": get(c.CT_TCP_FIN_S, abi.CT_DEFAULT_TCP_FIN_S),
            "tcp_rst": get(c.CT_TCP_RST_S, abi.CT_DEFAULT_TCP_RST_S),
            "udp": get(c.CT_UDP_S, abi.CT_DEFAULT_UDP_S),
            "icmp": get(c.CT_ICMP_S, abi.CT_DEFAULT_ICMP_S),
            "frag": get(c.FRAG_S, abi.CT_DEFAULT_FRAG_S),
        }

    def sweep(self, budget: int = 4096, now_ns: int | None = None) -> dict[str, int]:
        """Delete expired entries of ovl_ct, ovl_ct6, ovl_ct_in and ovl_frag:
        about ``budget`` entries looked at per map and call, resuming where the
        previous call stopped (one batch read and one batch delete per map).
        Returns {map: entries deleted}."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) if now_ns is None else now_ns
        life = self.lifetimes_ns()
        cursors = self._sweep_cursor
        out = {}
        for name in CT_MAPS:
            items, cursors[name] = bpfsys.scan(self.fd(name), self.info(name), cursors.get(name),
                                               budget)
            dead = [k for k, v in items if _expired(name, k, v, now, life)]
            batch.delete_keys(self.fd(name), dead, self.info(name).key_size)
            out[name] = len(dead)
        return out

    # -- apply ---------------------------------------------------------------

    def apply(self, ops: Iterable[Op]) -> None:
        """Apply ops (last op per key wins, as applying them in order would).

        Everything is encoded and checked against capacity first: a bad
        value raises DatapathError and an overflow raises CapacityError,
        both before anything is written. Puts go out per map in one
        update batch, deletes in one delete batch (overlay.datapath.ebpf.batch),
        their buffers built in bulk where a table allows (codec.encode_bulk)."""
        puts, dels = _encode(ops, self.nat_layout)
        self._check_capacity(puts, dels)

        for table in _DEL_FIRST:
            self._delete(table, dels)
        if puts.get(SELF):  # widen the hint first: a new own address is never missed
            hint = self.get_cfg(abi.CfgIndex.SELF_HINT)
            for k in puts[SELF].key_list(self.info(SELF).key_size):
                hint |= 1 << abi.self_hint_bit(struct.unpack("=4I", k))
            self.set_cfg(abi.CfgIndex.SELF_HINT, hint)
        for table in _PUT_ORDER:
            self._put(table, puts)
        for table in _DEL_LAST:
            self._delete(table, dels)
        if any(d.get(m) for d in (puts, dels) for m in (NAT, NAT_EXT)):
            # after the writes: an entry verified before them must be checked again
            self.set_cfg(abi.CfgIndex.NAT_GEN, (self.get_cfg(abi.CfgIndex.NAT_GEN) + 1) & 0xFFFFFFFF)
        if puts.get(SELF) or dels.get(SELF):
            self.update_self_hint()

    def update_self_hint(self) -> int:
        """Recompute OVL_CFG_SELF_HINT from ovl_self (a few entries): the programs
        look an arriving source up in ovl_self only when its bit is set. Set before
        a put (a wider hint is harmless) and narrowed after a delete."""
        hint = 0
        for key in bpfsys.keys(self.fd(SELF), self.info(SELF).key_size, abi.SELF_MAX):
            hint |= 1 << abi.self_hint_bit(struct.unpack("=4I", key))
        self.set_cfg(abi.CfgIndex.SELF_HINT, hint)
        return hint

    def _check_capacity(self, puts, dels) -> None:
        """Refuse the whole apply (CapacityError, nothing written) when any map
        would overflow; the message names every map that would.

        The maps are listed only when an upper bound of their size (the last exact
        count plus every put since) says the apply might not fit, and the keys
        compared only when the listed count plus the puts does not fit.
        """
        over = []
        for table, names in _CAPACITY_MAPS.items():
            for name in names:
                if not puts.get(name):
                    continue
                info = self.info(name)
                bound = self._count_bound.get(name)
                if bound is not None and bound + len(puts[name]) <= info.max_entries:
                    self._count_bound[name] = bound + len(puts[name])
                    continue
                current = batch.count_keys(self.fd(name), info, info.max_entries + 1)
                if len(current) + puts[name].count <= info.max_entries:  # fits even if all new
                    self._count_bound[name] = len(current) + puts[name].count
                    continue
                gone = dels[name].key_list(info.key_size) if name in dels else ()
                after = (current - set(gone)) | set(puts[name].key_list(info.key_size))
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

    def _put(self, table: str, puts: dict[str, Batch]) -> None:
        for name in STORE_MAPS[table]:
            items = puts.get(name)
            if not items:
                continue
            info = self.info(name)
            batch.update(self.fd(name), items, info.key_size, info.value_size)
            log.debug("%s: %d put", name, items.count)

    def _delete(self, table: str, dels: dict[str, Batch]) -> None:
        for name in STORE_MAPS[table]:
            keys = dels.get(name)
            if not keys:
                continue
            info = self.info(name)
            if name == NAT:  # an array: its slots are emptied by writing the zero value
                batch.update(self.fd(name), Batch(keys.keys, _ZERO_NAT * keys.count, keys.count),
                             info.key_size, info.value_size)
            else:
                batch.delete(self.fd(name), keys, info.key_size)
            log.debug("%s: %d deleted", name, keys.count)


_TABLE, _KEY, _VALUE = attrgetter("table"), attrgetter("key"), attrgetter("value")


def _locate(table: str, key, layout: NatLayout | None) -> tuple[str, bytes]:
    """(map, key bytes) of ``table[key]``: a ``nat`` key in the slots of ``layout`` is
    its slot index in ovl_nat, else its ovl_nat_ext key."""
    raw = encode_key(table, key)
    if table == "nat":
        slot = layout.slot(key)
        if slot is not None:
            return NAT, _U32.pack(slot)
        return NAT_EXT, raw
    return map_of(table, key), raw


_ZERO_NAT = bytes(8)  # struct ovl_nat_val with real 0: an empty ovl_nat slot


def raw_op(op: Op, layout: NatLayout) -> tuple[str, bytes, bytes | None]:
    """(map, key bytes, value bytes or None = delete) of one op: what a single
    update or delete syscall writes (a delete in ovl_nat's slots is a write of zero)."""
    name, key = _locate(op.table, op.key, layout)
    if op.value is None:
        return name, key, _ZERO_NAT if name == NAT else None
    return name, key, encode_value(op.table, op.value)


def _encode(ops: Iterable[Op], nat_layout) -> tuple[dict[str, Batch], dict[str, Batch]]:
    """({map: puts}, {map: deletes}) of ``ops``, the last op per key winning.

    Ops come grouped by table (diff emits them so): a table whose ops form one run
    of distinct keys is encoded in bulk when the codec can, its puts and its deletes
    apart (no Python frame per entry); anything else, entry by entry. ``nat_layout``
    is called (once) when there are ``nat`` ops: a delete of an ovl_nat slot is a put
    of the zero value."""
    runs: dict[str, list[list[Op]]] = {}
    layout = None
    for table, run in groupby(ops, key=_TABLE):
        if table == "nat" and layout is None:
            layout = nat_layout()
        if table not in TABLE_MAPS:
            raise DatapathError(f"unknown table {table!r}")
        runs.setdefault(table, []).append(list(run))
    puts: dict[str, list[tuple[bytes, bytes]]] = {}
    dels: dict[str, list[bytes]] = {}
    bulk_puts: dict[str, Batch] = {}
    bulk_dels: dict[str, Batch] = {}
    for table, parts in runs.items():
        if len(parts) == 1 and table not in ("ports", "config"):
            keys = list(map(_KEY, parts[0]))
            values = list(map(_VALUE, parts[0]))
            if len(set(keys)) == len(keys) and _bulk(table, keys, values, bulk_puts, bulk_dels,
                                                     layout):
                continue
        final: dict = {}
        for run in parts:
            for op in run:
                final.pop(op.key, None)  # keep the position of the last op
                final[op.key] = op.value
        for key, value in final.items():
            if table in ("ports", "config"):  # arrays: a delete writes 0
                name, k = map_of(table, key), encode_key(table, key)
            else:
                name, k = _locate(table, key, layout)
            if value is None and table not in ("ports", "config"):  # an ovl_nat slot too (_delete)
                dels.setdefault(name, []).append(k)
            else:
                puts.setdefault(name, []).append((k, encode_value(table, value)))
    return ({**{m: Batch.of_pairs(p) for m, p in puts.items()}, **bulk_puts},
            {**{m: Batch.of_keys(k) for m, k in dels.items()}, **bulk_dels})


def _bulk(table: str, keys: list, values: list, puts: dict[str, Batch],
          dels: dict[str, Batch], layout: NatLayout | None) -> bool:
    """Encode one table's puts and deletes in bulk into ``puts`` and ``dels``; False
    (nothing added) when the codec cannot."""
    if table == "nat":
        enc = encode_nat_bulk(layout, keys, values)
        if enc is None:
            return False
        puts.update({m: Batch(*p) for m, p in enc[0].items()})
        dels.update({m: Batch(k, b"", n) for m, (k, n) in enc[1].items()})
        return True
    gone = list(map(is_, values, repeat(None)))
    if any(gone):
        kept = list(map(not_, gone))
        del_keys, keys, values = list(compress(keys, gone)), list(compress(keys, kept)), list(compress(values, kept))
    else:
        del_keys = []
    put = encode_bulk(table, keys, values) if keys else None
    gone_enc = encode_keys_bulk(table, del_keys) if del_keys else None
    if (keys and put is None) or (del_keys and gone_enc is None):
        return False
    if put is not None:
        puts[put[0]] = Batch(put[1], put[2], len(keys))
    if gone_enc is not None:
        dels[gone_enc[0]] = Batch(gone_enc[1], b"", len(del_keys))
    return True


def _expired(name: str, key: bytes, value: bytes, now: int, life: Mapping[str, int]) -> bool:
    """Is this entry of a sweepable map past its lifetime (as the programs judge it)?"""
    if name == FRAG:
        seen, limit = abi.OvlFragVal.from_buffer_copy(value).ts_ns, life["frag"]
    elif name == CT_IN:
        proto = abi.OvlCt6Key.from_buffer_copy(key).proto
        seen = _U64.unpack_from(value)[0]
        limit = life["udp"] if proto == 17 else life["tcp_established"]
    else:
        v = abi.OvlCtVal.from_buffer_copy(value)
        proto = key[12] if len(key) == 16 else abi.OvlCt6Key.from_buffer_copy(key).proto
        seen, limit = v.last_seen_ns, _ct_lifetime(proto, v.state, life)
    return _age_ns(now, seen) > limit


def _age_ns(now: int, seen: int) -> int:
    """``now - seen`` as the programs compute it: a signed 64-bit difference (a ``seen``
    a little after ``now``, refreshed meanwhile, is a negative age: live)."""
    age = (now - seen) & 0xFFFF_FFFF_FFFF_FFFF
    return age - (1 << 64) if age >= 1 << 63 else age


def _ct_lifetime(proto: int, state: int, life: Mapping[str, int]) -> int:
    if proto == 6:
        return {
            abi.CtState.ESTABLISHED: life["tcp_established"],
            abi.CtState.CLOSING: life["tcp_fin"],
            abi.CtState.CLOSED: life["tcp_rst"],
        }.get(state, life["tcp_syn"])
    return life["udp"] if proto == 17 else life["icmp"]
