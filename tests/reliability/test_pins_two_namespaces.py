"""Reliability test 6 (issue 16): two daemons, default ``pin_root``, two namespaces, both ``eth0``.

Two real daemons (eBPF datapath, ``reject_all``, a static registry naming each other) in
two namespaces of one machine, each on an interface named ``eth0``, neither setting
``datapath.pin_root``: both are pinned under the default ``/sys/fs/bpf/overlay``, each in
its own namespace's directory (``<netns inode>/eth0``, the inode as ``stat`` prints it),
and both pass the connectivity checks, both ways, also after one restarts (it adopts its
own state, never the other's). Before the pin layout, the second daemon adopted the
first's maps and both hosts' traffic broke.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from overlay import netns as nx
from tests.support.daemons import Daemon, peer_ids, statuses
from tests.support.netns import NetnsSet, netns_inode, require_bcc, veth
from tests.support.paths import REPO, program
from tests.support.wait import wait_for

pytestmark = [pytest.mark.root]

DEFAULT_PIN_ROOT = "/sys/fs/bpf/overlay"
HOSTS = {"p1": ("10.0.0.1", "192.168.7.1"), "p2": ("10.0.0.2", "192.168.7.2")}
PORT = 7500


def _config(name: str, state: str) -> dict:
    private, overlay = HOSTS[name]
    other = next(n for n in HOSTS if n != name)
    return {
        "node_id": name, "network": "lan",
        "addresses": {"private": private, "public": f"198.18.1.{private.rsplit('.', 1)[1]}", "overlay": overlay},
        "registry": {"backend": "static", "peers": [
            {"node_id": other, "network": "lan", "private": HOSTS[other][0],
             "public": f"198.18.1.{HOSTS[other][0].rsplit('.', 1)[1]}", "overlay": HOSTS[other][1]}]},
        "datapath": {"backend": "ebpf", "interface": "eth0"},      # pin_root: the default
        "filter": {"reject_all": True},
        "state_dir": state,
    }


def _reachable(ns, src: str, dst: str) -> bool:
    import json
    import subprocess

    srv = subprocess.Popen(nx.nsenter(ns[dst], [*program("dpctl"), "serve-tcp", json.dumps(
        {"port": PORT, "count": 1, "timeout": 10})]), cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().startswith("{")
        out = nx.run(nx.nsenter(ns[src], [*program("dpctl"), "connect-tcp", json.dumps(
            {"host": HOSTS[dst][1], "port": PORT, "timeout": 3})]), timeout=30).stdout
        res = json.loads(out.splitlines()[-1])
    finally:
        srv.kill()
        srv.communicate(timeout=10)
    return res["ok"] and res["peer"] == HOSTS[dst][1] and res["server_saw"] == HOSTS[src][0]


@pytest.mark.timeout(600)
def test_two_daemons_default_pin_root_two_namespaces_both_eth0():
    require_bcc()
    work = tempfile.mkdtemp(prefix="ovl-pins-")
    made = NetnsSet()
    daemons: dict[str, Daemon] = {}
    pin_dirs: dict[str, str] = {}
    hosts: dict = {}
    ns: dict[str, str] = {}
    try:
        sw = made("pnsw")
        sw.run("ip", "link", "add", "br0", "type", "bridge")
        sw.run("ip", "link", "set", "br0", "up")
        for i, name in enumerate(HOSTS):
            h = hosts[name] = made(f"pn{name}")
            ns[name] = h.name
            veth(h, "eth0", sw, f"p{i}")
            sw.run("ip", "link", "set", f"p{i}", "master", "br0")
            h.run("ip", "addr", "add", f"{HOSTS[name][0]}/24", "dev", "eth0")
            pin_dirs[name] = os.path.join(DEFAULT_PIN_ROOT, str(netns_inode(h.name)), "eth0")
            assert not os.path.exists(pin_dirs[name])
        assert pin_dirs["p1"] != pin_dirs["p2"]
        for name in HOSTS:
            daemons[name] = Daemon(ns[name], _config(name, os.path.join(work, name, "state")),
                                   os.path.join(work, name))
            daemons[name].start()

        def ready():
            got = statuses([ns[n] for n in HOSTS])
            return all(s and s["ready"] and peer_ids(s) == set(HOSTS) - {s["node_id"]} for s in got)

        wait_for(ready, timeout=120, what="both daemons ready with the other as a peer")
        for name in HOSTS:
            assert os.path.isdir(pin_dirs[name]), f"{name} is not pinned at {pin_dirs[name]}"
            log = open(daemons[name].log).read()
            assert f"loaded and attached the datapath on eth0 (pinned at {pin_dirs[name]})" in log
            assert "adopted pinned datapath" not in log
            hosts[name].offload_off("ovl0")
            hosts[name].offload_off("ovl0p")
        assert _reachable(ns, "p1", "p2") and _reachable(ns, "p2", "p1")

        # p2 restarts: it adopts its own pins (not p1's), traffic both ways again
        daemons["p2"].stop()
        daemons["p2"].start()
        wait_for(ready, timeout=60, what="p2 back")
        last = open(daemons["p2"].log).read().split("---- test: starting")[-1]
        assert f"adopted pinned datapath at {pin_dirs['p2']}" in last
        assert _reachable(ns, "p1", "p2") and _reachable(ns, "p2", "p1")
    finally:
        for d in daemons.values():
            d.stop()
            try:
                d.run("datapath", "teardown", "--interface", "eth0")   # the default pin_root
            except nx.NetnsError:
                pass
        for d in pin_dirs.values():
            shutil.rmtree(os.path.dirname(d), ignore_errors=True)
        made.close()
        shutil.rmtree(work, ignore_errors=True)
