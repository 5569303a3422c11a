"""ABI 2 -> 3 conversion of pinned conntrack entries, ABI 3 -> 4 of NAT entries (pure;
the live upgrades are tests/integration/test_ebpf_upgrade.py and test_ebpf_upgrade4.py)."""

from __future__ import annotations

import struct

from overlay import abi
from overlay.datapath.ebpf import upgrade


def key(proto: int, sport: int = 80) -> bytes:
    return bytes(abi.OvlCtKey(abi.ip_to_be32("10.0.0.2"), abi.ip_to_be32("10.0.0.1"),
                              abi.port_to_be16(sport), abi.port_to_be16(40000), proto))


def v2(overlay: str | None, flags: int, seen: int) -> bytes:
    """An ABI-2 struct ovl_ct_val: {__u32 overlay, __u32 flags, __u64 last_seen_ns}."""
    return struct.pack("=IIQ", abi.ip_to_be32(overlay) if overlay else 0, flags, seen)


def test_only_translated_entries_are_carried_and_re_verified():
    nat = abi.CT_F_EGRESS | abi.CT_F_NAT
    items = [
        (key(6), v2("192.168.0.2", nat, 111)),            # a translated TCP flow
        (key(17, 53), v2("192.168.0.3", nat, 222)),        # a translated UDP flow
        (key(6, 443), v2(None, abi.CT_F_EGRESS, 333)),     # plain: maybe an inbound flow's reply
        (key(6, 444), v2(None, nat, 444)),                 # NAT flag without an overlay: junk
    ]
    out = upgrade.carry("ovl_ct", 2, 16, items)["ovl_ct"]
    assert [k for k, _ in out] == [key(6), key(17, 53)]
    tcp = abi.OvlCtVal.from_buffer_copy(out[0][1])
    udp = abi.OvlCtVal.from_buffer_copy(out[1][1])
    assert (abi.be32_to_ip(tcp.overlay), tcp.state, tcp.flags, tcp.last_seen_ns) == (
        "192.168.0.2", abi.CtState.ESTABLISHED, nat, 111)
    assert (udp.state, udp.last_seen_ns) == (abi.CtState.NEW, 222)
    assert tcp.nat_gen == udp.nat_gen == 0xFFFFFFFF  # never current: checked on the next reply
    assert len(out[0][1]) == 24


def test_abi3_nat_entries_go_to_their_slot_or_to_ext():
    from overlay.datapath.ebpf.codec import NatLayout

    layout = NatLayout(0x64400000, 256)  # 100.64.0.0, 256 slots: 100.64.0.0 .. 100.64.0.255
    val = [struct.pack("=4sI", bytes([10, 0, 0, i]), i % 2) for i in range(4)]
    items = [(bytes([100, 64, 0, 7]), val[0]), (bytes([100, 64, 1, 0]), val[1]),
             (bytes([192, 0, 2, 1]), val[2]), (bytes([100, 64, 0, 255]), val[3])]
    out = upgrade.carry("ovl_nat", 3, 8, items, layout)
    assert out == {
        "ovl_nat": [(struct.pack("=I", 7), val[0]), (struct.pack("=I", 255), val[3])],
        "ovl_nat_ext": [(bytes([100, 64, 1, 0]), val[1]), (bytes([192, 0, 2, 1]), val[2])],
    }
    assert upgrade.carry("ovl_nat", 3, 8, items) is None         # no layout: nothing known
    assert upgrade.carry("ovl_nat", 3, 12, items, layout) is None  # not the ABI-3 value
    assert upgrade.RETIRED_MAPS == ("ovl_rnat",)


def test_no_conversion_for_other_maps_or_versions():
    assert upgrade.carry("ovl_nat", 4, 8, [(b"k", b"v")]) is None
    assert upgrade.carry("ovl_ct", 3, 24, []) is None
    assert upgrade.carry("ovl_ct", 2, 24, []) is None  # not the ABI-2 layout
    assert "ovl_events" in upgrade.RECREATE_ON_ABI_CHANGE


def test_slots_of_another_subnet_size_are_re_indexed_by_address():
    from overlay.datapath.ebpf.codec import NatLayout

    old = NatLayout(0xC0A80000, 65536)   # 192.168.0.0/16
    new = NatLayout(0xC0A84000, 16384)   # 192.168.64.0/18
    val = [struct.pack("=4sI", bytes([10, 0, 0, i + 1]), 0) for i in range(3)]
    items = [(struct.pack("=I", 2), val[0]),                 # 192.168.0.2: outside the /18
             (struct.pack("=I", 70 * 256 + 9), val[1]),      # 192.168.70.9: slot 6 * 256 + 9
             (struct.pack("=I", 5), bytes(8)),               # an empty slot: nothing
             (struct.pack("=I", 64 * 256), val[2])]          # 192.168.64.0: slot 0
    assert upgrade.nat_relayout(items, old, new) == {
        "ovl_nat": [(struct.pack("=I", 6 * 256 + 9), val[1]), (struct.pack("=I", 0), val[2])],
        "ovl_nat_ext": [(bytes([192, 168, 0, 2]), val[0])],
    }
