"""Carrying map contents across an ABI change of the pinned datapath.

The loader (:mod:`overlay.datapath.ebpf.datapath`) re-creates a pinned map
whose geometry changed and refills it with what it held when the layout is
the same. For maps whose layout an ABI version changed, this module says
what can be carried and converts it (docs/datapath.md, "Upgrading to ABI 3"):

* ABI 2 -> 3, ``ovl_ct``: the key is unchanged, the value grew (state, NAT
  generation). ABI 2 let the uplink egress create an entry for every packet
  the host sent, replies of inbound connections included, so a plain entry
  cannot be told apart from one an inbound flow made: only translated
  entries (``OVL_CT_F_NAT``: created by the ovl0 egress, so flows this host
  opened) are carried, as ESTABLISHED (TCP) with a NAT generation that makes
  each re-check its NAT entry on its next reply. Plain entries are dropped:
  an untranslated flow this host opened to a non-member under
  ``reject_all`` recovers with its next outgoing UDP datagram or ICMP echo;
  such a TCP connection loses its replies and must reconnect.
* ``ovl_events`` (the drop event grew IPv6 addresses) is re-created empty.

And ("Upgrading to ABI 4"):

* ABI 3 -> 4, ``ovl_nat``: the hash (be32 overlay -> ``ovl_nat_val``) became an
  array of slots indexed by the overlay address's offset in the overlay subnet,
  with the hash ``ovl_nat_ext`` for the addresses outside the slots. Every entry
  is carried: into its slot when the layout has one for it, else into
  ``ovl_nat_ext``, so that translated flows survive the reload before the
  agent's first apply.
* ``ovl_rnat`` (never read by the programs) is unpinned (:data:`RETIRED_MAPS`).
"""

from __future__ import annotations

import socket
import struct

from overlay import abi
from overlay.datapath.ebpf.codec import NatLayout, nat_slot_used

# Maps re-created empty when the pinned ABI version is another one.
RECREATE_ON_ABI_CHANGE = ("ovl_events",)
# Maps of an older ABI that this one no longer has: unpinned on load (our names only).
RETIRED_MAPS = ("ovl_rnat",)

_V2_CT_VAL = struct.Struct("=IIQ")  # overlay, flags, last_seen_ns
_NAT_VAL = 8                        # struct ovl_nat_val: real, flags (unchanged since ABI 2)
_STALE_GEN = 0xFFFFFFFF             # never the current generation: re-verify on the next reply


def carry(name: str, old_abi: int, old_value_size: int, items: list[tuple[bytes, bytes]],
          nat_layout: NatLayout | None = None) -> dict[str, list[tuple[bytes, bytes]]] | None:
    """The entries of map ``name`` converted from ABI ``old_abi``, by the map they
    go to now, or None when this module has no conversion (the caller then carries
    entries only if the layout is unchanged). ``nat_layout``: the new ovl_nat's."""
    if name == "ovl_ct" and old_abi == 2 and old_value_size == _V2_CT_VAL.size:
        return {name: ct_from_v2(items)}
    if name == "ovl_nat" and old_abi in (2, 3) and old_value_size == _NAT_VAL and nat_layout is not None:
        return nat_from_v3(items, nat_layout)
    return None


def nat_relayout(items: list[tuple[bytes, bytes]], old: NatLayout, new: NatLayout) -> dict[str, list]:
    """ABI 4's ovl_nat slots of layout ``old`` (a subnet of another size) in layout ``new``:
    each non-empty slot by its overlay address, as :func:`nat_from_v3` places it."""
    return nat_from_v3([(socket.inet_aton(old.address(struct.unpack("=I", k)[0])), v)
                        for k, v in items if nat_slot_used(v)], new)


def nat_from_v3(items: list[tuple[bytes, bytes]], layout: NatLayout) -> dict[str, list]:
    """ABI 3's ovl_nat hash entries as ovl_nat slots (host-order u32 index) and
    ovl_nat_ext entries (the same key and value)."""
    slots, ext = [], []
    for key, value in items:
        slot = layout.slot(socket.inet_ntop(socket.AF_INET, key[:4]))
        if slot is None:
            ext.append((key, value))
        else:
            slots.append((struct.pack("=I", slot), value))
    return {"ovl_nat": slots, "ovl_nat_ext": ext}


def ct_from_v2(items: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    out = []
    for key, value in items:
        overlay, flags, seen = _V2_CT_VAL.unpack(value[: _V2_CT_VAL.size])
        if not flags & abi.CT_F_NAT or not overlay:
            continue
        proto = abi.OvlCtKey.from_buffer_copy(key).proto
        state = abi.CtState.ESTABLISHED if proto == 6 else abi.CtState.NEW
        new = abi.OvlCtVal(overlay, _STALE_GEN, seen, int(state), abi.CT_F_EGRESS | abi.CT_F_NAT)
        out.append((key, bytes(new)))
    return out

