"""overlay/datapath/ebpf/codec.py against hand-written bytes (pure: no kernel).

Every expected key and value is written here from the ABI's layout (overlay_abi.h: native
u32/u64 on this little-endian machine, addresses and ports in network order), byte by
byte with ``struct``, never with the codec or abi helpers under test. The names of the
counters and maps are the tables of docs/ and the codec's module docstring, written out.
"""

from __future__ import annotations

import ipaddress
import struct
import sys

import pytest

from overlay.datapath.ebpf import codec
from overlay.errors import CapacityError, DatapathError
from overlay.ops import NatEntry, PeerEntry

assert sys.byteorder == "little"   # the hand bytes below are the little-endian layout


def u32(*values: int) -> bytes:
    return struct.pack("<" + "I" * len(values), *values)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def v6(hexdigits: str) -> bytes:
    return bytes.fromhex(hexdigits.replace(" ", ""))


MAPPED_10_0_0_1 = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])
FD00_1 = v6("fd00 0000 0000 0000 0000 0000 0000 0001")


# -- counter names ---------------------------------------------------------------

COUNTERS = {
    1: "drop_no_peer", 2: "drop_not_allowed", 3: "drop_malformed", 4: "drop_policy",
    5: "drop_frag_short", 6: "drop_frag_orphan", 7: "drop_martian",
    16: "pass_failsafe", 17: "pass_established", 18: "pass_loopback", 19: "pass_member",
    20: "pass_open_port", 21: "pass_default", 22: "pass_related", 23: "nat_egress",
    24: "nat_ingress", 25: "pass_untouched", 26: "pass_policy", 27: "pass_ndp",
    28: "pass_fragment", 29: "ct_expired", 30: "ct_nat_stale", 31: "sock_connect",
    32: "sock_sendmsg", 33: "sock_recvmsg", 34: "sock_peername", 35: "sock_other_netns",
}


@pytest.mark.parametrize("slot", range(42))
def test_counter_names(slot):
    assert codec.counter_name(slot) == COUNTERS.get(slot)


# -- families and maps -----------------------------------------------------------

@pytest.mark.parametrize(("text", "want"), [
    ("fd00::1", True), ("2001:db8::/32", True), ("::ffff:10.0.0.1", True), ("10.0.0.1", False),
    ("10.0.0.0/8", False), (None, False), (b"fd00::1", False), (("fd00::1",), False), (7, False),
])
def test_is_v6(text, want):
    assert codec.is_v6(text) is want


@pytest.mark.parametrize(("table", "key", "want"), [
    ("nat", "192.168.0.1", "ovl_nat"), ("nat", "fd00::1", "ovl_nat"),
    ("peers", "10.0.0.1", "ovl_peers"), ("peers", "fd00::1", "ovl_peers6"),
    ("ports", (0, 1), "ovl_ports"),
    ("failsafe", "10.0.0.0/8", "ovl_failsafe"), ("failsafe", "fd00::/8", "ovl_failsafe6"),
    ("config", "reject_all", "ovl_cfg"),
    ("policy", (1, 6, 80, 16), "ovl_policy"),
    ("cidr_ident", "10.0.0.0/8", "ovl_cidr_ident"), ("cidr_ident", "fd00::/8", "ovl_cidr_ident6"),
    ("names", ("policy", 1), "ovl_names"),
    ("self", "10.0.0.1", "ovl_self"), ("self", "fd00::1", "ovl_self"),
])
def test_map_of(table, key, want):
    assert codec.map_of(table, key) == want


def test_map_of_an_unknown_table_names_it():
    with pytest.raises(DatapathError, match="^unknown table 'colour'$"):
        codec.map_of("colour", "10.0.0.1")


