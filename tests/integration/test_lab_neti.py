"""A lab with old-format (Neti) hosts (issue 18, acceptance 2 and the lab half of 3).

One lab (``Lab(..., with_neti=True)``, as ``overlay lab up --with-neti``) of a small
two-network topology: ec2 (daemons on ZooKeeper) with a member and an outsider, vpc
(daemons behind the gRPC controller) with a member; ``--with-neti`` adds ``ec2-old`` and
``vpc-old`` (10.0.0.21 in both networks), each running the old system's emulator
(overlay/lab/neti_agent.py: old allocation, old party entry, iptables DNAT + ipset filter).

- the matrix is green both ways (old <-> new by overlay address, in and across networks);
- each old host's NAT rules send a peer's overlay address to its private address when the
  peer has the old host's vpcflag, else to its public one (expected from the topology by hand);
- ``overlay audit`` (text and JSON) against the lab: every host live, once; none stale;
  the old hosts only in the old layout, as agent version "neti";
- ec2-old moves to Overlay (emulator stopped, daemon with the same id started): its
  overlay address is kept, its old rules are gone, the matrix stays green, and the audit
  shows it once, as a native host.
"""

from __future__ import annotations

import json
import re

import pytest

from overlay import netns as nx
from overlay.lab.check import OVERLAY, format_matrix
from overlay.lab.procs import overlay_command
from tests.support.lab import make_lab, require_lab_tools

pytestmark = [pytest.mark.root, pytest.mark.zk]

TOPOLOGY = """\
version: 1
overlay_subnet: 192.168.0.0/18
test_port: 7000
public_range: 198.18.0.0/15
internet: {subnet: 198.18.0.0/24}
zookeeper: {name: zk, address: 198.18.0.10, port: 2181}
controller: {port: 9470}
daemon:
  filter: {reject_all: true, open_ports: [], ssh_whitelist: [198.18.0.0/24]}
networks:
  - name: ec2
    subnet: 10.0.0.0/24
    public_subnet: 198.18.1.0/24
    edge: {private: 10.0.0.254, public: 198.18.0.2}
    hosts:
      - {name: ec2-web, private: 10.0.0.11, public: 198.18.1.11, groups: [web]}
      - {name: ec2-out, private: 10.0.0.50, public: 198.18.1.50, member: false}
  - name: vpc
    registry: grpc
    subnet: 10.0.0.0/24
    public_subnet: 198.18.2.0/24
    edge: {private: 10.0.0.254, public: 198.18.0.3}
    hosts:
      - {name: vpc-web, private: 10.0.0.11, public: 198.18.2.11, groups: [web]}
"""

# By hand, from the topology above and `--with-neti` (docs/lab.md): the old hosts, their
# addresses and flags (ec2: 0, vpc: 1), and every host an old host must reach.
OLD = {"ec2-old": ("ec2", "10.0.0.21", "198.18.1.21"), "vpc-old": ("vpc", "10.0.0.21", "198.18.2.21")}
JOINED = {"ec2-web": ("ec2", "10.0.0.11", "198.18.1.11"), "vpc-web": ("vpc", "10.0.0.11", "198.18.2.11"), **OLD}
ALL = ["ec2-web", "ec2-out", "ec2-old", "vpc-web", "vpc-old"]
# probes: overlay from each of the 4 joined hosts to the 3 others (12) and from the outsider
# to the 4 (4); private within ec2 (3 hosts: 6) and within vpc (2 hosts: 2)
N_PROBES = 12 + 4 + 6 + 2


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require_lab_tools()
    path = tmp_path_factory.mktemp("neti") / "topology.yaml"
    path.write_text(TOPOLOGY)
    lab = make_lab("neti", topology=str(path), with_neti=True)
    lab.down()   # leftovers of an interrupted earlier run
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def _green(lab):
    results, ok = lab.check()
    assert ok, "\n" + format_matrix(lab.topology(), results, verbose=True)
    return results


def _overlays(lab) -> dict[str, str]:
    return {h["name"]: h["overlay"] for h in lab.status()["hosts"] if h["overlay"]}


