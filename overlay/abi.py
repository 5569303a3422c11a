"""The one Python mirror of bpf/include/overlay_abi.h, and the pure codecs of its encodings.

Every constant, enum and struct that the eBPF programs share with Python is mirrored
here once; tests/bpf/test_abi.py checks every structure against the layouts bcc
compiled (sizes and field offsets), every constant against the header, the map sizes
against bpf/lib/maps.h and the protocol numbers against the kernel's.

Pure: the standard library only (``ctypes`` describes the structs' layouts; nothing is
loaded), no kernel access, no import-time side effects. It is part of the core
(docs/architecture.md): the planner (open ports, failsafe flags, identities, names),
``ops``, the eBPF backend (codec, maps, ``why``, ``drops``) and the iptables backend
all take their constants and encodings from here.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import socket
import struct
from collections import defaultdict
from collections.abc import Iterable, Mapping

ABI_VERSION = 4

PORT_WORDS = 1024
SSH_PORT = 22

NAT_F_OVERRIDE = 1
NAT_SLOTS_MAX = 1 << 20  # ovl_nat slots at most (8 MiB of struct ovl_nat_val)
PEER_F_MEMBER = 1
FS_SSH = 1
FS_ALL = 2
CT_F_EGRESS = 1
CT_F_NAT = 2
SELF_F_OWN = 1
SELF_MAX = 64
SELF_HINT_MUL = 0x9E3779B1
CT_DEFAULT_TCP_SYN_S = 120
CT_DEFAULT_TCP_ESTABLISHED_S = 432000
CT_DEFAULT_TCP_FIN_S = 120
CT_DEFAULT_TCP_RST_S = 10
CT_DEFAULT_UDP_S = 120
CT_DEFAULT_ICMP_S = 30
CT_DEFAULT_FRAG_S = 5
IDENTITY_NONE = 0
IDENTITY_MEMBER = 1
IDENTITY_CIDR = 0x80000000
POLICY_PORT_BITS = 48
POLICY_FULL_BITS = 64
NAME_LEN = 256
NAME_MAX_BYTES = NAME_LEN - 1  # names are cut to this many UTF-8 bytes (NUL-terminated ovl_name.text)

# Protocol numbers the programs judge (the kernel's IPPROTO_*; checked against socket's).
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
PROTO_NUMBERS = {"icmp": IPPROTO_ICMP, "tcp": IPPROTO_TCP, "udp": IPPROTO_UDP, "icmpv6": IPPROTO_ICMPV6}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}

# Map sizes (max entries; events: ring buffer pages), by their datapath.sizes name: the
# one place of their defaults. The loader passes every one to the C side as -D<define>
# (overlay/datapath/ebpf/build.py); bpf/lib/maps.h has no defaults of its own.
MAP_SIZES = {
    "nat": 65536,           # ovl_nat_ext: the NAT entries ovl_nat's slots do not cover
    "nat_slots": 65536,     # ovl_nat's slots (not a config key: nat_slots(overlay_subnet))
    "peers": 65536,
    "conntrack": 262144,    # ovl_ct
    "failsafe": 1024,
    "events_pages": 16,     # ovl_events (not a config key)
    "policy": 65536,
    "cidr_ident": 4096,
    "names": 65536,
    "conntrack6": 65536,
    "conntrack_in": 65536,
    "frag": 8192,
    "peers6": 65536,
    "failsafe6": 1024,
    "cidr_ident6": 4096,
    "sock": 65536,          # ovl_sock, socket mode's reverse translations (not a config key)
}
SIZE_DEFINES = {
    "nat": "OVL_NAT_MAX",
    "nat_slots": "OVL_NAT_SLOTS",
    "peers": "OVL_PEERS_MAX",
    "conntrack": "OVL_CT_MAX",
    "failsafe": "OVL_FAILSAFE_MAX",
    "events_pages": "OVL_EVENTS_PAGES",
    "policy": "OVL_POLICY_MAX",
    "cidr_ident": "OVL_CIDR_IDENT_MAX",
    "names": "OVL_NAMES_MAX",
    "conntrack6": "OVL_CT6_MAX",
    "conntrack_in": "OVL_CT_IN_MAX",
    "frag": "OVL_FRAG_MAX",
    "peers6": "OVL_PEERS6_MAX",
    "failsafe6": "OVL_FAILSAFE6_MAX",
    "cidr_ident6": "OVL_CIDR_IDENT6_MAX",
    "sock": "OVL_SOCK_MAX",
}


class CfgIndex(enum.IntEnum):
    REJECT_ALL = 0
    EGRESS_IFINDEX = 1
    MODE = 2
    ABI_VERSION = 3
    POLICY_ENFORCED = 4
    POLICY_DEFAULT = 5
    NAT_GEN = 6
    CT_TCP_SYN_S = 7
    CT_TCP_ESTABLISHED_S = 8
    CT_TCP_FIN_S = 9
    CT_TCP_RST_S = 10
    CT_UDP_S = 11
    CT_ICMP_S = 12
    FRAG_S = 13
    SELF_HINT = 14
    NETNS_COOKIE = 15
    NAT_BASE = 16
    MAX = 32


def nat_slots(subnet: str) -> int:
    """ovl_nat's slot count for an overlay subnet: its address count, at most NAT_SLOTS_MAX."""
    return min(ipaddress.IPv4Network(subnet, strict=False).num_addresses, NAT_SLOTS_MAX)


