"""The refusals of overlay/config.py word for word: key path and the whole reason.

tests/unit/test_config.py checks that a fragment of each reason is there; this hand table
holds the complete text an operator reads after the key path (DESIGN §4.1a), one row per
refusal of config.py's own sections, and what a valid section turns into.
"""

from __future__ import annotations

import ipaddress

import pytest

from overlay.config import Config, config_from_dict, load_config
from overlay.errors import InvalidConfigError

BASE = {"node_id": "n1", "network": "ec2"}
TLS = {"ca": "/c/ca.crt", "cert": "/c/n.crt", "key": "/c/n.key"}
DIGEST = "ops:" + "A" * 27 + "="
AUTH = {"user": "ops", "password": "pw"}
# model.valid_name's rule, as docs/config.md states it for names
NAME = "must be 1-253 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"

# description, config (over BASE), key path, the whole reason
REFUSED = [
    ("auth user with a colon", {"registry": {"auth": {"user": "a:b", "password": "p"}}},
     "registry.auth.user", "must not contain ':'"),
    ("auth without password", {"registry": {"auth": {"user": "a"}}}, "registry.auth.password", "is required"),
    ("auth scheme", {"registry": {"auth": {"scheme": "sasl", **AUTH}}}, "registry.auth.scheme",
     "'sasl' is not one of: digest"),
    ("operator user with a colon", {"registry": {"operator": {"user": "a:b", "password": "p"}}},
     "registry.operator.user", "must not contain ':'"),
    ("auth without user", {"registry": {"auth": {"password": "p"}}}, "registry.auth.user", "is required"),
    ("addresses without private", {"addresses": {"public": "198.18.0.1"}}, "addresses.private", "is required"),
    ("addresses without public", {"addresses": {"private": "10.0.0.1"}}, "addresses.public", "is required"),
    ("discovery without provider", {"discovery": {"interface": "eth0"}}, "discovery.provider", "is required"),
    ("netlink without interface", {"discovery": {"provider": "netlink"}}, "discovery.interface",
     "is required for provider netlink"),
    ("addresses and discovery", {"addresses": {"private": "10.0.0.1", "public": "198.18.0.1"},
                                 "discovery": {"provider": "aws-imds"}},
     "discovery", "give either addresses or discovery, not both"),
    ("no registry host", {"registry": {"hosts": []}}, "registry.hosts", "must list at least one host:port"),
    ("static peer twice", {"registry": {"backend": "static", "peers": [
        {"node_id": "a", "network": "ec2", "private": "10.0.0.2", "public": "198.18.0.2", "overlay": "192.168.0.2"},
        {"node_id": "a", "network": "ec2", "private": "10.0.0.3", "public": "198.18.0.3", "overlay": "192.168.0.3"}]}},
     "registry.peers[1].node_id", "'a' is listed twice"),
    ("peers without static", {"registry": {"peers": [
        {"node_id": "a", "network": "ec2", "private": "10.0.0.2", "public": "198.18.0.2", "overlay": "192.168.0.2"}]}},
     "registry.peers", "is only allowed with backend: static"),
    ("grpc without controller", {"registry": {"backend": "grpc", "tls": TLS}}, "registry.controller",
     'is required for backend: grpc ("host:port" of the controller, or a list of its replicas)'),
    ("grpc without tls", {"registry": {"backend": "grpc", "controller": "c:9470"}}, "registry.tls",
     "is required for backend: grpc ({ca, cert, key})"),
    ("controller without grpc", {"registry": {"controller": "c:9470"}}, "registry.controller",
     "is only allowed with backend: grpc"),
    ("tls without grpc", {"registry": {"tls": TLS}}, "registry.tls", "is only allowed with backend: grpc"),
    ("tls without key", {"registry": {"backend": "grpc", "controller": "c:1", "tls": {"ca": "a", "cert": "b"}}},
     "registry.tls.key", "is required"),
    ("node identities without operator", {"registry": {"node_identities": [DIGEST]}}, "registry.node_identities",
     "needs registry.operator (it sets the layout's ACLs)"),
    ("controller without tls", {"controller": {}}, "controller.tls",
     "is required: the controller serves mutual TLS only ({ca, cert, key})"),
    ("controller tls server_name", {"controller": {"tls": {**TLS, "server_name": "x"}}}, "controller.tls.server_name",
     "unknown key"),
    ("socket mode on iptables", {"datapath": {"backend": "iptables", "mode": "socket"}}, "datapath.mode",
     "socket mode needs backend: ebpf"),
    ("nat overrides not a mapping", {"nat_overrides": ["10.0.0.1"]}, "nat_overrides",
     "must be a mapping of overlay address to real address, got list"),
    ("nat override to itself", {"nat_overrides": {"10.9.9.9": "10.9.9.9"}}, "nat_overrides.10.9.9.9",
     "translates 10.9.9.9 to itself"),
    ("throttle max below min", {"throttle": {"min_s": 5, "max_s": 4}}, "throttle.max_s",
     "must be at least min_s (5.0), got 4.0"),
    ("tls without ca", {"registry": {"backend": "grpc", "controller": "c:1", "tls": {"cert": "b", "key": "k"}}},
     "registry.tls.ca", "is required"),
    ("tls without cert", {"registry": {"backend": "grpc", "controller": "c:1", "tls": {"ca": "a", "key": "k"}}},
     "registry.tls.cert", "is required"),
    ("bad node id", {"node_id": "-bad"}, "node_id", f"node_id '-bad' {NAME}"),
    ("bad network", {"network": "-x"}, "network", f"network '-x' {NAME}"),
    ("bad group", {"groups": ["web", "-g"]}, "groups[1]", f"group '-g' {NAME}"),
    ("bad attested network", {"controller": {"tls": TLS, "attest_public": ["ec2", "-x"]}},
     "controller.attest_public[1]", f"network '-x' {NAME}"),
    ("node identity not a digest", {"registry": {"operator": AUTH, "node_identities": ["bad"]}},
     "registry.node_identities[0]",
     'expected a ZooKeeper digest id "user:<28 base64 characters>" (`overlay zk digest USER` prints one), got \'bad\''),
    ("filter mode", {"filter": {"mode": "block"}}, "filter.mode", "'block' is not one of: enforce, audit"),
    ("no network", {"network": None}, "network",
     "is required: the address domain of this node (ec2, vpc, dc1...); peers in the same network are reached at "
     "their private address, others at their public one (discovery provider aws-imds can supply it)"),
]


