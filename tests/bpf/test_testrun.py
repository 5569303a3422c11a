"""testrun.py: the BPF_PROG_TEST_RUN harness itself."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from overlay.datapath.ebpf import testrun
from overlay.errors import DatapathError

FRAME = bytes(
    Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b")
    / IP(src="10.0.0.99", dst="10.0.0.11")
    / UDP(sport=1, dport=2)
    / b"x"
)


def test_run_returns_verdict_and_frame(dp):
    verdict, out = testrun.run(dp.progs["ingress"].fd, FRAME)
    assert (verdict, out) == (testrun.TC_ACT_OK, FRAME)


def test_repeat_and_duration(dp):
    result = testrun.run_ex(dp.progs["ingress"].fd, FRAME, repeat=50)
    assert result.retval == testrun.TC_ACT_OK and result.data == FRAME
    assert result.duration_ns >= 0
    assert sum(dp.counters().values()) == 50


def test_skb_context_is_accepted(dp):
    ctx = testrun.SkBuffCtx(mark=7, priority=3)
    ctx.cb[0] = 42
    assert testrun.run(dp.progs["egress"].fd, FRAME, ctx=ctx) == (testrun.TC_ACT_OK, FRAME)


def test_bad_context_is_refused(dp):
    ctx = testrun.SkBuffCtx(len=99)  # the kernel takes only mark, priority, ifindex, cb...
    with pytest.raises(DatapathError, match="Invalid argument"):
        testrun.run(dp.progs["egress"].fd, FRAME, ctx=ctx)


def test_not_a_program():
    with pytest.raises(DatapathError, match="BPF_PROG_TEST_RUN failed"):
        testrun.run(999999, FRAME)


@pytest.mark.parametrize("packet,repeat", [(b"\0" * 13, 1), (FRAME, 0)])
def test_bad_arguments(packet, repeat):
    with pytest.raises(ValueError):
        testrun.run(0, packet, repeat=repeat)
