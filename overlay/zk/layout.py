"""The ZooKeeper layout under a prefix (DESIGN §4.2, contract) and its one-time bootstrap.

::

    alloc/id-to-ip/<node_id>   persistent, data = overlay address
    alloc/ip-to-id/<overlay>   persistent, data = node_id
    nodes/<node_id>            EPHEMERAL, data = node record (JSON)
    groups/<group>             persistent
    policies/<policy_id>       persistent, data = policy (JSON)
    config/max_change          persistent, data = guard threshold (integer)
    assignments/<node_id>      persistent, data = {"v": 1, "groups": [...]} (granted by the operator)

and, for the controller (docs/grpc.md): ``changes`` (the journal), ``controllers``
(the leader election), ``leases`` and ``holders`` (node records written through it).
"""

from __future__ import annotations

from kazoo.client import KazooClient
from kazoo.exceptions import NodeExistsError

from overlay.config import Auth, RegistryConfig
from overlay.ownership import serialise_assignment
from overlay.zk import client as zkc
from overlay.zk.acl import layout_acls, operator_acl, publish_admins

# The parents of the layout, relative to the prefix ("" is the prefix itself).
PARENTS = ("", "alloc", "alloc/id-to-ip", "alloc/ip-to-id", "nodes", "groups", "policies", "config", "assignments")


class Layout:
    """Absolute paths of the layout under ``prefix`` (given with or without a trailing /)."""

    def __init__(self, prefix: str):
        p = prefix.rstrip("/")
        self.prefix = p
        self.nodes = f"{p}/nodes"
        self.policies = f"{p}/policies"
        self.groups = f"{p}/groups"
        self.config = f"{p}/config"
        self.max_change = f"{p}/config/max_change"
        self.id_to_ip = f"{p}/alloc/id-to-ip"
        self.ip_to_id = f"{p}/alloc/ip-to-id"
        self.assignments = f"{p}/assignments"  # groups granted per node (overlay.ownership)
        self.changes = f"{p}/changes"          # the controller's journal
        self.controllers = f"{p}/controllers"  # the controllers' leader election
        self.leases = f"{p}/leases"            # the controller: leased node records
        self.holders = f"{p}/holders"          # the controller: the nodes each replica holds

    def path(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if rel else self.prefix


def create_layout(client: KazooClient, layout: Layout, operator: Auth, node_identities: tuple[str, ...] = ()) -> None:
    """Create the layout's parents with their ACLs, or set the ACLs where they exist."""
    acls = layout_acls(operator, node_identities)
    for rel in PARENTS:
        path = layout.path(rel)
        acl = acls[rel]
        if client.exists(path) is None:
            try:
                client.create(path, b"", acl=acl, makepath=True)
                continue
            except NodeExistsError:
                pass
        client.set_acls(path, acl)
    publish_admins(client, layout.prefix, operator, node_identities)


def bootstrap(config: RegistryConfig, operator_auth: Auth, *, max_change: int | None = None) -> None:
    """Operator, once: create the layout under ``config.prefix`` with its ACLs (idempotent).

    Parents are readable by everyone; ``nodes`` and ``alloc/*`` let the identities of
    ``config.node_identities`` add children (a node's own record and allocation, which it
    creates with an ACL naming itself and the operator as writers) but only the operator
    delete them; ``policies``, ``groups``, ``config`` and ``assignments`` are written by the
    operator only (:mod:`overlay.zk.acl`).
    """
    layout = Layout(config.prefix)
    client = zkc.new_client(config, (operator_auth,))
    with zkc.translate(f"bootstrapping the registry layout under {config.prefix}", ",".join(config.hosts)):
        client.start(timeout=max(config.timeout_s, 1.0))
        try:
            create_layout(client, layout, operator_auth, config.node_identities)
            if max_change is not None:
                acl = layout_acls(operator_auth)[""]
                if client.exists(layout.max_change) is None:
                    client.create(layout.max_change, str(int(max_change)).encode(), acl=acl)
                else:
                    client.set(layout.max_change, str(int(max_change)).encode())
                    client.set_acls(layout.max_change, acl)
        finally:
            client.stop()
            client.close()


def grant_groups(config: RegistryConfig, grants: dict[str, tuple[str, ...]], timeout: float = 30.0) -> None:
    """Operator: write ``assignments/<node_id>`` for each node (the groups it may hold),
    straight into ZooKeeper with ``config``'s credentials (the lab does this; elsewhere use
    ``overlay nodes groups`` through the controller)."""
    layout = Layout(config.prefix)
    acl = operator_acl(config.operator)
    client = zkc.new_client(config)
    with zkc.translate(f"writing assignments under {config.prefix}", ",".join(config.hosts)):
        client.start(timeout=max(config.timeout_s, 1.0))
        try:
            client.ensure_path(layout.assignments, acl=acl)
            for node_id, groups in sorted(grants.items()):
                path, data = f"{layout.assignments}/{node_id}", serialise_assignment(groups)
                try:
                    client.create_async(path, data, acl=acl).get(timeout=timeout)
                except NodeExistsError:
                    client.set_async(path, data).get(timeout=timeout)
        finally:
            client.stop()
            client.close()
