"""The old system's party entry (Neti's ``ip-map`` children), pure (docs/migration.md).

Each live host of the old system is one ephemeral child of ``<prefix>/<ip_map>`` named
``<uuid4 hex>-<public>|<private>|<overlay>|<vpcflag>`` (empty data). Its readers split the
name on the first ``-``, then the rest on ``|`` into four fields; the flag is ``0`` or
``1``. A peer is reached at its private address when its flag equals the reader's, else at
its public address (Overlay's rule with networks: each flag is one network,
``registry.neti.vpcflag``).
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import dataclass

from overlay import addr

_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class PartyEntry:
    uid: str
    public: str
    private: str
    overlay: str
    flag: int

    @property
    def name(self) -> str:
        return format_entry(self.public, self.private, self.overlay, self.flag, self.uid)

    @property
    def suffix(self) -> str:
        """The part after the uuid: the same for every entry of one host with one address set."""
        return self.name.split("-", 1)[1]


def format_entry(public: str, private: str, overlay: str, flag: int, uid: str | None = None) -> str:
    """The party child name for a host (a fresh uuid4 unless ``uid`` is given)."""
    if flag not in (0, 1):
        raise ValueError(f"vpcflag must be 0 or 1, got {flag!r}")
    uid = uuid.uuid4().hex if uid is None else uid
    return f"{uid}-{public}|{private}|{overlay}|{flag}"


def parse_entry(name: str, subnet: ipaddress.IPv4Network) -> PartyEntry:
    """A party child name, as strictly as a native record: raises ValueError naming the fault."""
    uid, sep, rest = name.partition("-")
    if not sep:
        raise ValueError(f"party entry {name[:80]!r} has no '-' after its uuid")
    if len(uid) != 32 or not set(uid) <= _HEX:
        raise ValueError(f"party entry {name[:80]!r}: {uid[:40]!r} is not a uuid4 in hex (32 of 0-9a-f)")
    fields = rest.split("|")
    if len(fields) != 4:
        raise ValueError(f"party entry {name[:80]!r} has {len(fields)} '|'-separated fields, not 4 "
                         "(public|private|overlay|vpcflag)")
    public, private, overlay, flag = fields
    try:
        public = addr.host_ipv4(public)
    except ValueError as exc:
        raise ValueError(f"party entry {name[:80]!r}: public address: {exc}") from None
    try:
        private = addr.host_ipv4(private)
    except ValueError as exc:
        raise ValueError(f"party entry {name[:80]!r}: private address: {exc}") from None
    try:
        overlay = addr.in_subnet_host(overlay, subnet)
    except ValueError as exc:
        raise ValueError(f"party entry {name[:80]!r}: overlay address: {exc}") from None
    if flag not in ("0", "1"):
        raise ValueError(f"party entry {name[:80]!r}: vpcflag {flag[:10]!r} is not 0 or 1")
    return PartyEntry(uid, public, private, overlay, int(flag))