def test_the_map_names_and_the_sizes_that_fill_them():
    assert codec.TABLE_MAP == {
        "nat": "ovl_nat", "peers": "ovl_peers", "ports": "ovl_ports",
        "failsafe": "ovl_failsafe", "config": "ovl_cfg", "policy": "ovl_policy",
        "cidr_ident": "ovl_cidr_ident", "names": "ovl_names", "self": "ovl_self",
    }
    assert (codec.CT, codec.COUNTERS, codec.EVENTS, codec.SOCK) == ("ovl_ct", "ovl_counters", "ovl_events", "ovl_sock")
    assert codec.CT_MAPS == ("ovl_ct", "ovl_ct6", "ovl_ct_in", "ovl_frag")
    assert codec.STORE_MAPS["nat"] == ("ovl_nat", "ovl_nat_ext")
    assert codec.STORE_MAPS["peers"] == ("ovl_peers", "ovl_peers6")
    assert codec.STORE_MAPS["self"] == ("ovl_self",)
    assert codec.SIZE_KEY == {
        "ovl_nat_ext": "nat", "ovl_peers": "peers", "ovl_failsafe": "failsafe",
        "ovl_ct": "conntrack", "ovl_policy": "policy", "ovl_cidr_ident": "cidr_ident",
        "ovl_names": "names", "ovl_peers6": "peers6", "ovl_failsafe6": "failsafe6",
        "ovl_cidr_ident6": "cidr_ident6", "ovl_self": "(fixed)", "ovl_ct6": "conntrack6",
        "ovl_ct_in": "conntrack_in", "ovl_frag": "frag",
    }


# -- keys ------------------------------------------------------------------------

KEYS = [
    ("nat", "192.168.0.2", bytes([192, 168, 0, 2])),
    ("peers", "10.0.0.2", bytes([10, 0, 0, 2])),
    ("peers", "fd00::1", FD00_1),
    ("self", "10.0.0.1", MAPPED_10_0_0_1),
    ("self", "fd00::1", FD00_1),
    ("ports", (0, 0), u32(0)), ("ports", (0, 1023), u32(1023)),
    ("ports", (1, 0), u32(1024)), ("ports", (1, 1023), u32(2047)),
    ("failsafe", "10.0.0.0/8", u32(8) + bytes([10, 0, 0, 0])),
    ("failsafe", "0.0.0.0/0", u32(0) + bytes(4)),
    ("failsafe", "198.18.0.1/32", u32(32) + bytes([198, 18, 0, 1])),
    ("failsafe", "fd00::/8", u32(8) + b"\xfd" + bytes(15)),
    ("cidr_ident", "2001:db8::/32", u32(32) + v6("2001 0db8") + bytes(12)),
    ("cidr_ident", "172.16.0.0/12", u32(12) + bytes([172, 16, 0, 0])),
    # ovl_policy_key: u32 prefixlen (48 + port bits), u32 identity, u8 proto, u8 pad, be16 port
    ("policy", (5, 6, 0x1234, 16), u32(64, 5) + bytes([6, 0, 0x12, 0x34])),
    ("policy", (0x80000001, 17, 0, 0), u32(48, 0x80000001) + bytes([17, 0, 0, 0])),
    ("policy", (7, 6, 0x1200, 8), u32(56, 7) + bytes([6, 0, 0x12, 0])),
    ("policy", (7, 1, 0xFFFF, 16), u32(64, 7) + bytes([1, 0, 0xFF, 0xFF])),
    ("policy", (0xFFFFFFFF, 255, 0x8000, 1), u32(49, 0xFFFFFFFF) + bytes([255, 0, 0x80, 0])),
    ("names", ("policy", 7), u32(1, 7)), ("names", ("rule", 0), u32(2, 0)),
    ("names", ("identity", 0xFFFFFFFF), u32(3, 0xFFFFFFFF)), ("names", ("cidr", 9), u32(4, 9)),
]
CONFIG_SLOTS = {
    "reject_all": 0, "mode": 2, "policy_enforced": 4, "policy_default": 5, "ct_tcp_syn_s": 7,
    "ct_tcp_established_s": 8, "ct_tcp_fin_s": 9, "ct_tcp_rst_s": 10, "ct_udp_s": 11,
    "ct_icmp_s": 12, "frag_s": 13,
}


@pytest.mark.parametrize(("table", "key", "raw"), KEYS)
def test_keys_are_the_abi_bytes(table, key, raw):
    assert codec.encode_key(table, key) == raw


@pytest.mark.parametrize(("key", "slot"), sorted(CONFIG_SLOTS.items()))
def test_config_keys_are_the_enum_slots(key, slot):
    assert codec.encode_key("config", key) == u32(slot)


def test_the_config_keys_are_exactly_these():
    assert set(codec.CONFIG_INDEX) == set(CONFIG_SLOTS)


