"""A TCP stream through an overlay address survives kill -9 of the process
that loaded the datapath, and the adoption of the pinned state by a new one.

h1 streams a fixed number of bytes, paced over ~5 s, to h2's overlay
address; h1's datapath is loaded by a "holder" process (standing in for
the daemon), which is SIGKILLed mid-stream; a new holder then adopts the
pins. The stream must end with no error (no reset), every byte delivered
(same count and sha256 at both ends), not one packet leaving h1's ovl0
untranslated (it would show on ovl0p: the datapath never stopped
translating) and the same filters and programs.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.support.netns import finish
from tests.support.twonets import HOSTS, lab_context, member_ops

pytestmark = [pytest.mark.root]

NBYTES = 4 * 1024 * 1024
SECONDS = 5.0
PORT = 7100


def rx_packets(ns, dev: str) -> int:
    """Packets that arrived on ``dev``. On ovl0p, that is a packet to an overlay
    address that left ovl0 untranslated: the trace of a flap."""
    link = json.loads(ns.run("ip", "-s", "-j", "link", "show", dev).stdout)[0]
    return int(link["stats64"]["rx"]["packets"])


def test_stream_survives_kill_and_adoption():
    with lab_context() as lab:
        h1, h2 = lab.ns["h1"], lab.ns["h2"]
        lab.start_datapaths(("h2",))
        holders = []
        try:
            first = h1.helper_bg("hold", ops=member_ops("h1"), max_s=60, **lab.dp_args("h1"))
            holders.append(first)
            loaded = first.first
            assert loaded["adopted"] is False and loaded["pid"] == first.pid
            h1.offload_off("ovl0")
            h1.offload_off("ovl0p")

            untranslated0 = rx_packets(h1, "ovl0p")
            srv = h2.helper_bg("stream-serve", port=PORT, nbytes=NBYTES, timeout=30)
            cli = h1.helper_bg("stream-send", host=HOSTS["h2"]["overlay"], port=PORT,
                               nbytes=NBYTES, seconds=SECONDS, chunks=200, timeout=20)
            assert cli.first == {"connected": True}

            time.sleep(SECONDS * 0.3)
            assert cli.poll() is None, "the stream ended before the kill"
            first.kill()  # SIGKILL: no cleanup of any kind
            first.wait(5)

            second = h1.helper_bg("hold", ops=member_ops("h1"), max_s=60, **lab.dp_args("h1"))
            holders.append(second)
            adopted = second.first
            assert cli.poll() is None, "the stream ended before the adoption"
            assert adopted["adopted"] is True
            assert adopted["reattached"] == []
            assert adopted["attachments"] == loaded["attachments"]
            assert adopted["ct"] >= 1  # the stream's conntrack entry is still there

            sent = finish(cli)
            got = finish(srv)
            assert sent["error"] is None, sent
            assert got["error"] is None, got
            assert sent["sent"] == NBYTES and got["received"] == NBYTES
            assert got["sha256"] == sent["sha256"] == sent["echo"]
            assert got["peer"] == HOSTS["h1"]["private"]
            assert rx_packets(h1, "ovl0p") == untranslated0
        finally:
            for proc in holders:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