def nat_base(subnet: str) -> int:
    """OVL_CFG_NAT_BASE for an overlay subnet: its network address in host order."""
    return int(ipaddress.IPv4Network(subnet, strict=False).network_address)


class FilterMode(enum.IntEnum):
    ENFORCE = 0
    AUDIT = 1


class Reason(enum.IntEnum):
    DROP_NONE = 0
    DROP_NO_PEER = 1
    DROP_NOT_ALLOWED = 2
    DROP_MALFORMED = 3
    DROP_POLICY = 4
    DROP_FRAG_SHORT = 5
    DROP_FRAG_ORPHAN = 6
    DROP_MARTIAN = 7
    DROP_MAX = 8
    PASS_BASE = 16
    PASS_FAILSAFE = 16
    PASS_ESTABLISHED = 17
    PASS_LOOPBACK = 18
    PASS_MEMBER = 19
    PASS_OPEN_PORT = 20
    PASS_DEFAULT = 21
    PASS_RELATED = 22
    NAT_EGRESS = 23
    NAT_INGRESS = 24
    PASS_UNTOUCHED = 25
    PASS_POLICY = 26
    PASS_NDP = 27
    PASS_FRAGMENT = 28
    CT_EXPIRED = 29
    CT_NAT_STALE = 30
    SOCK_CONNECT = 31
    SOCK_SENDMSG = 32
    SOCK_RECVMSG = 33
    SOCK_PEERNAME = 34
    SOCK_OTHER_NETNS = 35
    COUNTER_MAX = 40


# Counter slots that carry a meaning, by the name /status and /metrics use.
DROP_REASONS = {
    Reason.DROP_NO_PEER: "no_peer",
    Reason.DROP_NOT_ALLOWED: "not_allowed",
    Reason.DROP_MALFORMED: "malformed",
    Reason.DROP_POLICY: "policy",
    Reason.DROP_FRAG_SHORT: "frag_short",
    Reason.DROP_FRAG_ORPHAN: "frag_orphan",
    Reason.DROP_MARTIAN: "martian",
}
PASS_REASONS = {
    Reason.PASS_FAILSAFE: "failsafe",
    Reason.PASS_ESTABLISHED: "established",
    Reason.PASS_LOOPBACK: "loopback",
    Reason.PASS_MEMBER: "member",
    Reason.PASS_OPEN_PORT: "open_port",
    Reason.PASS_DEFAULT: "default",
    Reason.PASS_RELATED: "related",
    Reason.NAT_EGRESS: "nat_egress",
    Reason.NAT_INGRESS: "nat_ingress",
    Reason.PASS_UNTOUCHED: "untouched",
    Reason.PASS_POLICY: "policy",
    Reason.PASS_NDP: "ndp",
    Reason.PASS_FRAGMENT: "fragment",
    Reason.CT_EXPIRED: "ct_expired",
    Reason.CT_NAT_STALE: "ct_nat_stale",
    Reason.SOCK_CONNECT: "sock_connect",
    Reason.SOCK_SENDMSG: "sock_sendmsg",
    Reason.SOCK_RECVMSG: "sock_recvmsg",
    Reason.SOCK_PEERNAME: "sock_peername",
    Reason.SOCK_OTHER_NETNS: "sock_other_netns",
}