BAD_KEYS = [
    ("nat", "192.168.0.256", DatapathError, r"^nat key: not an IPv4 address: '192\.168\.0\.256'"),
    ("nat", 3232235521, DatapathError, "^nat key: not an IPv4 address"),
    ("peers", "10.0.0", DatapathError, "^peers key: not an IPv4 address"),
    ("peers", "fd00::zz", DatapathError, "^peers key: not an IP address: 'fd00::zz'"),
    ("self", "nowhere", DatapathError, "^self key: not an IP address"),
    ("ports", (2, 0), CapacityError, r"^ports key \(2, 0\): outside ovl_ports \(2 slots of 1024 words\)"),
    ("ports", (0, 1024), CapacityError, "outside ovl_ports \\(2 slots of 1024 words\\)$"),
    ("ports", (0, -1), CapacityError, "outside ovl_ports \\(2 slots of 1024 words\\)$"),
    ("ports", (-1, 0), CapacityError, "outside ovl_ports \\(2 slots of 1024 words\\)$"),
    ("ports", (0, "1"), CapacityError, "outside ovl_ports \\(2 slots of 1024 words\\)$"),
    ("ports", (0,), DatapathError, r"^ports key: expected \(slot, word\), got \(0,\)"),
    ("ports", None, DatapathError, r"^ports key: expected \(slot, word\), got None$"),
    ("failsafe", "10.0.0.1/8", DatapathError, "^failsafe: not an IP network: '10.0.0.1/8'"),
    ("failsafe", None, DatapathError, "^failsafe: not an IP network"),
    ("cidr_ident", "fd00::1/8", DatapathError, "^cidr_ident: not an IP network"),
    ("config", "colour", DatapathError, "^config key: unknown 'colour' .known: reject_all, mode, policy_enforced"),
    ("policy", (1, 6, 80), DatapathError, r"^policy key: expected \(identity, proto, port, bits\)"),
    ("policy", None, DatapathError, r"^policy key: expected \(identity, proto, port, bits\)"),
    ("policy", (1 << 32, 6, 0, 0), DatapathError, "^policy identity: not a u32"),
    ("policy", (-1, 6, 0, 0), DatapathError, "^policy identity: not a u32"),
    ("policy", (True, 6, 0, 0), DatapathError, "^policy identity: not a u32"),
    ("policy", (1, 256, 0, 0), DatapathError, "^policy proto: not a u8"),
    ("policy", (1, 6, 65536, 16), DatapathError, "^policy port: not a u16"),
    ("policy", (1, 6, 0, 17), DatapathError, "port bits must be 0..16$"),
    ("policy", (1, 6, 0, -1), DatapathError, "port bits must be 0..16$"),
    ("policy", (1, 6, 0, True), DatapathError, "port bits must be 0..16$"),
    ("policy", (1, 6, 0, 8.0), DatapathError, "port bits must be 0..16$"),
    ("policy", (1, 6, 0x1201, 8), DatapathError, "port 4609 has bits past the first 8$"),
    ("policy", (1, 6, 1, 15), DatapathError, "port 1 has bits past the first 15$"),
    ("policy", (1, 6, 0x8000, 0), DatapathError, "bits past the first 0$"),
    ("names", ("colour", 1), DatapathError, "^names key: expected .kind, number. with kind in policy, rule, identity, cidr"),
    ("names", "policy", DatapathError, "^names key: expected"),
    ("names", None, DatapathError, "^names key: expected"),
    ("names", ("policy", -1), DatapathError, "^names number: not a u32"),
    ("names", ("policy", 1 << 32), DatapathError, "^names number: not a u32"),
    ("elsewhere", "x", DatapathError, "^unknown table 'elsewhere'"),
]


@pytest.mark.parametrize(("table", "key", "error", "message"), BAD_KEYS)
def test_bad_keys_are_refused_by_name(table, key, error, message):
    with pytest.raises(error, match=message):
        codec.encode_key(table, key)


def test_a_port_key_outside_the_map_is_a_capacity_error_not_a_shape_error():
    with pytest.raises(DatapathError) as shape:
        codec.encode_key("ports", (0, 1, 2))
    assert type(shape.value) is DatapathError


