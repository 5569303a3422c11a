"""Issue 11, acceptance 3: revocation takes effect within one apply.

The real daemon (``overlay daemon``, eBPF datapath, ``reject_all``) runs in a
namespace ``db*``; a member ``web`` connects to it from a fixed source port. Then:

* static registry: the config loses ``web`` and the daemon gets SIGHUP;
* ZooKeeper (a real server, in its own namespace ``zk``): ``web``'s node is deleted;
* ZooKeeper: the policy ``web -> db tcp 5432`` is narrowed to 5433;

and the same 4-tuple (the same source port to the same port) is refused in the
first apply that follows (``/status`` ``applies`` moved once; ``guard.settle_s: 0``
so a single removal is not deliberately delayed). Before this issue a SYN reusing
the 4-tuple matched the conntrack entry that the host's own SYN-ACK had created and
got in. Everything lives in namespaces the test creates; nothing in the root one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from tests.support.netns import NetnsSet, new_pin_root, require_bcc, veth
from tests.support.paths import PYTHON, program

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

HERE = os.path.dirname(os.path.abspath(__file__))
SUBNET = "192.168.0.0/18"
ZK = "10.30.0.10"
WEB = {"node_id": "web", "network": "n", "private": "10.30.0.2", "public": "198.18.30.2",
       "overlay": "192.168.0.2", "groups": ["web"]}
PORTS = (5432, 5433, 7000)
STATUS_PORT = 9464

ZK_CLIENT = r"""
import json, sys
from kazoo.client import KazooClient
zk = KazooClient(hosts=sys.argv[1], timeout=10)
zk.start(timeout=30)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    op = req["op"]
    if op == "quit":
        break
    if op == "put":
        zk.ensure_path(req["path"].rsplit("/", 1)[0])
        if zk.exists(req["path"]):
            zk.set(req["path"], req["data"].encode())
        else:
            zk.create(req["path"], req["data"].encode(), ephemeral=req.get("ephemeral", False))
    elif op == "delete":
        zk.delete(req["path"])
    print(json.dumps({"ok": True}), flush=True)
