"""Upgrading a pinned older datapath to this ABI under a live overlay stream.

h1's datapath is first loaded by the code of an older revision (``git archive``,
bench/before.py): the branch point of issue 11 (ABI 2), or main at 5f1847f (ABI 3,
the layout before ABI 4); h2 runs this revision. h1 streams to h2's overlay address;
mid-stream a holder of THIS revision starts on h1's pins WITHOUT applying anything:
the digest and ABI version differ, so it reloads, re-creating the maps whose layout
changed and carrying what can be carried (docs/datapath.md "Upgrading to ABI 3",
"Upgrading to ABI 4"): ABI-2 ``ovl_ct`` values are converted, the ABI-2/3 ``ovl_nat``
hash entries go into the ``ovl_nat`` array's slots or ``ovl_nat_ext``, ``ovl_rnat``
is unpinned. So the stream's replies keep coming back from the overlay address
(translated by the carried NAT entry before any apply) and the stream ends intact;
the old drop-event ring buffer is replaced by a new one.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time

import pytest

from overlay import abi
from overlay.datapath.ebpf import bpfsys
from tests.support.netns import finish, netns_inode
from tests.support.paths import REPO, program
from tests.support.twonets import HOSTS, lab_context, member_ops

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

NBYTES = 4 * 1024 * 1024
SECONDS = 4.0   # the stream's pace; it pauses half-way until the new holder is up (a reload
                # compiles: seconds, more under load), so the upgrade always falls mid-stream
PAUSE_MAX_S = 120.0
PORT = 7200


def map_id(path: str) -> int:
    fd = bpfsys.obj_get(path)
    try:
        return bpfsys.map_info(fd).id
    finally:
        bpfsys.close(fd)


ABI3_REV = "5f1847f"  # main before ABI 4: ovl_nat a hash, ovl_rnat


@pytest.mark.parametrize("old_abi", [2, 3])
def test_pinned_state_is_upgraded_under_a_live_stream(old_abi):
    from bench.before import DEFAULT_REV, ArchiveError, extract

    old_root = tempfile.mkdtemp(prefix=f"ovl-abi{old_abi}-")
    try:
        try:
            extract(DEFAULT_REV if old_abi == 2 else ABI3_REV, old_root)
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
            # ABI 2 pinned at <pin_root>/<interface> (the layout before pins were keyed by
            # network namespace); ABI 3 where this revision pins
            new_dir = os.path.join(args["pin_root"], str(netns_inode(h1.name)), "eth0")
            pin_dir = os.path.join(args["pin_root"], "eth0") if old_abi == 2 else new_dir
            old = h1.popen(*program("dpctl"), "hold",
                           json.dumps({"ops": member_ops("h1"), "max_s": 60, **args}), text=True,
                           cwd=old_root)
            holders = [old]
            try:
                loaded = json.loads(old.stdout.readline())
                assert loaded["adopted"] is False
                h1.offload_off("ovl0")
                h1.offload_off("ovl0p")
                assert lab_cfg(pin_dir, 3) == old_abi  # OVL_CFG_ABI_VERSION of the old programs
                assert os.path.exists(os.path.join(pin_dir, "ovl_rnat"))
                events_before = map_id(os.path.join(pin_dir, "ovl_events"))

                srv = h2.helper_bg("stream-serve", port=PORT, nbytes=NBYTES, timeout=60)
                resume = os.path.join(old_root, "resume-stream")
                cli = h1.helper_bg("stream-send", host=HOSTS["h2"]["overlay"], port=PORT,
                                   nbytes=NBYTES, seconds=SECONDS, chunks=200, timeout=40,
                                   pause_after=NBYTES // 2, pause_s=PAUSE_MAX_S, resume_file=resume)
                assert cli.first == {"connected": True}
                time.sleep(SECONDS * 0.15)
                old.kill()
                old.wait(5)

                new = h1.helper_bg("hold", max_s=60, **args)   # no apply: what it has is carried
                holders.append(new)
                upgraded = new.first
                assert cli.poll() is None, "the stream ended before the upgrade"
                open(resume, "w").close()      # the second half goes through the new programs
                assert upgraded["adopted"] is False  # a reload, not an adoption
                if old_abi == 2:  # moved to this revision's place
                    assert not os.path.exists(pin_dir)
                assert lab_cfg(new_dir, 3) == abi.ABI_VERSION
                assert not os.path.exists(os.path.join(new_dir, "ovl_rnat"))
                # every NAT entry carried (h2, h3: in 192.168.0.0/18, so in ovl_nat's slots)
                assert {k: v["real"] for k, v in upgraded["observe"]["nat"].items()} == \
                    member_ops("h1")["nat"]
                assert upgraded["fill"]["ovl_nat"]["entries"] == len(member_ops("h1")["nat"])
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
