"""registry.neti against a real ZooKeeper: the old system's layout read, joined and shared.

The old host is emulated with a plain kazoo client (overlay.lab.neti_host, written from the
layout's description); what the old layout must show is checked with the old format's own
rules, spelt out here independently of overlay.neti.
"""

from __future__ import annotations

import ipaddress
import random
import threading

import pytest
from kazoo.client import KazooClient

from overlay.config import RegistryConfig, config_from_dict
from overlay.config_neti import NetiConfig
from overlay.lab.neti_host import join_party, old_allocate, read_party
from overlay.model import Node
from overlay.plan import plan
from tests.support.wait import stop_process, wait_for

pytestmark = pytest.mark.zk

SUBNET = ipaddress.IPv4Network("192.168.0.0/18")


def neti_cfg(prefix: str, **flags) -> NetiConfig:
    return NetiConfig(f"{prefix}/neti", vpcflag=tuple(sorted((flags or {"ec2": 0, "vpc": 1}).items())))


def cfg(server, prefix, neti: NetiConfig) -> RegistryConfig:
    return RegistryConfig(hosts=(server.address,), prefix=prefix, timeout_s=3.0, neti=neti)


def old_split(name: str) -> tuple[str, str, str, str, str]:
    """The old format's reader: split on the first '-', then on '|' into four fields, flag 0|1."""
    uid, rest = name.split("-", 1)
    fields = rest.split("|")
    assert len(fields) == 4, name
    assert fields[3] in ("0", "1"), name
    assert len(uid) == 32 and int(uid, 16) >= 0, name
    return (uid, *fields)


def view_when(reg, pred, what: str):
    """Wait until ``pred(view)`` holds; returns that view."""
    return wait_for(lambda: (lambda v: v if pred(v) else None)(reg.view()), timeout=30, what=what)


def daemon_node(node_id: str, ip: str, network: str = "ec2", n: int = 1) -> Node:
    return Node(node_id, network, f"10.0.0.{n}", f"198.18.0.{n}", ip, (), ((80, 80),))


def test_old_host_and_daemon_see_each_other(zk_server, zk_prefix, zk_client, registries):
    neti = neti_cfg(zk_prefix)
    # two old hosts: one in the daemon's network (flag 0 = ec2), one in vpc (flag 1)
    same_ip = old_allocate(zk_client, neti, SUBNET, "i-same")
    other_ip = old_allocate(zk_client, neti, SUBNET, "i-other")
    join_party(zk_client, neti, "203.0.113.5", "10.1.0.5", same_ip, 0)
    join_party(zk_client, neti, "203.0.113.6", "10.2.0.6", other_ip, 1)

    reg = registries(cfg(zk_server, zk_prefix, neti), SUBNET, "ovl-1")
    ip = reg.allocate("ovl-1")
    assert ip not in (same_ip, other_ip)
    reg.start(lambda: None)
    me = daemon_node("ovl-1", ip)
    reg.register(me)

    view = view_when(reg, lambda v: {"i-same", "i-other"} <= set(v.nodes), "the old hosts in the view")
    assert view.source_of("i-same") == "neti" and view.source_of("i-other") == "neti"
    assert view.nodes["i-same"].network == "ec2" and view.nodes["i-other"].network == "vpc"
    assert view.nodes["i-same"].groups == ()
    # the planner (what the agent programs) translates by vpcflag: same flag -> private, else public
    config = config_from_dict({"node_id": "ovl-1", "network": "ec2", "overlay_subnet": str(SUBNET),
                               "addresses": {"private": me.private, "public": me.public}})
    desired = plan(me, view.nodes.values(), config, grants=view.grants, order=view.order)
    nat = {p.overlay: p.real for p in desired.peers}
    assert nat[same_ip] == "10.1.0.5" and nat[other_ip] == "203.0.113.6"

    # the old layout: our allocation in both of its maps, our entry in its party, old format
    assert zk_client.get(f"{neti.prefix}/id-to-ip/ovl-1")[0].decode() == ip
    assert zk_client.get(f"{neti.prefix}/ip-to-id/{ip}")[0].decode() == "ovl-1"
    ours = [old_split(c) for c in zk_client.get_children(f"{neti.prefix}/ip-map") if f"|{ip}|" in c]
    assert [o[1:] for o in ours] == [("198.18.0.1", "10.0.0.1", ip, "0")]
    assert zk_client.get(f"{neti.prefix}/ip-map/{ours[0][0]}-{'|'.join(ours[0][1:])}")[0] == b""
    # an old host in vpc (flag 1) reaches us at our public address, one in ec2 at our private one
    assert read_party(zk_client, neti, 1)[ip] == "198.18.0.1"
    assert read_party(zk_client, neti, 0)[ip] == "10.0.0.1"
    # the registry reports the bridge in /status
    extra = reg.status_extra()["neti"]
    assert extra["peers"] == 2 and extra["party_entry"].endswith(f"|{ip}|0")

    # an old host leaving the party leaves the view; stopping removes our entry at once
    for c in zk_client.get_children(f"{neti.prefix}/ip-map"):
        if f"|{other_ip}|" in c:
            zk_client.delete(f"{neti.prefix}/ip-map/{c}")
    wait_for(lambda: "i-other" not in reg.view().nodes, what="i-other gone", timeout=30)
    reg.close()
    assert not [c for c in zk_client.get_children(f"{neti.prefix}/ip-map") if f"|{ip}|" in c]


