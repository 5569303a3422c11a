"""The lab's old-format (Neti) hosts, pure parts: ``--with-neti``, topology keys, the
configs, a host moved to Overlay, the emulator's rules, the expected matrix (no root)."""

from __future__ import annotations

import copy

import pytest
import yaml

from overlay.config import config_from_dict
from overlay.lab.check import OVERLAY, PRIVATE, expected_probes
from overlay.lab.neti_agent import CLEAR, render
from overlay.lab.neti_lab import agent_config, moved, with_neti
from overlay.lab.render import controller_config, member_config
from overlay.lab.topology import TopologyError, load_topology, parse_topology, topology_from_dict


@pytest.fixture(scope="module")
def base():
    return load_topology()


@pytest.fixture(scope="module")
def topo(base):
    return parse_topology(with_neti(base.text, base.source), "with-neti")


@pytest.fixture
def raw(topo):
    return copy.deepcopy(yaml.safe_load(topo.text))


def test_with_neti_adds_one_old_host_per_network_and_the_section(base, topo):
    assert topo.neti == {"prefix": "/neti", "vpcflag": {"ec2": 0, "vpc": 1}}
    got = {h.name: (h.network, h.private, h.public, h.member, h.neti) for h in topo.neti_hosts}
    assert got == {"ec2-old": ("ec2", "10.0.0.21", "198.18.1.21", False, True),
                   "vpc-old": ("vpc", "10.0.0.21", "198.18.2.21", False, True)}
    assert [h.name for h in topo.members] == [h.name for h in base.members]
    assert len(topo.joined) == len(base.members) + 2
    again = parse_topology(with_neti(topo.text), "again")          # a second pass adds nothing
    assert [h.name for h in again.hosts] == [h.name for h in topo.hosts]


def test_with_neti_skips_taken_addresses_and_keeps_a_given_section(raw):
    raw["neti"] = {"prefix": "/old", "vpcflag": {"ec2": 1, "vpc": 0}}
    for net in raw["networks"]:
        net["hosts"] = [h for h in net["hosts"] if not h.get("neti")]
    raw["networks"][0]["hosts"].append({"name": "ec2-x", "private": "10.0.0.21", "public": "198.18.1.30"})
    raw["networks"][1]["hosts"].append({"name": "vpc-x", "private": "10.0.0.30", "public": "198.18.2.22"})
    topo = parse_topology(with_neti(yaml.safe_dump(raw)), "t")
    assert topo.neti["prefix"] == "/old"
    got = {h.name: (h.private, h.public) for h in topo.neti_hosts}
    assert got == {"ec2-old": ("10.0.0.22", "198.18.1.22"), "vpc-old": ("10.0.0.21", "198.18.2.21")}


def test_with_neti_refuses_three_networks_without_a_section(base):
    raw = yaml.safe_load(base.text)
    third = copy.deepcopy(raw["networks"][1])
    third.update(name="dc1", public_subnet="198.18.3.0/24", registry="zookeeper",
                 edge={"private": "10.0.0.254", "public": "198.18.0.4"})
    third["hosts"] = [{"name": "dc1-web", "private": "10.0.0.11", "public": "198.18.3.11"}]
    raw["networks"].append(third)
    with pytest.raises(TopologyError, match="neti: --with-neti picks flags 0 and 1 for two networks"):
        with_neti(yaml.safe_dump(raw), "t")


@pytest.mark.parametrize("mutate, where, reason", [
    (lambda r: r.pop("neti"), "networks[0].hosts[4].neti", "needs the top-level neti section"),
    (lambda r: r["networks"][0]["hosts"][-1].update(member=True), "networks[0].hosts[4].member", "not the daemon"),
    (lambda r: r["networks"][0]["hosts"][-1].update(groups=["web"]), "networks[0].hosts[4]", "runs no daemon"),
    (lambda r: r["neti"]["vpcflag"].pop("vpc"), "neti.vpcflag", "no flag for network 'vpc'"),
    (lambda r: r["neti"].update(prefix="/overlay"), "neti.prefix", "must differ from registry.prefix"),
    (lambda r: r["neti"].update(vpcflag={"ec2": 0, "vpc": 0}), "neti.vpcflag.vpc", "already the flag"),
    (lambda r: r["neti"].update(bogus=1), "neti.bogus", "unknown"),
])
def test_invalid_neti_topologies_name_the_key(raw, mutate, where, reason):
    mutate(raw)
    with pytest.raises(TopologyError) as exc:
        topology_from_dict(raw, "t.yaml")
    assert where in exc.value.path and reason in exc.value.reason, (exc.value.path, exc.value.reason)


def test_registry_neti_goes_to_zookeeper_members_and_the_controllers(topo):
    for h in topo.members:
        reg = member_config(topo, h)["registry"]
        if topo.registry_of(h) == "zookeeper":
            assert reg["neti"] == {"prefix": "/neti", "vpcflag": {"ec2": 0, "vpc": 1}}
        else:
            assert "neti" not in reg          # behind the controller, which bridges for them
    for replica in (1, 2):
        cfg = controller_config(topo, replica=replica)
        assert config_from_dict(cfg).registry.neti.vpcflag == (("ec2", 0), ("vpc", 1))


