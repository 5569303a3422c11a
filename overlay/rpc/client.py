"""A client of ``overlay.v1.Registry`` over mutual TLS: the daemon's grpc backend and the
operator commands use it. Every call has a deadline; status codes come back as the
project's errors (:func:`overlay.rpc.status.raise_for`)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from overlay.config import TlsConfig
from overlay.errors import Unavailable
from overlay.model import Node, Policy
from overlay.rpc import convert
from overlay.rpc.proto import modules
from overlay.rpc.status import raise_for
from overlay.rpc.tls import MAX_MESSAGE, read_tls

# Keepalive (client side): ping every 30 s (the server allows one every 5 s), give up on
# the connection if a ping is not answered in 10 s; pings also while only Watch is open.
CLIENT_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    ("grpc.enable_retries", 0),
    # No bandwidth-delay probing: it sends a ping for (nearly) every Watch delta after a
    # pause, which the controller must read and answer: more than the delta itself costs it
    # (bench controller_fanout). A fixed 1 MiB stream window instead of gRPC's 64 KiB: a
    # snapshot streams at up to 1 MiB per round trip.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 1 << 20),
)


def channel(target: str, tls: TlsConfig, *, options: tuple = CLIENT_OPTIONS, path: str = "registry.tls") -> grpc.Channel:
    ca, cert, key = read_tls(tls, path)
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    opts = list(options)
    if tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(target, creds, options=opts)


class Client:
    """Typed calls of ``overlay.v1.Registry``; each with ``timeout`` seconds of deadline."""

    def __init__(self, target: str, tls: TlsConfig, *, timeout: float = 10.0, options: tuple = CLIENT_OPTIONS,
                 path: str = "registry.tls"):
        self.target = target
        self.timeout = timeout
        self.pb2, pb2_grpc = modules()
        self.channel = channel(target, tls, options=options, path=path)
        self.stub = pb2_grpc.RegistryStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, name: str, request, what: str, timeout: float | None = None):
        try:
            return getattr(self.stub, name)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise raise_for(exc, what) from None
        except ValueError as exc:   # the channel was closed meanwhile (a failover replaced it)
            raise Unavailable(f"{what}: {exc}") from None

    # --- nodes ------------------------------------------------------------------------------

    def allocate(self, node_id: str, requested: str | None = None) -> str:
        req = self.pb2.AllocateRequest(node_id=node_id, requested=requested or "")
        return self._unary("Allocate", req, f"allocating an overlay address for {node_id}").overlay

    def register(self, node: Node, timeout: float | None = None) -> int:
        return self.register_node(node, timeout)[0]

    def register_node(self, node: Node, timeout: float | None = None) -> tuple[int, tuple[str, ...]]:
        """``(revision, groups claimed but not granted by the node's assignment)``."""
        req = self.pb2.RegisterNodeRequest(node=convert.node_to_pb(self.pb2, node))
        resp = self._unary("RegisterNode", req, f"registering node {node.node_id}", timeout)
        return resp.revision, tuple(resp.ungranted)

    def deregister(self, node_id: str, timeout: float | None = None) -> int:
        req = self.pb2.DeregisterNodeRequest(node_id=node_id)
        return self._unary("DeregisterNode", req, f"deregistering node {node_id}", timeout).revision

    def heartbeat(self, node_id: str, timeout: float | None = None) -> float:
        """Renew ``node_id``'s lease on this replica; returns the lease in seconds."""
        req = self.pb2.HeartbeatRequest(node_id=node_id)
        return self._unary("Heartbeat", req, f"renewing the lease of node {node_id}", timeout).lease_s

    def get_node(self, node_id: str) -> Node:
        resp = self._unary("GetNode", self.pb2.GetNodeRequest(node_id=node_id), f"reading node {node_id}")
        return convert.node_from_record(convert.node_record_from_pb(resp.node))

    def list_nodes(self) -> tuple[list[Node], dict[str, str], int]:
        nodes, rejected, _, revision = self.list_nodes_detail()
        return nodes, rejected, revision

    def list_nodes_detail(self) -> tuple[list[Node], dict[str, str], dict[str, str], int]:
        """``(nodes, rejected, conflicts, revision)``: conflicts name the nodes whose address
        an earlier registration holds, with the reason."""
        return self.list_nodes_sources()[:4]

    def list_nodes_sources(self) -> tuple[list[Node], dict[str, str], dict[str, str], int, dict[str, str]]:
        """:meth:`list_nodes_detail` and the nodes that are not Overlay's records (id -> source,
        ``neti``: the old system's layout, through the controller's registry.neti)."""
        resp = self._unary("ListNodes", self.pb2.ListNodesRequest(), "listing nodes")
        nodes = [convert.node_from_record(convert.node_record_from_pb(n)) for n in resp.nodes]
        return (nodes, {r.id: r.reason for r in resp.rejected}, {c.id: c.reason for c in resp.conflicts},
                resp.revision, {n.node_id: n.source for n in resp.nodes if n.source})

    # --- assignments ------------------------------------------------------------------------

    def set_node_groups(self, node_id: str, groups) -> int:
        req = self.pb2.SetNodeGroupsRequest(node_id=node_id, groups=list(groups))
        return self._unary("SetNodeGroups", req, f"granting groups to {node_id}").revision

    def get_node_groups(self, node_id: str) -> tuple[tuple[str, ...] | None, int]:
        """``(granted groups, or None without an assignment; revision)``."""
        resp = self._unary("GetNodeGroups", self.pb2.GetNodeGroupsRequest(node_id=node_id),
                           f"reading the groups of {node_id}")
        return (tuple(resp.groups) if resp.assigned else None), resp.revision

    def list_node_groups(self) -> tuple[dict[str, tuple[str, ...]], dict[str, str], int]:
        resp = self._unary("ListNodeGroups", self.pb2.ListNodeGroupsRequest(), "listing assignments")
        return ({a.node_id: tuple(a.groups) for a in resp.assignments}, {r.id: r.reason for r in resp.rejected},
                resp.revision)

    # --- groups and policies ----------------------------------------------------------------

    def put_group(self, name: str, description: str = "", create_only: bool = False) -> int:
        req = self.pb2.PutGroupRequest(group=self.pb2.Group(name=name, description=description), create_only=create_only)
        return self._unary("PutGroup", req, f"writing group {name}").revision

    def delete_group(self, name: str) -> int:
        return self._unary("DeleteGroup", self.pb2.DeleteGroupRequest(name=name), f"deleting group {name}").revision

    def list_groups(self) -> tuple[dict[str, str], int]:
        resp = self._unary("ListGroups", self.pb2.ListGroupsRequest(), "listing groups")
        return {g.name: g.description for g in resp.groups}, resp.revision

    def put_policy(self, policy: Policy, create_only: bool = False) -> int:
        req = self.pb2.PutPolicyRequest(policy=convert.policy_to_pb(self.pb2, policy), create_only=create_only)
        return self._unary("PutPolicy", req, f"writing policy {policy.policy_id}").revision

    def delete_policy(self, policy_id: str) -> int:
        req = self.pb2.DeletePolicyRequest(policy_id=policy_id)
        return self._unary("DeletePolicy", req, f"deleting policy {policy_id}").revision

    def list_policies(self) -> tuple[list, dict[str, str], int]:
        """``(policies as pb2.Policy, rejected, revision)``."""
        resp = self._unary("ListPolicies", self.pb2.ListPoliciesRequest(), "listing policies")
        return list(resp.policies), {r.id: r.reason for r in resp.rejected}, resp.revision

    # --- Watch ------------------------------------------------------------------------------

    def watch(self, from_revision: int = 0, epoch: str = "", timeout: float = 300.0) -> Iterator:
        """The Watch stream (a grpc call: iterate it, ``cancel()`` it); ends after ``timeout``
        seconds with DEADLINE_EXCEEDED, and the caller resumes from its last revision."""
        req = self.pb2.WatchRequest(from_revision=from_revision, epoch=epoch)
        return self.stub.Watch(req, timeout=timeout)