def _old_nat(lab, host: str) -> dict[str, str]:
    """The DNAT rules installed in ``host``'s namespace: overlay -> address (read with iptables-save)."""
    text = nx.run(["nsenter", f"--net=/run/netns/{lab.names.host(host)}", "iptables-save", "-t", "nat"]).stdout
    return dict(re.findall(r"-d (\S+)/32 .*-j DNAT --to-destination (\S+)", text))


def _audit(lab, inventory: str, *args: str):
    cmd = [*overlay_command(), "audit", "-c", lab.controller_config_path, "--stale-days", "0",
           "--inventory", inventory, *args]
    return nx.run(nx.nsenter(lab.names.zookeeper(lab.topology()), cmd), timeout=60).stdout


def _check_audit(lab, tmp_path, old_layout: list[str]) -> None:
    inventory = tmp_path / "inventory.txt"
    inventory.write_text("\n".join(JOINED) + "\n")
    report = json.loads(_audit(lab, str(inventory), "--json"))
    assert report["hosts"] == len(JOINED)                       # each host once, the moved one too
    assert report["missing"] == [] and report["unlisted"] == []
    assert report["stale"] == []
    assert report["invalid_records"] == 0
    assert report["only_neti"] == sorted(old_layout)
    assert report["versions"].get("neti", []) == sorted(old_layout)
    native = sorted(i for v, ids in report["versions"].items() if v != "neti" for i in ids)
    assert native == sorted(set(JOINED) - set(old_layout))
    assert report["addresses"]["allocated"] == len(JOINED)
    text = _audit(lab, str(inventory))
    assert f"hosts live: {len(JOINED)}" in text
    assert f"only in the old layout: {len(old_layout)}" in text
    assert "stale allocations (no live host, allocated over 0 days ago): 0" in text
    for host in old_layout:
        assert f"  {host}" in text


def test_old_and_new_hosts_reach_each_other_both_ways(lab):
    topo = lab.topology()
    assert sorted(h.name for h in topo.neti_hosts) == sorted(OLD)
    assert {h.name: (h.network, h.private, h.public) for h in topo.neti_hosts} == OLD
    results = _green(lab)
    assert len(results) == N_PROBES
    pairs = {(r.probe.src, r.probe.dst) for r in results if r.probe.kind == OVERLAY and r.ok and r.open}
    for old in OLD:
        for new in ("ec2-web", "vpc-web"):
            assert (old, new) in pairs and (new, old) in pairs
    assert ("ec2-old", "vpc-old") in pairs and ("vpc-old", "ec2-old") in pairs


def test_old_hosts_translate_by_vpcflag(lab):
    overlays = _overlays(lab)
    assert set(overlays) == set(JOINED)
    for old, (net, _private, _public) in OLD.items():
        want = {overlays[peer]: (private if pnet == net else public)
                for peer, (pnet, private, public) in JOINED.items() if peer != old}
        assert _old_nat(lab, old) == want, old


def test_audit_against_the_lab_before_the_move(lab, tmp_path):
    _check_audit(lab, tmp_path, list(OLD))


def test_moving_an_old_host_keeps_its_address_and_the_matrix_green(lab, tmp_path):
    before = _overlays(lab)
    res = lab.move_to_overlay("ec2-old")
    print(f"moved ec2-old in {res['seconds']} s")
    assert res["overlay_before"] == before["ec2-old"] == res["overlay_after"]
    topo = lab.topology()
    assert topo.host("ec2-old").member and not topo.host("ec2-old").neti
    status = lab.daemon_statuses()["ec2-old"]
    assert status["overlay"] == before["ec2-old"]
    assert _overlays(lab) == before
    assert _old_nat(lab, "ec2-old") == {}               # the emulator took its rules with it
    assert len(_green(lab)) == N_PROBES
    # the remaining old host still sends to ec2-old's address the way it did (same flag? no: public)
    assert _old_nat(lab, "vpc-old")[before["ec2-old"]] == OLD["ec2-old"][2]
    _check_audit(lab, tmp_path, ["vpc-old"])
