"""The ``overlay.v1.Registry`` servicer: authorisation, validation, status codes; the rest is the store.

Runs on a ``grpc.aio`` server: unary calls hand the blocking store work to a
thread pool; Watch streams are coroutines that read the store's journal, so
thousands of them cost no threads. Every error leaves as a status code
(:data:`STATUS_OF`), never as a success flag.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from overlay import addr
from overlay.controller.certs import Identity, identity_of
from overlay.controller.store import Plan, Store
from overlay.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from overlay.rpc import convert
from overlay.rpc.proto import modules
from overlay.rpc.status import status_of

log = logging.getLogger(__name__)

SNAPSHOT_CHUNK = 500          # items per snapshot message
COALESCE_AFTER = 1024         # a stream this many revisions behind gets one coalesced delta
AHEAD_WAIT_S = 5.0            # a client ahead of this replica waits this long for it to catch up
IDLE_WAKE_S = 30.0

class Hub:
    """Wakes Watch coroutines when the store changed (called from any thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._fut: asyncio.Future = loop.create_future()

    def fire_threadsafe(self) -> None:
        if not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._fire)
            except RuntimeError:  # loop closing
                pass

    def _fire(self) -> None:
        fut, self._fut = self._fut, self._loop.create_future()
        if not fut.done():
            fut.set_result(None)

    def future(self) -> asyncio.Future:
        return self._fut

    @staticmethod
    async def wait(fut: asyncio.Future, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            pass


def _rpc(method: Callable) -> Callable:
    """Map the store's errors to status codes; log what should not happen."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as exc:
            code = status_of(exc)
            if code is None:
                log.exception("%s failed", method.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
            await context.abort(code, str(exc))

    return wrapper


@functools.lru_cache(maxsize=4096)
def _identity_of_pem(pem: bytes) -> Identity | None:
    return identity_of(pem)


class RegistryServicer:
    """Implements every method of ``overlay.v1.Registry`` (registered via the generated helper)."""

    def __init__(self, store: Store, subnet: ipaddress.IPv4Network, hub: Hub, executor: ThreadPoolExecutor):
        self.store = store
        self.subnet = ipaddress.IPv4Network(subnet)
        self.hub = hub
        self.pb2, _ = modules()
        self._executor = executor

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
        if not request.HasField("node"):
            raise InvalidArgument("node", "is required")
        node = convert.node_from_pb(request.node, self.subnet)
        self._own(ident, node.node_id, "node.node_id")
        await self._call(self.store.register, node, ident.role == "node")
        want = {"node": node.to_dict()}
        rev = await self._visible(("node", node.node_id), lambda v: v == want)
        return self.pb2.RegisterNodeResponse(revision=rev)

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
        for node_id, value in items:
            if "rejected" in value:
                resp.rejected.append(self.pb2.Rejected(id=node_id, reason=value["rejected"]))
            else:
                resp.nodes.append(convert.node_to_pb(self.pb2, convert.node_from_record(value["node"])))
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
        try:
            ident = self._identity(context)
        except PermissionDenied as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        holder = ident.name if ident.role == "node" else None
        if holder is not None:
            self.store.stream_opened(holder)
        try:
            async for msg in self._stream(request.from_revision, request.epoch):
                yield msg
        finally:
            if holder is not None:
                self.store.stream_closed(holder)

    async def _stream(self, revision: int, epoch: str):
        pb2 = self.pb2
        loop = asyncio.get_running_loop()
        ahead_until: float | None = None
        sent_any = False
        fresh = revision == 0   # 0: the client has nothing yet
        while True:
            fut = self.hub.future()
            plan = self.store.read_since(revision, epoch, COALESCE_AFTER, fresh)
            if plan is None:
                await self.hub.wait(fut, 1.0)
                continue
            if plan.kind == "ahead":
                # resumed on a replica that has not read as far as the client has: give it a moment
                ahead_until = ahead_until or loop.time() + AHEAD_WAIT_S
                if loop.time() < ahead_until:
                    await self.hub.wait(fut, max(0.0, ahead_until - loop.time()))
                    continue
                plan = self.store.read_since(0, "", COALESCE_AFTER, fresh=True)
                plan = Plan("snapshot", plan.epoch, plan.revision, items=plan.items, reset=True)
            ahead_until = None
            if plan.kind == "snapshot":
                for msg in self._snapshot_messages(plan):
                    yield msg
                revision, epoch, sent_any, fresh = plan.revision, plan.epoch, True, False
            elif plan.kind == "delta":
                yield pb2.WatchResponse(
                    kind=pb2.WatchResponse.DELTA, epoch=plan.epoch, revision=plan.revision,
                    base_revision=plan.base, coalesced=plan.coalesced,
                    changes=[convert.change_to_pb(pb2, r, k, v) for r, k, v in plan.items])
                revision, epoch, sent_any = plan.revision, plan.epoch, True
            else:  # current
                if not sent_any:  # tell a resuming client it is live and up to date
                    yield pb2.WatchResponse(kind=pb2.WatchResponse.DELTA, epoch=plan.epoch,
                                            revision=plan.revision, base_revision=plan.revision)
                    epoch, sent_any = plan.epoch, True
                await self.hub.wait(fut, IDLE_WAKE_S)

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
