"""The two-network lab, end to end (issue 5, acceptance 2-4; issue 7, acceptance 5).

Brings up a lab of the default topology under a name of its own
(``tests.support.lab``: ``ovl-labt<pid>-*``, its run and pin directories), so a
lab a developer has up (``make lab``: ``ovl-lab-*``) or another test run's is
left alone. ec2's daemons use
ZooKeeper directly, vpc's the gRPC controller beside it. Then: the matrix is
green; each daemon reports its network's registry backend, connected, and
the controller lists the whole fleet; flows arrive from the right addresses;
outsiders cannot reach members; one daemon per backend is killed (traffic
still flows on its pinned state) and restarted (it adopts that state without
a single op); ZooKeeper is stopped for 30 s (nothing changes; the ZooKeeper
daemons' /readyz says 503, the controller's daemons keep 200 on its last
state; then all 200); one controller replica is killed (its daemons fail
over, nothing changes), then both for a minute (they fail static, nothing
changes) and ``up`` restarts them; everything is torn down and nothing is left.
Bounded: about four to five minutes in all.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from overlay import netns as nx
from overlay.lab.check import OVERLAY, format_matrix, probe_once
from overlay.lab.lab import Lab, LabError
from tests.support.lab import make_lab, require_lab_tools

pytestmark = [pytest.mark.root, pytest.mark.zk]

# Only the maps that hold state (not counters, conntrack or fill levels).
STATE_MAPS = ("digest", "ovl_cfg", "ovl_failsafe", "ovl_nat", "ovl_peers", "ovl_ports")
SESSION_TIMEOUT_S = 10.0   # registry.timeout_s's default: a killed daemon's record outlives it this long
ZK_OUTAGE_S = 30.0


def _assert_clean(lab: Lab) -> None:
    assert [ns for ns in nx.list_netns() if ns.startswith(lab.names.prefix)] == []
    assert not os.path.exists(lab.run_dir)
    assert not os.path.exists(lab.pin_dir)


@pytest.fixture(scope="module")
def lab_lines():
    return []


@pytest.fixture(scope="module")
def lab(lab_lines):
    require_lab_tools()
    lab = make_lab("labt", lab_lines)
    lab.down()   # leftovers of an interrupted earlier run
    try:
        t0 = time.monotonic()
        lab.up()
        lab.up_seconds = time.monotonic() - t0
        yield lab
    finally:
        lab.down()


def _green(lab: Lab):
    results, ok = lab.check()
    assert ok, "\n" + format_matrix(lab.topology(), results, verbose=True)
    return results


def _snapshot(lab: Lab, hosts) -> dict:
    def one(host: str) -> dict:
        maps = lab.maps(host)
        return {k: maps[k] for k in STATE_MAPS}

    hosts = list(hosts)
    with ThreadPoolExecutor(len(hosts)) as pool:
        return dict(zip(hosts, pool.map(one, hosts), strict=True))


def _changes(before, after, path: str = "") -> list[str]:
    """Where two snapshots differ (paths and both values), for a readable failure."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for k in sorted(set(before) | set(after), key=str):
            out += _changes(before.get(k), after.get(k), f"{path}/{k}")
        return out
    return [] if before == after else [f"{path}: {before!r} -> {after!r}"]


def _assert_unchanged(lab: Lab, hosts, before: dict) -> None:
    changed = _changes(before, _snapshot(lab, hosts))
    assert not changed, "the maps changed:\n" + "\n".join(changed[:40])


def _peer_ids(lab: Lab) -> dict:
    return {h: sorted(p["node_id"] for p in (s or {}).get("peers", [])) for h, s in lab.daemon_statuses().items()}


def _wait_readyz(lab: Lab, code: int | dict, timeout: float) -> dict:
    """Wait until every member's /readyz is ``code`` (or ``code[host]``); returns the last answers."""
    deadline = time.monotonic() + timeout
    while True:
        got = lab.readyz()
        want = code if isinstance(code, dict) else {h: code for h in got}
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.25)


def _by_registry(lab: Lab, zookeeper, grpc) -> dict:
    """{member: zookeeper or grpc value, by how its daemon reaches the registry}."""
    topo = lab.topology()
    return {h.name: (grpc if topo.registry_of(h) == "grpc" else zookeeper) for h in topo.members}


