"""The one thread that reads ZooKeeper for a watcher (the daemon's registry, the controller's store).

kazoo's connection thread only queues (watch notifications, state changes); all reading
happens here, in order. Queued items are tuples: ``("event", type, path)`` for a
notification, ``("resync", reason)`` when everything must be read again (start, a
reconnection), ``("stop",)``, and whatever else the owner defines (the store's
``("kick",)``).

Each round takes up to ``max_batch`` items and calls ``handle(resync, events, batch)``:
``resync`` is the reason of the last ``resync`` item of the batch (or of one still due
after a failed round), ``events`` the ``event`` items after it, ``batch`` everything
taken. A round that raises is logged (kazoo's and the registry's errors as one warning
line, anything else with its traceback), waits a backoff that doubles up to
``backoff[1]``, and makes a resync due when ``can_resync()`` allows one (otherwise the
next reconnection asks for it). A round runs on every wake-up (at least once a second)
when ``every_round`` is set, else only when something was queued or a resync is due.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kazoo.exceptions import KazooException
from kazoo.handlers.threading import KazooTimeoutError

from overlay.errors import RegistryError

log = logging.getLogger(__name__)

Handler = Callable[[str | None, list[tuple], list[tuple]], None]
IDLE_WAKE_S = 1.0


@dataclass
class WatchWorker:
    """``name`` is the thread's; ``who`` starts its log lines (``node web-1``)."""

    name: str
    handle: Handler
    who: str
    backoff: tuple[float, float] = (0.5, 5.0)
    max_batch: int = 20000
    every_round: bool = False
    can_resync: Callable[[], bool] = lambda: True
    _queue: deque[tuple] = field(default_factory=deque, init=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _due: str | None = field(default=None, init=False)   # a resync still owed after a failed round

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def enqueue(self, item: tuple) -> None:
        with self._cond:
            self._queue.append(item)
            self._cond.notify()

    def resync(self, reason: str) -> None:
        """Ask for a full re-read (the next round)."""
        self.enqueue(("resync", reason))

    def stop(self, timeout: float) -> None:
        """Stop the thread (after the round in progress), waiting up to ``timeout`` seconds."""
        self._stop.set()
        self.enqueue(("stop",))
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def pause(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the worker is being stopped."""
        return self._stop.wait(seconds)

    def _take(self) -> list[tuple]:
        with self._cond:
            if not self._queue:
                self._cond.wait(IDLE_WAKE_S)
            batch = []
            while self._queue and len(batch) < self.max_batch:
                batch.append(self._queue.popleft())
        return batch

    def _run(self) -> None:
        backoff = self.backoff[0]
        while not self._stop.is_set():
            batch = self._take()
            if self._stop.is_set() or any(item[0] == "stop" for item in batch):
                return
            last = max((i for i, item in enumerate(batch) if item[0] == "resync"), default=-1)
            resync = batch[last][1] if last >= 0 else self._due
            if not batch and resync is None and not self.every_round:
                continue
            events = [item for item in batch[last + 1:] if item[0] == "event"]
            try:
                self.handle(resync, events, batch)
                self._due = None
                backoff = self.backoff[0]
            except Exception as exc:  # never let the worker die; resync once we can
                if self._stop.is_set():
                    return
                if isinstance(exc, KazooException | KazooTimeoutError | RegistryError):
                    log.warning("%s: ZooKeeper work failed (%s: %s); will resync", self.who, type(exc).__name__, exc)
                else:
                    log.exception("%s: unexpected error in the %s worker; will resync", self.who, self.name)
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, self.backoff[1])
                self._due = "after error" if self.can_resync() else None
