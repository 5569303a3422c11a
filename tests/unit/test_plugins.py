"""Plugins chosen by name in the config, validating their own sections, and ``overlay plugins``
(overlay/backends.py, overlay/config.py, overlay/cli/plugins.py), with fake entry points.

The real thing (the example plugin installed, two daemons on it in namespaces) is
tests/integration/test_plugin_file_registry.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from overlay import backends
from overlay.cli import main
from overlay.config import config_from_dict
from overlay.daemon import make_datapath
from overlay.errors import InvalidConfigError
from overlay.model import Node


class Dist:
    def __init__(self, name: str, version: str):
        self.name, self.version = name, version


class EP:
    """An entry point as importlib.metadata gives it: name, value, dist, load()."""

    def __init__(self, name: str, obj, value: str = "plugin:Thing", dist: Dist | None = None):
        self.name, self._obj, self.value = name, obj, value
        self.dist = dist or Dist("overlay-plugin", "1.2.3")

    def load(self):
        if isinstance(self._obj, BaseException):
            raise self._obj
        return self._obj


@pytest.fixture
def installed(monkeypatch):
    """``installed(group, *eps)``: what importlib.metadata reports for ``group``."""
    groups: dict[str, list[EP]] = {}
    monkeypatch.setattr(backends, "entry_points", lambda group: list(groups.get(group, [])))

    def install(group: str, *eps: EP) -> None:
        groups.setdefault(group, []).extend(eps)

    return install


@dataclass(frozen=True)
class EtcdOptions:
    endpoints: tuple[str, ...]
    lease_s: float = 5.0


class EtcdRegistry:
    """A registry plugin whose hook validates ``endpoints`` and ``lease_s``."""

    name = "etcd"
    seen: list[dict] = []

    @classmethod
    def validate_config(cls, section: dict) -> EtcdOptions:
        cls.seen.append(dict(section))
        for key in section:
            if key not in ("endpoints", "lease_s", "nested"):
                raise InvalidConfigError(key, "unknown key")
        if "endpoints" not in section:
            raise InvalidConfigError("endpoints", "is required")
        eps = section["endpoints"]
        if not isinstance(eps, list):
            raise InvalidConfigError("endpoints", "must be a list")
        for i, ep in enumerate(eps):
            if ":" not in str(ep):
                raise InvalidConfigError(f"endpoints[{i}]", "expected host:port")
        if "nested" in section:
            raise InvalidConfigError("nested.deep[1].key", "is wrong")
        return EtcdOptions(tuple(eps), float(section.get("lease_s", 5.0)))

    @classmethod
    def from_config(cls, config):
        return cls()


class PlainRegistry:
    """A registry plugin without a config hook."""

    name = "plain"

    @classmethod
    def from_config(cls, config):
        return cls()


def cfg(**sections) -> dict:
    return {"node_id": "a", "network": "lab", "addresses": {"private": "10.0.0.1", "public": "198.18.0.1"},
            **sections}


def bad(obj: dict) -> InvalidConfigError:
    with pytest.raises(InvalidConfigError) as info:
        config_from_dict(obj)
    return info.value


# --- registries ------------------------------------------------------------------------------------


def test_a_registry_plugin_gets_its_keys_and_its_options_are_kept(installed):
    installed("overlay.registries", EP("etcd", EtcdRegistry))
    EtcdRegistry.seen.clear()
    c = config_from_dict(cfg(registry={"backend": "etcd", "endpoints": ["e1:2379"], "lease_s": 3, "timeout_s": 4}))
    assert EtcdRegistry.seen == [{"endpoints": ["e1:2379"], "lease_s": 3}]  # not backend, not timeout_s
    assert c.registry.backend == "etcd" and c.registry.timeout_s == 4.0
    assert c.registry.options == EtcdOptions(("e1:2379",), 3.0)
    assert c.registry.hosts == ()  # the ZooKeeper default is not this backend's (nor the failsafe's)
    assert isinstance(backends.create_registry(c), EtcdRegistry)


@pytest.mark.parametrize("registry, path, reason", [
    ({"backend": "etcd"}, "registry.endpoints", "is required"),
    ({"backend": "etcd", "endpoints": ["x"]}, "registry.endpoints[0]", "expected host:port"),
    ({"backend": "etcd", "endpoints": [], "colour": "red"}, "registry.colour", "unknown key"),
    ({"backend": "etcd", "endpoints": [], "nested": 1}, "registry.nested.deep[1].key", "is wrong"),
    ({"backend": "etcd", "endpoints": [], "timeout_s": "soon"}, "registry.timeout_s", "must be a number"),
    ({"backend": "etcd", "endpoints": [], "hosts": ["127.0.0.1:2181"]}, "registry.hosts", "unknown key"),
])
def test_a_registry_plugins_errors_name_the_full_key_path(installed, registry, path, reason):
    installed("overlay.registries", EP("etcd", EtcdRegistry))
    err = bad(cfg(registry=registry))
    assert err.path == path and err.reason.startswith(reason)


def test_a_plugin_without_a_hook_takes_no_keys_of_its_own(installed):
    installed("overlay.registries", EP("plain", PlainRegistry))
    c = config_from_dict(cfg(registry={"backend": "plain", "timeout_s": 2}))
    assert (c.registry.backend, c.registry.options, c.registry.timeout_s) == ("plain", None, 2.0)
    err = bad(cfg(registry={"backend": "plain", "directory": "/srv"}))
    assert err.path == "registry.directory" and err.reason.startswith("unknown key")


def test_a_hook_that_raises_something_else_is_one_error_at_the_section(installed):
    class Crashy(PlainRegistry):
        @staticmethod
        def validate_config(section):
            return section["missing"]

    installed("overlay.registries", EP("crashy", Crashy))
    err = bad(cfg(registry={"backend": "crashy"}))
    assert err.path == "registry"
    assert err.reason == "registry backend 'crashy' could not validate this section: KeyError: 'missing'"


def test_an_unknown_backend_names_every_available_one(installed):
    installed("overlay.registries", EP("etcd", EtcdRegistry), EP("plain", PlainRegistry))
    err = bad(cfg(registry={"backend": "consul"}))
    assert err.path == "registry.backend"
    assert err.reason.startswith("'consul' is not one of the available registry backends: "
                                 "etcd, grpc, plain, static, zookeeper (")
    assert "overlay.registries entry point" in err.reason


@pytest.mark.parametrize("obj, reason", [
    (ImportError("No module named 'etcd3'"),
     "registry backend 'etcd' (plugin:Thing) failed to load: No module named 'etcd3'"),
    (SystemExit(3), "registry backend 'etcd' (plugin:Thing) failed to load: 3"),
    (object(), "registry backend 'etcd' (plugin:Thing) is not callable"),
    (type("NoFactory", (), {}), "registry backend 'etcd' (plugin:Thing) has no from_config()"),
])
def test_a_broken_plugin_is_a_config_error_at_the_backend_key(installed, obj, reason):
    installed("overlay.registries", EP("etcd", obj))
    err = bad(cfg(registry={"backend": "etcd", "endpoints": ["e:1"]}))
    assert (err.path, err.reason) == ("registry.backend", reason)


def test_builtins_keep_their_typed_sections_whatever_is_installed(installed):
    class Impostor(EtcdRegistry):
        @classmethod
        def validate_config(cls, section):
            raise AssertionError("a plugin must never validate a built-in's section")

    installed("overlay.registries", EP("static", Impostor), EP("zookeeper", Impostor))
    c = config_from_dict(cfg(registry={"backend": "static"}))
    assert c.registry.backend == "static" and c.registry.options is None
    err = bad(cfg(registry={"backend": "zookeeper", "endpoints": ["e:1"]}))
    assert err.path == "registry.endpoints" and err.reason.startswith("unknown key")
    assert backends.REGISTRIES.lookup("static").__name__ == "StaticRegistry"


# --- datapaths and address providers -------------------------------------------------------------


@dataclass(frozen=True)
class XdpOptions:
    mode: str


class XdpDatapath:
    name = "xdp"

    @staticmethod
    def validate_config(section: dict) -> XdpOptions:
        extra = set(section) - {"xdp_mode"}
        if extra:
            raise InvalidConfigError(sorted(extra)[0], "unknown key")
        mode = section.get("xdp_mode", "native")
        if mode not in ("native", "generic"):
            raise InvalidConfigError("xdp_mode", f"{mode!r} is not one of: native, generic")
        return XdpOptions(mode)

    def __init__(self, **kwargs):
        self.kwargs = kwargs


def test_a_datapath_plugin_gets_the_common_keys_as_arguments_and_its_options(installed):
    installed("overlay.datapaths", EP("xdp", XdpDatapath))
    c = config_from_dict(cfg(datapath={"backend": "xdp", "interface": "ens5", "xdp_mode": "generic"}))
    assert c.datapath.options == XdpOptions("generic") and c.datapath.interface == "ens5"
    me = Node("a", "lab", "10.0.0.1", "198.18.0.1", "192.168.0.1")
    dp = make_datapath(c, me)
    assert isinstance(dp, XdpDatapath)
    assert dp.kwargs["options"] == XdpOptions("generic")
    assert (dp.kwargs["interface"], dp.kwargs["self_overlay"], dp.kwargs["pin_root"]) == (
        "ens5", "192.168.0.1", "/sys/fs/bpf/overlay")
    err = bad(cfg(datapath={"backend": "xdp", "xdp_mode": "offload"}))
    assert (err.path, err.reason) == ("datapath.xdp_mode", "'offload' is not one of: native, generic")
    err = bad(cfg(datapath={"backend": "xdp", "mode": "socket"}))
    assert err.path == "datapath.mode"  # a core key keeps the core's rule
    # a built-in ignores the options it is given (None)
    assert config_from_dict(cfg(datapath={"backend": "dryrun"})).datapath.options is None


def test_an_address_provider_plugin_validates_its_section_with_a_function_attribute(installed):
    def gce(config):
        return ("10.0.0.5", "198.18.0.5")

    def validate(section):
        if set(section) != {"project"}:
            raise InvalidConfigError("project", "is required (and the only key)")
        return section["project"]

    gce.validate_config = validate
    installed("overlay.providers", EP("gce", gce))
    c = config_from_dict({"node_id": "a", "network": "lab", "discovery": {"provider": "gce", "project": "p1"}})
    assert (c.discovery.provider, c.discovery.options) == ("gce", "p1")
    err = bad({"node_id": "a", "network": "lab", "discovery": {"provider": "gce", "interface": "eth0"}})
    assert (err.path, err.reason) == ("discovery.project", "is required (and the only key)")
    err = bad({"node_id": "a", "network": "lab", "discovery": {"provider": "nope"}})
    assert err.path == "discovery.provider"
    assert err.reason.startswith("'nope' is not one of the available address providers: aws-imds, gce, netlink, static")


@pytest.mark.parametrize("group, kind, obj", [
    ("overlay.registries", "registry backend", {"registry": {"backend": "x"}}),
    ("overlay.datapaths", "datapath backend", {"datapath": {"backend": "x"}}),
    ("overlay.providers", "address provider", {"discovery": {"provider": "x"}}),
])
def test_a_listed_plugin_that_cannot_load_is_an_error_at_its_own_key(installed, group, kind, obj):
    installed(group, EP("x", ImportError("No module named 'x_sdk'"), "x_plugin:X"))
    err = bad({"node_id": "a", "network": "lab", "addresses": {"private": "10.0.0.1", "public": "198.18.0.1"}, **obj})
    section, = obj
    key, = obj[section]
    assert (err.path, err.reason) == (f"{section}.{key}", f"{kind} 'x' (x_plugin:X) failed to load: No module named 'x_sdk'")


# --- overlay plugins -------------------------------------------------------------------------------


def _install_a_mixed_set(installed):
    installed("overlay.registries",
              EP("etcd", EtcdRegistry, "overlay_etcd:EtcdRegistry", Dist("overlay-etcd", "0.3.0")),
              EP("plain", PlainRegistry, "overlay_plain:PlainRegistry", Dist("overlay-plain", "2.0")),
              EP("broken", ModuleNotFoundError("No module named 'kv'"), "overlay_kv:Registry", Dist("overlay-kv", "0.0.1")),
              EP("static", PlainRegistry, "evil:Static", Dist("evil", "6.6.6")),
              EP("etcd", PlainRegistry, "other:Etcd", Dist("overlay-etcd-fork", "0.1")))
    installed("overlay.datapaths", EP("xdp", XdpDatapath, "overlay_xdp:XdpDatapath", Dist("overlay-xdp", "1.0")))


def test_describe_lists_builtins_then_plugins_with_their_state(installed):
    _install_a_mixed_set(installed)
    rows = {(r["name"], r["module"]): r for r in backends.REGISTRIES.describe()}
    assert [r["name"] for r in backends.REGISTRIES.describe()] == [
        "grpc", "static", "zookeeper", "etcd", "plain", "broken", "static", "etcd"]
    assert rows[("zookeeper", "overlay.registry.zookeeper:ZooKeeperRegistry")] | {"version": None} == {
        "name": "zookeeper", "builtin": True, "distribution": "overlay", "version": None,
        "module": "overlay.registry.zookeeper:ZooKeeperRegistry", "shadowed_by": None, "loads": True,
        "error": None, "config_hook": None}
    assert rows[("etcd", "overlay_etcd:EtcdRegistry")] == {
        "name": "etcd", "builtin": False, "distribution": "overlay-etcd", "version": "0.3.0",
        "module": "overlay_etcd:EtcdRegistry", "shadowed_by": None, "loads": True, "error": None,
        "config_hook": True}
    assert rows[("plain", "overlay_plain:PlainRegistry")]["config_hook"] is False
    broken = rows[("broken", "overlay_kv:Registry")]
    assert (broken["loads"], broken["error"]) == (
        False, "registry backend 'broken' (overlay_kv:Registry) failed to load: No module named 'kv'")
    assert rows[("static", "evil:Static")]["shadowed_by"] == "built-in"
    assert rows[("static", "evil:Static")]["loads"] is None
    assert rows[("etcd", "other:Etcd")]["shadowed_by"] == "overlay-etcd"


def test_overlay_plugins_prints_every_group_and_broken_plugins_without_a_traceback(installed, capsys):
    _install_a_mixed_set(installed)
    assert main(["plugins"]) == 0
    text = capsys.readouterr()
    assert "Traceback" not in text.out + text.err
    lines = text.out.splitlines()
    assert lines[0] == "overlay.registries (registry.backend)"
    assert "overlay.datapaths (datapath.backend)" in lines and "overlay.providers (discovery.provider)" in lines
    row = next(line for line in lines if "overlay_kv:Registry" in line).split()
    assert row[:4] == ["broken", "overlay-kv", "0.0.1", "overlay_kv:Registry"]
    assert "ERROR: registry backend 'broken' (overlay_kv:Registry) failed to load: No module named 'kv'" in " ".join(row)
    etcd = next(line for line in lines if "overlay_etcd:EtcdRegistry" in line)
    assert etcd.split()[:4] == ["etcd", "overlay-etcd", "0.3.0", "overlay_etcd:EtcdRegistry"]
    assert etcd.endswith("ok, validates its own section")
    assert next(line for line in lines if "evil:Static" in line).endswith("unused: shadowed by built-in")
    assert next(line for line in lines if "overlay_xdp:XdpDatapath" in line).split()[:2] == ["xdp", "overlay-xdp"]


def test_overlay_plugins_json(installed, capsys):
    _install_a_mixed_set(installed)
    assert main(["plugins", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert set(got) == {"overlay.registries", "overlay.datapaths", "overlay.providers"}
    assert [r["name"] for r in got["overlay.providers"]] == ["aws-imds", "netlink", "static"]
    xdp = [r for r in got["overlay.datapaths"] if not r["builtin"]]
    assert xdp == [{"name": "xdp", "builtin": False, "distribution": "overlay-xdp", "version": "1.0",
                    "module": "overlay_xdp:XdpDatapath", "shadowed_by": None, "loads": True, "error": None,
                    "config_hook": True}]


def test_check_config_exits_2_naming_the_plugin_key(installed, tmp_path, capsys):
    installed("overlay.registries", EP("etcd", EtcdRegistry))
    path = tmp_path / "c.yaml"
    path.write_text("node_id: a\nnetwork: lab\naddresses: {private: 10.0.0.1, public: 198.18.0.1}\n"
                    "registry: {backend: etcd, endpoints: ['e:1'], colour: red}\n")
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == "overlay: invalid config: registry.colour: unknown key"
    path.write_text("node_id: a\nnetwork: lab\naddresses: {private: 10.0.0.1, public: 198.18.0.1}\n"
                    "registry: {backend: etcd, endpoints: ['e:1']}\n")
    assert main(["check-config", str(path)]) == 0
    assert "registry etcd" in capsys.readouterr().out