def test_bad_entries_are_rejected_counted_and_never_widen(zk_server, zk_prefix, zk_client, registries):
    neti = neti_cfg(zk_prefix, ec2=0)   # flag 1 has no network here
    good = old_allocate(zk_client, neti, SUBNET, "i-good")
    flag1 = old_allocate(zk_client, neti, SUBNET, "i-flag1")
    stolen = old_allocate(zk_client, neti, SUBNET, "i-stolen")
    # the native layout gives 'stolen's overlay to someone else
    zk_client.ensure_path(f"{zk_prefix}/alloc/ip-to-id")
    zk_client.create(f"{zk_prefix}/alloc/ip-to-id/{stolen}", b"somebody-else")
    party = f"{neti.prefix}/ip-map"
    zk_client.ensure_path(party)
    u = "0123456789abcdef0123456789abcdef"
    bad = {
        f"{u}-203.0.113.9|10.1.0.9|{flag1}|1": "no network",
        f"{u}-203.0.113.9|10.1.0.9|{stolen}|0": "somebody-else",
        f"{u}-203.0.113.9|10.1.0.9|192.168.63.200|0": "not allocated",
        f"{u}-203.0.113.9|10.1.0.999|{good}|0": "private address",
        f"{u}-203.0.113.9|10.1.0.9|10.99.0.1|0": "outside the overlay subnet",
        f"{u}-203.0.113.9|10.1.0.9|{good}|2": "not 0 or 1",
        f"{u}-203.0.113.9|10.1.0.9|{good}": "not 4",
        f"nothex-203.0.113.9|10.1.0.9|{good}|0": "uuid4",
    }
    for name in bad:
        zk_client.create(f"{party}/{name}", b"")
    join_party(zk_client, neti, "203.0.113.1", "10.1.0.1", good, 0)

    reg = registries(cfg(zk_server, zk_prefix, neti), SUBNET, "ovl-1")
    reg.start(lambda: None)
    view = view_when(reg, lambda v: v.synced, "synced")
    assert set(view.nodes) == {"i-good"}
    for name, why in bad.items():
        assert why in view.rejected[f"neti:{name}"], (name, view.rejected[f"neti:{name}"])
    assert reg.rejected_total >= len(bad)
    counted = reg.rejected_total

    # incremental: one new entry costs a few reads, not a re-read of the party
    reads = reg.reads
    new_ip = old_allocate(zk_client, neti, SUBNET, "i-new")
    join_party(zk_client, neti, "203.0.113.2", "10.1.0.2", new_ip, 0)
    wait_for(lambda: "i-new" in reg.view().nodes, what="i-new in the view", timeout=30)
    assert reg.reads - reads <= 6, reg.reads - reads
    assert reg.rejected_total == counted          # nothing logged twice
    # an allocation changing hands re-checks the entry that claims it
    zk_client.set(f"{neti.prefix}/ip-to-id/{new_ip}", b"i-renamed")
    wait_for(lambda: "i-renamed" in reg.view().nodes and "i-new" not in reg.view().nodes, what="the new owner", timeout=30)


def test_native_record_wins_and_old_max_change_is_the_fallback(zk_server, zk_prefix, zk_client, registries):
    neti = neti_cfg(zk_prefix)
    a = registries(cfg(zk_server, zk_prefix, neti), SUBNET, "both")
    ip = a.allocate("both")
    a.register(daemon_node("both", ip, n=2))          # native record + party entry
    old_ip = old_allocate(zk_client, neti, SUBNET, "i-old")
    join_party(zk_client, neti, "203.0.113.7", "10.1.0.7", old_ip, 1)
    zk_client.create(f"{neti.prefix}/maxchange", b"7")

    b = registries(cfg(zk_server, zk_prefix, neti), SUBNET, "watcher")
    b.start(lambda: None)
    view = view_when(b, lambda v: {"both", "i-old"} <= set(v.nodes), "both peers")
    assert view.source_of("both") == "native" and view.source_of("i-old") == "neti"
    assert len(view.nodes) == 2 and not [k for k in view.rejected if "both" in k]
    assert view.max_change == 7
    zk_client.ensure_path(f"{zk_prefix}/config")
    zk_client.create(f"{zk_prefix}/config/max_change", b"3")
    wait_for(lambda: b.view().max_change == 3, what="the native threshold first", timeout=30)
    # the native record going (its daemon stopping) leaves its party entry: still one peer
    a.detach()
    zk_client.delete(f"{zk_prefix}/nodes/both")
    view = view_when(b, lambda v: v.source_of("both") == "neti", "both from neti")
    assert view.nodes["both"].overlay == ip