# -- values ----------------------------------------------------------------------

VALUES = [
    ("nat", NatEntry("10.0.0.2"), bytes([10, 0, 0, 2]) + u32(0)),
    ("nat", NatEntry("10.0.0.250", override=True), bytes([10, 0, 0, 250]) + u32(1)),
    ("nat", "10.1.2.3", bytes([10, 1, 2, 3]) + u32(0)),
    ("peers", PeerEntry(identity=42, flags=1), u32(42, 1)),
    ("peers", PeerEntry(identity=0xFFFFFFFF, flags=0xFFFFFFFF), u32(0xFFFFFFFF, 0xFFFFFFFF)),
    ("ports", 1 << 63, u64(1 << 63)), ("ports", None, bytes(8)), ("ports", 0, bytes(8)),
    ("ports", (1 << 64) - 1, b"\xff" * 8),
    ("failsafe", 2, u32(2)), ("self", 1, u32(1)), ("failsafe", 0xFFFFFFFF, u32(0xFFFFFFFF)),
    ("config", 432000, u64(432000)), ("config", None, bytes(8)), ("config", (1 << 64) - 1, b"\xff" * 8),
    ("policy", 9, u32(9)), ("cidr_ident", 0x80000005, u32(0x80000005)),
    ("names", "web", b"web" + bytes(253)),
    ("names", "", bytes(256)),
    ("names", "x" * 255, b"x" * 255 + b"\0"),
    ("names", "é", "é".encode() + bytes(254)),
]


@pytest.mark.parametrize(("table", "value", "raw"), VALUES)
def test_values_are_the_abi_bytes(table, value, raw):
    assert codec.encode_value(table, value) == raw


BAD_VALUES = [
    ("nat", 5, "^nat value: expected NatEntry, got 5"),
    ("nat", NatEntry("10.0.0"), "^nat real: not an IPv4 address"),
    ("peers", 3, "^peers value: expected PeerEntry, got 3"),
    ("peers", PeerEntry(identity=1 << 32), "^peer identity: not a u32"),
    ("peers", PeerEntry(flags=-1), "^peer flags: not a u32"),
    ("ports", 1 << 64, "^ports word: not a u64"),
    ("ports", -1, "^ports word: not a u64"),
    ("ports", True, "^ports word: not a u64"),
    ("failsafe", 1 << 32, "^failsafe flags: not a u32"),
    ("self", None, "^self flags: not a u32"),
    ("config", 1 << 64, "^config value: not a u64"),
    ("config", 1.0, "^config value: not a u64"),
    ("policy", -1, "^policy index: not a u32"),
    ("policy", None, "^policy index: not a u32"),
    ("cidr_ident", 1 << 32, "^cidr identity: not a u32"),
    ("names", 5, "^names value: expected text, got 5"),
    ("names", "x" * 256, r"^names value: 256 bytes \(at most 255, no NUL\)"),
    ("names", "é" * 128, "^names value: 256 bytes"),
    ("names", "a\0b", "^names value: 3 bytes"),
    ("elsewhere", 1, "^unknown table 'elsewhere'"),
]


@pytest.mark.parametrize(("table", "value", "message"), BAD_VALUES)
def test_bad_values_are_refused_by_name(table, value, message):
    with pytest.raises(DatapathError, match=message):
        codec.encode_value(table, value)


# -- decoding --------------------------------------------------------------------

