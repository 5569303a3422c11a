"""codec.encode_bulk / encode_keys_bulk / encode_nat_bulk: the bytes of a whole table at
once (pure), and NatLayout, where a NAT entry lives.

The expected buffers are built here by hand from the ABI layout (be32 addresses
from the dotted quad's octets, u32 words in native order), not from the encoders
under test; the per-entry encoders must agree too (both are the datapath's)."""

from __future__ import annotations

import struct

import pytest

from overlay import abi
from overlay.datapath.ebpf.codec import (
    NAT,
    NAT_EXT,
    PEERS,
    NatLayout,
    decode_nat_slots,
    encode_bulk,
    encode_key,
    encode_keys_bulk,
    encode_nat_bulk,
    encode_value,
)
from overlay.ops import NatEntry, PeerEntry


def be32(addr: str) -> bytes:
    return bytes(int(o) for o in addr.split("."))


OVERLAYS = [f"100.64.{i // 250}.{i % 250 + 1}" for i in range(600)]
REALS = [f"10.{i % 7}.{i // 250}.{i % 250 + 1}" for i in range(600)]


def test_nat_ext_and_peers_in_bulk_are_the_abi_bytes():
    nat_vals = [NatEntry(r, override=i % 5 == 0) for i, r in enumerate(REALS)]
    name, keys, vals = encode_bulk("nat", OVERLAYS, nat_vals)
    assert name == NAT_EXT
    assert keys == b"".join(be32(o) for o in OVERLAYS)
    assert vals == b"".join(be32(r) + struct.pack("=I", abi.NAT_F_OVERRIDE if i % 5 == 0 else 0)
                            for i, r in enumerate(REALS))
    assert vals == b"".join(encode_value("nat", v) for v in nat_vals)

    peer_vals = [PeerEntry(identity=i * 977 + 1, flags=i % 4) for i in range(600)]
    name, keys, vals = encode_bulk("peers", REALS, peer_vals)
    assert name == PEERS
    assert keys == b"".join(encode_key("peers", r) for r in REALS) == b"".join(map(be32, REALS))
    assert vals == b"".join(struct.pack("=II", i * 977 + 1, i % 4) for i in range(600))

    assert encode_keys_bulk("nat", OVERLAYS) == (NAT_EXT, b"".join(map(be32, OVERLAYS)))
    assert encode_bulk("nat", [], []) == (NAT_EXT, b"", b"")


@pytest.mark.parametrize("table,keys,values", [
    ("nat", ["100.64.0.1", "not-an-address"], [NatEntry("10.0.0.1"), NatEntry("10.0.0.2")]),
    ("nat", ["100.64.0.1"], [NatEntry("10.0.0.999")]),
    ("nat", ["100.64.0.1"], ["10.0.0.1"]),               # a str value: per-entry path
    ("nat", ["100.64.0.1"], [NatEntry("10.0.0.1", override="yes")]),
    ("rnat", ["10.0.0.1"], ["100.64.0.1"]),                # no such table since ABI 4
    ("peers", ["10.0.0.1", "fd00::1"], [PeerEntry(), PeerEntry()]),   # IPv6: ovl_peers6
    ("peers", ["10.0.0.1"], [PeerEntry(identity=-1)]),
    ("peers", ["10.0.0.1"], [PeerEntry(identity=1 << 32)]),
    ("peers", ["10.0.0.1"], [PeerEntry(identity=True)]),
    ("peers", ["10.0.0.1"], [PeerEntry(flags=1.5)]),
    ("peers", ["10.0.0.1"], [(1, 1)]),
    ("ports", [(0, 1)], [1]),                             # no bulk encoder
    ("failsafe", ["10.0.0.0/8"], [1]),
    ("config", ["reject_all"], [1]),
])
def test_what_bulk_does_not_take_goes_entry_by_entry(table, keys, values):
    assert encode_bulk(table, keys, values) is None


# 100.64.0.0/16 -> base 0x64400000 (100 << 24 | 64 << 16), 65,536 slots
LAYOUT = NatLayout(100 << 24 | 64 << 16, 65536)


