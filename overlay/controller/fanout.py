"""Watch fan-out: what keeps one change cheap to deliver to thousands of streams.

- :class:`Hub` wakes the Watch coroutines waiting for the store to change: one private
  waiter future per sleeping stream (no timer, no shield, no task per wait), timeouts
  swept by one timer for all of them.
- :class:`DeltaCache` holds the serialized ``WatchResponse`` of a delta, built once per
  (epoch, base revision, revision) and handed to every stream at that revision, so a
  change costs one build and one serialization, not one per stream.
- :func:`method_handlers` registers ``overlay.v1.Registry`` with a Watch serializer that
  passes ``bytes`` through (a message is serialized as usual): what goes on the wire is
  exactly the contract's ``WatchResponse``.

All of it runs on the server's event loop thread (``Hub.fire_threadsafe`` excepted).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

SWEEP_S = 0.25          # how often timed-out waiters are woken (the precision of Hub.sleep)
CACHE_SIZE = 64         # delta messages kept (the current epoch only)
CACHE_BYTES = 16 << 20  # and their bytes at most; a message over 1/16 of it is not kept


class Hub:
    """Wakes Watch coroutines when the store changed (:meth:`fire_threadsafe` from any thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._fut: asyncio.Future = loop.create_future()
        self._waiters: dict[asyncio.Future, float] = {}    # waiter -> deadline (loop time)
        self._earliest = float("inf")                       # no deadline of a waiter is earlier
        self._sweeper: asyncio.TimerHandle | None = None

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
        waiters, self._waiters = self._waiters, {}
        self._earliest = float("inf")
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def future(self) -> asyncio.Future:
        """Done at the next change (shared: await it only through :meth:`wait`)."""
        return self._fut

    @staticmethod
    async def wait(fut: asyncio.Future, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            pass

    async def sleep(self, timeout: float) -> None:
        """Until the next change, or about ``timeout`` seconds (within :data:`SWEEP_S`).

        A change that happened before this call (in an earlier step of the loop) does not
        count: check the store and call this in the same step, as a Watch stream does."""
        w = self._loop.create_future()
        deadline = self._waiters[w] = self._loop.time() + timeout
        self._earliest = min(self._earliest, deadline)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(SWEEP_S, self._sweep)
        try:
            await w
        finally:
            self._waiters.pop(w, None)

    def sleeping(self) -> int:
        return len(self._waiters)

    def _sweep(self) -> None:
        now = self._loop.time()
        if self._earliest <= now:     # else nobody is due: no scan
            self._earliest = float("inf")
            for w, deadline in list(self._waiters.items()):
                if deadline <= now:
                    del self._waiters[w]
                    if not w.done():
                        w.set_result(None)
                else:
                    self._earliest = min(self._earliest, deadline)
        self._sweeper = self._loop.call_later(SWEEP_S, self._sweep) if self._waiters else None


class DeltaCache:
    """Serialized delta messages by (base, revision) of one epoch, built by ``build(plan)``.

    Bounded (``size`` messages and ``max_bytes``, the oldest goes first; a message over
    1/16 of ``max_bytes``, such as a slow stream's coalesced delta, is built for its stream
    and not kept) and emptied when a plan of another epoch arrives: revisions of different
    epochs are not comparable. A cached message is the delta from its base to its revision
    whatever the journal did since, so any stream at that base may be sent it."""

    def __init__(self, build: Callable, size: int = CACHE_SIZE, max_bytes: int = CACHE_BYTES):
        self._build = build
        self._size = max(1, size)
        self._max_bytes = max_bytes
        self._epoch: str | None = None
        self._msgs: dict[tuple[int, int], bytes] = {}
        self.bytes = 0
        self.built = 0

    def __len__(self) -> int:
        return len(self._msgs)

    def peek(self, epoch: str, base: int, revision: int) -> bytes | None:
        """The message from ``base`` to ``revision`` of ``epoch``, if it was built."""
        return self._msgs.get((base, revision)) if epoch == self._epoch else None

    def get(self, plan) -> bytes:
        """The message of a delta ``plan`` (:class:`~overlay.controller.journal.Plan`), built once."""
        if plan.epoch != self._epoch:
            self._msgs.clear()
            self.bytes = 0
            self._epoch = plan.epoch
        key = (plan.base, plan.revision)
        msg = self._msgs.get(key)
        if msg is None:
            msg = self._build(plan)
            self.built += 1
            if len(msg) * 16 <= self._max_bytes:
                while self._msgs and (len(self._msgs) >= self._size or self.bytes + len(msg) > self._max_bytes):
                    self.bytes -= len(self._msgs.pop(next(iter(self._msgs))))
                self._msgs[key] = msg
                self.bytes += len(msg)
        return msg


def passthrough(serialize: Callable[[object], bytes]) -> Callable[[object], bytes]:
    """A response serializer that sends ``bytes`` as they are and serializes anything else."""

    def ser(msg) -> bytes:
        return msg if type(msg) is bytes else serialize(msg)

    return ser


def method_handlers(pb2, servicer, service: str = "Registry", raw: tuple[str, ...] = ("Watch",)) -> dict:
    """The RPC method handlers of ``service`` (from its descriptor, as the generated
    ``add_*Servicer_to_server`` builds them) on ``servicer``; the methods in ``raw`` may
    also yield already serialized responses."""
    out = {}
    for m in pb2.DESCRIPTOR.services_by_name[service].methods:
        if m.client_streaming:
            raise ValueError(f"{service}.{m.name}: client streaming is not handled here")
        req, resp = getattr(pb2, m.input_type.name), getattr(pb2, m.output_type.name)
        ser = passthrough(resp.SerializeToString) if m.name in raw else resp.SerializeToString
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        out[m.name] = make(getattr(servicer, m.name), request_deserializer=req.FromString, response_serializer=ser)
    return out


def add_to_server(pb2, servicer, server, full_name: str) -> None:
    """Register ``servicer`` (:func:`method_handlers`) on a gRPC server as ``full_name``."""
    handlers = method_handlers(pb2, servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(full_name, handlers),))
    server.add_registered_method_handlers(full_name, handlers)