ITEMS = [
    ("nat", bytes([192, 168, 0, 2]), bytes([10, 0, 0, 2]) + u32(1), ("192.168.0.2", NatEntry("10.0.0.2", True))),
    ("nat", bytes([192, 168, 0, 3]), bytes([10, 0, 0, 3]) + u32(0), ("192.168.0.3", NatEntry("10.0.0.3", False))),
    # only bit 0 is the override flag
    ("nat", bytes([192, 168, 0, 4]), bytes([10, 0, 0, 4]) + u32(2), ("192.168.0.4", NatEntry("10.0.0.4", False))),
    ("peers", bytes([10, 0, 0, 2]), u32(42, 1), ("10.0.0.2", PeerEntry(42, 1))),
    ("peers", FD00_1, u32(9, 0), ("fd00::1", PeerEntry(9, 0))),
    # a 16-byte peers key is IPv6 even when it reads as IPv4-mapped (Python's text of it
    # differs between versions: the stdlib's is the reference)
    ("peers", MAPPED_10_0_0_1, u32(1, 1), (str(ipaddress.IPv6Address("::ffff:10.0.0.1")), PeerEntry(1, 1))),
    ("self", MAPPED_10_0_0_1, u32(1) + b"\xff" * 4, ("10.0.0.1", 1)),
    ("self", FD00_1, u32(3), ("fd00::1", 3)),
    ("ports", u32(0), u64(1 << 22), ((0, 0), 1 << 22)),
    ("ports", u32(1023), u64(1), ((0, 1023), 1)),
    ("ports", u32(1025), u64(1 << 63), ((1, 1), 1 << 63)),
    ("failsafe", u32(8) + bytes([10, 0, 0, 0]), u32(1) + b"\xff" * 4, ("10.0.0.0/8", 1)),
    ("failsafe", u32(8) + b"\xfd" + bytes(15), u32(2), ("fd00::/8", 2)),
    ("failsafe", u32(96) + bytes(10) + b"\xff\xff" + bytes(4), u32(1), (f"{ipaddress.IPv6Address('::ffff:0.0.0.0')}/96", 1)),
    ("cidr_ident", u32(12) + bytes([172, 16, 0, 0]), u32(0x80000002) + b"\xff" * 4, ("172.16.0.0/12", 0x80000002)),
    ("policy", u32(64, 5) + bytes([6, 0, 0x12, 0x34]), u32(3) + b"\xff" * 4, ((5, 6, 0x1234, 16), 3)),
    ("policy", u32(48, 0x80000001) + bytes([17, 0, 0, 0]), u32(0), ((0x80000001, 17, 0, 0), 0)),
    ("names", u32(1, 7), b"web" + bytes(253), (("policy", 7), "web")),
    ("names", u32(4, 2), b"10.0.0.0/8\0junk" + bytes(241), (("cidr", 2), "10.0.0.0/8")),
    ("names", u32(9, 1), b"\xffok" + bytes(253), (("9", 1), "\ufffdok")),
    ("names", u32(2, 3), b"r" * 256, (("rule", 3), "r" * 256)),
]


@pytest.mark.parametrize(("table", "key", "value", "want"), ITEMS)
def test_decode_item_from_abi_bytes(table, key, value, want):
    assert codec.decode_item(table, key, value) == want


def test_decode_item_of_an_unknown_table_names_it():
    with pytest.raises(DatapathError, match="^unknown table 'config'$"):
        codec.decode_item("config", u32(0), u64(0))


def _ct4(saddr: bytes, daddr: bytes, sport: int, dport: int, proto: int) -> bytes:
    return saddr + daddr + struct.pack("!HH", sport, dport) + bytes([proto, 0, 0, 0])


def _ct6(saddr: bytes, daddr: bytes, sport: int, dport: int, proto: int, family: int) -> bytes:
    return saddr + daddr + struct.pack("!HH", sport, dport) + bytes([proto, family, 0, 0])


def _ctval(overlay: bytes, nat_gen: int, last_seen: int, state: int, flags: int) -> bytes:
    return overlay + u32(nat_gen) + u64(last_seen) + bytes([state, flags]) + bytes(6)


