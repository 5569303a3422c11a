"""What the ZooKeeper registry's worker knows of each record, and why one is accepted or refused.

A node record is accepted when it parses (DESIGN §4.2), lives at ``nodes/<its node_id>``
and ``alloc/ip-to-id/<its overlay>`` names it; a policy when it parses; ``config/max_change``
when it is an integer in range. Anything else is refused with a reason, logged once per
record version (``rejected_total`` counts those lines). Worker thread only.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from overlay.errors import InvalidRecord
from overlay.model import Node, Policy, parse_node_record, parse_policy_record, valid_name
from overlay.ownership import parse_assignment
from overlay.zk.client import Session, Unreadable
from overlay.zk.layout import Layout

log = logging.getLogger(__name__)

MAX_MAX_CHANGE = 1_000_000


@dataclass
class Rec:
    """What the worker knows of one ``nodes/<name>`` znode."""

    mzxid: int
    node: Node | None      # parsed, before the ownership check
    reason: str | None     # why it does not parse


class Records:
    """The records of ``layout`` as one node (``node_id``, for log lines) sees them."""

    def __init__(self, session: Session, layout: Layout, subnet: ipaddress.IPv4Network, node_id: str):
        self._zk = session
        self._layout = layout
        self.subnet = subnet
        self.node_id = node_id
        self.rejected_total = 0                     # rejection log lines (once per record version)
        self.records: dict[str, Rec] = {}
        self.claims: dict[str, set[str]] = {}       # overlay -> names whose records claim it
        self.owners: dict[str, str | None] = {}     # cache of alloc/ip-to-id/<overlay>
        self.alloc_order: dict[str, int] = {}       # overlay -> czxid of alloc/ip-to-id/<overlay>
        self.logged: dict[str, tuple[int, str]] = {}

    def reset(self, keep: set[str]) -> None:
        """Forget everything (a full re-read follows); keep the log memory of ``keep``."""
        self.owners.clear()
        self.alloc_order.clear()
        self.records.clear()
        self.claims.clear()
        self.logged = {k: v for k, v in self.logged.items() if k in keep}

    def store_result(self, name: str, res: Any) -> None:
        if isinstance(res, Unreadable):
            self.forget(name, keep_owner=True)
            self.records[name] = Rec(-1, None, f"nodes/{name} cannot be read ({res.error})")
        else:
            self._store_record(name, res[0], res[1].mzxid)

    def _store_record(self, name: str, data: bytes, mzxid: int) -> None:
        old = self.records.get(name)
        if old is not None and old.mzxid == mzxid:
            return
        self.forget(name, keep_owner=True)
        try:
            valid_name(name, "znode name")
            node = parse_node_record(data, self.subnet)
            if node.node_id != name:
                raise InvalidRecord(f"node record names node_id {node.node_id!r} but lives at nodes/{name}")
            rec = Rec(mzxid, node, None)
            self.claims.setdefault(node.overlay, set()).add(name)
        except (InvalidRecord, ValueError) as exc:
            rec = Rec(mzxid, None, str(exc))
        self.records[name] = rec

    def forget(self, name: str, deleted: bool = False, keep_owner: bool = False) -> None:
        """Drop what is known of ``nodes/<name>``; the cached owner of its overlay goes
        too once nobody claims it (unless the record is about to be replaced)."""
        if deleted:
            self.logged.pop(name, None)
        rec = self.records.pop(name, None)
        if rec is not None and rec.node is not None:
            claimants = self.claims.get(rec.node.overlay)
            if claimants is not None:
                claimants.discard(name)
                if not claimants:
                    del self.claims[rec.node.overlay]
                    if not keep_owner:
                        self.owners.pop(rec.node.overlay, None)
                        self.alloc_order.pop(rec.node.overlay, None)

    def fetch_owners(self, ips: set[str]) -> None:
        if not ips:
            return
        got = self._zk.get_many([f"{self._layout.ip_to_id}/{ip}" for ip in sorted(ips)])
        for ip in ips:
            res = got[f"{self._layout.ip_to_id}/{ip}"]
            self.alloc_order.pop(ip, None)
            if isinstance(res, Unreadable):
                self.owners[ip] = ""  # never a node name: claimants are rejected
            elif res is None:
                self.owners[ip] = None
            else:
                self.owners[ip] = res[0].decode("utf-8", "replace")
                self.alloc_order[ip] = res[1].czxid   # when the owner got it: the order of its record

    def order_of(self, node: Node) -> int | None:
        """The order key of an accepted record: the zxid that created its allocation (both
        directions are created in one transaction), which outlives restarts and sessions."""
        return self.alloc_order.get(node.overlay)

    def evaluate(self, name: str) -> tuple[Node | None, str | None]:
        rec = self.records[name]
        if rec.node is None:
            reason = rec.reason or "invalid"
        else:
            owner = self.owners.get(rec.node.overlay)
            if owner == name:
                return rec.node, None
            if owner == "":
                reason = f"alloc/ip-to-id/{rec.node.overlay} cannot be read, so {name}'s overlay is unproven"
            elif owner is None:
                reason = f"overlay {rec.node.overlay} is not allocated to {name} (no alloc/ip-to-id/{rec.node.overlay})"
            else:
                reason = f"overlay {rec.node.overlay} is allocated to {owner!r}, not {name!r}"
        self.log_rejection(name, rec.mzxid, reason)
        return None, reason

    def parse_policy(self, pid: str, res: Any) -> tuple[Policy | None, str | None]:
        return self._parse(f"policy:{pid}", f"policies/{pid}", res, lambda data: parse_policy_record(data, pid))

    def parse_assignment(self, node_id: str, res: Any) -> tuple[tuple[str, ...] | None, str | None]:
        """``(granted groups, None)`` or ``(None, reason)`` for ``assignments/<node_id>``."""
        def parse(data: bytes) -> tuple[str, ...]:
            valid_name(node_id, "assignment name")
            return parse_assignment(data)

        return self._parse(f"assignment:{node_id}", f"assignments/{node_id}", res, parse)

    def _parse(self, key: str, where: str, res: Any, parse: Any) -> tuple[Any, str | None]:
        """``(parse(data), None)``, or ``(None, reason)`` logged once under ``key``."""
        if isinstance(res, Unreadable):
            reason, mzxid = f"{where} cannot be read ({res.error})", -1
        else:
            data, stat = res
            mzxid = stat.mzxid
            try:
                return parse(data), None
            except (InvalidRecord, ValueError) as exc:
                reason = str(exc)
        self.log_rejection(key, mzxid, reason)
        return None, reason

    def parse_max_change(self, res: Any) -> int | None:
        if res is None:
            return None
        if isinstance(res, Unreadable):
            self.log_rejection("config:max_change", -1, f"{self._layout.max_change} cannot be read ({res.error})")
            return None
        data, stat = res
        text = data.decode("utf-8", "replace").strip()
        if text.isdigit() and int(text) <= MAX_MAX_CHANGE:
            return int(text)
        self.log_rejection("config:max_change", stat.mzxid,
                            f"{self._layout.max_change} holds {text[:40]!r}, not an integer in 0..{MAX_MAX_CHANGE}")
        return None

    def log_rejection(self, key: str, mzxid: int, reason: str) -> None:
        if self.logged.get(key) == (mzxid, reason):
            return
        self.logged[key] = (mzxid, reason)
        self.rejected_total += 1
        log.warning("node %s: ignoring registry record %s: %s", self.node_id, key, reason)