def _cfg(extra: dict) -> Config:
    obj = {**BASE, **extra}
    return config_from_dict({k: v for k, v in obj.items() if v is not None})


@pytest.mark.parametrize(("what", "extra", "path", "reason"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_with_the_whole_reason(what, extra, path, reason):
    with pytest.raises(InvalidConfigError) as info:
        _cfg(extra)
    assert (info.value.path, info.value.reason) == (path, reason)


def test_a_non_string_override_key_is_named_by_its_repr():
    with pytest.raises(InvalidConfigError) as info:
        _cfg({"nat_overrides": {5: "10.0.0.1"}})
    assert info.value.path == "nat_overrides[5]"


def test_the_network_may_come_from_imds_or_be_absent_for_a_controller():
    assert _cfg({"network": None, "discovery": {"provider": "aws-imds"}}).network is None
    assert _cfg({"network": None, "controller": {"tls": TLS}}).network is None
    with pytest.raises(InvalidConfigError):
        _cfg({"network": None, "discovery": {"provider": "netlink", "interface": "eth0"}})


def test_what_valid_sections_turn_into():
    cfg = _cfg({
        "groups": ["web", "db", "web"],
        "addresses": {"private": "10.0.0.1", "public": "198.18.0.1", "overlay": "192.168.0.9",
                      "private6": "fd00::1", "public6": "2001:db8::1"},
        "registry": {"hosts": ["z1:2181", "z2:2182"], "prefix": "/o", "timeout_s": 3, "auth": AUTH,
                     "operator": {"user": "root", "password": "x"}, "node_identities": [DIGEST, DIGEST]},
        "filter": {"open_ports": [443, 22, "8000-8100", 22], "ssh_whitelist": ["10.0.0.0/8", "10.0.0.0/8", "1.2.3.4"],
                   "reject_all": True, "mode": "audit"},
        "nat_overrides": {"192.168.0.20": "10.0.0.20", "10.9.9.9": "10.0.0.9"},
        "guard": {"max_change": 0, "settle_s": 0},
        "throttle": {"min_s": 1, "max_s": 1},
        "status_listen": "0.0.0.0:1234",
        "metrics_listen": "127.0.0.1:9100",
        "state_dir": "/s",
        "control_socket": "/run/x.sock",
        "datapath": {"backend": "ebpf", "mode": "socket", "interface": "ens5", "overlay_device": "ovl9",
                     "pin_root": "/sys/fs/bpf/x", "cgroup": "/sys/fs/cgroup/a/", "sizes": {"nat": 16},
                     "conntrack": {"frag_s": 120}},
    })
    assert cfg.groups == ("db", "web")
    a = cfg.addresses
    assert (a.private, a.public, a.overlay, a.private6, a.public6) == (
        "10.0.0.1", "198.18.0.1", "192.168.0.9", "fd00::1", "2001:db8::1")
    r = cfg.registry
    assert (r.backend, r.hosts, r.prefix, r.timeout_s) == ("zookeeper", ("z1:2181", "z2:2182"), "/o", 3.0)
    assert (r.auth.scheme, r.auth.user, r.auth.password) == ("digest", "ops", "pw")
    assert (r.operator.user, r.operator.password) == ("root", "x")
    assert r.node_identities == (DIGEST,)
    assert (r.controller, r.tls, r.peers) == (None, None, ())
    f = cfg.filter
    assert (f.reject_all, f.mode) == (True, "audit")
    assert f.open_ports == ((22, 22), (443, 443), (8000, 8100))
    assert f.ssh_whitelist == ("10.0.0.0/8", "1.2.3.4/32")
    assert cfg.nat_overrides == (("10.9.9.9", "10.0.0.9"), ("192.168.0.20", "10.0.0.20"))
    assert cfg.override_routes == ("10.9.9.9",)
    assert (cfg.guard.max_change, cfg.guard.settle_s) == (0, 0.0)
    assert (cfg.throttle.min_s, cfg.throttle.max_s) == (1.0, 1.0)
    assert cfg.status_listen == ("0.0.0.0", 1234) and cfg.metrics_listen == ("127.0.0.1", 9100)
    assert (cfg.state_dir, cfg.control_socket) == ("/s", "/run/x.sock")
    d = cfg.datapath
    assert (d.backend, d.mode, d.interface, d.overlay_device, d.pin_root, d.cgroup) == (
        "ebpf", "socket", "ens5", "ovl9", "/sys/fs/bpf/x", "/sys/fs/cgroup/a")
    assert (d.sizes.nat, d.sizes.peers, d.conntrack.frag_s, d.conntrack.udp_s) == (16, 65536, 120, 120)
    assert cfg.overlay_subnet == ipaddress.IPv4Network("192.168.0.0/18")
    assert cfg.controller is None and cfg.discovery is None
    assert (r.options, d.options) == (None, None)                 # built-ins: no plugin options
    assert (r.neti, cfg.addresses.private6) == (None, "fd00::1")


def test_discovery_and_grpc_and_controller_sections():
    cfg = _cfg({"discovery": {"provider": "netlink", "interface": "eth1", "public_interface": "eth2",
                              "endpoint": "http://x", "timeout_s": 7},
                "registry": {"backend": "grpc", "controller": ["c1:1", "c2:2"],
                             "tls": {**TLS, "server_name": "ctl"}}})
    d = cfg.discovery
    assert (d.provider, d.interface, d.public_interface, d.endpoint, d.timeout_s) == (
        "netlink", "eth1", "eth2", "http://x", 7.0)
    r = cfg.registry
    assert r.controller == ("c1:1", "c2:2")
    assert (r.tls.ca, r.tls.cert, r.tls.key, r.tls.server_name) == ("/c/ca.crt", "/c/n.crt", "/c/n.key", "ctl")
    imds = _cfg({"discovery": {"provider": "aws-imds"}}).discovery
    assert (imds.interface, imds.public_interface, imds.endpoint, imds.timeout_s, imds.options) == (
        None, None, "http://169.254.169.254", 2.0, None)
    assert (d.options, r.options, r.auth, r.operator, r.neti) == (None, None, None, None, None)
    c = _cfg({"controller": {"tls": TLS, "listen": "0.0.0.0:0", "lease_s": 5, "window": 16,
                             "attest_public": ["ec2", "vpc", "ec2"],
                             "limits": {"max_concurrent_rpcs": 16, "watch_streams": 1, "register_rate": 0.5,
                                        "register_burst": 1}}}).controller
    assert (c.listen, c.lease_s, c.window, c.attest_public) == ("0.0.0.0:0", 5.0, 16, ("ec2", "vpc"))
    assert (c.tls.ca, c.tls.server_name) == ("/c/ca.crt", None)
    lim = c.limits
    assert (lim.max_concurrent_rpcs, lim.watch_streams, lim.register_rate, lim.register_burst) == (16, 1, 0.5, 1)
    static = _cfg({"registry": {"backend": "static", "peers": [
        {"node_id": "a", "network": "ec2", "private": "10.0.0.2", "public": "198.18.0.2", "overlay": "192.168.0.2"},
        {"node_id": "b", "network": "vpc", "private": "10.0.0.3", "public": "198.18.0.3", "overlay": "192.168.0.3"}]}})
    assert [p.node_id for p in static.registry.peers] == ["a", "b"]


@pytest.mark.parametrize(("hostname", "node_id"), [("web-1.example.com", "web-1"), ("db", "db"),
                                                   ("", "localhost"), (".local", "localhost")])
def test_without_node_id_the_hostname_up_to_its_first_dot(monkeypatch, hostname, node_id):
    monkeypatch.setattr("overlay.config.socket.gethostname", lambda: hostname)
    assert config_from_dict({"network": "ec2"}).node_id == node_id


def test_a_hostname_that_is_no_name_is_refused_saying_where_it_came_from(monkeypatch):
    monkeypatch.setattr("overlay.config.socket.gethostname", lambda: "web_1!")
    with pytest.raises(InvalidConfigError) as info:
        config_from_dict({"network": "ec2"})
    assert (info.value.path, info.value.reason) == (
        "node_id", "node_id (from the hostname) 'web_1!' must be 1-253 characters of letters, digits, '.', '_' "
                   "or '-', starting with a letter or digit")


def test_an_empty_config_file_is_the_defaults(tmp_path, monkeypatch):
    from overlay.config import load_config

    monkeypatch.setattr("overlay.config.socket.gethostname", lambda: "h1")
    p = tmp_path / "c.yaml"
    p.write_text("network: ec2\n")
    assert load_config(str(p)) == config_from_dict({"network": "ec2"})
    p.write_text("")
    with pytest.raises(InvalidConfigError) as info:     # nothing: the network is missing
        load_config(str(p))
    assert info.value.path == "network"


def test_every_config_class_is_frozen():
    """DESIGN §7.6: config is typed and frozen."""
    import dataclasses

    import overlay.config as config_module

    cfg = _cfg({"addresses": {"private": "10.0.0.1", "public": "198.18.0.1"},
                "registry": {"auth": AUTH}, "controller": {"tls": TLS}})
    disc = _cfg({"discovery": {"provider": "aws-imds"}}).discovery
    grpc = _cfg({"registry": {"backend": "grpc", "controller": "c:1", "tls": TLS}}).registry
    instances = [cfg, cfg.addresses, disc, cfg.registry.auth, grpc.tls, cfg.registry, cfg.controller.limits,
                 cfg.controller, cfg.datapath.sizes, cfg.datapath.conntrack, cfg.datapath, cfg.filter, cfg.guard,
                 cfg.throttle]
    classes = {c for c in vars(config_module).values()
               if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == "overlay.config"}
    assert {type(i) for i in instances} == classes       # one instance of each
    for inst in instances:
        field = dataclasses.fields(inst)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(inst, field, None)


def test_addresses_without_the_optional_ones():
    a = _cfg({"addresses": {"private": "10.0.0.1", "public": "198.18.0.1"}}).addresses
    assert (a.overlay, a.private6, a.public6) == (None, None, None)


def test_the_dataclass_defaults_that_code_builds_without_the_config():
    """What ``datapath_location`` (no config file) and ``overlay.rpc.tls`` build: no plugin
    options, no server name; an address set with only its two required addresses."""
    from overlay.config import Addresses, DatapathConfig, TlsConfig

    assert DatapathConfig().options is None
    assert TlsConfig("a", "b", "c").server_name is None
    a = Addresses("10.0.0.1", "198.18.0.1")
    assert (a.overlay, a.private6, a.public6) == (None, None, None)


def test_filter_mode_enforce_may_be_written_out():
    assert _cfg({"filter": {"mode": "enforce"}}).filter.mode == "enforce"


def test_an_empty_file_is_an_empty_config(tmp_path):
    """An empty YAML file reads as {}: refused for what {} lacks (the network), not as a
    file that is not a mapping."""
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(InvalidConfigError) as info:
        load_config(str(path))
    assert info.value.path == "network" and info.value.reason.startswith("is required: the address domain")