def test_a_host_moving_from_the_old_system_keeps_its_address(zk_server, zk_prefix, zk_client, registries):
    neti = neti_cfg(zk_prefix)
    ip = old_allocate(zk_client, neti, SUBNET, "host-7")
    reg = registries(cfg(zk_server, zk_prefix, neti), SUBNET, "host-7")
    assert reg.allocate("host-7") == ip
    assert zk_client.get(f"{zk_prefix}/alloc/ip-to-id/{ip}")[0] == b"host-7"
    assert zk_client.get(f"{zk_prefix}/alloc/id-to-ip/host-7")[0].decode() == ip
    assert reg.allocate("host-7") == ip                      # and again (a restart)
    # an Overlay allocation made before registry.neti was on is written to the old layout
    plain = registries(RegistryConfig(hosts=(zk_server.address,), prefix=zk_prefix, timeout_s=3.0), SUBNET, "early")
    early = plain.allocate("early")
    later = registries(cfg(zk_server, zk_prefix, neti), SUBNET, "early")
    assert later.allocate("early") == early
    assert zk_client.get(f"{neti.prefix}/ip-to-id/{early}")[0] == b"early"


def test_200_mixed_concurrent_allocations_never_collide(zk_server, zk_prefix, registries):
    """100 old-style allocations (4 kazoo clients) race 100 Overlay ones (4 registries) in a /24."""
    subnet = ipaddress.IPv4Network("10.77.0.0/24")
    neti = neti_cfg(zk_prefix)
    got: dict[str, str] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    regs = [registries(cfg(zk_server, zk_prefix, neti), subnet, f"alloc-{k}") for k in range(4)]
    clients = [KazooClient(hosts=zk_server.address, timeout=10) for _ in range(4)]
    for c in clients:
        c.start(timeout=15)
    barrier = threading.Barrier(8)

    def run(kind: str, k: int) -> None:
        try:
            barrier.wait(30)
            rng = random.Random(k)
            for i in range(25):
                node_id = f"{kind}-{k}-{i}"
                if kind == "old":
                    ip = old_allocate(clients[k], neti, subnet, node_id, rng)
                else:
                    ip = regs[k].allocate(node_id)
                with lock:
                    got[node_id] = ip
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(kind, k)) for kind in ("old", "new") for k in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors[:3]
        assert len(got) == 200
        assert len(set(got.values())) == 200, "two ids got one address"
        c = clients[0]
        old_owners = {ip: c.get(f"{neti.prefix}/ip-to-id/{ip}")[0].decode()
                      for ip in c.get_children(f"{neti.prefix}/ip-to-id")}
        assert old_owners == {ip: node_id for node_id, ip in got.items()}   # every allocation, both kinds
        native = {ip: c.get(f"{zk_prefix}/alloc/ip-to-id/{ip}")[0].decode()
                  for ip in c.get_children(f"{zk_prefix}/alloc/ip-to-id")}
        assert native == {ip: n for n, ip in got.items() if n.startswith("new-")}
    finally:
        for c in clients:
            c.stop()
            c.close()


def test_daemon_process_applies_old_hosts_by_vpcflag(zk_server, zk_prefix, zk_client, tmp_path):
    """A daemon (dry-run datapath: what it applied is in /status) with registry.neti applies the
    old hosts' translations and shows their source; an old host's reader finds its entry."""
    import json
    import subprocess
    import sys
    import urllib.request

    import yaml

    from tests.support.wait import free_port

    neti = neti_cfg(zk_prefix)
    same_ip = old_allocate(zk_client, neti, SUBNET, "i-same")
    other_ip = old_allocate(zk_client, neti, SUBNET, "i-other")
    join_party(zk_client, neti, "203.0.113.5", "10.1.0.5", same_ip, 1)    # vpc, like the daemon
    join_party(zk_client, neti, "203.0.113.6", "10.2.0.6", other_ip, 0)   # ec2
    port = free_port()
    cfg_file = tmp_path / "overlay.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "node_id": "ovl-d", "network": "vpc", "overlay_subnet": str(SUBNET),
        "addresses": {"private": "10.9.0.1", "public": "198.19.0.1"},
        "registry": {"backend": "zookeeper", "hosts": [zk_server.address], "prefix": zk_prefix, "timeout_s": 6,
                     "neti": {"prefix": neti.prefix, "vpcflag": {"ec2": 0, "vpc": 1}}},
        "datapath": {"backend": "dryrun"},
        "status_listen": f"127.0.0.1:{port}",
        "state_dir": str(tmp_path / "state"),
        "control_socket": str(tmp_path / "run" / "control.sock"),
    }))
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "overlay.cli", "daemon", "-c", str(cfg_file)], stdout=log,
                            stderr=subprocess.STDOUT)

    def status():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=3) as r:
            return json.loads(r.read())

    try:
        s = wait_for(lambda: (lambda s: s if s["ready"] and len(s["peers"]) == 2 else None)(status()),
                     timeout=30, what="daemon ready with the two old hosts", ignore=(OSError,))
        peers = {p["node_id"]: p for p in s["peers"]}
        assert (peers["i-same"]["overlay"], peers["i-same"]["real"], peers["i-same"]["source"]) == \
            (same_ip, "10.1.0.5", "neti")
        assert (peers["i-other"]["overlay"], peers["i-other"]["real"], peers["i-other"]["source"]) == \
            (other_ip, "203.0.113.6", "neti")
        assert s["registry"]["neti"]["peers"] == 2
        mine = s["overlay"]
        assert read_party(zk_client, neti, 1)[mine] == "10.9.0.1"
        assert read_party(zk_client, neti, 0)[mine] == "198.19.0.1"
    finally:
        stop_process(proc)
        log.close()
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()