@pytest.mark.parametrize("subnet,base,slots", [
    ("100.64.0.0/16", 0x64400000, 65536),
    ("10.0.0.0/24", 0x0A000000, 256),
    ("10.96.0.0/11", 0x0A600000, 1 << 20),   # 2**21 addresses: capped at NAT_SLOTS_MAX
    ("10.0.0.0/8", 0x0A000000, 1 << 20),
    ("192.168.7.4/30", 0xC0A80704, 4),
])
def test_layout_of_a_subnet(subnet, base, slots):
    assert NatLayout.of_subnet(subnet) == (base, slots)
    assert abi.nat_slots(subnet) == slots and abi.nat_base(subnet) == base


@pytest.mark.parametrize("addr,slot", [
    ("100.64.0.0", 0), ("100.64.0.1", 1), ("100.64.1.0", 256), ("100.64.255.255", 65535),
    ("100.65.0.0", None), ("100.63.255.255", None), ("10.0.0.1", None), ("0.0.0.0", None),
])
def test_layout_slot_and_back(addr, slot):
    assert LAYOUT.slot(addr) == slot
    if slot is not None:
        assert LAYOUT.address(slot) == addr


def test_nat_bulk_splits_array_slots_and_ext_by_hand():
    keys = ["100.64.0.5", "192.0.2.7", "100.64.1.2", "100.64.0.9", "198.51.100.1", "100.65.0.1"]
    values = [NatEntry("10.0.0.5"), NatEntry("10.9.9.9", override=True), None,
              NatEntry("10.0.0.9", override=True), None, NatEntry("10.1.1.1")]
    puts, dels = encode_nat_bulk(LAYOUT, keys, values)
    # ovl_nat: puts into slots 5 and 9; the deleted slot 258 is a delete (MapSet writes zero)
    assert puts[NAT] == (struct.pack("=II", 5, 9),
                         be32("10.0.0.5") + struct.pack("=I", 0) + be32("10.0.0.9")
                         + struct.pack("=I", 1), 2)
    assert puts[NAT_EXT] == (be32("192.0.2.7") + be32("100.65.0.1"),
                             be32("10.9.9.9") + struct.pack("=I", 1) + be32("10.1.1.1") + bytes(4), 2)
    assert dels == {NAT: (struct.pack("=I", 258), 1), NAT_EXT: (be32("198.51.100.1"), 1)}


def test_nat_bulk_all_in_the_slots_and_all_outside():
    puts, dels = encode_nat_bulk(LAYOUT, OVERLAYS, [NatEntry(r) for r in REALS])
    slots = [int(o.split(".")[2]) * 256 + int(o.split(".")[3]) for o in OVERLAYS]
    assert list(puts) == [NAT] and not dels
    assert puts[NAT][0] == struct.pack(f"={len(slots)}I", *slots)
    assert puts[NAT][2] == 600
    outside = NatLayout(0x0A000000, 256)   # 10.0.0.0/24: no 100.64 address is inside
    puts, dels = encode_nat_bulk(outside, OVERLAYS, [None] * 600)
    assert puts == {} and dels == {NAT_EXT: (b"".join(map(be32, OVERLAYS)), 600)}


@pytest.mark.parametrize("keys,values", [
    (["100.64.0.1", "bad"], [NatEntry("10.0.0.1"), NatEntry("10.0.0.2")]),
    (["100.64.0.1"], [NatEntry("10.0.0.999")]),
    (["100.64.0.1"], ["10.0.0.1"]),
    (["192.0.2.1"], [NatEntry("10.0.0.1", override="yes")]),   # ext side refuses too
])
def test_nat_bulk_refuses_what_goes_entry_by_entry(keys, values):
    assert encode_nat_bulk(LAYOUT, keys, values) is None


def test_decode_nat_slots_skips_empty_slots():
    items = [(struct.pack("=I", 0), be32("10.0.0.1") + struct.pack("=I", 1)),
             (struct.pack("=I", 1), bytes(8)),
             (struct.pack("=I", 513), be32("10.0.0.2") + struct.pack("=I", 0))]
    assert decode_nat_slots(LAYOUT, items) == {
        "100.64.0.0": NatEntry("10.0.0.1", True), "100.64.2.1": NatEntry("10.0.0.2", False),
    }
