"""maps.py encoders and decoders against the ABI (pure: no kernel)."""

from __future__ import annotations

import ctypes
import struct

import pytest

from overlay import abi
from overlay.datapath.ebpf.maps import (
    decode_ct,
    decode_item,
    encode_key,
    encode_value,
)
from overlay.errors import CapacityError, DatapathError
from overlay.ops import NatEntry, PeerEntry

ROUNDTRIP = [
    ("nat", "192.168.0.2", NatEntry("10.0.0.2")),
    ("nat", "192.168.63.1", NatEntry("10.0.0.250", override=True)),
    ("peers", "10.0.0.2", PeerEntry(identity=42, flags=abi.PEER_F_MEMBER)),
    ("ports", (0, 1), 1 << 16),
    ("ports", (1, 1023), 1 << 63),
    ("failsafe", "198.18.0.0/15", abi.FS_SSH),
    ("failsafe", "10.1.2.3/32", abi.FS_ALL),
    ("failsafe", "2001:db8::/32", abi.FS_SSH),
    ("peers", "2001:db8::7", PeerEntry(identity=9, flags=abi.PEER_F_MEMBER)),
    ("cidr_ident", "fd00::/8", (1 << 31) | 5),
    ("self", "10.0.0.1", 1),
    ("self", "fd00::1", 1),
]


@pytest.mark.parametrize("table,key,value", ROUNDTRIP)
def test_roundtrip(table, key, value):
    assert decode_item(table, encode_key(table, key), encode_value(table, value)) == (key, value)


def test_layouts_are_the_abi():
    assert encode_key("nat", "192.168.0.2") == bytes([192, 168, 0, 2])  # network order
    assert encode_value("nat", NatEntry("10.0.0.2", True)) == bytes([10, 0, 0, 2]) + struct.pack("=I", 1)
    assert encode_key("ports", (1, 3)) == struct.pack("=I", abi.PORT_WORDS + 3)
    assert encode_key("failsafe", "10.0.0.0/8") == struct.pack("=I", 8) + bytes([10, 0, 0, 0])
    assert encode_key("config", "reject_all") == struct.pack("=I", abi.CfgIndex.REJECT_ALL)
    assert encode_key("config", "mode") == struct.pack("=I", abi.CfgIndex.MODE)
    assert encode_value("config", None) == bytes(8)
    assert encode_key("peers", "2001:db8::7") == bytes.fromhex("20010db8000000000000000000000007")
    assert encode_key("self", "10.0.0.1") == bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])
    assert encode_key("failsafe", "fd00::/8") == struct.pack("=I", 8) + bytes([0xFD]) + bytes(15)
    assert encode_key("config", "ct_udp_s") == struct.pack("=I", abi.CfgIndex.CT_UDP_S)


@pytest.mark.parametrize("table,key,value,error", [
    ("nat", "not-an-ip", NatEntry("10.0.0.1"), DatapathError),
    ("nat", "192.168.0.1", "bogus", DatapathError),
    ("peers", "10.0.0.1", 3, DatapathError),
    ("ports", (2, 0), 1, CapacityError),
    ("ports", (0, 1024), 1, CapacityError),
    ("ports", (0, 1), 1 << 64, DatapathError),
    ("failsafe", "10.0.0.1/8", 1, DatapathError),  # host bits set
    ("config", "colour", 1, DatapathError),
    ("elsewhere", "x", 1, DatapathError),
])
def test_bad_input_raises(table, key, value, error):
    with pytest.raises(error):
        encode_key(table, key)
        encode_value(table, value)


def test_ct_and_ports_rendering():
    key = abi.OvlCtKey(abi.ip_to_be32("10.0.0.2"), abi.ip_to_be32("10.0.0.1"),
                       abi.port_to_be16(80), abi.port_to_be16(40000), 6)
    val = abi.OvlCtVal(abi.ip_to_be32("192.168.0.2"), 7, 123, abi.CtState.CLOSING,
                       abi.CT_F_EGRESS | abi.CT_F_NAT)
    assert decode_ct(bytes(key), bytes(val)) == {
        "family": 4, "saddr": "10.0.0.2", "daddr": "10.0.0.1", "sport": 80, "dport": 40000, "proto": 6,
        "overlay": "192.168.0.2", "state": "closing", "flags": 3, "nat_gen": 7, "last_seen_ns": 123,
    }
    words = ctypes.c_uint32 * 4
    key6 = abi.OvlCt6Key(words(*abi.ip_to_words("2001:db8::2")), words(*abi.ip_to_words("2001:db8::1")),
                         abi.port_to_be16(443), abi.port_to_be16(50000), 6, 6)
    val6 = abi.OvlCtVal(0, 0, 5, abi.CtState.SYN_SENT, abi.CT_F_EGRESS)
    assert decode_ct(bytes(key6), bytes(val6)) == {
        "family": 6, "saddr": "2001:db8::2", "daddr": "2001:db8::1", "sport": 443, "dport": 50000,
        "proto": 6, "overlay": None, "state": "syn_sent", "flags": 1, "nat_gen": 0, "last_seen_ns": 5,
    }
    assert abi.ports_by_proto({(0, 0): 1 << 22, (0, 1): 1 << 16, (1, 0): 1 << 53}) == {
        "tcp": [22, 80], "udp": [53]}
