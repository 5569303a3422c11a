"""codec.encode_bulk / encode_keys_bulk: the bytes of a whole table at once (pure).

The expected buffers are built here by hand from the ABI layout (be32 addresses
from the dotted quad's octets, u32 words in native order), not from the encoders
under test; the per-entry encoders must agree too (both are the datapath's)."""

from __future__ import annotations

import struct

import pytest

from overlay import abi
from overlay.datapath.ebpf.codec import (
    NAT,
    PEERS,
    RNAT,
    encode_bulk,
    encode_key,
    encode_keys_bulk,
    encode_value,
)
from overlay.ops import NatEntry, PeerEntry


def be32(addr: str) -> bytes:
    return bytes(int(o) for o in addr.split("."))


OVERLAYS = [f"100.64.{i // 250}.{i % 250 + 1}" for i in range(600)]
REALS = [f"10.{i % 7}.{i // 250}.{i % 250 + 1}" for i in range(600)]


def test_nat_rnat_peers_in_bulk_are_the_abi_bytes():
    nat_vals = [NatEntry(r, override=i % 5 == 0) for i, r in enumerate(REALS)]
    name, keys, vals = encode_bulk("nat", OVERLAYS, nat_vals)
    assert name == NAT
    assert keys == b"".join(be32(o) for o in OVERLAYS)
    assert vals == b"".join(be32(r) + struct.pack("=I", abi.NAT_F_OVERRIDE if i % 5 == 0 else 0)
                            for i, r in enumerate(REALS))
    assert vals == b"".join(encode_value("nat", v) for v in nat_vals)

    name, keys, vals = encode_bulk("rnat", REALS, OVERLAYS)
    assert (name, keys, vals) == (RNAT, b"".join(map(be32, REALS)), b"".join(map(be32, OVERLAYS)))

    peer_vals = [PeerEntry(identity=i * 977 + 1, flags=i % 4) for i in range(600)]
    name, keys, vals = encode_bulk("peers", REALS, peer_vals)
    assert name == PEERS
    assert keys == b"".join(encode_key("peers", r) for r in REALS) == b"".join(map(be32, REALS))
    assert vals == b"".join(struct.pack("=II", i * 977 + 1, i % 4) for i in range(600))

    assert encode_keys_bulk("nat", OVERLAYS) == (NAT, b"".join(map(be32, OVERLAYS)))
    assert encode_bulk("nat", [], []) == (NAT, b"", b"")


@pytest.mark.parametrize("table,keys,values", [
    ("nat", ["100.64.0.1", "not-an-address"], [NatEntry("10.0.0.1"), NatEntry("10.0.0.2")]),
    ("nat", ["100.64.0.1"], [NatEntry("10.0.0.999")]),
    ("nat", ["100.64.0.1"], ["10.0.0.1"]),               # a str value: per-entry path
    ("nat", ["100.64.0.1"], [NatEntry("10.0.0.1", override="yes")]),
    ("rnat", ["10.0.0.1"], [None]),
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