@pytest.mark.parametrize(("key", "value", "want"), [
    (_ct4(bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1]), 80, 40000, 6),
     _ctval(bytes([192, 168, 0, 2]), 7, 123, 3, 3),
     {"family": 4, "saddr": "10.0.0.2", "daddr": "10.0.0.1", "sport": 80, "dport": 40000, "proto": 6,
      "overlay": "192.168.0.2", "state": "closing", "flags": 3, "nat_gen": 7, "last_seen_ns": 123}),
    (_ct4(bytes([10, 0, 0, 3]), bytes([10, 0, 0, 4]), 0x1234, 0xABCD, 17),
     _ctval(bytes(4), 0, 1 << 40, 0, 0),
     {"family": 4, "saddr": "10.0.0.3", "daddr": "10.0.0.4", "sport": 0x1234, "dport": 0xABCD, "proto": 17,
      "overlay": None, "state": "new", "flags": 0, "nat_gen": 0, "last_seen_ns": 1 << 40}),
    (_ct4(bytes([10, 0, 0, 3]), bytes([10, 0, 0, 4]), 1, 2, 1),
     _ctval(bytes([0, 0, 0, 1]), 1, 2, 4, 2),
     {"family": 4, "saddr": "10.0.0.3", "daddr": "10.0.0.4", "sport": 1, "dport": 2, "proto": 1,
      "overlay": "0.0.0.1", "state": "closed", "flags": 2, "nat_gen": 1, "last_seen_ns": 2}),
    (_ct4(bytes([10, 0, 0, 3]), bytes([10, 0, 0, 4]), 1, 2, 6),
     _ctval(bytes(4), 0, 0, 9, 0),
     {"family": 4, "saddr": "10.0.0.3", "daddr": "10.0.0.4", "sport": 1, "dport": 2, "proto": 6,
      "overlay": None, "state": "9", "flags": 0, "nat_gen": 0, "last_seen_ns": 0}),
    (_ct6(v6("2001 0db8" + "00" * 11 + "02"), v6("2001 0db8" + "00" * 11 + "01"), 443, 50000, 6, 6),
     _ctval(bytes(4), 0, 5, 1, 1),
     {"family": 6, "saddr": "2001:db8::2", "daddr": "2001:db8::1", "sport": 443, "dport": 50000,
      "proto": 6, "overlay": None, "state": "syn_sent", "flags": 1, "nat_gen": 0, "last_seen_ns": 5}),
    # the ct6 key of an IPv4 flow (socket mode): mapped addresses, family 4
    (_ct6(MAPPED_10_0_0_1, bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 9]), 53, 5353, 17, 4),
     _ctval(bytes(4), 2, 6, 2, 0),
     {"family": 4, "saddr": "10.0.0.1", "daddr": "10.0.0.9", "sport": 53, "dport": 5353,
      "proto": 17, "overlay": None, "state": "established", "flags": 0, "nat_gen": 2, "last_seen_ns": 6}),
])
def test_decode_ct_from_abi_bytes(key, value, want):
    assert codec.decode_ct(key, value) == want


def test_to_jsonable_by_hand():
    state = {
        "nat": {"192.168.0.2": NatEntry("10.0.0.2"), "192.168.0.3": NatEntry("10.0.0.3", True)},
        "peers": {"10.0.0.2": PeerEntry(5, 1)},
        "ports": {(0, 0): (1 << 22) | (1 << 23), (1, 0): 1 << 53, (0, 1): 1},
        "failsafe": {"198.18.0.0/15": 1},
        "config": {"mode": 1},
        "policy": {(5, 6, 80, 16): 2, (1, 17, 0, 0): 7},
        "cidr_ident": {"10.0.0.0/8": 0x80000001},
        "names": {("rule", 2): "b", ("policy", 9): "a"},
        "self": {"10.0.0.1": 1},
    }
    assert codec.to_jsonable(state) == {
        "nat": {"192.168.0.2": {"real": "10.0.0.2", "override": False},
                "192.168.0.3": {"real": "10.0.0.3", "override": True}},
        "peers": {"10.0.0.2": {"identity": 5, "flags": 1}},
        "ports": {"tcp": [22, 23, 64], "udp": [53]},
        "failsafe": {"198.18.0.0/15": 1},
        "config": {"mode": 1},
        "policy": [{"identity": 1, "proto": 17, "port": 0, "bits": 0, "index": 7},
                   {"identity": 5, "proto": 6, "port": 80, "bits": 16, "index": 2}],
        "cidr_ident": {"10.0.0.0/8": 0x80000001},
        "names": {"policy:9": "a", "rule:2": "b"},
        "self": {"10.0.0.1": 1},
    }
    assert list(codec.to_jsonable(state)["names"]) == ["policy:9", "rule:2"]


def test_to_jsonable_of_a_state_without_the_newer_tables():
    old = {"nat": {}, "peers": {}, "ports": {}, "failsafe": {}, "config": {}}
    assert codec.to_jsonable(old) == {
        "nat": {}, "peers": {}, "ports": {"tcp": [], "udp": []}, "failsafe": {}, "config": {},
        "policy": [], "cidr_ident": {}, "names": {}, "self": {},
    }
