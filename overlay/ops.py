"""The vocabulary shared by plan, diff and every datapath: tables and ops.

A datapath state is a mapping ``table name -> {key: value}`` of plain
hashable Python values. ``plan`` builds the desired one, a datapath's
``observe()`` reports the one it holds, and ``diff`` turns the difference
into ops. Tables:

``nat``       overlay address (str) -> NatEntry(real, override)
``peers``     real address (str, IPv4 or IPv6) -> PeerEntry(identity, flags)
``ports``     (slot, word) -> 64-bit bitmap word (int, non-zero); slot 0 tcp, 1 udp
              (``abi.ports_bitmap`` encodes ranges, ``abi.bitmap_ports`` decodes)
``failsafe``  CIDR (str, "a.b.c.d/n" or IPv6) -> flags (int): abi.FS_SSH | abi.FS_ALL
``config``    name (str) -> int: reject_all, mode (always present); policy_enforced,
              policy_default (present only when non-zero, like ``ports`` words); the
              conntrack lifetimes in seconds (``ct_tcp_syn_s``, ``ct_tcp_established_s``,
              ``ct_tcp_fin_s``, ``ct_tcp_rst_s``, ``ct_udp_s``, ``ct_icmp_s``, ``frag_s``; present
              only when not the default, like ``ports`` words: 0 means the default)
``policy``    (identity, proto number, first port, port prefix bits 0..16) -> policy index
              (int): new inbound flows from ``identity`` to a port whose first bits
              are those of ``first port`` are allowed by that policy (docs/policies.md)
``cidr_ident`` CIDR (str, IPv4 or IPv6) -> CIDR identity (int, bit 31 set)
``names``     (kind, number) -> text (str): ("policy", index) -> policy id,
              ("rule", index) -> the rule in words, ("identity", identity) -> its
              groups comma-separated, ("cidr", identity) -> its CIDR
``self``      this host's own address (str, IPv4 or IPv6) -> abi.SELF_F_OWN: a packet from
              the wire with such a source (or a loopback one) is a martian

``policy``, ``cidr_ident`` and ``names`` are enforced by the eBPF datapath only;
the iptables backend keeps them in memory and ignores them (docs/policies.md).

The numbers in these tables (flags, identities, slots, modes) are the ABI's: they come
from :mod:`overlay.abi`, the one mirror of bpf/include/overlay_abi.h.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from overlay.abi import IDENTITY_MEMBER, PEER_F_MEMBER

TABLES = ("nat", "peers", "ports", "failsafe", "config", "policy", "cidr_ident", "names",
          "self")
# the keys of the ``config`` table (each an ovl_cfg index of the same name, upper case)
CT_LIFETIME_KEYS = ("ct_tcp_syn_s", "ct_tcp_established_s", "ct_tcp_fin_s", "ct_tcp_rst_s",
                    "ct_udp_s", "ct_icmp_s", "frag_s")
CONFIG_KEYS = ("reject_all", "mode", "policy_enforced", "policy_default", *CT_LIFETIME_KEYS)
# the kinds of the ``names`` table (each an enum ovl_name_kind of the same name, upper case)
NAME_KINDS = ("policy", "rule", "identity", "cidr")


@dataclass(frozen=True, slots=True)
class NatEntry:
    real: str
    override: bool = False


@dataclass(frozen=True, slots=True)
class PeerEntry:
    identity: int = IDENTITY_MEMBER
    flags: int = PEER_F_MEMBER


@dataclass(frozen=True)
class Op:
    """Set ``table[key] = value``, or delete ``table[key]`` when ``value`` is None."""

    table: str
    key: Hashable
    value: Any = None

    @property
    def is_delete(self) -> bool:
        return self.value is None


def empty_state() -> dict[str, dict]:
    return {t: {} for t in TABLES}
