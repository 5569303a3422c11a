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
"""

from __future__ import annotations

import struct

from overlay import abi

# Maps re-created empty when the pinned ABI version is another one.
RECREATE_ON_ABI_CHANGE = ("ovl_events",)

_V2_CT_VAL = struct.Struct("=IIQ")  # overlay, flags, last_seen_ns
_STALE_GEN = 0xFFFFFFFF             # never the current generation: re-verify on the next reply


def carry(name: str, old_abi: int, old_value_size: int,
          items: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]] | None:
    """The entries of map ``name`` converted from ABI ``old_abi``, or None
    when this module has no conversion (the caller then carries entries only
    if the layout is unchanged)."""
    if name == "ovl_ct" and old_abi == 2 and old_value_size == _V2_CT_VAL.size:
        return ct_from_v2(items)
    return None


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