class NameKind(enum.IntEnum):
    POLICY = 1
    RULE = 2
    IDENTITY = 3
    CIDR = 4


class CtState(enum.IntEnum):
    NEW = 0
    SYN_SENT = 1
    ESTABLISHED = 2
    CLOSING = 3
    CLOSED = 4


class PortSlot(enum.IntEnum):
    TCP = 0
    UDP = 1
    SLOTS = 2


# the open-ports bitmap's slot of each protocol, by name and by number (plain ints)
PORT_SLOTS = {"tcp": int(PortSlot.TCP), "udp": int(PortSlot.UDP)}
PROTO_SLOT = {PROTO_NUMBERS[name]: slot for name, slot in PORT_SLOTS.items()}


class OvlSockKey(ctypes.Structure):
    _fields_ = [
        ("cookie", ctypes.c_uint64),
        ("real", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class OvlNatVal(ctypes.Structure):
    _fields_ = [("real", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class OvlPeerVal(ctypes.Structure):
    _fields_ = [("identity", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class OvlAddr6(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32 * 4)]


class OvlLpmKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint32)]


class OvlLpm6Key(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint32 * 4)]


class OvlPolicyKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
    ]


class OvlNameKey(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_uint32), ("id", ctypes.c_uint32)]


class OvlName(ctypes.Structure):
    _fields_ = [("text", ctypes.c_char * NAME_LEN)]