def test_a_moved_host_is_a_member_with_the_same_id_and_addresses(topo):
    after = moved(topo, ["ec2-old"])
    h = after.host("ec2-old")
    assert (h.member, h.neti, h.network, h.private, h.public) == (True, False, "ec2", "10.0.0.21", "198.18.1.21")
    assert [x.name for x in after.neti_hosts] == ["vpc-old"]
    cfg = config_from_dict(member_config(after, "ec2-old"))
    assert (cfg.node_id, cfg.registry.neti.prefix, cfg.groups) == ("ec2-old", "/neti", ())
    assert moved(topo, []) is topo
    with pytest.raises(TopologyError, match="not in the topology"):
        moved(topo, ["nope"])


def test_agent_config(topo):
    cfg = agent_config(topo, "vpc-old", run_dir="/run/x")
    assert cfg == {
        "instance_id": "vpc-old", "zookeeper": "198.18.0.10:2181", "overlay_subnet": "192.168.0.0/18",
        "neti": {"prefix": "/neti", "ip_map": "ip-map", "id_to_ip": "id-to-ip", "ip_to_id": "ip-to-id",
                 "max_change": "maxchange", "vpcflag": {"ec2": 0, "vpc": 1}},
        "private": "10.0.0.21", "public": "198.18.2.21", "flag": 1, "reject_all": True, "open_ports": [],
        "ssh_whitelist": ["198.18.0.0/24"], "state_file": "/run/x/hosts/vpc-old/neti-state.json",
    }
    with pytest.raises(TopologyError, match="not an old-format host"):
        agent_config(topo, "ec2-web", run_dir="/run/x")


CFG = {"overlay_subnet": "192.168.0.0/18", "reject_all": True, "ssh_whitelist": ["198.18.0.0/24"],
       "open_ports": ["80", "8000-8100"]}


def test_emulator_rules_by_hand():
    sets, rules = render({"192.168.0.9": "198.18.2.11", "192.168.0.10": "10.0.0.11"}, CFG)
    assert sets.splitlines() == [
        "create NETI-PEERS hash:ip family inet -exist", "create NETI-PEERS-NEW hash:ip family inet -exist",
        "flush NETI-PEERS-NEW", "add NETI-PEERS-NEW 10.0.0.11", "add NETI-PEERS-NEW 198.18.2.11",
        "swap NETI-PEERS-NEW NETI-PEERS", "destroy NETI-PEERS-NEW"]
    assert rules.splitlines() == [
        "*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]", ":NETI-NAT - [0:0]", "-A OUTPUT -d 192.168.0.0/18 -j NETI-NAT",
        "-A NETI-NAT -d 192.168.0.9/32 -j DNAT --to-destination 198.18.2.11",
        "-A NETI-NAT -d 192.168.0.10/32 -j DNAT --to-destination 10.0.0.11",
        "COMMIT",
        "*filter", ":INPUT DROP [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":NETI-IN - [0:0]",
        "-A INPUT -j NETI-IN",
        "-A NETI-IN -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A NETI-IN -i lo -j ACCEPT",
        "-A NETI-IN -s 198.18.0.0/24 -p tcp --dport 22 -j ACCEPT",
        "-A NETI-IN -m set --match-set NETI-PEERS src -j ACCEPT",
        "-A NETI-IN -p tcp --dport 80 -j ACCEPT",
        "-A NETI-IN -p tcp --dport 8000:8100 -j ACCEPT",
        "COMMIT"]


def test_emulator_without_reject_all_filters_nothing():
    _sets, rules = render({}, {**CFG, "reject_all": False})
    filt = rules.split("*filter\n", 1)[1].splitlines()
    assert filt == [":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":NETI-IN - [0:0]",
                    "-A INPUT -j NETI-IN", "COMMIT"]
    assert "DNAT" not in rules and "DROP" not in CLEAR


def test_expected_matrix_counts_old_hosts_as_members_both_ways(topo):
    overlays = {h.name: f"192.168.0.{i}" for i, h in enumerate(topo.joined, start=1)}
    probes = {(p.src, p.dst, p.kind): p for p in expected_probes(topo, overlays)}
    # 10 hosts (6 members, 2 old, 2 outsiders), 8 with an overlay address; 5 hosts per network
    assert len(probes) == 8 * 7 + 2 * 8 + 2 * 5 * 4
    cases = [  # src, dst, kind, expect open, the client address the server sees
        ("ec2-old", "ec2-web", OVERLAY, True, "10.0.0.21"),
        ("ec2-web", "ec2-old", OVERLAY, True, "10.0.0.11"),
        ("vpc-old", "ec2-web", OVERLAY, True, "198.18.2.21"),
        ("ec2-db", "vpc-old", OVERLAY, True, "198.18.1.13"),
        ("ec2-old", "vpc-old", OVERLAY, True, "198.18.1.21"),
        ("ec2-out", "ec2-old", OVERLAY, False, None),
        ("ec2-out", "ec2-old", PRIVATE, False, None),
        ("ec2-old", "ec2-out", PRIVATE, True, "10.0.0.21"),
        ("vpc-web", "vpc-old", PRIVATE, True, "10.0.0.11"),
    ]
    for src, dst, kind, is_open, seen in cases:
        p = probes[(src, dst, kind)]
        assert (p.expect_open, p.expect_seen) == (is_open, seen), (src, dst, kind)
        assert p.address == (overlays[dst] if kind == OVERLAY else topo.host(dst).private)