# --- acceptance 1/2: up, steps, the matrix ------------------------------------------------


def test_up_shows_every_step_with_timings_and_the_matrix_is_green(lab, lab_lines):
    text = "\n".join(lab_lines)
    for step in ("preflight", "namespaces (14)", "veth pairs", "1:1 NAT", "ZooKeeper", "test-port servers",
                 "controller at 198.18.0.10:9470", "daemon configs", "daemons (6", "ready and converged",
                 "lab state saved"):
        assert step in text, text
    assert text.count(" ok (") >= 12
    assert lab.up_seconds < 150
    results = _green(lab)
    assert len(results) == 66


def test_up_again_verifies_quickly(lab):
    t0 = time.monotonic()
    status = lab.up()
    assert time.monotonic() - t0 < 15
    assert status["state"] == "up"


def test_status_json(lab):
    s = lab.status()
    assert s["zookeeper"] == "198.18.0.10:2181"
    assert len(s["hosts"]) == 8
    overlays = set()
    for h in s["hosts"]:
        assert {"name", "netns", "network", "private", "public", "overlay", "member", "groups"} <= set(h)
        assert h["netns"].startswith("ovl-") and h["netns_exists"]
        assert os.path.exists(h["test_server"]["log"])
        if h["member"]:
            assert h["overlay"] and h["overlay"].startswith("192.168.")
            overlays.add(h["overlay"])
            d = h["daemon"]
            assert d["running"] and d["ready"] and d["peers"] == 5
            assert os.path.getsize(d["log"]) > 0
            assert os.path.isdir(d["pin_root"])
        else:
            assert h["overlay"] is None and "daemon" not in h
    assert len(overlays) == 6
    assert s["zookeeper_info"]["running"] and os.path.getsize(s["zookeeper_info"]["log"]) > 0
    assert s["controller"] == "198.18.0.10:9470"
    assert [(c["replica"], c["address"], c["running"]) for c in s["controllers"]] == [
        (1, "198.18.0.10:9470", True), (2, "198.18.0.20:9470", True)]
    c = s["controller_info"]
    assert c["running"] and c["networks"] == ["vpc"] and c["netns"] == s["zookeeper_info"]["netns"]
    assert os.path.getsize(c["log"]) > 0 and os.path.exists(c["config"])
    assert {h["name"]: h["registry"] for h in s["hosts"] if h["member"]} == _by_registry(lab, "zookeeper", "grpc")


# --- issue 7, acceptance 5: one network through the controller ---------------------------


def test_each_network_uses_its_registry_backend(lab):
    statuses = lab.daemon_statuses()
    got = {h: {k: v for k, v in (s or {}).get("registry", {}).items() if k in ("backend", "connected")}
           for h, s in statuses.items()}
    assert got == _by_registry(lab, {"backend": "zookeeper", "connected": True},
                               {"backend": "grpc", "connected": True}), got
    topo = lab.topology()
    # the vpc daemons list both controller replicas and use one of them
    for h in topo.grpc_members:
        reg = statuses[h.name]["registry"]
        assert reg["controllers"] == list(topo.controllers) and reg["controller"] in topo.controllers
    # the controllers' failsafe entries: the vpc daemons never lock out their addresses
    failsafe = lab.maps("vpc-web")["ovl_failsafe"]["entries"]
    for hp in topo.controllers:
        assert f"{hp.rpartition(':')[0]}/32" in failsafe, failsafe
    # the controller (stored in the same ZooKeeper) lists the whole fleet, both networks
    certs = lab.status()["controller_info"]["certs"]
    from overlay.lab.lab import overlay_command

    proc = nx.run(nx.nsenter(lab.names.zookeeper(topo), [*overlay_command(), "nodes", "list", "--json",
                                                          "--controller", topo.controller, "--certs", certs]),
                  timeout=30)
    nodes = {n["node_id"]: n for n in json.loads(proc.stdout)["nodes"]}
    assert sorted(nodes) == sorted(h.name for h in topo.members)
    assert {n["network"] for n in nodes.values()} == {"ec2", "vpc"}


