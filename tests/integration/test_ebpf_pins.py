"""Pins keyed by owner (issue 16; docs/datapath.md, "Pin layout").

Two datapaths in two namespaces, both on ``eth0``, share one ``pin_root``: each lives
under its own namespace's identity (``<pin_root>/<netns inode>/eth0``, the inode as
``stat -L /run/netns/NAME`` prints it), adopts only its own state, and both carry
traffic. The old layout (``<pin_root>/eth0``) is adopted once by the namespace whose
ingress filter runs the program pinned there, and left alone by the other; a pin
directory that records another (gone) namespace as its owner is reloaded, not adopted.
"""

from __future__ import annotations

import os

import pytest

from tests.support.netns import netns_inode
from tests.support.twonets import HOSTS, lab_context, member_ops

pytestmark = [pytest.mark.root]

PORT = 7300


def _reachable(lab, src: str, dst: str) -> bool:
    srv = lab.ns[dst].helper_bg("serve-tcp", port=PORT, count=1, timeout=10)
    try:
        res = lab.ns[src].helper("connect-tcp", host=HOSTS[dst]["overlay"], port=PORT, timeout=3)
    finally:
        srv.kill()
        srv.communicate(timeout=10)
    return res["ok"] and res["peer"] == HOSTS[dst]["overlay"]


def test_two_namespaces_share_a_pin_root_and_the_old_layout_moves_once():
    with lab_context() as lab:
        shared = lab.dp_args("h1")["pin_root"]
        args = {n: {**lab.dp_args(n), "pin_root": shared} for n in ("h1", "h2")}

        def start(name: str, **extra) -> dict:
            return lab.ns[name].helper("start", **args[name], **extra)

        want = {n: os.path.join(shared, str(netns_inode(lab.ns[n].name)), "eth0") for n in ("h1", "h2")}
        assert want["h1"] != want["h2"]
        first = {n: start(n, ops=member_ops(n)) for n in ("h1", "h2")}
        for n in ("h1", "h2"):
            lab.ns[n].offload_off("ovl0")
            lab.ns[n].offload_off("ovl0p")
            assert first[n]["adopted"] is False and first[n]["pin_dir"] == want[n]
            assert "owner" in os.listdir(want[n])
        assert sorted(os.listdir(shared)) == sorted(os.path.basename(os.path.dirname(d)) for d in want.values())
        assert _reachable(lab, "h1", "h2") and _reachable(lab, "h2", "h1")

        # each adopts its own state again: its own peers, its own programs
        again = start("h2")
        assert again["adopted"] is True and again["observe"] == first["h2"]["observe"]
        assert again["attachments"] == first["h2"]["attachments"]

        # what an older version left: h1's pins at <pin_root>/eth0, no owner record
        legacy = os.path.join(shared, "eth0")
        os.rename(want["h1"], legacy)
        os.unlink(os.path.join(legacy, "owner"))
        # h2 restarts: it adopts its own state and leaves h1's old-layout pins alone
        res = start("h2")
        assert res["adopted"] is True and res["observe"] == first["h2"]["observe"]
        assert os.path.isdir(legacy) and not os.path.exists(want["h1"])
        # h1 restarts: the old layout is its own (its ingress filter runs the program pinned
        # there): moved into the new layout and adopted, nothing compiled, its state intact
        res = start("h1")
        assert res["adopted"] is True and res["pin_dir"] == want["h1"] and res["start_s"] < 1.0
        assert res["observe"] == first["h1"]["observe"] and res["attachments"] == first["h1"]["attachments"]
        assert not os.path.exists(legacy) and "owner" in os.listdir(want["h1"])
        assert _reachable(lab, "h1", "h2") and _reachable(lab, "h2", "h1")

        # a directory recording another namespace as its owner (its inode reused after it
        # went away) is never adopted: reloaded, and the owner is this namespace again
        code = ("import sys; from overlay.datapath.ebpf import pins; "
                "o = pins.this_owner(); pins.write_owner(sys.argv[1], pins.Owner(o.inode, o.cookie + 1000))")
        lab.ns["h2"].py(code, want["h2"])
        res = start("h2", ops=member_ops("h2"))
        assert res["adopted"] is False and res["observe"]["nat"] == first["h2"]["observe"]["nat"]
        check = ("import sys; from overlay.datapath.ebpf import pins; "
                 "print(pins.read_owner(sys.argv[1]) == pins.this_owner())")
        assert lab.ns["h2"].py(check, want["h2"]).stdout.strip() == "True"
        assert _reachable(lab, "h1", "h2") and _reachable(lab, "h2", "h1")