class OvlCtKey(ctypes.Structure):
    _fields_ = [
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class OvlCt6Key(ctypes.Structure):
    _fields_ = [
        ("saddr", ctypes.c_uint32 * 4),
        ("daddr", ctypes.c_uint32 * 4),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class OvlCtVal(ctypes.Structure):
    _fields_ = [
        ("overlay", ctypes.c_uint32),
        ("nat_gen", ctypes.c_uint32),
        ("last_seen_ns", ctypes.c_uint64),
        ("state", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 6),
    ]


class OvlCtInVal(ctypes.Structure):
    _fields_ = [("last_seen_ns", ctypes.c_uint64)]


class OvlFragKey(ctypes.Structure):
    _fields_ = [
        ("saddr", ctypes.c_uint32 * 4),
        ("daddr", ctypes.c_uint32 * 4),
        ("id", ctypes.c_uint32),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class OvlFragVal(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("overlay", ctypes.c_uint32),
        ("verdict", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("l4_len", ctypes.c_uint16),
    ]


class OvlDropEvent(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("saddr", ctypes.c_uint32 * 4),
        ("daddr", ctypes.c_uint32 * 4),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("audit", ctypes.c_uint8),
        ("direction", ctypes.c_uint8),
        ("policy", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


STRUCTS = {
    "ovl_sock_key": OvlSockKey,
    "ovl_nat_val": OvlNatVal,
    "ovl_peer_val": OvlPeerVal,
    "ovl_addr6": OvlAddr6,
    "ovl_lpm_key": OvlLpmKey,
    "ovl_lpm6_key": OvlLpm6Key,
    "ovl_policy_key": OvlPolicyKey,
    "ovl_name_key": OvlNameKey,
    "ovl_name": OvlName,
    "ovl_ct_key": OvlCtKey,
    "ovl_ct6_key": OvlCt6Key,
    "ovl_ct_val": OvlCtVal,
    "ovl_ct_in_val": OvlCtInVal,
    "ovl_frag_key": OvlFragKey,
    "ovl_frag_val": OvlFragVal,
    "ovl_drop_event": OvlDropEvent,
}


def ip_to_be32(addr: str) -> int:
    """'10.0.0.1' -> the u32 whose memory holds the address in network order."""
    return struct.unpack("=I", socket.inet_aton(addr))[0]


def be32_to_ip(value: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", value))


_MAPPED = b"\0" * 10 + b"\xff\xff"


def ip_to_words(addr: str) -> tuple[int, int, int, int]:
    """An IPv6 address, or an IPv4 one IPv4-mapped, as the four u32 words of
    its 16 bytes in network order (the ABI's 16-byte address form)."""
    ip = ipaddress.ip_address(addr)
    raw = ip.packed if ip.version == 6 else _MAPPED + ip.packed
    return struct.unpack("=4I", raw)


def words_to_ip(words, family: int | None = None) -> str:
    """The inverse of :func:`ip_to_words`; an IPv4-mapped address comes back
    as IPv4 (unless ``family`` is 6)."""
    raw = struct.pack("=4I", *words)
    if family != 6 and raw[:12] == _MAPPED:
        return socket.inet_ntoa(raw[12:])
    return str(ipaddress.IPv6Address(raw))


def self_hint_bit(words) -> int:
    """The bit of OVL_CFG_SELF_HINT that an address (its four u32 words as stored) sets."""
    x = words[0] ^ words[1] ^ words[2] ^ words[3]
    return ((x * SELF_HINT_MUL) & 0xFFFFFFFF) >> 26


def addr6(addr: str) -> OvlAddr6:
    return OvlAddr6((ctypes.c_uint32 * 4)(*ip_to_words(addr)))


def port_to_be16(port: int) -> int:
    return struct.unpack("=H", struct.pack("!H", port))[0]


def be16_to_port(value: int) -> int:
    return struct.unpack("!H", struct.pack("=H", value))[0]


def lpm_key(cidr: str) -> OvlLpmKey:
    net = ipaddress.IPv4Network(cidr, strict=True)
    return OvlLpmKey(net.prefixlen, ip_to_be32(str(net.network_address)))


def lpm6_key(cidr: str) -> OvlLpm6Key:
    net = ipaddress.IPv6Network(cidr, strict=True)
    words = struct.unpack("=4I", net.network_address.packed)
    return OvlLpm6Key(net.prefixlen, (ctypes.c_uint32 * 4)(*words))


def policy_key(identity: int, proto: int, port: int, port_bits: int) -> OvlPolicyKey:
    """The ovl_policy key of ``identity``/``proto`` and the ports whose first
    ``port_bits`` bits (0..16) are those of ``port`` (host order)."""
    return OvlPolicyKey(POLICY_PORT_BITS + port_bits, identity, proto, 0, port_to_be16(port))


def proto_name(number: int) -> str:
    """``tcp``, ``udp``, ``icmp``, ``icmpv6``, or the number as text."""
    return PROTO_NAMES.get(number, str(number))


# -- the open-ports bitmap (ovl_ports) ------------------------------------------
#
# BPF_ARRAY of u64 words, PORT_WORDS per slot (PortSlot): index = slot * PORT_WORDS +
# port / 64, bit port % 64. In the ops vocabulary a word is ``(slot, word) -> bits``,
# non-zero words only.


def port_bit(proto: int, port: int) -> tuple[tuple[int, int], int] | None:
    """The ``(slot, word)`` key and the bit mask of ``port`` of protocol number ``proto``;
    None for a protocol without open ports (anything but TCP and UDP)."""
    slot = PROTO_SLOT.get(proto)
    return None if slot is None else ((slot, port >> 6), 1 << (port & 63))


def ports_bitmap(specs: Iterable[tuple[int, int]], protos: Iterable[str] = ("tcp", "udp")) -> dict:
    """Port ranges ``(lo, hi)`` -> {(slot, word): bits} for each protocol name, non-zero words only."""
    words: dict[tuple[int, int], int] = defaultdict(int)
    for proto in protos:
        slot = PORT_SLOTS[proto]
        for lo, hi in specs:
            for port in range(lo, hi + 1):  # as port_bit(), inline: a range may be 65535 ports
                words[(slot, port >> 6)] |= 1 << (port & 63)
    return {k: v for k, v in words.items() if v}


def bitmap_ports(words: Mapping[tuple[int, int], int], slot: int) -> list[int]:
    """The inverse of :func:`ports_bitmap` for one slot: the sorted open ports."""
    out = []
    for (s, word), bits in words.items():
        if s != slot:
            continue
        for bit in range(64):
            if bits >> bit & 1:
                out.append(word * 64 + bit)
    return sorted(out)


def ports_by_proto(words: Mapping[tuple[int, int], int]) -> dict[str, list[int]]:
    """{(slot, word): bits} -> {"tcp": [ports], "udp": [ports]} (for humans and JSON)."""
    return {name: bitmap_ports(words, slot) for name, slot in PORT_SLOTS.items()}
