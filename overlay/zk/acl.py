"""Who may read and write what in the ZooKeeper layout: one policy (docs/registry.md, "ACLs").

With digest credentials configured (``registry.operator`` on the controller and operator
machines, ``registry.auth`` on daemons):

- everything the controller or an operator writes (groups, policies, config, assignments,
  the journal, the election, records and allocations made through the controller) is
  ``world:anyone:r`` + ``digest:<operator>:cdrwa`` (:func:`operator_acl`);
- what a daemon writes for itself (``nodes/<id>``, ``alloc/id-to-ip/<id>``,
  ``alloc/ip-to-id/<ip>``) is ``world:anyone:r`` + ``digest:<node>:cdrwa`` + the
  operator's ``cdrwa`` (:func:`owned_acl`). ZooKeeper shows digest ids in an ACL only to
  clients with ADMIN on the znode, so the operator's id is published in ``config/admins``
  (:func:`publish_admins`), readable by the operator and the node identities only;
- the parents allow CREATE only to who needs it (:func:`layout_acls`): ``nodes`` and
  ``alloc/*`` to the operator and the node identities of ``registry.node_identities``,
  every other parent to the operator alone. DELETE of any child needs DELETE on its
  parent, which only the operator has.

ZooKeeper's CREATE right on a parent is all-or-nothing per identity: a node identity may
create any *name* under ``nodes`` and ``alloc/*``, not only its own. What it can still
make, and what the readers' checks catch, is in docs/registry.md.

Without credentials everything is open (a lab, a test). :func:`repair` brings existing
entries to this policy (the controller at start, bounded; ``overlay zk acl-repair``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kazoo.exceptions import BadVersionError, NoAuthError, NodeExistsError, NoNodeError
from kazoo.security import (
    ACL,
    OPEN_ACL_UNSAFE,
    Id,
    Permissions,
    make_acl,
    make_digest_acl,
    make_digest_acl_credential,
)

from overlay.config import Auth

log = logging.getLogger(__name__)

WORLD = Id("world", "anyone")
READ_CREATE = Permissions.READ | Permissions.CREATE


def world_read() -> Any:
    """Everyone may read."""
    return make_acl("world", "anyone", read=True)


def digest(a: Auth, **perms: bool) -> Any:
    return make_digest_acl(a.user, a.password, **perms)


def operator_acl(operator: Auth | None) -> list:
    """What the controller or an operator writes: the operator may do everything, everyone
    may read. Open without operator credentials."""
    if operator is None:
        return list(OPEN_ACL_UNSAFE)
    return [digest(operator, all=True), world_read()]


def owned_acl(owner: Auth | None, admins: Iterable[Any] = ()) -> list:
    """What a daemon writes for itself: its identity and the ``admins`` (the operator, as
    found in the parent's ACL: :func:`admins_of`) may do everything, everyone may read.
    Open when the daemon has no credentials."""
    if owner is None:
        return list(OPEN_ACL_UNSAFE)
    mine = digest(owner, all=True)
    others = [a for a in admins if a.id != mine.id]
    return [mine, *others, world_read()]


def admins_of(acl: Iterable[Any]) -> list:
    """The digest identities with every right in an ACL (the operator)."""
    return [a for a in acl if a.id.scheme == "digest" and a.perms == Permissions.ALL]


ADMINS = "config/admins"   # the operator's digest id, for daemons to name in their own entries


def admins_acl(operator: Auth, node_identities: Iterable[str] = ()) -> list:
    """``config/admins``: the operator may do everything, node identities read; nobody else."""
    return [digest(operator, all=True), *(ACL(Permissions.READ, Id("digest", i)) for i in node_identities)]


def admins_data(operator: Auth) -> bytes:
    return json.dumps({"v": 1, "admins": [make_digest_acl_credential(operator.user, operator.password)]},
                      separators=(",", ":")).encode()


def parse_admins(data: bytes) -> list:
    """The ACL entries (every right) of the digest ids in ``config/admins``; [] if unreadable."""
    try:
        ids = json.loads(data.decode("utf-8"))["admins"]
        return [ACL(Permissions.ALL, Id("digest", i)) for i in ids if isinstance(i, str) and ":" in i]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return []


def publish_admins(client: Any, prefix: str, operator: Auth, node_identities: Iterable[str] = (),
                   timeout: float = 30.0) -> None:
    """Create or update ``config/admins`` (data and ACL); ``client`` is the operator's."""
    path, data, acl = f"{prefix}/{ADMINS}", admins_data(operator), admins_acl(operator, node_identities)
    try:
        client.create_async(path, data, acl=acl, makepath=True).get(timeout=timeout)
        return
    except NodeExistsError:
        pass
    client.set_async(path, data).get(timeout=timeout)
    client.set_acls_async(path, acl).get(timeout=timeout)


def layout_acls(operator: Auth, node_identities: Iterable[str] = ()) -> dict[str, list]:
    """ACL of each layout parent (relative to the prefix; "" is the prefix itself).
    ``node_identities``: ZooKeeper digest ids (``user:base64(sha1(user:password))``) that
    may create their records and allocations."""
    op = digest(operator, all=True)
    ro = [op, world_read()]
    rc = [op, world_read(), *(ACL(READ_CREATE, Id("digest", i)) for i in node_identities)]
    return {
        "": ro,
        "alloc": ro,
        "alloc/id-to-ip": rc,
        "alloc/ip-to-id": rc,
        "nodes": rc,
        "groups": ro,
        "policies": ro,
        "config": ro,
        "assignments": ro,
        "changes": ro,
        "controllers": ro,
    }


# Children of these parents are daemons' own entries; of every other parent, the operator's.
OWNED_PARENTS = ("nodes", "alloc/id-to-ip", "alloc/ip-to-id")
OPERATOR_PARENTS = ("groups", "policies", "config", "assignments", "changes", "controllers")


def expected_owned(current: Iterable[Any], admins: list) -> list:
    """The ACL a daemon's entry should have, keeping the digest identity that owns it (one
    that may write and is no admin); an entry nobody owns (open, or the controller's) gets
    :func:`operator_acl`'s shape."""
    admin_ids = {a.id for a in admins}
    owners = [ACL(Permissions.ALL, a.id) for a in current
              if a.id.scheme == "digest" and a.id not in admin_ids and a.perms & Permissions.WRITE]
    return [*owners, *admins, world_read()]


def same_acl(a: Iterable[Any], b: Iterable[Any]) -> bool:
    return {(x.perms, x.id.scheme, x.id.id) for x in a} == {(x.perms, x.id.scheme, x.id.id) for x in b}


@dataclass
class RepairReport:
    checked: int = 0
    fixed: int = 0
    refused: list[str] = field(default_factory=list)   # entries whose ACL gives the operator no ADMIN right
    truncated: bool = False

    def summary(self) -> str:
        text = f"{self.checked} entries checked, {self.fixed} re-ACLed"
        if self.refused:
            text += (f", {len(self.refused)} refused (their ACL gives the operator no ADMIN right; a ZooKeeper "
                     f"super user can fix them, or the node re-creates its record), e.g. {self.refused[0]}")
        if self.truncated:
            text += "; stopped at the limit: run `overlay zk acl-repair` for the rest"
        return text


def repair(client: Any, prefix: str, operator: Auth, node_identities: Iterable[str] = (), *,
           limit: int = 20_000, timeout: float = 30.0, batch: int = 500) -> RepairReport:
    """Bring the layout under ``prefix`` to the policy above: the parents, then every child of
    them, re-ACLed where the ACL differs. At most ``limit`` entries are checked (pipelined
    in batches); ``client`` must be authenticated as ``operator``."""
    report = RepairReport()
    parents = layout_acls(operator, node_identities)
    op_acl = operator_acl(operator)
    admins = admins_of(op_acl)

    def path(rel: str) -> str:
        return f"{prefix}/{rel}" if rel else prefix

    if client.exists_async(path("config")).get(timeout=timeout) is not None:
        publish_admins(client, prefix, operator, node_identities, timeout)
    todo: list[tuple[str, list | None]] = [(path(rel), acl) for rel, acl in parents.items()]
    for rel in (*OWNED_PARENTS, *OPERATOR_PARENTS):
        try:
            kids = client.get_children_async(path(rel)).get(timeout=timeout)
        except NoNodeError:
            continue
        want = None if rel in OWNED_PARENTS else op_acl   # None: keep the owner (expected_owned)
        todo += [(f"{path(rel)}/{k}", want) for k in sorted(kids) if f"{rel}/{k}" != ADMINS]
    if len(todo) > limit:
        todo, report.truncated = todo[:limit], True
    for i in range(0, len(todo), batch):
        chunk = todo[i:i + batch]
        pending = [(p, want, client.get_acls_async(p)) for p, want in chunk]
        sets = []
        for p, want, res in pending:
            try:
                current, stat = res.get(timeout=timeout)
            except NoNodeError:
                continue
            report.checked += 1
            target = want if want is not None else expected_owned(current, admins)
            if not same_acl(current, target):
                sets.append((p, client.set_acls_async(p, target, version=stat.aversion)))
        for p, res in sets:
            try:
                res.get(timeout=timeout)
                report.fixed += 1
            except NoAuthError:
                report.refused.append(p)
            except (NoNodeError, BadVersionError):
                continue   # gone or changed meanwhile: the next repair sees it
    return report
