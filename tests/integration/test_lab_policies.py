"""Group policies in the two-network lab (issue 6, acceptance 2).

A lab of the default topology under a name of its own (``ovl-pol<pid>-``),
run directory and pin directory (as test_lab.py does), so neither a lab a
developer has up nor test_lab's is touched. Every member runs the daemon with
``reject_all`` (members admit members). Then, through the registry only
(ZooKeeper ``<prefix>/policies/web-db-5432``, written with kazoo from inside
the lab's ZooKeeper namespace; daemons of either registry backend see it, the
gRPC ones through the controller):

* policy web -> db tcp/5432: web reaches db:5432 in both networks (and
  across), app -> db:5432 and web -> db:7000 are dropped, db -> web stays
  open, db's ``/status`` shows the drops by reason (``policy``);
* the policy deleted: the previous behaviour is back;

each within seconds, with no daemon restarted (same pids throughout).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time

import pytest

from overlay import netns as nx
from overlay.config import load_config
from overlay.lab.check import probe_once
from overlay.lab.lab import Lab
from tests.support.lab import make_lab, require_lab_tools

pytestmark = [pytest.mark.root, pytest.mark.zk]

POLICY_ID = "web-db-5432"
POLICY = {"v": 1, "from": {"group": "web"}, "to": {"group": "db"}, "proto": "tcp", "ports": [5432]}
DB_PORT, OTHER_PORT = 5432, 7000       # 7000: the lab's test port, served on every host
CONVERGE_S = 20.0                      # "within seconds": the bound every change must meet


@pytest.fixture(scope="module")
def lab():
    require_lab_tools()
    lab = make_lab("pol")
    lab.down()  # leftovers of an interrupted earlier run
    extra: list[tuple[int, int]] = []
    try:
        lab.up()
        topo = lab.topology()
        # a server on 5432 on every db host (the lab serves only its test port)
        for h in topo.members:
            if "db" in h.groups:
                argv = nx.nsenter(lab.names.host(h), [sys.executable, "-m", "overlay.lab.echo",
                                                      "--port", str(DB_PORT), "--name", h.name])
                extra.append(nx.start_process(argv, os.path.join(lab.run_dir, "logs", f"echo5432-{h.name}.log"),
                                              cwd=lab.run_dir, die_with_parent=True))
        lab.extra_servers = extra
        yield lab
    finally:
        nx.stop_processes(extra)
        lab.down()


def _by_group(lab: Lab, group: str) -> list[str]:
    return [h.name for h in lab.topology().members if group in h.groups]


def _hosts_in(lab: Lab, *groups: str):
    return [h for h in lab.topology().members if set(groups) & set(h.groups)]


def _overlays(lab: Lab) -> dict[str, str]:
    return {name: s["overlay"] for name, s in lab.daemon_statuses().items() if s}


def _daemon_pids(lab: Lab) -> dict[str, int]:
    return {h["name"]: h["daemon"]["pid"] for h in lab.status()["hosts"] if h.get("daemon")}


def _zk(lab: Lab, action: str, path: str, data: str = "") -> None:
    """put or delete a znode, from inside the lab's ZooKeeper namespace."""
    topo = lab.topology()
    script = textwrap.dedent("""
        import sys
        from kazoo.client import KazooClient
        from kazoo.exceptions import NoNodeError
        hosts, action, path, data = sys.argv[1:5]
        zk = KazooClient(hosts=hosts, timeout=10)
        zk.start(timeout=20)
        try:
            if action == "put":
                if zk.exists(path):
                    zk.set(path, data.encode())
                else:
                    zk.create(path, data.encode(), makepath=True)
            else:
                try:
                    zk.delete(path)
                except NoNodeError:
                    pass
        finally:
            zk.stop()
            zk.close()
    """)
    nx.run(nx.nsenter(lab.names.zookeeper(topo), [sys.executable, "-c", script, topo.zookeeper, action, path,
                                                  data]), timeout=60)


def _policy_path(lab: Lab) -> str:
    db = _by_group(lab, "db")[0]
    prefix = load_config(lab.config_path(db)).registry.prefix
    return f"{prefix}/policies/{POLICY_ID}"


