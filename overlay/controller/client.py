"""A client of ``overlay.v1.Registry`` over mutual TLS: the daemon's grpc backend and the
operator commands use it. Every call has a deadline; status codes come back as the
project's errors (:func:`raise_for`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc

from overlay.config import TlsConfig
from overlay.controller import convert
from overlay.controller.proto import modules
from overlay.errors import (
    AllocationExhausted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    InvalidConfigError,
    NotFound,
    OverlayError,
    PermissionDenied,
    RegistryError,
    Unavailable,
)
from overlay.model import Node, Policy

MAX_MESSAGE = 64 * 1024 * 1024

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
)

_ERRORS = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: AllocationExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def raise_for(exc: grpc.RpcError, what: str = "") -> OverlayError:
    """The project's error for a failed call (to be raised by the caller)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or str(code)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, sep, reason = details.partition(": ")
        return InvalidArgument(field, reason) if sep else InvalidArgument("", details)
    cls = _ERRORS.get(code, RegistryError)
    prefix = f"{what}: " if what and not details.startswith(what) else ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return cls(f"{prefix}the controller did not answer in time")
    return cls(f"{prefix}{details}")


def load_tls(tls: TlsConfig, path: str = "registry.tls") -> tuple[bytes, bytes, bytes]:
    out = []
    for name in ("ca", "cert", "key"):
        filename = getattr(tls, name)
        try:
            with open(filename, "rb") as fh:
                out.append(fh.read())
        except OSError as exc:
            raise InvalidConfigError(f"{path}.{name}", f"cannot read {filename}: {exc.strerror}") from None
    return out[0], out[1], out[2]


def tls_from_dir(directory: str, name: str = "operator") -> TlsConfig:
    """The files ``overlay certs`` wrote: ca.crt, NAME.crt, NAME.key."""
    return TlsConfig(os.path.join(directory, "ca.crt"), os.path.join(directory, f"{name}.crt"),
                     os.path.join(directory, f"{name}.key"))


def channel(target: str, tls: TlsConfig, *, options: tuple = CLIENT_OPTIONS, path: str = "registry.tls") -> grpc.Channel:
    ca, cert, key = load_tls(tls, path)
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

    # --- nodes ------------------------------------------------------------------------------

    def allocate(self, node_id: str, requested: str | None = None) -> str:
        req = self.pb2.AllocateRequest(node_id=node_id, requested=requested or "")
        return self._unary("Allocate", req, f"allocating an overlay address for {node_id}").overlay

    def register(self, node: Node, timeout: float | None = None) -> int:
        req = self.pb2.RegisterNodeRequest(node=convert.node_to_pb(self.pb2, node))
        return self._unary("RegisterNode", req, f"registering node {node.node_id}", timeout).revision

    def deregister(self, node_id: str, timeout: float | None = None) -> int:
        req = self.pb2.DeregisterNodeRequest(node_id=node_id)
        return self._unary("DeregisterNode", req, f"deregistering node {node_id}", timeout).revision

    def get_node(self, node_id: str) -> Node:
        resp = self._unary("GetNode", self.pb2.GetNodeRequest(node_id=node_id), f"reading node {node_id}")
        return convert.node_from_record(_node_record(resp.node))

    def list_nodes(self) -> tuple[list[Node], dict[str, str], int]:
        resp = self._unary("ListNodes", self.pb2.ListNodesRequest(), "listing nodes")
        nodes = [convert.node_from_record(_node_record(n)) for n in resp.nodes]
        return nodes, {r.id: r.reason for r in resp.rejected}, resp.revision

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


def _node_record(n) -> dict:
    return {"v": 1, "node_id": n.node_id, "network": n.network, "private": n.private, "public": n.public,
            "overlay": n.overlay, "groups": list(n.groups),
            "open_ports": [int(p) if p.isdigit() else p for p in n.open_ports]}