def test_audit_against_real_zookeeper_text_and_json(zk_server, zk_prefix, zk_client, registries, tmp_path):
    import json
    import subprocess
    import sys

    import yaml

    neti = neti_cfg(zk_prefix)
    reg = registries(cfg(zk_server, zk_prefix, neti), SUBNET, "new-1")
    ip = reg.allocate("new-1")
    reg.register(Node("new-1", "ec2", "10.0.0.1", "198.18.0.1", ip, (), (), agent_version="0.1.0"))
    old_ip = old_allocate(zk_client, neti, SUBNET, "i-old")
    join_party(zk_client, neti, "203.0.113.5", "10.1.0.5", old_ip, 1)
    gone = old_allocate(zk_client, neti, SUBNET, "i-gone")        # allocated, no live host
    conf = tmp_path / "audit.yaml"
    conf.write_text(yaml.safe_dump({
        "overlay_subnet": str(SUBNET), "network": "ec2",
        "registry": {"hosts": [zk_server.address], "prefix": zk_prefix,
                     "neti": {"prefix": neti.prefix, "vpcflag": {"ec2": 0, "vpc": 1}}}}))
    inv = tmp_path / "inventory.csv"
    inv.write_text("hostname,rack\nnew-1,a\ni-missing,b\n")
    base = [sys.executable, "-m", "overlay.cli", "audit", "-c", str(conf), "--inventory", str(inv),
            "--min-version", "0.2", "--stale-days", "0"]
    res = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["hosts"] == 2 and r["missing"] == ["i-missing"] and r["unlisted"] == ["i-old"]
    assert r["versions"] == {"0.1.0": ["new-1"], "neti": ["i-old"]}
    assert r["below"] == ["i-old", "new-1"] and r["only_neti"] == ["i-old"]
    assert r["addresses"]["allocated"] == 3 and r["addresses"]["free"] == r["addresses"]["total"] - 3
    assert [(s["node_id"], s["overlay"], s["layouts"]) for s in r["stale"]] == [("i-gone", gone, ["neti"])]
    text = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert text.returncode == 0 and "only in the old layout: 1" in text.stdout and "i-gone" in text.stdout
    bad = subprocess.run([*base[:-2], "--min-version", "latest"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--min-version" in bad.stderr and "Traceback" not in bad.stderr


def test_party_entry_comes_back_after_session_loss(zk_server, zk_prefix, zk_client, registries):
    from tests.support.zk import expire_session

    neti = neti_cfg(zk_prefix)
    reg = registries(cfg(zk_server, zk_prefix, neti), SUBNET, "ovl-1")
    ip = reg.allocate("ovl-1")
    reg.start(lambda: None)
    reg.register(daemon_node("ovl-1", ip))

    def ours():
        return [c for c in zk_client.get_children(f"{neti.prefix}/ip-map") if f"|{ip}|" in c]

    first = wait_for(ours, what="our party entry")
    assert len(first) == 1
    old_session = reg.session_id
    expire_session(reg._zk.client)
    wait_for(lambda: reg.session_id != old_session and len(ours()) == 1 and ours() != first, timeout=60,
             what="a new entry under the new session")
    reg.register(daemon_node("ovl-1", ip))       # registering again adopts it: still one entry
    assert len(ours()) == 1
    reg.register(daemon_node("ovl-1", ip, n=9))  # new addresses: the entry is replaced
    assert [c.split("-", 1)[1] for c in ours()] == [f"198.18.0.9|10.0.0.9|{ip}|0"]
