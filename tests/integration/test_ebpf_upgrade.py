"""Upgrading a pinned ABI-2 datapath to ABI 3 under a live overlay stream.

h1's datapath is first loaded by the code of the branch point of issue 11
(``git archive 57b97c1``, bench/before.py: ABI 2), h2 runs this revision. h1
streams to h2's overlay address; mid-stream a holder of THIS revision starts on
h1's pins: the digest and ABI version differ, so it reloads, re-creating the maps
whose layout changed. The stream's translated conntrack entry is carried over
(ABI-2 ``ovl_ct`` values are converted: docs/datapath.md "Upgrading to ABI 3"),
so its replies keep coming back from the overlay address and the stream ends
intact; the old drop-event ring buffer is replaced by a new one.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time

import pytest

from overlay.datapath.ebpf import bpfsys
from tests.support.netns import finish, netns_inode
from tests.support.paths import REPO, program
from tests.support.twonets import HOSTS, lab_context, member_ops

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

NBYTES = 4 * 1024 * 1024
SECONDS = 25.0  # long enough for the new holder to compile (a reload, not an adoption)
PORT = 7200


def map_id(path: str) -> int:
    fd = bpfsys.obj_get(path)
    try:
        return bpfsys.map_info(fd).id
    finally:
        bpfsys.close(fd)


def test_abi2_state_is_upgraded_under_a_live_stream():
    from bench.before import DEFAULT_REV, ArchiveError, extract

    old_root = tempfile.mkdtemp(prefix="ovl-abi2-")
    try:
        try:
            extract(DEFAULT_REV, old_root)
        except ArchiveError as exc:
            pytest.skip(str(exc))
        # the test programs of this revision (tests/support), run on the old library:
        # `python -m tests.support.dpctl` from old_root puts old_root first on sys.path
        shutil.copytree(os.path.join(REPO, "tests", "support"), os.path.join(old_root, "tests", "support"),
                        dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        with lab_context() as lab:
            h1, h2 = lab.ns["h1"], lab.ns["h2"]
            lab.start_datapaths(("h2",))
            args = lab.dp_args("h1")
            pin_dir = os.path.join(args["pin_root"], "eth0")
            old = h1.popen(*program("dpctl"), "hold",
                           json.dumps({"ops": member_ops("h1"), "max_s": 60, **args}), text=True,
                           cwd=old_root)
            holders = [old]
            try:
                loaded = json.loads(old.stdout.readline())
                assert loaded["adopted"] is False
                h1.offload_off("ovl0")
                h1.offload_off("ovl0p")
                assert lab_cfg(pin_dir, 3) == 2  # OVL_CFG_ABI_VERSION of the old programs
                events_before = map_id(os.path.join(pin_dir, "ovl_events"))

                srv = h2.helper_bg("stream-serve", port=PORT, nbytes=NBYTES, timeout=60)
                cli = h1.helper_bg("stream-send", host=HOSTS["h2"]["overlay"], port=PORT,
                                   nbytes=NBYTES, seconds=SECONDS, chunks=200, timeout=40)
                assert cli.first == {"connected": True}
                time.sleep(SECONDS * 0.15)
                old.kill()
                old.wait(5)

                new = h1.helper_bg("hold", ops=member_ops("h1"), max_s=60, **args)
                holders.append(new)
                upgraded = new.first
                assert cli.poll() is None, "the stream ended before the upgrade"
                assert upgraded["adopted"] is False  # a reload, not an adoption
                # the ABI-2 revision pinned at <pin_root>/<interface> (the layout before pins
                # were keyed by network namespace); this one moved it to its own place
                new_dir = os.path.join(args["pin_root"], str(netns_inode(h1.name)), "eth0")
                assert not os.path.exists(pin_dir)
                assert lab_cfg(new_dir, 3) == 3
                assert map_id(os.path.join(new_dir, "ovl_events")) != events_before

                sent = finish(cli)
                got = finish(srv)
                assert sent["error"] is None and got["error"] is None, (sent, got)
                assert sent["sent"] == got["received"] == NBYTES
                assert got["sha256"] == sent["sha256"] == sent["echo"]
                # the carried entry was re-verified against its NAT entry on its first reply
                state = h1.helper("observe", **args)
                assert state["counters"]["nat_ingress"] > 0
                assert state["counters"]["ct_nat_stale"] == 0
            finally:
                for proc in holders:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(5)
    finally:
        shutil.rmtree(old_root, ignore_errors=True)


def lab_cfg(pin_dir: str, index: int) -> int:
    fd = bpfsys.obj_get(os.path.join(pin_dir, "ovl_cfg"))
    try:
        info = bpfsys.map_info(fd)
        raw = bpfsys.lookup(fd, struct.pack("=I", index), 4, info.value_size)
        return struct.unpack("=Q", raw[:8])[0]
    finally:
        bpfsys.close(fd)
