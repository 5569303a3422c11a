"""The lab's topology file, what is derived from it, the expected matrix, the
table, the CLI's pure commands, and ``vagrant validate`` (no root needed)."""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import shutil
import subprocess

import pytest
import yaml

from overlay.cli import main
from overlay.config import config_from_dict, load_config
from overlay.lab.check import OVERLAY, PRIVATE, Result, expected_probes, format_matrix
from overlay.lab.render import (
    controller_config,
    edge_nat_rules,
    member_config,
    node_script,
    render_config,
)
from overlay.lab.topology import (
    Names,
    TopologyError,
    default_topology_path,
    load_topology,
    parse_topology,
    topology_from_dict,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def topo():
    return load_topology()


@pytest.fixture
def raw():
    with open(default_topology_path(), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


# --- the default topology (DESIGN §4.3) ------------------------------------------------


def test_default_topology_is_the_two_network_problem(topo):
    assert [n.name for n in topo.networks] == ["ec2", "vpc"]
    assert all(str(n.subnet) == "10.0.0.0/24" for n in topo.networks)   # the overlap
    public = ipaddress.IPv4Network("198.18.0.0/15")
    for n in topo.networks:
        assert [h.groups for h in n.hosts if h.member] == [("web",), ("app",), ("db",)]
        assert len([h for h in n.hosts if not h.member]) == 1
        for h in n.hosts:
            assert ipaddress.IPv4Address(h.public) in public
            assert ipaddress.IPv4Address(h.private) in n.subnet
    assert ipaddress.IPv4Address(topo.zk_address) in public
    assert topo.zookeeper == "198.18.0.10:2181"
    assert topo.test_port not in (22, 9464)
    # identical private addresses across networks: only public/overlay tell hosts apart
    assert topo.host("ec2-web").private == topo.host("vpc-web").private


def test_namespace_names_are_unique_and_prefixed(topo):
    names = Names().all(topo)
    assert len(names) == len(set(names)) == 2 + 2 * (2 + 4)
    assert all(n.startswith("ovl-lab-") for n in names)
    assert Names("ovl-labtest-").host("ec2-web") == "ovl-labtest-ec2-web"


def test_lab_names_pick_prefix_run_and_pin_directories(monkeypatch):
    from overlay.lab.lab import Lab
    from overlay.lab.topology import lab_place

    monkeypatch.delenv("OVERLAY_LAB_NAME", raising=False)
    # the default lab is where `make lab` has always put it
    assert (Lab().names.prefix, Lab().run_dir, Lab().pin_dir) == (
        "ovl-lab-", "/run/overlay-lab", "/sys/fs/bpf/overlay/lab")
    lab = Lab(name="rel7")
    assert (lab.name, lab.names.prefix, lab.run_dir, lab.pin_dir) == (
        "rel7", "ovl-rel7-", "/run/overlay-rel7", "/sys/fs/bpf/overlay/rel7")
    monkeypatch.setenv("OVERLAY_LAB_NAME", "mine")
    assert Lab().names.host("ec2-web") == "ovl-mine-ec2-web" and Lab().run_dir == "/run/overlay-mine"
    assert Lab(name="other").run_dir == "/run/overlay-other"       # --name wins over the environment
    for bad in ("Lab", "a-b", "x" * 13, "1ab", "a/b"):
        with pytest.raises(TopologyError, match="must match"):
            lab_place(bad)


def test_lab_name_flag_reaches_the_config_it_prints(capsys, monkeypatch):
    monkeypatch.delenv("OVERLAY_LAB_NAME", raising=False)
    assert main(["lab", "config", "ec2-web", "--name", "abc"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["state_dir"] == "/run/overlay-abc/hosts/ec2-web/state"
    assert cfg["datapath"]["pin_root"] == "/sys/fs/bpf/overlay/abc/ec2-web"
    assert main(["lab", "status", "--name", "Bad!"]) == 2
    assert "--name" in capsys.readouterr().err


def test_member_configs_validate_and_pin_apart(topo):
    pins = set()
    for h in topo.members:
        cfg = config_from_dict(member_config(topo, h))
        assert cfg.node_id == h.name and cfg.network == h.network
        assert cfg.addresses.private == h.private and cfg.addresses.public == h.public
        assert cfg.groups == h.groups
        if h.network == "ec2":
            assert cfg.registry.backend == "zookeeper" and cfg.registry.hosts == ("198.18.0.10:2181",)
            assert cfg.registry.controller is None and cfg.registry.tls is None
        else:   # vpc: registry: grpc, through the controller beside ZooKeeper
            # both replicas of the controller, in order (the daemon fails over between them)
            assert cfg.registry.backend == "grpc"
            assert cfg.registry.controller == ("198.18.0.10:9470", "198.18.0.20:9470")
            assert cfg.registry.tls.ca == "/run/overlay-lab/certs/ca.crt"
            assert (cfg.registry.tls.cert, cfg.registry.tls.key) == (
                f"/run/overlay-lab/certs/{h.name}.crt", f"/run/overlay-lab/certs/{h.name}.key")
        assert cfg.datapath.backend == "ebpf" and cfg.datapath.interface == "eth0"
        assert cfg.filter.reject_all is True and cfg.filter.open_ports == ()
        assert "198.18.0.0/15" not in cfg.filter.ssh_whitelist
        assert cfg.status_listen == ("127.0.0.1", 9464)
        assert cfg.state_dir.startswith("/run/overlay-lab/")
        pins.add(cfg.datapath.pin_root)
    assert pins == {f"/sys/fs/bpf/overlay/lab/{h.name}" for h in topo.members}


def test_vagrant_config_uses_the_product_defaults(topo):
    cfg = config_from_dict(member_config(topo, "vpc-db", target="vagrant", interface="eth1"))
    assert cfg.datapath.interface == "eth1"
    assert cfg.datapath.pin_root == "/sys/fs/bpf/overlay"
    assert cfg.state_dir == "/var/lib/overlay"
    assert cfg.registry.tls.cert == "/etc/overlay/certs/vpc-db.crt"
    assert cfg.registry.tls.ca == "/etc/overlay/certs/ca.crt"


def test_mixed_registries_and_the_controller(topo):
    assert [(n.name, n.registry) for n in topo.networks] == [("ec2", "zookeeper"), ("vpc", "grpc")]
    assert topo.controller == "198.18.0.10:9470"
    assert topo.controllers == ("198.18.0.10:9470", "198.18.0.20:9470")
    assert [h.name for h in topo.grpc_members] == ["vpc-web", "vpc-app", "vpc-db"]
    assert topo.registry_of("ec2-web") == "zookeeper" and topo.registry_of("vpc-out") == "grpc"
    for target, certs in (("netns", "/run/overlay-lab/certs"), ("vagrant", "/etc/overlay/certs")):
        cfg = config_from_dict(controller_config(topo, target=target))
        assert cfg.registry.backend == "zookeeper" and cfg.registry.hosts == ("198.18.0.10:2181",)
        assert cfg.registry.prefix == "/overlay"
        assert cfg.controller.listen == "198.18.0.10:9470"
        assert (cfg.controller.tls.ca, cfg.controller.tls.cert, cfg.controller.tls.key) == (
            f"{certs}/ca.crt", f"{certs}/controller.crt", f"{certs}/controller.key")
        second = config_from_dict(controller_config(topo, target=target, replica=2))
        assert second.controller.listen == "198.18.0.20:9470" and second.registry == cfg.registry
    with pytest.raises(TopologyError, match="no replica 3"):
        controller_config(topo, replica=3)
    # the second replica's address lives on the ZooKeeper machine
    assert 'ip addr replace 198.18.0.20/24 dev "$wan"' in node_script(topo, "zk")


def test_ensemble_of_three_and_controller_options(raw):
    raw["zookeeper"]["ensemble"] = 3
    raw["controller"] = {"port": 9470, "addresses": ["198.18.0.10", "198.18.0.30"], "lease_s": 400}
    t = topology_from_dict(raw)
    assert t.zk_servers == (("zk", "198.18.0.10"), ("zk2", "198.18.0.11"), ("zk3", "198.18.0.12"))
    assert t.zookeeper == "198.18.0.10:2181,198.18.0.11:2181,198.18.0.12:2181"
    names = Names("ovl-x-")
    assert [names.zookeeper(t, i) for i in (1, 2, 3)] == ["ovl-x-zk", "ovl-x-zk2", "ovl-x-zk3"]
    assert {"ovl-x-zk", "ovl-x-zk2", "ovl-x-zk3"} <= set(names.all(t))
    assert t.node_names()[:3] == ["zk", "zk2", "zk3"]
    ec2 = config_from_dict(member_config(t, "ec2-web"))
    assert ec2.registry.hosts == ("198.18.0.10:2181", "198.18.0.11:2181", "198.18.0.12:2181")
    ctl = config_from_dict(controller_config(t, replica=2))
    assert ctl.registry.hosts == ec2.registry.hosts and ctl.controller.lease_s == 400
    assert ctl.controller.listen == "198.18.0.30:9470"
    s = node_script(t, "zk3")
    assert "ip addr replace 198.18.0.12/24" in s and "198.18.0.30" not in s
    assert "ip addr replace 198.18.0.30/24" in node_script(t, "zk")
    from overlay.lab.render import iter_links

    assert [link for link in iter_links(t, names) if link[0] == "ovl-x-inet" and link[1].startswith("zk")] == [
        ("ovl-x-inet", "zk", "ovl-x-zk", "eth0"), ("ovl-x-inet", "zk2", "ovl-x-zk2", "eth0"),
        ("ovl-x-inet", "zk3", "ovl-x-zk3", "eth0")]


def test_all_zookeeper_topology_runs_no_controller(raw):
    del raw["networks"][1]["registry"]
    t = topology_from_dict(raw)
    assert t.controller is None and t.grpc_members == ()
    assert all(config_from_dict(member_config(t, h)).registry.backend == "zookeeper" for h in t.members)
    with pytest.raises(TopologyError, match="no network has registry: grpc"):
        controller_config(t)


def test_controller_port_and_prefix_follow_the_topology(raw):
    raw["controller"] = {"port": 19470}
    raw["daemon"]["registry"]["prefix"] = "/lab"
    t = topology_from_dict(raw)
    assert t.controller == "198.18.0.10:19470"
    assert config_from_dict(member_config(t, "vpc-app")).registry.controller == ("198.18.0.10:19470",)
    cfg = config_from_dict(controller_config(t))
    assert cfg.controller.listen == "198.18.0.10:19470" and cfg.registry.prefix == "/lab"


def test_outsiders_have_no_daemon_config(topo):
    with pytest.raises(TopologyError, match="outsider"):
        member_config(topo, "ec2-out")


def test_rendered_config_loads(topo, tmp_path):
    path = tmp_path / "overlay.yaml"
    path.write_text(render_config(topo, "ec2-app"))
    assert load_config(str(path)).node_id == "ec2-app"


def test_daemon_overrides_merge(raw):
    raw["daemon"]["throttle"] = {"min_s": 0.1, "max_s": 0.2}
    raw["networks"][0]["hosts"][0]["daemon"] = {"filter": {"open_ports": [80]}}
    t = topology_from_dict(raw)
    cfg = config_from_dict(member_config(t, "ec2-web"))
    assert cfg.filter.open_ports == ((80, 80),) and cfg.filter.reject_all is True
    assert cfg.throttle.max_s == 0.2
    assert config_from_dict(member_config(t, "ec2-app")).filter.open_ports == ()


# --- validation: table-driven ----------------------------------------------------------


def _set(path: str, value):
    def mutate(d):
        keys = path.split(".")
        for k in keys[:-1]:
            d = d[int(k)] if k.isdigit() else d[k]
        last = keys[-1]
        if value is _DEL:
            del d[last]
        elif last.isdigit():
            d[int(last)] = value
        else:
            d[last] = value
    return mutate


_DEL = object()

INVALID = [
    ("unknown top key", _set("colour", "blue"), "colour", "unknown key"),
    ("version", _set("version", 2), "version", "not supported"),
    ("test port 22", _set("test_port", 22), "test_port", "reserved"),
    ("no networks", _set("networks", []), "networks", "non-empty"),
    ("zk outside internet", _set("zookeeper.address", "198.18.5.1"), "zookeeper.address", "outside"),
    ("ensemble of two", _set("zookeeper.ensemble", 2), "zookeeper.ensemble", "1, 3 or 5"),
    ("ensemble past the segment", lambda r: (_set("zookeeper.ensemble", 3)(r), _set("zookeeper.address", "198.18.0.253")(r)),
     "zookeeper.address", "server 3"),
    ("ensemble meets an edge", lambda r: (_set("zookeeper.ensemble", 3)(r), _set("zookeeper.address", "198.18.0.1")(r)),
     "edge.public", "already used"),
    ("controller on zk2", lambda r: (_set("zookeeper.ensemble", 3)(r), _set("controller.addresses", ["198.18.0.11"])(r)),
     "controller.addresses[0]", "ZooKeeper server 2"),
    ("controller on an edge", _set("controller.addresses", ["198.18.0.10", "198.18.0.2"]), "edge.public", "already used"),
    ("controller addresses twice", _set("controller.addresses", ["198.18.0.10", "198.18.0.10"]), "controller.addresses",
     "listed twice"),
    ("controller lease", _set("controller.lease_s", -1), "controller.lease_s", "between 0 and 3600"),
    ("controller on zk ports", _set("controller.port", 2888), "controller.port", "ZooKeeper's ports"),
    ("internet outside public range", _set("internet.subnet", "203.0.113.0/24"), "internet.subnet", "public_range"),
    ("duplicate network", _set("networks.1.name", "ec2"), "networks[1].name", "twice"),
    ("bad network name", _set("networks.0.name", "EC2"), "networks[0].name", "must match"),
    ("public subnets overlap", _set("networks.1.public_subnet", "198.18.1.0/24"),
     "networks[1].public_subnet", "overlaps"),
    ("subnet overlaps overlay", _set("networks.0.subnet", "192.168.0.0/24"), "networks[0].subnet", "overlay"),
    ("edge outside subnet", _set("networks.0.edge.private", "10.0.1.1"), "networks[0].edge.private", "outside"),
    ("edge public reused", _set("networks.1.edge.public", "198.18.0.2"), "networks[1].edge.public", "already used"),
    ("duplicate host", _set("networks.1.hosts.0.name", "ec2-web"), "networks[1].hosts[0].name", "already defined"),
    ("host name too long", _set("networks.0.hosts.0.name", "a-very-long-host-name"), "hosts[0].name", "must match"),
    ("reserved host name", _set("networks.0.hosts.0.name", "ec2-edge"), "hosts[0].name", "reserved"),
    ("private outside subnet", _set("networks.0.hosts.0.private", "10.0.1.11"), "hosts[0].private", "outside"),
    ("private reused", _set("networks.0.hosts.1.private", "10.0.0.11"), "hosts[1].private", "already used"),
    ("private is the gateway", _set("networks.0.hosts.1.private", "10.0.0.254"), "hosts[1].private", "already used"),
    ("public outside its subnet", _set("networks.0.hosts.0.public", "198.18.2.99"), "hosts[0].public", "outside"),
    ("public reused", _set("networks.0.hosts.1.public", "198.18.1.11"), "hosts[1].public", "already used"),
    ("not an address", _set("networks.0.hosts.0.private", "ten"), "hosts[0].private", "not an IPv4"),
    ("member not a bool", _set("networks.0.hosts.0.member", "yes"), "hosts[0].member", "true or false"),
    ("outsider with groups", _set("networks.0.hosts.3.groups", ["web"]), "hosts[3]", "outsider"),
    ("overlay outside subnet", _set("networks.0.hosts.0.overlay", "10.9.9.9"), "hosts[0].overlay", "outside"),
    ("lab-owned key", _set("daemon.node_id", "x"), "daemon.node_id", "set by the lab"),
    ("lab-owned pin root", _set("daemon.datapath", {"pin_root": "/x"}), "daemon.datapath.pin_root", "set by the lab"),
    ("bad daemon key", _set("daemon.filter", {"reject_all": "yes"}), "filter.reject_all", "true or false"),
    ("unknown daemon key", _set("daemon.bogus", 1), "bogus", "unknown key"),
    ("missing hosts", _set("networks.0.hosts", _DEL), "networks[0].hosts", "required"),
    ("unknown registry", _set("networks.0.registry", "etcd"), "networks[0].registry", "not one of"),
    ("controller on ZooKeeper's port", _set("controller.port", 2181), "controller.port", "ZooKeeper's port"),
    ("controller port not a port", _set("controller.port", "x"), "controller.port", "port number"),
    ("unknown controller key", _set("controller.listen", "0.0.0.0:1"), "controller.listen", "unknown key"),
    ("lab-owned registry tls", _set("daemon.registry.tls", {"ca": "x", "cert": "y", "key": "z"}),
     "daemon.registry.tls", "set by the lab"),
    ("lab-owned controller", _set("daemon.registry.controller", "x:1"), "daemon.registry.controller",
     "set by the lab"),
]


@pytest.mark.parametrize("mutate,where,reason", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_topologies_name_the_key(raw, mutate, where, reason):
    bad = copy.deepcopy(raw)
    mutate(bad)
    with pytest.raises(TopologyError) as info:
        topology_from_dict(bad, "t.yaml")
    assert where in info.value.path and info.value.path.startswith("t.yaml")
    assert reason in info.value.reason


def test_not_yaml():
    with pytest.raises(TopologyError, match="not valid YAML at line"):
        parse_topology("networks: [\n", "x.yaml")


# --- network scripts -------------------------------------------------------------------


def test_host_scripts(topo):
    s = node_script(topo, "ec2-web")
    assert "lan=eth0" in s and "ip addr replace 10.0.0.11/24" in s
    assert 'ip route replace default via 10.0.0.254 dev "$lan"' in s
    assert 'ethtool -K "$lan" tx off rx off' in s
    v = node_script(topo, "ec2-web", "vagrant")
    assert 'lan="$(need_dev 10.0.0.11)"' in v
    assert "ip route replace 198.18.0.0/15 via 10.0.0.254" in v and "default" not in v.split("need_dev()")[1]


def test_edge_script_does_one_to_one_nat(topo):
    s = node_script(topo, "vpc-edge")
    assert "sysctl -qw net.ipv4.ip_forward=1" in s
    assert "ip route replace 198.18.1.0/24 via 198.18.0.2" in s     # to ec2's public prefix
    rules = edge_nat_rules(topo, "vpc", "lan", "wan")
    for h in topo.network("vpc").hosts:
        assert f"-A PREROUTING -i wan -d {h.public}/32 -j DNAT --to-destination {h.private}" in rules
        assert f"-A POSTROUTING -o wan -s {h.private}/32 -j SNAT --to-source {h.public}" in rules
    assert rules.endswith("COMMIT\n")


def test_zookeeper_script_routes_to_every_network(topo):
    s = node_script(topo, "zk")
    for n in topo.networks:
        assert f"ip route replace {n.public_subnet} via {n.edge_public}" in s


def test_scripts_are_valid_shell(topo):
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh")
    for node in topo.node_names():
        for target in ("netns", "vagrant"):
            proc = subprocess.run([sh, "-n"], input=node_script(topo, node, target), text=True, capture_output=True)
            assert proc.returncode == 0, (node, target, proc.stderr)


# --- the expected matrix ---------------------------------------------------------------


def _overlays(topo):
    return {h.name: f"192.168.0.{i + 1}" for i, h in enumerate(topo.members)}


def test_expected_matrix(topo):
    probes = expected_probes(topo, _overlays(topo))
    by = {(p.src, p.dst, p.kind): p for p in probes}
    assert len(by) == len(probes)
    # member -> member overlay: open; seen address is private in-network, public across
    p = by[("ec2-web", "ec2-app", OVERLAY)]
    assert p.expect_open and p.expect_seen == "10.0.0.11"
    p = by[("ec2-web", "vpc-app", OVERLAY)]
    assert p.expect_open and p.expect_seen == "198.18.1.11"
    # outsider -> member overlay: closed
    assert not by[("ec2-out", "ec2-web", OVERLAY)].expect_open
    assert not by[("vpc-out", "ec2-web", OVERLAY)].expect_open
    # any -> same-network outsider private: open
    assert by[("ec2-web", "ec2-out", PRIVATE)].expect_open
    # member -> same-network member private: open; outsider -> member private: closed
    assert by[("vpc-db", "vpc-web", PRIVATE)].expect_open
    assert not by[("vpc-out", "vpc-web", PRIVATE)].expect_open
    # private addresses only inside a network; nobody probes itself
    assert ("ec2-web", "vpc-web", PRIVATE) not in by
    assert all(p.src != p.dst for p in probes)
    n_over = sum(1 for p in probes if p.kind == OVERLAY)
    assert n_over == len(topo.hosts) * len(topo.members) - len(topo.members)
    assert len(probes) - n_over == sum(len(n.hosts) * (len(n.hosts) - 1) for n in topo.networks)


def test_expected_matrix_without_daemons(topo):
    probes = expected_probes(topo, {}, daemons=False)
    assert probes and all(p.kind == PRIVATE and p.expect_open for p in probes)


def _results(probes, flip=None):
    out = []
    for p in probes:
        is_open = p.expect_open != (flip == (p.src, p.dst, p.kind))
        r = Result(p, "open" if is_open else "timeout")
        if is_open:
            r.server, r.seen, r.peer = p.dst, p.expect_seen, p.address
        out.append(r)
    return out


def test_matrix_table_all_green(topo):
    probes = expected_probes(topo, _overlays(topo))
    text = format_matrix(topo, _results(probes))
    assert "OK: all 66 probes as expected" in text
    assert "18/18 cross-network" in text and "12/12 same-network" in text
    assert "!" not in text.split("\n", 1)[1]
    assert "\033[" not in text
    assert "\033[32m" in format_matrix(topo, _results(probes), color=True)


def test_matrix_table_shows_mismatches(topo):
    probes = expected_probes(topo, _overlays(topo))
    results = _results(probes, flip=("ec2-out", "ec2-web", PRIVATE))
    assert sum(1 for r in results if not r.ok) == 1
    text = format_matrix(topo, results)
    assert "OPEN!" in text and "FAIL: 1 mismatch" in text
    assert "ec2-out -> ec2-web private 10.0.0.11: expected closed, got open" in text
    # an open flow that arrived from the wrong address is a mismatch too
    results = _results(probes)
    bad = next(r for r in results if (r.probe.src, r.probe.dst, r.probe.kind) == ("ec2-web", "vpc-web", OVERLAY))
    bad.seen = "10.0.0.11"
    bad.problems.append("server saw 10.0.0.11, expected 198.18.1.11")
    assert not bad.ok and "BAD!" in format_matrix(topo, results)


def test_unknown_overlay_is_a_mismatch(topo):
    ov = _overlays(topo)
    ov["vpc-db"] = None
    probes = expected_probes(topo, ov)
    r = Result(next(p for p in probes if p.dst == "vpc-db" and p.kind == OVERLAY), "skipped")
    assert not r.ok


# --- CLI (no root) --------------------------------------------------------------------


def test_cli_config_and_script(capsys, tmp_path):
    assert main(["lab", "config", "vpc-app"]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "c.yaml"
    path.write_text(out)
    assert load_config(str(path)).datapath.pin_root == "/sys/fs/bpf/overlay/lab/vpc-app"
    assert main(["lab", "config", "vpc-app", "--vagrant", "--interface", "enp0s8"]) == 0
    assert "interface: enp0s8" in capsys.readouterr().out
    assert main(["lab", "script", "ec2-edge", "--vagrant"]) == 0
    assert "iptables-restore" in capsys.readouterr().out
    # the ZooKeeper machine's config is the controller's
    assert main(["lab", "config", "zk", "--vagrant"]) == 0
    path.write_text(capsys.readouterr().out)
    cfg = load_config(str(path))
    assert cfg.controller.listen == "198.18.0.10:9470"
    assert cfg.controller.tls.cert == "/etc/overlay/certs/controller.crt"


def test_cli_refusals(capsys, tmp_path):
    assert main(["lab", "config", "ec2-out"]) == 2
    assert "outsider" in capsys.readouterr().err
    assert main(["lab", "config", "nosuch"]) == 2
    assert main(["lab", "script", "nosuch"]) == 1
    bad = tmp_path / "t.yaml"
    bad.write_text("version: 1\npublic_range: 198.18.0.0/15\n")
    assert main(["lab", "config", "x", "--topology", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "internet" in err and "required" in err and "Traceback" not in err


# --- vagrant/ ---------------------------------------------------------------------------


def test_vagrant_reads_the_same_topology(topo):
    ruby = shutil.which("ruby")
    if ruby is None:
        pytest.skip("ruby is not installed (comes with Debian's vagrant package)")
    code = ('require "json"; require "./vagrant/lab_topology"; '
            'puts JSON.dump(LabTopology.machines.map { |m| [m.name, m.role, m.nics.map { |n| [n.segment, n.ip] }] })')
    proc = subprocess.run([ruby, "-e", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    machines = json.loads(proc.stdout)
    assert [m[0] for m in machines] == topo.node_names()
    roles = {m[0]: m[1] for m in machines}
    assert {h for h, r in roles.items() if r == "member"} == {h.name for h in topo.members}
    nics = {m[0]: m[2] for m in machines}
    assert nics["ec2-web"] == [["ec2", "10.0.0.11"]]
    assert nics["vpc-edge"] == [["vpc", "10.0.0.254"], ["inet", "198.18.0.3"]]
    assert nics["zk"] == [["inet", "198.18.0.10"]]


def test_vagrant_certificates_work_with_the_controller_and_the_daemons(topo, tmp_path):
    """vagrant/lab_certs.rb (Ruby's OpenSSL) makes what `overlay certs` makes: the identities the
    controller authorises on, and certificates gRPC accepts for mutual TLS at the ZooKeeper address."""
    ruby = shutil.which("ruby")
    if ruby is None:
        pytest.skip("ruby is not installed (comes with Debian's vagrant package)")
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from overlay.controller.certs import Identity, identity_of

    out = tmp_path / "certs"
    code = ('require "json"; require "yaml"; require "./vagrant/lab_certs"; '
            f'puts JSON.dump(LabCerts.ensure(LabTopology.load, {json.dumps(str(out))}))')
    proc = subprocess.run([ruby, "-r", "./vagrant/lab_topology", "-e", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "OVERLAY_LAB_TOPOLOGY": default_topology_path()})
    assert proc.returncode == 0, proc.stderr
    uploads = json.loads(proc.stdout)
    grpc_members = [h.name for h in topo.grpc_members]
    assert sorted(uploads) == sorted(["zk", *grpc_members])
    assert sorted(uploads["zk"]) == ["ca.crt", "controller.crt", "controller.key", "operator.crt", "operator.key"]
    for m in grpc_members:
        assert sorted(uploads[m]) == ["ca.crt", f"{m}.crt", f"{m}.key"]
    read = lambda f: (out / f).read_bytes()  # noqa: E731
    assert identity_of(read("controller.crt")) == Identity("controller", "controller")
    assert identity_of(read("operator.crt")) == Identity("operator", "operator")
    assert all(identity_of(read(f"{m}.crt")) == Identity("node", m) for m in grpc_members)
    assert all(oct((out / f"{m}.key").stat().st_mode & 0o777) == "0o600" for m in ["ca", "controller", *grpc_members])
    # mutual TLS through gRPC, the controller's certificate checked against the ZooKeeper VM's address
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    creds = grpc.ssl_server_credentials([(read("controller.key"), read("controller.crt"))],
                                        root_certificates=read("ca.crt"), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        client = grpc.ssl_channel_credentials(read("ca.crt"), read(f"{grpc_members[0]}.key"),
                                              read(f"{grpc_members[0]}.crt"))
        with grpc.secure_channel(f"127.0.0.1:{port}", client,
                                 options=[("grpc.ssl_target_name_override", topo.zk_address)]) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)
    # kept when present: a second run changes nothing
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    proc = subprocess.run([ruby, "-r", "./vagrant/lab_topology", "-e", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "OVERLAY_LAB_TOPOLOGY": default_topology_path()})
    assert proc.returncode == 0, proc.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_provision_script_is_valid_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    proc = subprocess.run([bash, "-n", os.path.join(REPO, "vagrant", "provision.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
