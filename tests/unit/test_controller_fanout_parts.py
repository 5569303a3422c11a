"""The pure parts of the controller's Watch fan-out (overlay/controller/fanout.py): the shared
delta cache, the hub's waiters, the method handlers with a pass-through Watch serializer."""

from __future__ import annotations

import asyncio

import pytest

from overlay.controller.fanout import DeltaCache, Hub, method_handlers, passthrough
from overlay.controller.journal import Plan
from overlay.rpc.proto import modules

pb2, pb2_grpc = modules()


def _delta(epoch: str, base: int, rev: int) -> Plan:
    return Plan("delta", epoch, rev, base=base, items=tuple((r, ("group", f"g{r}"), {"group": {"description": ""}})
                                                          for r in range(base + 1, rev + 1)))


def _build(plan: Plan) -> bytes:
    return f"{plan.epoch}:{plan.base}->{plan.revision}:{len(plan.items)}".encode()


# --- DeltaCache -------------------------------------------------------------------------------


def test_every_stream_at_one_revision_gets_the_same_bytes_built_once():
    calls = []
    cache = DeltaCache(lambda p: calls.append((p.base, p.revision)) or _build(p))
    first = cache.get(_delta("e1", 4, 6))
    assert first == b"e1:4->6:2"
    for _ in range(999):   # the other streams at revision 4 when the head is 6
        assert cache.peek("e1", 4, 6) is first
        assert cache.get(_delta("e1", 4, 6)) is first
    assert calls == [(4, 6)] and cache.built == 1
    assert cache.get(_delta("e1", 5, 6)) == b"e1:5->6:1"   # another base: its own message
    assert calls == [(4, 6), (5, 6)]
    assert cache.peek("e1", 6, 7) is None      # not built yet: the stream reads the store
    assert cache.peek("e2", 4, 6) is None      # same revisions, another epoch: not comparable


def test_a_plan_of_another_epoch_empties_the_cache():
    cache = DeltaCache(_build)
    cache.get(_delta("e1", 1, 2))
    cache.get(_delta("e1", 2, 3))
    assert len(cache) == 2
    assert cache.get(_delta("e2", 1, 2)) == b"e2:1->2:1"
    assert len(cache) == 1
    assert cache.peek("e1", 2, 3) is None and cache.peek("e1", 1, 2) is None
    assert cache.peek("e2", 1, 2) == b"e2:1->2:1"


def test_the_cache_is_bounded_and_drops_the_oldest_first():
    cache = DeltaCache(_build, size=3)
    for r in range(1, 6):
        cache.get(_delta("e", r - 1, r))
    assert len(cache) == 3
    assert [cache.peek("e", r - 1, r) is not None for r in range(1, 6)] == [False, False, True, True, True]
    assert cache.built == 5
    assert cache.get(_delta("e", 0, 1)) == b"e:0->1:1" and cache.built == 6   # built again when asked


def test_the_cache_is_bounded_in_bytes_and_keeps_no_oversized_message():
    cache = DeltaCache(lambda p: b"x" * (10 * len(p.items)), size=100, max_bytes=320)
    assert len(cache.get(_delta("e", 0, 2))) == 20 and cache.bytes == 20      # 20 * 16 <= 320: kept
    assert len(cache.get(_delta("e", 0, 3))) == 30 and cache.bytes == 20      # 30 * 16 > 320: sent, not kept
    assert cache.peek("e", 0, 3) is None and cache.peek("e", 0, 2) is not None
    for r in range(3, 43):   # 40 x 10 bytes: the oldest go once 320 bytes would be passed
        cache.get(_delta("e", r - 1, r))
    assert cache.bytes == 320 and len(cache) == 32
    # kept: the last 32 of the 40 (revisions 11..42); gone: the 20-byte one and 3..10
    assert cache.peek("e", 0, 2) is None and cache.peek("e", 9, 10) is None
    assert cache.peek("e", 10, 11) is not None and cache.peek("e", 41, 42) is not None
    cache.get(_delta("f", 0, 1))
    assert cache.bytes == 10 and len(cache) == 1


# --- Hub --------------------------------------------------------------------------------------


