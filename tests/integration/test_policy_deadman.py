"""The dead-man switch of `overlay policies apply --confirm-within` against a real ZooKeeper and
two daemon processes (dry-run datapath: what each daemon enforces is in /status ``policy``).

A policy set that would make both hosts default-deny is applied with --confirm-within 5 and not
confirmed: both daemons enforce it, then drop it at the deadline by themselves (the CLI has
exited); a confirmed one stays past its deadline. Times are measured and printed, with
generous bounded waits only (the confirmed change gets 15 s: the CLI runs three times first).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from tests.support.wait import free_port, stop_process, wait_for

pytestmark = pytest.mark.zk
OVERLAY = [sys.executable, "-m", "overlay.cli"]
POLICIES = {"policies": {"only-web-ssh": {"from": {"group": "web"}, "to": {"group": "db"}, "proto": "tcp",
                                          "ports": [22]}}}


def status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=3) as r:
        return json.loads(r.read())


def enforced(port: int) -> bool:
    return status(port)["policy"]["enforced"]


@pytest.fixture
def fleet(zk_server, zk_prefix, zk_client, tmp_path):
    for path in ("alloc/id-to-ip", "alloc/ip-to-id", "nodes", "config", "policies", "assignments"):
        zk_client.ensure_path(f"{zk_prefix}/{path}")
    ops = tmp_path / "ops.yaml"
    ops.write_text(yaml.safe_dump({"network": "lan", "registry": {"hosts": [zk_server.address], "prefix": zk_prefix}}))
    procs, ports = [], []
    for i in (1, 2):
        zk_client.create(f"{zk_prefix}/assignments/db-{i}", json.dumps({"v": 1, "groups": ["db"]}).encode())
        port = free_port()
        cfg = tmp_path / f"db-{i}.yaml"
        cfg.write_text(yaml.safe_dump({
            "node_id": f"db-{i}", "network": "lan", "groups": ["db"],
            "addresses": {"private": f"10.9.0.{i}", "public": f"198.19.0.{i}"},
            "registry": {"hosts": [zk_server.address], "prefix": zk_prefix, "timeout_s": 6},
            "datapath": {"backend": "dryrun"}, "filter": {"ssh_whitelist": ["10.8.0.0/24"]},
            "status_listen": f"127.0.0.1:{port}", "state_dir": str(tmp_path / f"state{i}"),
            "control_socket": str(tmp_path / f"run{i}" / "control.sock")}))
        log = open(tmp_path / f"db-{i}.log", "w")
        procs.append((subprocess.Popen([*OVERLAY, "daemon", "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT),
                      log))
        ports.append(port)
    try:
        for port in ports:
            wait_for(lambda p=port: status(p)["ready"], timeout=30, what="daemon ready", ignore=(OSError,))
        yield ops, ports, tmp_path
    finally:
        for proc, log in procs:
            stop_process(proc)
            log.close()
    for i in (1, 2):
        assert "Traceback" not in (tmp_path / f"db-{i}.log").read_text()


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*OVERLAY, *argv], capture_output=True, text=True, timeout=60)


def test_unconfirmed_change_rolls_back_everywhere_and_confirmed_one_stays(fleet, zk_client, zk_prefix):
    ops, ports, tmp = fleet
    pol = tmp / "policies.yaml"
    pol.write_text(yaml.safe_dump(POLICIES))
    assert not any(enforced(p) for p in ports)

    plan = run("policies", "plan", "-c", str(ops), str(pol), "--json")
    assert plan.returncode == 0, plan.stderr
    rows = json.loads(plan.stdout)["verdicts"]
    assert {(r["host"], r["from"], r["ports"], r["before"], r["after"]) for r in rows} == {
        ("db-1", "group web", "22", "open", "allow"), ("db-2", "group web", "22", "open", "allow")}

    t0 = time.time()
    res = run("policies", "apply", "-c", str(ops), str(pol), "--confirm-within", "5")
    assert res.returncode == 0 and "rolls it back" in res.stdout, res.stderr
    deadline = json.loads(zk_client.get(f"{zk_prefix}/config/pending")[0])["deadline"]
    for p in ports:
        wait_for(lambda p=p: enforced(p), timeout=10, what="the change enforced")
    late = {}
    for p in ports:    # nobody confirms; the CLI has exited: each daemon rolls back by itself
        wait_for(lambda p=p: not enforced(p), timeout=max(0.0, deadline - time.time()) + 15, what="the rollback")
        late[p] = time.time() - deadline
    # the same clock for all: never before the deadline; how late is the figure to report
    print(f"rolled back {sorted(round(v, 2) for v in late.values())} s after the deadline "
          f"(CLI start to deadline {deadline - t0:.2f} s)")
    assert all(v >= 0 for v in late.values())
    assert status(ports[0])["registry"]["pending_policies"]["rolled_back"] is True
    # ZooKeeper still holds the change until someone writes the rollback
    assert zk_client.get_children(f"{zk_prefix}/policies") == ["only-web-ssh"]
    res = run("policies", "confirm", "-c", str(ops))
    assert res.returncode == 1 and "missed its deadline" in res.stderr
    assert zk_client.get_children(f"{zk_prefix}/policies") == []
    assert zk_client.exists(f"{zk_prefix}/config/pending") is None

    # a confirmed change (a generous deadline: the CLI runs three times before confirming)
    t_apply = time.monotonic()
    res = run("policies", "apply", "-c", str(ops), str(pol), "--confirm-within", "15")
    assert res.returncode == 0, res.stderr
    again = run("policies", "apply", "-c", str(ops), str(pol), "--confirm-within", "5")
    assert again.returncode == 1 and "pending" in again.stderr
    for p in ports:
        wait_for(lambda p=p: enforced(p), timeout=10, what="the change enforced")
    res = run("policies", "confirm", "-c", str(ops))
    assert res.returncode == 0 and "confirmed" in res.stdout, res.stderr
    wait_for(lambda: all("pending_policies" not in status(p)["registry"] for p in ports), timeout=10,
             what="the pending record gone everywhere")
    time.sleep(max(0.0, t_apply + 16.5 - time.monotonic()))   # past the deadline it had
    assert all(enforced(p) for p in ports)
    assert zk_client.get_children(f"{zk_prefix}/policies") == ["only-web-ssh"]
