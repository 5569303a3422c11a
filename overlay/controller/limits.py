"""Per-identity limits of the controller (``controller.limits``, docs/grpc.md "Limits").

Pure bookkeeping, thread-safe, with an injectable clock: a token bucket per identity
for RegisterNode, and a count of open Watch streams per identity. The servicer turns a
refusal into RESOURCE_EXHAUSTED with a retry hint (:func:`retry_after_ms`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_IDENTITIES = 100_000     # buckets kept; the fullest (idle) ones are forgotten beyond this


@dataclass
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """``rate`` tokens per second per key, at most ``burst`` saved up; a call takes one."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0.0 if a token was taken; else the seconds until one is there (nothing taken)."""
        now = self._clock()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                if len(self._buckets) >= MAX_IDENTITIES:
                    self._forget_full(now)
                b = self._buckets[key] = _Bucket(self.burst, now)
            b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
            b.at = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return 0.0
            return (1.0 - b.tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        """Caller holds the lock: drop the buckets that have refilled (they start full anyway)."""
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]


class StreamCounter:
    """Open streams per key, at most ``cap`` each."""

    def __init__(self, cap: int):
        self.cap = cap
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> bool:
        with self._lock:
            n = self._open.get(key, 0)
            if n >= self.cap:
                return False
            self._open[key] = n + 1
            return True

    def release(self, key: str) -> None:
        with self._lock:
            n = self._open.get(key, 0) - 1
            if n > 0:
                self._open[key] = n
            else:
                self._open.pop(key, None)

    def count(self, key: str) -> int:
        with self._lock:
            return self._open.get(key, 0)


def retry_after_ms(seconds: float) -> int:
    """The ``grpc-retry-pushback-ms`` value for a wait of ``seconds`` (at least 1 ms)."""
    return max(1, math.ceil(seconds * 1000))