zk.stop()
"""


class Net:
    """A bridge in ``sw``; ``web`` 10.30.0.2 and ``zk`` 10.30.0.10 on it; daemons added with add_db()."""

    def __init__(self, made: NetnsSet):
        self.made = made
        self.sw = made("rv-sw")
        self.sw.run("ip", "link", "add", "br0", "type", "bridge")
        self.sw.run("ip", "link", "set", "br0", "up")
        self.ports = 0
        self.web = self._attach("rv-web", WEB["private"])
        self.zk_ns = self._attach("rv-zk", ZK)
        self.procs: list[subprocess.Popen] = []
        self.pins: list[str] = []

    def _attach(self, name: str, addr: str):
        ns = self.made(name)
        self.ports += 1
        veth(ns, "eth0", self.sw, f"p{self.ports}")
        self.sw.run("ip", "link", "set", f"p{self.ports}", "master", "br0")
        ns.run("ip", "addr", "add", f"{addr}/24", "dev", "eth0")
        return ns

    def add_db(self, name: str, addr: str):
        ns = self._attach(name, addr)
        server = ns.popen(*program("iptctl"), "serve", *map(str, PORTS), text=True)
        self.procs.append(server)
        assert server.stdout.readline().strip() == "ready"
        return ns

    def connect(self, host: str, port: int, sport: int) -> bool:
        """web -> host:port from source port ``sport`` (closed with a RST: the 4-tuple is free again)."""
        out = self.web.run(*program("conformance"), "probe", json.dumps({"probes": [
            {"proto": "tcp", "host": host, "port": port, "sport": sport}], "timeout": 1.5}), timeout=30)
        res = json.loads(out.stdout.strip().splitlines()[-1])[0]
        return res["ok"]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for path in self.pins:
            shutil.rmtree(path, ignore_errors=True)


class Daemon:
    """``overlay daemon -c FILE`` inside ``ns``; /status read from inside the namespace."""

    def __init__(self, net: Net, ns, config: dict, tmp_path):
        self.ns = ns
        self.path = tmp_path / f"{ns.name}.yaml"
        self.config = config
        self.write(config)
        self.log = tmp_path / f"{ns.name}.log"
        with open(self.log, "w") as out:
            self.proc = ns.popen(PYTHON, "-m", "overlay.cli", "daemon", "-c", str(self.path),
                                 stdout=out, stderr=subprocess.STDOUT)
        net.procs.append(self.proc)

    def write(self, config: dict) -> None:
        self.path.write_text(yaml.safe_dump(config))

    def status(self) -> dict:
        code = ("import json, urllib.request; print(urllib.request.urlopen("
                f"'http://127.0.0.1:{STATUS_PORT}/status', timeout=3).read().decode())")
        out = self.ns.run(PYTHON, "-c", code, check=False, timeout=30)
        if out.returncode != 0:
            return {}
        return json.loads(out.stdout)

    def wait(self, pred, what: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            if s and pred(s):
                return s
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{self.ns.name}: {what} not reached\n{self.log.read_text()[-3000:]}")


def base_config(name: str, addr: str, pin_root: str, registry: dict) -> dict:
    return {
        "node_id": name, "network": "n", "overlay_subnet": SUBNET, "groups": ["db"],
        "addresses": {"private": addr, "public": f"198.18.30.{addr.rsplit('.', 1)[1]}",
                      "overlay": f"192.168.0.{addr.rsplit('.', 1)[1]}"},
        "registry": registry,
        "datapath": {"backend": "ebpf", "interface": "eth0", "pin_root": pin_root},
        "filter": {"reject_all": True},
        "guard": {"settle_s": 0},
        "status_listen": f"127.0.0.1:{STATUS_PORT}",
    }


@pytest.fixture
def net():
    require_bcc()
    made = NetnsSet()
    n = None
    try:
        n = Net(made)
        yield n
    finally:
        if n is not None:
            n.close()
        made.close()


def test_static_registry_reload_revokes_the_same_4_tuple(net, tmp_path):
    db = net.add_db("rv-db1", "10.30.0.21")
    pin = new_pin_root("revoke-static")
    net.pins.append(pin)
    config = base_config("db1", "10.30.0.21", pin, {"backend": "static", "peers": [
        {k: v for k, v in WEB.items() if k != "groups"}]})
    d = Daemon(net, db, config, tmp_path)
    d.wait(lambda s: s["ready"] and [p["node_id"] for p in s["peers"]] == ["web"], "ready with web")
    assert net.connect("10.30.0.21", 7000, sport=45000), "a member was refused"
    applies = d.status()["applies"]

    d.write({**config, "registry": {"backend": "static", "peers": []}})
    d.proc.send_signal(signal.SIGHUP)
    s = d.wait(lambda s: s["peers"] == [], "web removed")
    assert s["applies"] == applies + 1, "the removal took more than one apply"
    assert not net.connect("10.30.0.21", 7000, sport=45000), "the removed peer got in on the same 4-tuple"
    assert not net.connect("10.30.0.21", 7000, sport=45001)
    assert d.status()["drops"]["not_allowed"] >= 2


@pytest.fixture
def zookeeper(net, tmp_path):
    from overlay.zk.server import ZooKeeperServer

    server = ZooKeeperServer(tmp_path / "zk", host=ZK, port=2181, netns=net.zk_ns.name, fsync=False,
                             heap_mb=256, die_with_parent=True)
    server.start(timeout=90)
    client = net.zk_ns.popen(PYTHON, "-c", ZK_CLIENT, f"{ZK}:2181", stdin=subprocess.PIPE, text=True)
    try:
        assert json.loads(client.stdout.readline())["ready"]

        def call(**req) -> None:
            client.stdin.write(json.dumps(req) + "\n")
            client.stdin.flush()
            assert json.loads(client.stdout.readline())["ok"], req

        yield call
    finally:
        if client.poll() is None:
            client.stdin.write(json.dumps({"op": "quit"}) + "\n")
            client.stdin.flush()
            try:
                client.wait(10)
            except subprocess.TimeoutExpired:
                client.kill()
        server.stop()


def test_zookeeper_delete_and_policy_narrowing_revoke(net, zookeeper, tmp_path):
    prefix = "/ovlrevoke"
    zk = zookeeper
    zk(op="put", path=f"{prefix}/alloc/id-to-ip/web", data=WEB["overlay"])
    zk(op="put", path=f"{prefix}/alloc/ip-to-id/{WEB['overlay']}", data="web")
    web_record = json.dumps({"v": 1, **WEB, "open_ports": []})
    zk(op="put", path=f"{prefix}/nodes/web", data=web_record, ephemeral=True)
    # the operator grants the groups the records claim (a node holds only granted groups)
    for node, groups in (("web", ["web"]), ("db2", ["db"])):
        zk(op="put", path=f"{prefix}/assignments/{node}", data=json.dumps({"v": 1, "groups": groups}))

    db = net.add_db("rv-db2", "10.30.0.22")
    pin = new_pin_root("revoke-zk")
    net.pins.append(pin)
    config = base_config("db2", "10.30.0.22", pin, {"backend": "zookeeper", "hosts": [f"{ZK}:2181"],
                                                      "prefix": prefix, "timeout_s": 10})
    d = Daemon(net, db, config, tmp_path)
    d.wait(lambda s: s["ready"] and [p["node_id"] for p in s["peers"]] == ["web"], "ready with web", 90)

    # (1) the peer's node is deleted: the same 4-tuple is refused in the next apply
    assert net.connect("10.30.0.22", 7000, sport=45100)
    applies = d.status()["applies"]
    zk(op="delete", path=f"{prefix}/nodes/web")
    s = d.wait(lambda s: s["peers"] == [], "web's deletion applied")
    assert s["applies"] == applies + 1
    assert not net.connect("10.30.0.22", 7000, sport=45100), "the deleted peer got in on the same 4-tuple"

    # (2) web is back; a policy selects db: only web -> 5432 is allowed
    zk(op="put", path=f"{prefix}/nodes/web", data=web_record, ephemeral=True)
    policy = {"v": 1, "from": {"group": "web"}, "to": {"group": "db"}, "proto": "tcp", "ports": [5432]}
    zk(op="put", path=f"{prefix}/policies/web-db", data=json.dumps(policy))
    d.wait(lambda s: s["peers"] and s["policy"]["enforced"], "web back and the policy applied")
    assert net.connect("10.30.0.22", 5432, sport=45200), "the policy's port was refused"
    assert not net.connect("10.30.0.22", 7000, sport=45201), "default-deny let another port in"

    # (3) narrowed to 5433: the next new connection to 5432 from the same source port is refused
    applies = d.status()["applies"]
    zk(op="put", path=f"{prefix}/policies/web-db", data=json.dumps({**policy, "ports": [5433]}))
    s = d.wait(lambda s: s["applies"] > applies, "the narrowed policy applied")
    assert s["applies"] == applies + 1
    assert not net.connect("10.30.0.22", 5432, sport=45200), "a narrowed policy let 5432 in again"
    assert net.connect("10.30.0.22", 5433, sport=45202), "the narrowed policy's new port was refused"
    assert d.status()["drops"]["policy"] >= 2
