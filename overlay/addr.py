"""Address and port validation shared by config and records.

Functions here raise ``ValueError`` with a short reason; callers wrap it into
the error type of their layer (``InvalidConfigError`` with a key path, or
``InvalidRecord``).
"""

from __future__ import annotations

import ipaddress

from overlay.errors import clip, shown

_RESERVED = ipaddress.IPv4Network("240.0.0.0/4")


def _host(value: object, cls, family: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``value`` as one address of ``cls``, refusing what no host address can be."""
    if not isinstance(value, str):
        raise ValueError(f"expected an {family} address string, got {type(value).__name__}")
    if "/" in value:
        raise ValueError(f"{shown(value)} is a network (CIDR), expected a single host address")
    try:
        ip = cls(value.strip())
    except ValueError:
        raise ValueError(f"{shown(value)} is not an {family} address") from None
    if ip.is_unspecified:
        raise ValueError(f"{value} is the unspecified address")
    if ip.is_multicast:
        raise ValueError(f"{value} is a multicast address")
    if ip.is_loopback:
        raise ValueError(f"{value} is {'a loopback' if family == 'IPv4' else 'the loopback'} address")
    return ip


def host_ipv4(value: object) -> str:
    """A single usable IPv4 host address, returned in canonical text form."""
    ip = _host(value, ipaddress.IPv4Address, "IPv4")
    if str(ip) != value.strip():
        raise ValueError(f"{shown(value)} is not in canonical dotted-quad form")
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{value} is the broadcast address")
    if ip in _RESERVED:
        raise ValueError(f"{value} is in the reserved range 240.0.0.0/4")
    return str(ip)


def host_ipv6(value: object) -> str:
    """A single usable IPv6 unicast host address (global or unique-local), canonical text."""
    ip = _host(value, ipaddress.IPv6Address, "IPv6")
    if ip.is_link_local:
        raise ValueError(f"{value} is link-local (ambiguous without a link); use a global or unique-local address")
    if ip.ipv4_mapped is not None:
        raise ValueError(f"{value} is an IPv4-mapped address; give the IPv4 address as private/public")
    return str(ip)


def cidr_ip(value: object) -> str:
    """An IPv4 or IPv6 network in CIDR form with no host bits set."""
    if isinstance(value, str) and ":" in value:
        try:
            return str(ipaddress.IPv6Network(value.strip(), strict=True))
        except ValueError as exc:
            raise ValueError(f"{shown(value)} is not an IPv6 network: {clip(str(exc), 100)}") from None
    return cidr_ipv4(value)


def cidr_ipv4(value: object) -> str:
    """An IPv4 network in CIDR form with no host bits set ("10.0.0.0/8")."""
    if not isinstance(value, str):
        raise ValueError(f"expected a CIDR string, got {type(value).__name__}")
    try:
        net = ipaddress.IPv4Network(value.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{shown(value)} is not an IPv4 network: {clip(str(exc), 100)}") from None
    return str(net)


def subnet_ipv4(value: object) -> ipaddress.IPv4Network:
    """An overlay subnet: a CIDR with room for at least two hosts."""
    net = ipaddress.IPv4Network(cidr_ipv4(value))
    if net.prefixlen > 30:
        raise ValueError(f"{shown(value)} is too small: an overlay subnet needs a prefix of /30 or shorter")
    return net


def in_subnet_host(value: object, subnet: ipaddress.IPv4Network) -> str:
    """A host address inside ``subnet``, not its network or broadcast address."""
    addr = host_ipv4(value)
    ip = ipaddress.IPv4Address(addr)
    if ip not in subnet:
        raise ValueError(f"{addr} is outside the overlay subnet {subnet}")
    if ip in (subnet.network_address, subnet.broadcast_address):
        raise ValueError(f"{addr} is the network or broadcast address of {subnet}")
    return addr


def port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a port number, got {shown(value)}")
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} is outside 1..65535")
    return value


def port_spec(value: object) -> tuple[int, int]:
    """A port (80) or a range ("8000-8100"), returned as an inclusive (lo, hi)."""
    if isinstance(value, str):
        text = value.strip()
        if "-" in text:
            lo_s, _, hi_s = text.partition("-")
            if not (lo_s.strip().isdigit() and hi_s.strip().isdigit()):
                raise ValueError(f"{shown(value)} is not a port range like \"8000-8100\"")
            lo, hi = port(int(lo_s)), port(int(hi_s))
            if lo > hi:
                raise ValueError(f"range {shown(value)} starts after it ends")
            return lo, hi
        if text.isdigit():
            p = port(int(text))
            return p, p
        raise ValueError(f"{shown(value)} is not a port or a port range")
    p = port(value)
    return p, p
