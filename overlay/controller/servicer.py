"""The ``overlay.v1.Registry`` servicer: authorisation, validation, limits, status codes; the rest is the store.

Runs on a ``grpc.aio`` server: unary calls hand the blocking store work to a
thread pool; Watch streams are coroutines that read the store's journal, so
thousands of them cost no threads. Every error leaves as a status code
(:data:`STATUS_OF`), never as a success flag; an error that describes the store
(ZooKeeper hosts, paths) or that nobody expected reaches the client as its kind and
a request id only, the detail goes to the log under that id.

A node speaks only for itself (docs/grpc.md, "Trust"): its certificate names its
``node_id``; RegisterNode refuses an address another live node holds
(FAILED_PRECONDITION naming it) and, for the networks of ``controller.attest_public``,
a ``public`` address that is not the connection's; its groups are narrowed to its
assignment. Per identity, Watch streams are capped and RegisterNode is rate-limited
(RESOURCE_EXHAUSTED with ``grpc-retry-pushback-ms``).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import urllib.parse
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from overlay import addr
from overlay.config import ControllerLimits
from overlay.controller.certs import Identity, identity_of
from overlay.controller.fanout import DeltaCache, Hub
from overlay.controller.limits import StreamCounter, TokenBuckets, retry_after_ms
from overlay.controller.store import Plan, Store
from overlay.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Throttled,
)
from overlay.model import Node
from overlay.ownership import resolve
from overlay.rpc import convert
from overlay.rpc.proto import modules
from overlay.rpc.status import REQUEST_ID, RETRY_PUSHBACK, status_of

log = logging.getLogger(__name__)

GENERIC = {
    grpc.StatusCode.UNAVAILABLE: "the controller cannot reach its store now; retry with backoff",
    grpc.StatusCode.FAILED_PRECONDITION: "the controller's store refused the operation",
}
WATCH_RETRY_S = 5.0           # the retry hint of a refused Watch (a dead stream is gone in 30 s)

SNAPSHOT_CHUNK = 500          # items per snapshot message
COALESCE_AFTER = 1024         # a stream this many revisions behind gets one coalesced delta
AHEAD_WAIT_S = 5.0            # a client ahead of this replica waits this long for it to catch up
IDLE_WAKE_S = 30.0

def _rpc(method: Callable) -> Callable:
    """Map errors to status codes: an error we meant keeps its message; one that describes
    the store (``internal``), an UNAVAILABLE, and anything unexpected get a generic message
    with a request id, logged in full under it."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as exc:
            code, details, trailing = self.failure(method.__name__, exc)
            await context.abort(code, details, trailing_metadata=trailing)

    return wrapper


def peer_address(peer: str) -> str | None:
    """The IP address of a gRPC peer string (``ipv4:10.0.0.5:4711``, ``ipv6:[::1]:4711``,
    IPv4-mapped IPv6 as IPv4); None for anything else (a unix socket)."""
    scheme, _, rest = urllib.parse.unquote(peer).partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return None
    host = rest.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


@functools.lru_cache(maxsize=4096)
def _identity_of_pem(pem: bytes) -> Identity | None:
    return identity_of(pem)


