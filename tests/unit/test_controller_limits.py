"""The controller's per-identity limits (overlay/controller/limits.py) and the peer address
parser of attestation, with a hand-driven clock."""

from __future__ import annotations

import pytest

from overlay.controller.limits import StreamCounter, TokenBuckets, retry_after_ms
from overlay.controller.servicer import peer_address


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_token_bucket_burst_then_rate():
    clock = Clock()
    tb = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [tb.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]      # the burst
    assert tb.take("a") == pytest.approx(0.5)                        # 1 token at 2/s: 0.5 s
    assert tb.take("b") == 0.0                                       # another identity has its own
    clock.t += 0.25
    assert tb.take("a") == pytest.approx(0.25)                       # half a token saved up
    clock.t += 0.25
    assert tb.take("a") == 0.0
    assert tb.take("a") == pytest.approx(0.5)
    clock.t += 100                                                   # never more than the burst
    assert [tb.take("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0]
    assert tb.take("a") > 0


def test_token_bucket_counts_exactly_over_a_burst_of_calls():
    clock = Clock()
    tb = TokenBuckets(rate=1.0, burst=10, clock=clock)
    granted = sum(tb.take("x") == 0.0 for _ in range(10_000))
    assert granted == 10
    clock.t += 5.0
    assert sum(tb.take("x") == 0.0 for _ in range(100)) == 5


def test_stream_counter_caps_per_key():
    sc = StreamCounter(cap=2)
    assert sc.acquire("n") and sc.acquire("n") and not sc.acquire("n")
    assert sc.acquire("m")
    sc.release("n")
    assert sc.count("n") == 1 and sc.acquire("n") and not sc.acquire("n")
    sc.release("n")
    sc.release("n")
    assert sc.count("n") == 0
    sc.release("n")   # an extra release never goes negative
    assert sc.count("n") == 0 and sc.acquire("n")


def test_retry_after_ms():
    assert retry_after_ms(0.0) == 1 and retry_after_ms(0.0004) == 1 and retry_after_ms(1.2345) == 1235


@pytest.mark.parametrize(("peer", "want"), [
    ("ipv4:10.0.0.5:4711", "10.0.0.5"),
    ("ipv6:[::1]:4711", "::1"),
    ("ipv6:%5B::ffff:10.1.2.3%5D:50051", "10.1.2.3"),
    ("ipv6:[2001:db8::7]:1", "2001:db8::7"),
    ("unix:/run/x.sock", None),
    ("ipv4:not-an-ip:1", None),
    ("", None),
])
def test_peer_address(peer, want):
    assert peer_address(peer) == want
