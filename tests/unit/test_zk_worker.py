"""The worker that reads ZooKeeper for the registry and the store (overlay/zk/worker.py),
driven by a fake handler: batching, resync-then-events, failure and recovery, stop.
No ZooKeeper: the handler is where the reading would be."""

from __future__ import annotations

import threading

from kazoo.exceptions import ConnectionLoss

from overlay.zk.worker import WatchWorker
from tests.support.wait import wait_for


class Recorder:
    def __init__(self, fail: int = 0):
        self.calls: list[tuple] = []
        self.fail = fail              # rounds that raise before one succeeds
        self.gate = threading.Event()  # a round waits for it (items pile up meanwhile)
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, resync, events, batch):
        self.entered.set()
        self.gate.wait(5)
        self.calls.append((resync, [e[2] for e in events], [b[0] for b in batch]))
        if self.fail:
            self.fail -= 1
            raise ConnectionLoss()


def _ev(path: str) -> tuple:
    return ("event", 3, path)


def test_a_batch_is_the_last_resync_and_the_events_after_it():
    rec = Recorder()
    rec.gate.clear()
    w = WatchWorker("t", rec, who="test")
    w.start()
    try:
        w.enqueue(_ev("/first"))               # taken alone; the round blocks on the gate
        assert rec.entered.wait(5), "the first round did not start"
        for item in (_ev("/a"), ("resync", "one"), _ev("/b"), ("resync", "two"), _ev("/c"), ("kick",)):
            w.enqueue(item)
        rec.gate.set()
        wait_for(lambda: len(rec.calls) == 2, timeout=5, what="two rounds")
        assert rec.calls[0] == (None, ["/first"], ["event"])
        # events before the last resync are covered by it; the owner's own items stay in the batch
        assert rec.calls[1] == ("two", ["/c"], ["event", "resync", "event", "resync", "event", "kick"])
    finally:
        w.stop(5)
    assert not w.running


def test_a_failed_round_waits_and_resyncs_when_it_may():
    rec = Recorder(fail=2)
    w = WatchWorker("t", rec, who="test", backoff=(0.01, 0.02))
    w.start()
    try:
        w.enqueue(_ev("/x"))
        wait_for(lambda: len(rec.calls) == 3, timeout=5, what="two failures and a recovery")
        assert rec.calls == [(None, ["/x"], ["event"]), ("after error", [], []), ("after error", [], [])]
    finally:
        w.stop(5)


def test_no_resync_after_a_failure_while_disconnected():
    rec = Recorder(fail=1)
    connected = threading.Event()
    w = WatchWorker("t", rec, who="test", backoff=(0.01, 0.02), can_resync=connected.is_set)
    w.start()
    try:
        w.enqueue(_ev("/x"))
        wait_for(lambda: len(rec.calls) == 1, timeout=5, what="the failing round")
        threading.Event().wait(0.3)       # idle wake-ups pass: nothing is due
        assert len(rec.calls) == 1
        w.resync("reconnected")           # what the owner queues on CONNECTED
        wait_for(lambda: len(rec.calls) == 2, timeout=5, what="the resync")
        assert rec.calls[1] == ("reconnected", [], ["resync"])
    finally:
        w.stop(5)


def test_every_round_runs_without_items():
    rec = Recorder()
    w = WatchWorker("t", rec, who="test", every_round=True)
    w.start()
    try:
        wait_for(lambda: len(rec.calls) >= 1, timeout=5, what="an idle round")
        assert rec.calls[0] == (None, [], [])
    finally:
        w.stop(5)