def test_a_change_wakes_every_sleeper_and_a_timeout_wakes_only_its_own():
    async def main():
        loop = asyncio.get_running_loop()
        hub = Hub(loop)
        woke: list[str] = []

        async def sleeper(name: str, timeout: float):
            await hub.sleep(timeout)
            woke.append(name)

        short = asyncio.create_task(sleeper("short", 0.05))
        mid = asyncio.create_task(sleeper("mid", 0.6))
        longs = [asyncio.create_task(sleeper(f"long{i}", 60.0)) for i in range(3)]
        await asyncio.sleep(0)
        assert hub.sleeping() == 5
        await asyncio.wait_for(short, 5)     # within SWEEP_S of its timeout
        assert woke == ["short"] and hub.sleeping() == 4
        await asyncio.wait_for(mid, 5)       # the next deadline is remembered after a sweep
        assert woke == ["short", "mid"] and hub.sleeping() == 3
        hub.fire_threadsafe()                # as the store's worker thread calls it
        await asyncio.wait_for(asyncio.gather(*longs), 5)
        assert sorted(woke) == ["long0", "long1", "long2", "mid", "short"] and hub.sleeping() == 0

    asyncio.run(main())


def test_a_cancelled_sleeper_leaves_no_waiter_and_does_not_disturb_the_others():
    async def main():
        hub = Hub(asyncio.get_running_loop())
        gone = asyncio.create_task(hub.sleep(60.0))
        stays = asyncio.create_task(hub.sleep(60.0))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert hub.sleeping() == 1
        hub._fire()
        await asyncio.wait_for(stays, 5)
        assert hub.sleeping() == 0

    asyncio.run(main())


def test_a_change_before_the_sleep_does_not_count():
    async def main():
        hub = Hub(asyncio.get_running_loop())
        hub._fire()                    # nobody sleeps: nothing to wake, nothing remembered
        t = asyncio.create_task(hub.sleep(60.0))
        await asyncio.sleep(0.05)
        assert not t.done()            # the stream re-reads the store before it sleeps
        hub._fire()
        await asyncio.wait_for(t, 5)

    asyncio.run(main())


# --- method handlers --------------------------------------------------------------------------


class _Recorder:
    """Collects what a generated ``add_*Servicer_to_server`` registers."""

    def __init__(self):
        self.handlers: dict = {}

    def add_generic_rpc_handlers(self, handlers):
        pass

    def add_registered_method_handlers(self, service, handlers):
        self.handlers = handlers


class _Servicer:
    def __getattr__(self, name):
        return f"method {name}"


def test_the_handlers_are_those_the_generated_code_builds_but_watch_passes_bytes_through():
    generated = _Recorder()
    pb2_grpc.add_RegistryServicer_to_server(_Servicer(), generated)
    ours = method_handlers(pb2, _Servicer())
    assert set(ours) == set(generated.handlers) and "Watch" in ours
    for name, ref in generated.handlers.items():
        h = ours[name]
        assert (h.request_streaming, h.response_streaming) == (ref.request_streaming, ref.response_streaming), name
        assert h.request_deserializer == ref.request_deserializer, name
        assert (h.unary_unary or h.unary_stream) == f"method {name}"
        if name != "Watch":
            assert h.response_serializer == ref.response_serializer, name
    watch = ours["Watch"].response_serializer
    msg = pb2.WatchResponse(kind=pb2.WatchResponse.DELTA, epoch="e", revision=7, base_revision=6,
                            changes=[pb2.Change(revision=7, kind=pb2.Change.GROUP, id="g",
                                                group=pb2.Group(name="g", description="d"))])
    wire = msg.SerializeToString()
    assert watch(msg) == wire                     # a message: serialized as the generated code does
    assert watch(wire) is wire                    # bytes: sent as they are
    assert pb2.WatchResponse.FromString(watch(wire)) == msg


def test_passthrough_serializes_anything_that_is_not_bytes():
    ser = passthrough(lambda m: b"<" + str(m).encode() + b">")
    assert ser(b"raw") == b"raw"
    assert ser(bytearray(b"x")) == b"<bytearray(b'x')>"
    assert ser(5) == b"<5>"


def test_a_client_streaming_method_is_refused():
    class M:
        name, client_streaming, server_streaming = "Up", True, False

    class D:
        services_by_name = {"Registry": type("S", (), {"methods": [M]})}

    with pytest.raises(ValueError, match="client streaming"):
        method_handlers(type("P", (), {"DESCRIPTOR": D}), _Servicer())
