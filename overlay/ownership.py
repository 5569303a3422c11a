"""Who holds what: groups are granted by assignment, an address belongs to the earlier registration.

Pure (no I/O); the planner, the registries and the controller use it (docs/registry.md,
"Assignments" and "Address ownership").

**Assignments.** ``<prefix>/assignments/<node_id>`` holds ``{"v": 1, "groups": [...]}``,
written by the operator (``overlay nodes groups``). A node's effective groups are the
groups its record claims *and* its assignment grants; a node without an assignment has
none. A node still chooses which granted groups it joins.

**Order.** Every record has an order key given by its registry (ZooKeeper: the creation
zxid of ``nodes/<id>``; the controller: the journal revision at which the record was
created; static: the position in the file), kept beside the record in the view. Ties
are broken by node id.

**Conflicts.** Records that claim one address: the earliest keeps it, the later ones are
excluded with a :class:`Conflict` naming the holder. The planner claims a peer's overlay
and real address (as this node reaches it); the controller and ``overlay nodes list``
claim the overlay, the private address within its network and the public address
fleet-wide.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from overlay.errors import InvalidRecord
from overlay.model import MAX_GROUPS, Node, valid_name

ASSIGNMENT_VERSION = 1
MAX_ASSIGNMENT_BYTES = 4096
LAST = 1 << 62        # the order of a record its registry gave none

Grants = Mapping[str, tuple[str, ...]]
Claim = tuple[str, ...]   # ("overlay", ip), ("real", ip), ("private", network, ip), ("public", ip)


# --- assignments -------------------------------------------------------------------------------


def parse_assignment(data: bytes) -> tuple[str, ...]:
    """The granted groups of an assignment record (raises :class:`InvalidRecord`)."""
    if len(data) > MAX_ASSIGNMENT_BYTES:
        raise InvalidRecord(f"assignment is {len(data)} bytes, over {MAX_ASSIGNMENT_BYTES}")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRecord(f"assignment is not UTF-8 JSON: {str(exc)[:100]}") from None
    if not isinstance(obj, dict) or set(obj) != {"v", "groups"}:
        raise InvalidRecord('assignment must be {"v": 1, "groups": [...]}')
    if isinstance(obj["v"], bool) or obj["v"] != ASSIGNMENT_VERSION:
        raise InvalidRecord(f"assignment: unsupported version v={str(obj['v'])[:20]}")
    return valid_groups(obj["groups"], "assignment groups")


def valid_groups(groups: object, what: str = "groups") -> tuple[str, ...]:
    """Sorted, unique group names (raises :class:`InvalidRecord`)."""
    if not isinstance(groups, (list, tuple)):
        raise InvalidRecord(f"{what} must be a list of group names")
    if len(groups) > MAX_GROUPS:
        raise InvalidRecord(f"{what}: more than {MAX_GROUPS} groups")
    try:
        return tuple(sorted({valid_name(g, "group") for g in groups}))
    except ValueError as exc:
        raise InvalidRecord(f"{what}: {exc}") from None


def serialise_assignment(groups: Iterable[str]) -> bytes:
    return json.dumps({"v": ASSIGNMENT_VERSION, "groups": list(valid_groups(list(groups)))},
                      separators=(",", ":")).encode()


def granted(node: Node, grants: Grants) -> tuple[Node, tuple[str, ...]]:
    """``node`` with the groups its assignment grants, and the claimed groups dropped."""
    allowed = set(grants.get(node.node_id, ()))
    keep = tuple(g for g in node.groups if g in allowed)
    if len(keep) == len(node.groups):
        return node, ()
    return replace(node, groups=keep), tuple(g for g in node.groups if g not in allowed)


# --- address conflicts -------------------------------------------------------------------------


@dataclass(frozen=True)
class Conflict:
    """``node_id`` claims ``address`` (``kind``: overlay, real, private or public), which the
    earlier registration ``holder`` holds."""

    node_id: str
    kind: str
    address: str
    holder: str

    @property
    def reason(self) -> str:
        return f"{self.kind} address {self.address} is held by the earlier registration {self.holder}"

    def to_dict(self) -> dict[str, str]:
        return {"node_id": self.node_id, "kind": self.kind, "address": self.address, "holder": self.holder}


def fleet_claims(node: Node) -> list[Claim]:
    """What a registration holds fleet-wide: its overlay address, its private address within
    its network, its public address."""
    return [("overlay", node.overlay), ("private", node.network, node.private), ("public", node.public)]


def order_of(order: Mapping[str, int], node_id: str) -> tuple[int, str]:
    return order.get(node_id, LAST), node_id


def resolve(nodes: Iterable[Node], order: Mapping[str, int],
            claims: Callable[[Node], list[Claim]] = fleet_claims) -> tuple[list[Node], list[Conflict]]:
    """Keep the earliest claimant of every address: ``(kept, conflicts)``, both in order.
    A node that loses one of its claims holds none of them."""
    held: dict[Claim, str] = {}
    kept: list[Node] = []
    conflicts: list[Conflict] = []
    for node in sorted(nodes, key=lambda n: order_of(order, n.node_id)):
        mine = claims(node)
        lost = next((c for c in mine if c in held), None)
        if lost is not None:
            conflicts.append(Conflict(node.node_id, lost[0], lost[-1], held[lost]))
            continue
        for c in mine:
            held[c] = node.node_id
        kept.append(node)
    return kept, conflicts


def holders(node: Node, live: Iterable[Node]) -> list[Conflict]:
    """The addresses of ``node`` that other live registrations hold (RegisterNode's check)."""
    mine = set(fleet_claims(node))
    out = []
    for other in sorted(live, key=lambda n: n.node_id):
        if other.node_id == node.node_id:
            continue
        for c in fleet_claims(other):
            if c in mine:
                out.append(Conflict(node.node_id, c[0], c[-1], other.node_id))
    return out