class RegistryServicer:
    """Implements every method of ``overlay.v1.Registry`` (registered via the generated helper)."""

    def __init__(self, store: Store, subnet: ipaddress.IPv4Network, hub: Hub, executor: ThreadPoolExecutor, *,
                 limits: ControllerLimits | None = None, attest_public: tuple[str, ...] = ()):
        self.store = store
        self.subnet = ipaddress.IPv4Network(subnet)
        self.hub = hub
        self.pb2, _ = modules()
        self._executor = executor
        self.limits = limits or ControllerLimits()
        self.attest_public = frozenset(attest_public)
        self._registers = TokenBuckets(self.limits.register_rate, self.limits.register_burst)
        self._watches = StreamCounter(self.limits.watch_streams)
        self.refused = {"watch": 0, "register": 0}    # RESOURCE_EXHAUSTED answers, by limit
        self.deltas = DeltaCache(self._delta)

    def failure(self, method: str, exc: Exception) -> tuple[grpc.StatusCode, str, tuple]:
        """``(code, details, trailing metadata)`` for an error leaving ``method``."""
        code = status_of(exc)
        if isinstance(exc, Throttled):
            return code, str(exc), ((RETRY_PUSHBACK, str(retry_after_ms(exc.retry_after_s))),)
        if code is not None and not exc.internal and code != grpc.StatusCode.UNAVAILABLE:
            return code, str(exc), ()
        rid = uuid.uuid4().hex[:12]
        if code is None:
            log.error("request %s: %s failed", rid, method, exc_info=exc)
            code = grpc.StatusCode.INTERNAL
        else:
            log.warning("request %s: %s failed: %s", rid, method, exc)
        return code, f"{GENERIC.get(code, 'internal error')} (request id {rid})", ((REQUEST_ID, rid),)

    # --- helpers ----------------------------------------------------------------------------

    async def _call(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _identity(self, context) -> Identity:
        certs = context.auth_context().get("x509_pem_cert") or []
        ident = _identity_of_pem(certs[0]) if certs else None
        if ident is None or ident.role not in ("operator", "node"):
            raise PermissionDenied("the client certificate names no operator or node of this fleet "
                                   "(issue one with `overlay certs issue`)")
        return ident

    @staticmethod
    def _operator(ident: Identity, what: str) -> None:
        if ident.role != "operator":
            raise PermissionDenied(f"{what} needs an operator certificate; {ident} may not")

    @staticmethod
    def _own(ident: Identity, node_id: str, field: str) -> None:
        if ident.role == "node" and ident.name != node_id:
            raise PermissionDenied(f"{field}: {ident} may act only on its own node, not on {node_id!r}")

    def _throttle_register(self, ident: Identity) -> None:
        wait = self._registers.take(str(ident))
        if wait > 0:
            self.refused["register"] += 1
            raise Throttled(f"{ident} registers more often than controller.limits allows "
                            f"({self.limits.register_rate:g}/s, bursts of {self.limits.register_burst}); "
                            f"retry in {wait:.1f} s", wait)

    def _attest(self, node: Node, context) -> None:
        """``controller.attest_public``: in those networks a node's public address is the
        address its connection comes from (no NAT between the node and the controller)."""
        if node.network not in self.attest_public:
            return
        seen = peer_address(context.peer())
        if seen != node.public:
            raise PermissionDenied(f"node.public: {node.public} is not the address this connection comes from "
                                   f"({seen or 'unknown'}); network {node.network!r} attests public addresses "
                                   "(controller.attest_public)")

    async def _visible(self, key, check: Callable[[dict | None], bool], timeout: float = 5.0) -> int:
        """The revision at which the journal shows a write (0 if it does not within ``timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            fut = self.hub.future()
            cur = self.store.get(key)
            if check(cur[1] if cur else None):
                return cur[0] if cur else self.store.head
            left = deadline - loop.time()
            if left <= 0:
                return 0
            await self.hub.wait(fut, left)

    # --- nodes ------------------------------------------------------------------------------

    @_rpc
    async def Allocate(self, request, context):
        ident = self._identity(context)
        node_id = convert.name_arg(request.node_id, "node_id")
        self._own(ident, node_id, "node_id")
        requested = None
        if request.requested:
            try:
                requested = addr.in_subnet_host(request.requested, self.subnet)
            except ValueError as exc:
                raise InvalidArgument("requested", str(exc)) from None
        overlay = await self._call(self.store.allocate, node_id, requested)
        return self.pb2.AllocateResponse(overlay=overlay)

    @_rpc
    async def RegisterNode(self, request, context):
        ident = self._identity(context)
        if ident.role == "node":
            self._throttle_register(ident)      # first: a refused call costs as little as possible
        if not request.HasField("node"):
            raise InvalidArgument("node", "is required")
        node = convert.node_from_pb(request.node, self.subnet)
        self._own(ident, node.node_id, "node.node_id")
        if ident.role == "node":
            self._attest(node, context)
        shown, ungranted = await self._call(self.store.register, node, ident.role == "node")
        want = shown.to_dict()
        rev = await self._visible(("node", node.node_id), lambda v: v is not None and v.get("node") == want)
        return self.pb2.RegisterNodeResponse(revision=rev, ungranted=list(ungranted))

    @_rpc
    async def DeregisterNode(self, request, context):
        ident = self._identity(context)
        node_id = convert.name_arg(request.node_id, "node_id")
        self._own(ident, node_id, "node_id")
        await self._call(self.store.deregister, node_id)
        rev = await self._visible(("node", node_id), lambda v: v is None)
        return self.pb2.DeregisterNodeResponse(revision=rev)

    @_rpc
    async def Heartbeat(self, request, context):
        ident = self._identity(context)
        node_id = convert.name_arg(request.node_id, "node_id")
        self._own(ident, node_id, "node_id")
        self.store.heartbeat(node_id)
        return self.pb2.HeartbeatResponse(lease_s=self.store.leases.lease_s, revision=self.store.head)

    @_rpc
    async def GetNode(self, request, context):
        self._identity(context)
        node_id = convert.name_arg(request.node_id, "node_id")
        cur = self.store.get(("node", node_id))
        if cur is None:
            raise NotFound(f"node_id: node {node_id!r} is not registered")
        rev, value = cur
        if "rejected" in value:
            raise NotFound(f"node_id: the record of {node_id!r} is ignored: {value['rejected']}")
        node = convert.node_from_record(value["node"])
        return self.pb2.GetNodeResponse(node=convert.node_to_pb(self.pb2, node), revision=self.store.head)

    @_rpc
    async def ListNodes(self, request, context):
        self._identity(context)
        head, items = self.store.items("node")
        resp = self.pb2.ListNodesResponse(revision=head)
        nodes, order = [], {}
        for node_id, value in items:
            if "rejected" in value:
                resp.rejected.append(self.pb2.Rejected(id=node_id, reason=value["rejected"]))
            else:
                node = convert.node_from_record(value["node"])
                nodes.append(node)
                order[node_id] = value.get("order") or 0
                resp.nodes.append(convert.node_to_pb(self.pb2, node, value.get("source", "")))
        for c in resolve(nodes, order)[1]:
            resp.conflicts.append(self.pb2.Rejected(id=c.node_id, reason=c.reason))
        return resp

    # --- assignments --------------------------------------------------------------------------

    @_rpc
    async def SetNodeGroups(self, request, context):
        ident = self._identity(context)
        self._operator(ident, "SetNodeGroups")
        node_id = convert.name_arg(request.node_id, "node_id")
        groups = convert.groups_arg(request.groups)
        await self._call(self.store.set_assignment, node_id, groups)
        want = {"assignment": {"groups": list(groups)}}
        rev = await self._visible(("assignment", node_id), lambda v: v == want)
        return self.pb2.SetNodeGroupsResponse(revision=rev)

    @_rpc
    async def GetNodeGroups(self, request, context):
        self._identity(context)
        node_id = convert.name_arg(request.node_id, "node_id")
        cur = self.store.get(("assignment", node_id))
        if cur is not None and "rejected" in cur[1]:
            raise NotFound(f"node_id: the assignment of {node_id!r} is ignored: {cur[1]['rejected']}")
        groups = cur[1]["assignment"]["groups"] if cur is not None else []
        return self.pb2.GetNodeGroupsResponse(groups=groups, assigned=cur is not None, revision=self.store.head)

    @_rpc
    async def ListNodeGroups(self, request, context):
        self._identity(context)
        head, items = self.store.items("assignment")
        resp = self.pb2.ListNodeGroupsResponse(revision=head)
        for node_id, value in items:
            if "rejected" in value:
                resp.rejected.append(self.pb2.Rejected(id=node_id, reason=value["rejected"]))
            else:
                resp.assignments.append(self.pb2.Assignment(node_id=node_id, groups=value["assignment"]["groups"]))
        return resp

    # --- groups -----------------------------------------------------------------------------

    @_rpc
    async def PutGroup(self, request, context):
        ident = self._identity(context)
        self._operator(ident, "PutGroup")
        if not request.HasField("group"):
            raise InvalidArgument("group", "is required")
        name, description = convert.group_from_pb(request.group)
        await self._call(self.store.put_group, name, description, request.create_only)
        want = {"group": {"description": description}}
        rev = await self._visible(("group", name), lambda v: v == want)
        return self.pb2.PutGroupResponse(revision=rev)

    @_rpc
    async def DeleteGroup(self, request, context):
        ident = self._identity(context)
        self._operator(ident, "DeleteGroup")
        name = convert.name_arg(request.name, "name")
        await self._call(self.store.delete_group, name)
        rev = await self._visible(("group", name), lambda v: v is None)
        return self.pb2.DeleteGroupResponse(revision=rev)

    @_rpc
    async def ListGroups(self, request, context):
        self._identity(context)
        head, items = self.store.items("group")
        groups = [self.pb2.Group(name=n, description=v["group"].get("description", "")) for n, v in items]
        return self.pb2.ListGroupsResponse(groups=groups, revision=head)

    # --- policies ---------------------------------------------------------------------------

    @_rpc
    async def PutPolicy(self, request, context):
        ident = self._identity(context)
        self._operator(ident, "PutPolicy")
        if not request.HasField("policy"):
            raise InvalidArgument("policy", "is required")
        policy = convert.policy_from_pb(request.policy)
        await self._call(self.store.put_policy, policy, request.create_only)
        want = {"policy": policy.to_dict()}
        rev = await self._visible(("policy", policy.policy_id), lambda v: v == want)
        return self.pb2.PutPolicyResponse(revision=rev)

    @_rpc
    async def DeletePolicy(self, request, context):
        ident = self._identity(context)
        self._operator(ident, "DeletePolicy")
        pid = convert.name_arg(request.policy_id, "policy_id")
        await self._call(self.store.delete_policy, pid)
        rev = await self._visible(("policy", pid), lambda v: v is None)
        return self.pb2.DeletePolicyResponse(revision=rev)

    @_rpc
    async def ListPolicies(self, request, context):
        self._identity(context)
        head, items = self.store.items("policy")
        resp = self.pb2.ListPoliciesResponse(revision=head)
        from overlay.model import policy_from_dict

        for pid, value in items:
            if "rejected" in value:
                resp.rejected.append(self.pb2.Rejected(id=pid, reason=value["rejected"]))
            else:
                resp.policies.append(convert.policy_to_pb(self.pb2, policy_from_dict(value["policy"], pid), pid))
        return resp

    # --- Watch ------------------------------------------------------------------------------

    async def Watch(self, request, context):
        key, holder = await self._admit_watch(context)
        try:
            if holder is not None:
                self.store.stream_opened(holder)
            try:
                async for msg in self._stream(request.from_revision, request.epoch):
                    yield msg
            finally:
                if holder is not None:
                    self.store.stream_closed(holder)
        finally:
            self._watches.release(key)

    async def _admit_watch(self, context) -> tuple[str, str | None]:
        """``(key of the stream limit, node holding a lease through the stream or None)``;
        aborts the call (PERMISSION_DENIED, RESOURCE_EXHAUSTED) otherwise."""
        try:
            ident = self._identity(context)
        except PermissionDenied as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        key = str(ident)
        if not self._watches.acquire(key):
            self.refused["watch"] += 1
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{ident} has {self.limits.watch_streams} Watch streams open already "
                f"(controller.limits.watch_streams); retry in {WATCH_RETRY_S:g} s",
                trailing_metadata=((RETRY_PUSHBACK, str(retry_after_ms(WATCH_RETRY_S))),))
        return key, ident.name if ident.role == "node" else None

    async def _stream(self, revision: int, epoch: str):
        """The messages of one stream. A stream behind the head is sent the shared, already
        serialized delta of its revision when another stream built it (:class:`DeltaCache`);
        a stream at the head sleeps without asking the store (:meth:`Hub.sleep`; the check
        and the sleep are in one step of the loop, so no change is missed)."""
        pb2, store, hub, cache = self.pb2, self.store, self.hub, self.deltas
        loop = asyncio.get_running_loop()
        ahead_until: float | None = None
        sent_any = False
        fresh = revision == 0   # 0: the client has nothing yet
        while True:
            pos = store.position()
            if sent_any and pos is not None and pos[0] == epoch:
                if pos[1] == revision:
                    await hub.sleep(IDLE_WAKE_S)
                    continue
                msg = cache.peek(epoch, revision, pos[1])
                if msg is not None:
                    yield msg
                    revision = pos[1]
                    continue
            plan = store.read_since(revision, epoch, COALESCE_AFTER, fresh)
            if plan is None:
                await hub.sleep(1.0)
                continue
            if plan.kind == "ahead":
                # resumed on a replica that has not read as far as the client has: give it a moment
                ahead_until = ahead_until or loop.time() + AHEAD_WAIT_S
                if loop.time() < ahead_until:
                    await hub.sleep(max(0.0, ahead_until - loop.time()))
                    continue
                plan = store.read_since(0, "", COALESCE_AFTER, fresh=True)
                plan = Plan("snapshot", plan.epoch, plan.revision, items=plan.items, reset=True)
            ahead_until = None
            if plan.kind == "snapshot":
                for msg in self._snapshot_messages(plan):
                    yield msg
                revision, epoch, sent_any, fresh = plan.revision, plan.epoch, True, False
            elif plan.kind == "delta":
                yield cache.get(plan)
                revision, epoch, sent_any = plan.revision, plan.epoch, True
            elif not sent_any:  # current: tell a resuming client it is live and up to date
                yield pb2.WatchResponse(kind=pb2.WatchResponse.DELTA, epoch=plan.epoch,
                                        revision=plan.revision, base_revision=plan.revision)
                epoch, sent_any = plan.epoch, True
            else:
                await hub.sleep(IDLE_WAKE_S)

    def _delta(self, plan: Plan) -> bytes:
        """The serialized ``WatchResponse`` of a delta plan (built once, :class:`DeltaCache`)."""
        pb2 = self.pb2
        return pb2.WatchResponse(
            kind=pb2.WatchResponse.DELTA, epoch=plan.epoch, revision=plan.revision,
            base_revision=plan.base, coalesced=plan.coalesced,
            changes=[convert.change_to_pb(pb2, r, k, v) for r, k, v in plan.items]).SerializeToString()

    def _snapshot_messages(self, plan: Plan):
        pb2 = self.pb2
        items = plan.items
        n = max(1, (len(items) + SNAPSHOT_CHUNK - 1) // SNAPSHOT_CHUNK)
        for i in range(n):
            part = items[i * SNAPSHOT_CHUNK:(i + 1) * SNAPSHOT_CHUNK]
            yield pb2.WatchResponse(
                kind=pb2.WatchResponse.SNAPSHOT, epoch=plan.epoch, revision=plan.revision,
                reset=plan.reset, last=i == n - 1,
                changes=[convert.change_to_pb(pb2, r, k, v) for r, k, v in part])