def _expected(lab: Lab, enforced: bool) -> dict[tuple[str, str, int], str]:
    """(client, server, port) -> "open" | "shut", across both networks."""
    webs, apps, dbs = _by_group(lab, "web"), _by_group(lab, "app"), _by_group(lab, "db")
    out = {}
    for db in dbs:
        for web in webs:
            out[(web, db, DB_PORT)] = "open"
            out[(web, db, OTHER_PORT)] = "shut" if enforced else "open"
            out[(db, web, OTHER_PORT)] = "open"
        for app in apps:
            out[(app, db, DB_PORT)] = "shut" if enforced else "open"
    return out


def _probe(lab: Lab, overlays: dict[str, str], cells) -> dict[tuple[str, str, int], dict]:
    calls = [(lab.names.host(src), probe_once, (overlays[dst], port, 1.5)) for src, dst, port in cells]
    results = nx.parallel_in_netns(calls, timeout=10)
    return dict(zip(cells, results, strict=True))


def _state(result) -> str:
    if isinstance(result, dict) and result.get("state") == "open":
        return "open"
    if isinstance(result, dict) and result.get("state") == "timeout":
        return "shut"   # dropped: no reset came back
    return f"other:{result}"


def _wait_for(lab: Lab, overlays: dict[str, str], want: dict, timeout: float = CONVERGE_S) -> float:
    """Probe until every cell is as wanted; the seconds it took (fails past ``timeout``)."""
    t0 = time.monotonic()
    while True:
        got = {cell: _state(r) for cell, r in _probe(lab, overlays, list(want)).items()}
        bad = {c: (got[c], w) for c, w in want.items() if got[c] != w}
        elapsed = time.monotonic() - t0
        if not bad:
            return elapsed
        if elapsed > timeout:
            raise AssertionError(f"after {elapsed:.1f} s, (client, server, port): (got, want) = {bad}")
        time.sleep(0.5)


def _db_status(lab: Lab) -> dict[str, dict]:
    statuses = lab.daemon_statuses(_hosts_in(lab, "db"))
    assert all(statuses.values()), statuses
    return statuses


def test_policy_web_to_db_then_deleted(lab):
    overlays = _overlays(lab)
    assert len(overlays) == len(lab.topology().members)
    pids = _daemon_pids(lab)
    path = _policy_path(lab)

    # before: members admit members
    _wait_for(lab, overlays, _expected(lab, enforced=False))
    drops_before = {h: s["drops"].get("policy", 0) for h, s in _db_status(lab).items()}

    # the policy, written to the registry
    t0 = time.monotonic()
    _zk(lab, "put", path, json.dumps(POLICY))
    took = _wait_for(lab, overlays, _expected(lab, enforced=True))
    print(f"policy in force on every host {time.monotonic() - t0:.1f} s after the write ({took:.1f} s of probing)")
    for host, s in _db_status(lab).items():
        assert s["policy"]["enforced"] is True and s["policy"]["selected_by"] == [POLICY_ID], (host, s["policy"])
        assert s["drops"]["policy"] > drops_before[host], (host, s["drops"])
        assert s["fill"]["ovl_policy"]["entries"] >= 1, s["fill"]
        assert s["datapath"]["counters"]["pass_policy"] > 0
    # web and app (not selected) keep the members / reject_all behaviour
    for host, s in lab.daemon_statuses(_hosts_in(lab, "web", "app")).items():
        assert s["policy"]["enforced"] is False, host

    # deleted: the previous behaviour comes back
    t0 = time.monotonic()
    _zk(lab, "delete", path)
    _wait_for(lab, overlays, _expected(lab, enforced=False))
    print(f"policy gone on every host {time.monotonic() - t0:.1f} s after the delete")
    for host, s in _db_status(lab).items():
        assert s["policy"]["enforced"] is False and s["fill"]["ovl_policy"]["entries"] == 0, host
        assert s["last_error"] is None, s["last_error"]

    # nothing was restarted
    assert _daemon_pids(lab) == pids