# --- acceptance 3: who sees which address ------------------------------------------------


def test_flows_arrive_from_public_across_networks_and_private_inside(lab):
    results = _green(lab)
    topo = lab.topology()
    by = {(r.probe.src, r.probe.dst, r.probe.kind): r for r in results}
    cross = by[("ec2-web", "vpc-app", OVERLAY)]
    assert cross.open and cross.server == "vpc-app"
    assert cross.seen == topo.host("ec2-web").public            # the client's public address
    same = by[("vpc-db", "vpc-web", OVERLAY)]
    assert same.open and same.server == "vpc-web"
    assert same.seen == topo.host("vpc-db").private             # the client's private address
    for r in results:
        if r.probe.kind == OVERLAY and r.open:
            assert r.peer == r.probe.address                     # the client sees the overlay address
            src, dst = topo.host(r.probe.src), topo.host(r.probe.dst)
            assert r.seen == (src.private if src.network == dst.network else src.public)


# --- acceptance 4: outsiders -----------------------------------------------------------


def test_outsiders_cannot_reach_members_members_reach_outsiders(lab):
    results = _green(lab)
    for r in results:
        src_member = lab.topology().host(r.probe.src).member
        dst_member = lab.topology().host(r.probe.dst).member
        if not src_member and dst_member:
            assert not r.open, r
        if src_member and not dst_member:
            assert r.open, r
    # across networks, through the public addresses (direct, no overlay involved)
    topo = lab.topology()
    cases = [("ec2-web", "vpc-out", True), ("vpc-out", "ec2-web", False), ("ec2-out", "vpc-app", False)]
    calls = [(lab.names.host(src), probe_once, (topo.host(dst).public, topo.test_port, 3.0)) for src, dst, _ in cases]
    for (src, dst, want), got in zip(cases, nx.parallel_in_netns(calls, timeout=15), strict=True):
        assert (got["state"] == "open") == want, (src, dst, got)
        if want:
            assert got["server"] == dst and got["seen"] == topo.host(src).public


# --- acceptance 2: a daemon dies and comes back ----------------------------------------


@pytest.mark.parametrize("host", ["ec2-web", "vpc-web"], ids=["zookeeper", "grpc"])
def test_killed_daemon_traffic_flows_and_restart_adopts(lab, host):
    before = _snapshot(lab, [host])[host]
    t_kill = time.monotonic()
    pid = lab.kill_daemon(host, signal.SIGKILL)
    assert not nx.alive(pid)
    # its pinned programs and maps keep working (and its record lives until its session expires)
    _green(lab)
    assert time.monotonic() - t_kill < SESSION_TIMEOUT_S, "the check took longer than the session timeout"
    assert _snapshot(lab, [host])[host] == before
    # the restarted daemon adopts the pinned state: no op applied, same maps
    lab.start_daemon(host)
    lab.wait_converged(60)
    status = lab.daemon_statuses([lab.topology().host(host)])[host]
    assert status["ready"] and status["ops_total"] == 0, status
    assert _snapshot(lab, [host])[host] == before
    # once the dead session has expired and the record is re-made, all is green again
    time.sleep(max(0.0, t_kill + SESSION_TIMEOUT_S + 5 - time.monotonic()))
    lab.wait_converged(60)
    _green(lab)
    assert _snapshot(lab, [host])[host] == before


# --- acceptance 2: ZooKeeper goes away for 30 s ------------------------------------------


def test_zookeeper_outage_changes_nothing(lab):
    members = [h.name for h in lab.topology().members]
    lab.wait_converged(60)
    before = _snapshot(lab, members)
    peers_before = _peer_ids(lab)
    # the ZooKeeper daemons fail static (503); the controller keeps serving its last state to its own
    outage = _by_registry(lab, 503, 200)
    t0 = time.monotonic()
    lab.zookeeper_stop()
    try:
        assert _wait_readyz(lab, outage, 20) == outage
        _green(lab)
        time.sleep(max(0.0, t0 + ZK_OUTAGE_S - 8 - time.monotonic()))
        _green(lab)
        assert lab.readyz() == outage
        _assert_unchanged(lab, members, before)
        assert _peer_ids(lab) == peers_before
        assert time.monotonic() - t0 >= ZK_OUTAGE_S - 5
        time.sleep(max(0.0, t0 + ZK_OUTAGE_S - time.monotonic()))
    finally:
        lab.zookeeper_start()
    assert _wait_readyz(lab, 200, 60) == {h: 200 for h in members}
    lab.wait_converged(60)
    _assert_unchanged(lab, members, before)
    assert _peer_ids(lab) == peers_before
    _green(lab)


