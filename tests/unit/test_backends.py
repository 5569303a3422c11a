"""Backends by name (overlay/backends.py): datapaths and registries through one table
mechanism, built-ins first, then entry points (no root: nothing is started)."""

from __future__ import annotations

import ipaddress
import os

import pytest

from overlay import backends
from overlay.config import config_from_dict
from overlay.datapath import Datapath
from overlay.errors import UnsupportedError
from overlay.registry import Registry


class _EP:
    def __init__(self, name: str, obj, value: str = "plugin:Thing"):
        self.name, self._obj, self.value = name, obj, value

    def load(self):
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


def _entry_points(monkeypatch, wanted: str, *eps: _EP) -> None:
    monkeypatch.setattr(backends, "entry_points", lambda group: list(eps) if group == wanted else [])


def test_builtin_ebpf_is_lazy_and_follows_the_protocol():
    dp = backends.create_datapath(
        "ebpf", interface="eth0", overlay_subnet="192.168.0.0/18", self_private="10.0.0.1",
        self_overlay="192.168.0.1", sizes=None, pin_root="/sys/fs/bpf/overlay",
        overlay_device="ovl0",
    )
    assert isinstance(dp, Datapath)
    assert dp.name == "ebpf"
    # pinned under this network namespace's identity: the inode `stat -L /proc/self/ns/net` shows
    assert dp.pin_dir == f"/sys/fs/bpf/overlay/{os.stat('/proc/self/ns/net').st_ino}/eth0"
    assert "ebpf" in backends.DATAPATHS.names()


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(UnsupportedError, match="'nope' is not available.*ebpf"):
        backends.create_datapath("nope")
    with pytest.raises(UnsupportedError, match=r"registry backend 'nope' is not available \(known: grpc, static, zookeeper\)"):
        backends.REGISTRIES.lookup("nope")


def test_entry_points_are_consulted(monkeypatch):
    class Fake:
        name = "fake"

        def __init__(self, **kwargs):
            self.kwargs = kwargs

    _entry_points(monkeypatch, "overlay.datapaths", _EP("fake", Fake))
    dp = backends.create_datapath("fake", interface="x")
    assert isinstance(dp, Fake) and dp.kwargs == {"interface": "x"}
    assert "fake" in backends.DATAPATHS.names()


@pytest.mark.parametrize("backend, cls", [
    ("static", "StaticRegistry"), ("zookeeper", "ZooKeeperRegistry"), ("grpc", "GrpcRegistry"),
])
def test_builtin_registries_come_from_the_table(backend, cls):
    got = backends.REGISTRIES.lookup(backend)
    assert got.__name__ == cls and got.name == backend
    assert callable(got.from_config)


def test_static_registry_from_config_follows_the_protocol():
    cfg = config_from_dict({"node_id": "a", "network": "n", "registry": {"backend": "static", "peers": [
        {"node_id": "b", "network": "n", "private": "10.0.0.2", "public": "198.18.0.2", "overlay": "192.168.0.2"}]}})
    reg = backends.create_registry(cfg)
    assert isinstance(reg, Registry) and reg.name == "static"
    assert set(reg.view().nodes) == {"b"}


def test_registry_entry_points_are_consulted_and_builtins_win(monkeypatch):
    made = []

    class FileRegistry:
        name = "file"

        @classmethod
        def from_config(cls, config):
            made.append(config.node_id)
            return cls()

    class Impostor:
        pass

    _entry_points(monkeypatch, "overlay.registries", _EP("file", FileRegistry), _EP("static", Impostor))
    assert backends.REGISTRIES.lookup("file") is FileRegistry
    assert backends.REGISTRIES.lookup("static").__name__ == "StaticRegistry"
    assert backends.REGISTRIES.names() == ["file", "grpc", "static", "zookeeper"]
    cfg = config_from_dict({"node_id": "a", "network": "n", "overlay_subnet": str(ipaddress.IPv4Network("192.168.0.0/18"))})
    reg = backends.REGISTRIES.lookup("file").from_config(cfg)
    assert isinstance(reg, FileRegistry) and made == ["a"]


@pytest.mark.parametrize("obj, error", [
    (ImportError("no module plugin"), r"registry backend 'file' \(plugin:Thing\) failed to load: no module plugin"),
    ("a string", r"registry backend 'file' \(plugin:Thing\) is not callable"),
])
def test_a_broken_registry_plugin_is_an_error_naming_it(monkeypatch, obj, error):
    _entry_points(monkeypatch, "overlay.registries", _EP("file", obj))
    with pytest.raises(UnsupportedError, match=error):
        backends.REGISTRIES.lookup("file")


def test_ebpf_maps_counter_names_cover_the_abi():
    from overlay import abi
    from overlay.datapath.ebpf.maps import counter_name

    assert counter_name(abi.Reason.DROP_NOT_ALLOWED) == "drop_not_allowed"
    assert counter_name(abi.Reason.PASS_MEMBER) == "pass_member"
    assert counter_name(abi.Reason.NAT_EGRESS) == "nat_egress"
    assert counter_name(abi.Reason.PASS_UNTOUCHED) == "pass_untouched"
    assert counter_name(abi.Reason.DROP_MAX) is None
