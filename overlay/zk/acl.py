"""Who may read and write what in the ZooKeeper layout (docs/registry.md, "ACLs").

With ``registry.auth`` / ``registry.operator`` set, everyone may read; a node's own
record and allocation may be changed only by the identity that created them; the
layout's parents, groups, policies and ``config`` only by the operator. Without
credentials everything is open (a lab, a test).
"""

from __future__ import annotations

from typing import Any

from kazoo.security import OPEN_ACL_UNSAFE, make_acl, make_digest_acl

from overlay.config import Auth


def world_read(create: bool = False) -> Any:
    """Everyone may read (and, with ``create``, add children)."""
    return make_acl("world", "anyone", read=True, create=create)


def digest(a: Auth, **perms: bool) -> Any:
    return make_digest_acl(a.user, a.password, **perms)


def record_acl(auth: Auth | None) -> list:
    """ACL of what a node creates: only its own identity may change it; everyone may read."""
    if auth is None:
        return list(OPEN_ACL_UNSAFE)
    return [digest(auth, read=True, write=True), world_read()]


def operator_acl(operator: Auth | None) -> list:
    """ACL of what only the operator writes (groups, policies, config, the controller's
    journal); everyone may read. Open without operator credentials."""
    if operator is None:
        return list(OPEN_ACL_UNSAFE)
    return [digest(operator, all=True), world_read()]


def layout_acls(operator: Auth) -> dict[str, list]:
    """ACL of each layout path (relative to the prefix; "" is the prefix itself)."""
    op = digest(operator, all=True)
    ro = [op, world_read()]
    rc = [op, world_read(create=True)]  # nodes may add children, never delete them
    return {
        "": ro,
        "alloc": ro,
        "alloc/id-to-ip": rc,
        "alloc/ip-to-id": rc,
        "nodes": rc,
        "groups": ro,
        "policies": ro,
        "config": ro,
    }