# --- the controller goes away; `up` brings it back ----------------------------------------


CONTROLLERS_DOWN_S = 60.0   # issue 16: with every replica dead, the matrix holds this long


def test_controller_replicas_killed_one_then_both_and_up_restarts_them(lab):
    """Issue 16, acceptance 2: one replica killed (SIGKILL): its daemons move to the other,
    stay ready, and the matrix and the maps are unchanged; both killed: the daemons fail
    static (not ready, the ZooKeeper ones stay ready) and the matrix and the maps stay
    unchanged for a minute; ``up`` restarts both and everything converges."""
    lab.wait_converged(60)
    grpc_hosts = [h.name for h in lab.topology().grpc_members]
    before = _snapshot(lab, grpc_hosts)
    lab.controller_stop(1, sig=signal.SIGKILL)
    assert [c["running"] for c in lab.status()["controllers"]] == [False, True]
    assert _wait_readyz(lab, 200, 30) == {h.name: 200 for h in lab.topology().members}
    _green(lab)
    _assert_unchanged(lab, grpc_hosts, before)
    lab.controller_stop(2, sig=signal.SIGKILL)
    both_dead = time.monotonic()
    assert [c["running"] for c in lab.status()["controllers"]] == [False, False]
    # its daemons keep their datapath, not ready; the ZooKeeper ones stay ready
    assert _wait_readyz(lab, _by_registry(lab, 200, 503), 30) == _by_registry(lab, 200, 503)
    _green(lab)
    _assert_unchanged(lab, grpc_hosts, before)
    time.sleep(max(0.0, CONTROLLERS_DOWN_S - (time.monotonic() - both_dead)))
    _green(lab)                            # a minute on: still every flow, the same state
    _assert_unchanged(lab, grpc_hosts, before)
    assert lab.readyz() == _by_registry(lab, 200, 503)
    status = lab.up()                      # the repair path restarts them and waits for convergence
    assert status["controller_info"]["running"]
    assert [c["running"] for c in lab.status()["controllers"]] == [True, True]
    assert _wait_readyz(lab, 200, 60) == {h.name: 200 for h in lab.topology().members}
    _green(lab)


# --- down ------------------------------------------------------------------------------


def test_down_removes_everything(lab):
    procs = lab.load_state()["procs"]
    assert "controller" in procs
    pids = [p["pid"] for p in procs.values()]
    lab.down()
    _assert_clean(lab)
    assert not any(nx.alive(pid) for pid in pids)


# --- failure handling (no daemons: quick) -----------------------------------------------


@pytest.fixture
def small_lab():
    require_lab_tools()
    lab = make_lab("labf")
    lab.down()
    try:
        yield lab
    finally:
        lab.down()


def test_partial_failure_removes_what_was_made(small_lab, monkeypatch):
    def broken(*_a, **_k):
        raise LabError("injected failure")

    monkeypatch.setattr(Lab, "_start_echo", broken)
    with pytest.raises(LabError, match=r"failed at step 6 \(test-port servers.*\); everything it made was removed. injected failure"):
        small_lab.up(daemons=False)
    _assert_clean(small_lab)


def test_down_after_a_crash_finds_everything(small_lab):
    small_lab.up(daemons=False)
    results, ok = small_lab.check()
    assert ok and len(results) == 24
    pids = [p["pid"] for p in small_lab.load_state()["procs"].values()]
    assert all(nx.alive(p) for p in pids)
    os.unlink(small_lab.state_path)      # as if the lab's bookkeeping were lost
    small_lab.down()
    _assert_clean(small_lab)
    assert not any(nx.alive(p) for p in pids)
