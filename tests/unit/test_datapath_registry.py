"""Datapath backends by name (no root: nothing is started)."""

from __future__ import annotations

import pytest

from overlay.datapath import Datapath, registry
from overlay.errors import UnsupportedError


def test_builtin_ebpf_is_lazy_and_follows_the_protocol():
    dp = registry.create(
        "ebpf", interface="eth0", overlay_subnet="192.168.0.0/18", self_private="10.0.0.1",
        self_overlay="192.168.0.1", sizes=None, pin_root="/sys/fs/bpf/overlay",
        overlay_device="ovl0",
    )
    assert isinstance(dp, Datapath)
    assert dp.name == "ebpf"
    assert dp.pin_dir == "/sys/fs/bpf/overlay/eth0"
    assert "ebpf" in registry.names()


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(UnsupportedError, match="'nope' is not available.*ebpf"):
        registry.create("nope")


def test_entry_points_are_consulted(monkeypatch):
    class Fake:
        name = "fake"

        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class EP:
        name = "fake"

        def load(self):
            return Fake

    monkeypatch.setattr(registry, "entry_points", lambda group: [EP()] if group == registry.ENTRY_POINT_GROUP else [])
    dp = registry.create("fake", interface="x")
    assert isinstance(dp, Fake) and dp.kwargs == {"interface": "x"}
    assert "fake" in registry.names()


def test_ebpf_maps_counter_names_cover_the_abi():
    from overlay.datapath.ebpf import abi
    from overlay.datapath.ebpf.maps import counter_name

    assert counter_name(abi.Reason.DROP_NOT_ALLOWED) == "drop_not_allowed"
    assert counter_name(abi.Reason.PASS_MEMBER) == "pass_member"
    assert counter_name(abi.Reason.NAT_EGRESS) == "nat_egress"
    assert counter_name(abi.Reason.PASS_UNTOUCHED) == "pass_untouched"
    assert counter_name(abi.Reason.DROP_MAX) is None
