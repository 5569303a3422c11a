"""Packets by hand, for probes that must not depend on a ``ping`` binary (raw sockets, root)."""

from __future__ import annotations

import select
import socket
import struct
import time


def icmp_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    """An ICMP echo request (type 8) with a correct checksum."""
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, icmp_checksum(head + payload), ident, seq) + payload


def await_echo_reply(sock: socket.socket, ident: int, seq: int, timeout: float) -> str | None:
    """The source address of the first echo reply to ``(ident, seq)`` on raw socket ``sock``
    within ``timeout`` seconds, or None."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            break
        pkt, src = sock.recvfrom(2048)
        ihl = (pkt[0] & 0x0F) * 4
        typ, _code, _csum, rid, rseq = struct.unpack("!BBHHH", pkt[ihl:ihl + 8])
        if typ == 0 and rid == ident and rseq == seq:
            return src[0]
    return None
