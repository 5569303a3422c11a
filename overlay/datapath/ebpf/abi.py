"""The one Python mirror of bpf/include/overlay_abi.h.

tests/bpf/test_abi.py checks every structure here against the layouts bcc
compiled (sizes and field offsets) and every constant against the header.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import socket
import struct

ABI_VERSION = 2

PORT_WORDS = 1024
SSH_PORT = 22

NAT_F_OVERRIDE = 1
PEER_F_MEMBER = 1
FS_SSH = 1
FS_ALL = 2
CT_F_EGRESS = 1
CT_F_NAT = 2
IDENTITY_NONE = 0
IDENTITY_MEMBER = 1
IDENTITY_CIDR = 0x80000000
POLICY_PORT_BITS = 48
POLICY_FULL_BITS = 64
NAME_LEN = 256


class CfgIndex(enum.IntEnum):
    REJECT_ALL = 0
    EGRESS_IFINDEX = 1
    MODE = 2
    ABI_VERSION = 3
    POLICY_ENFORCED = 4
    POLICY_DEFAULT = 5
    MAX = 8


class FilterMode(enum.IntEnum):
    ENFORCE = 0
    AUDIT = 1


class Reason(enum.IntEnum):
    DROP_NONE = 0
    DROP_NO_PEER = 1
    DROP_NOT_ALLOWED = 2
    DROP_MALFORMED = 3
    DROP_POLICY = 4
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
    COUNTER_MAX = 32


# Counter slots that carry a meaning, by the name /status and /metrics use.
DROP_REASONS = {
    Reason.DROP_NO_PEER: "no_peer",
    Reason.DROP_NOT_ALLOWED: "not_allowed",
    Reason.DROP_MALFORMED: "malformed",
    Reason.DROP_POLICY: "policy",
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
}


class NameKind(enum.IntEnum):
    POLICY = 1
    RULE = 2
    IDENTITY = 3
    CIDR = 4


class PortSlot(enum.IntEnum):
    TCP = 0
    UDP = 1
    SLOTS = 2


class OvlNatVal(ctypes.Structure):
    _fields_ = [("real", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class OvlPeerVal(ctypes.Structure):
    _fields_ = [("identity", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class OvlLpmKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint32)]


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


class OvlCtVal(ctypes.Structure):
    _fields_ = [
        ("overlay", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("last_seen_ns", ctypes.c_uint64),
    ]


class OvlDropEvent(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("audit", ctypes.c_uint8),
        ("direction", ctypes.c_uint8),
        ("policy", ctypes.c_uint32),
    ]


STRUCTS = {
    "ovl_nat_val": OvlNatVal,
    "ovl_peer_val": OvlPeerVal,
    "ovl_lpm_key": OvlLpmKey,
    "ovl_policy_key": OvlPolicyKey,
    "ovl_name_key": OvlNameKey,
    "ovl_name": OvlName,
    "ovl_ct_key": OvlCtKey,
    "ovl_ct_val": OvlCtVal,
    "ovl_drop_event": OvlDropEvent,
}


def ip_to_be32(addr: str) -> int:
    """'10.0.0.1' -> the u32 whose memory holds the address in network order."""
    return struct.unpack("=I", socket.inet_aton(addr))[0]


def be32_to_ip(value: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", value))


def port_to_be16(port: int) -> int:
    return struct.unpack("=H", struct.pack("!H", port))[0]


def be16_to_port(value: int) -> int:
    return struct.unpack("!H", struct.pack("=H", value))[0]


def lpm_key(cidr: str) -> OvlLpmKey:
    net = ipaddress.IPv4Network(cidr, strict=True)
    return OvlLpmKey(net.prefixlen, ip_to_be32(str(net.network_address)))


def policy_key(identity: int, proto: int, port: int, port_bits: int) -> OvlPolicyKey:
    """The ovl_policy key of ``identity``/``proto`` and the ports whose first
    ``port_bits`` bits (0..16) are those of ``port`` (host order)."""
    return OvlPolicyKey(POLICY_PORT_BITS + port_bits, identity, proto, 0, port_to_be16(port))
