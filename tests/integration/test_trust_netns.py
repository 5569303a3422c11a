"""Trust in the control plane, end to end in namespaces (issue 13, acceptance 2 and attestation).

Four namespaces on one bridge (``sw``): ``ctl`` (10.88.0.2) runs ZooKeeper and the controller
(``controller.attest_public: [lan]``); ``peer`` (10.88.0.1) runs a daemon with the eBPF datapath
on the grpc backend; ``mal`` (10.88.0.3) is a node that claims more than it was granted. All
addresses live in the namespaces the test creates.

- attestation: mallory's public address must be the address its connection comes from;
- groups are granted: mallory claims ``admin``; no host's live maps hold an ``admin`` identity
  (read from the kernel with ``overlay maps --json`` in the peer's namespace); the operator
  grants it (``overlay nodes groups``) and the peer's next apply shows it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest
import yaml

from overlay.controller import certs as certlib
from tests.support.netns import NetnsSet, new_pin_root, require_bcc, veth
from tests.support.paths import PYTHON, REPO
from tests.support.wait import stop_process, wait_for

pytestmark = [pytest.mark.zk, pytest.mark.root]

SUBNET = "192.168.0.0/24"
ADDR = {"peer": "10.88.0.1", "ctl": "10.88.0.2", "mal": "10.88.0.3"}
CTL = f"{ADDR['ctl']}:9470"
OVERLAY = [PYTHON, "-m", "overlay.cli"]

MALLORY = """
import json, sys
from overlay.model import Node
from overlay.rpc.client import Client
from overlay.rpc.tls import tls_from_dir
from overlay.errors import OverlayError
controller, certs, private, public = sys.argv[1:5]
out = {}
with Client(controller, tls_from_dir(certs, "mallory"), timeout=10) as c:
    ip = c.allocate("mallory")
    node = Node("mallory", "lan", private, public, ip, ("admin", "web"), ())
    try:
        rev, ungranted = c.register_node(node)
        out = {"ok": True, "ungranted": list(ungranted), "overlay": ip}
    except OverlayError as exc:
        out = {"ok": False, "kind": type(exc).__name__, "error": str(exc)}
print(json.dumps(out))
"""


@pytest.fixture
def world():
    require_bcc()
    make = NetnsSet()
    base = tempfile.mkdtemp(prefix="overlay-trust-")
    pin_root = new_pin_root("trust")
    procs: list[subprocess.Popen] = []
    zk = None
    try:
        ns = {n: make(n) for n in ("sw", "ctl", "peer", "mal")}
        ns["sw"].run("ip", "link", "add", "br0", "type", "bridge")
        ns["sw"].run("ip", "link", "set", "br0", "up")
        for i, name in enumerate(("peer", "ctl", "mal"), start=1):
            veth(ns[name], "eth0", ns["sw"], f"p{i}")
            ns["sw"].run("ip", "link", "set", f"p{i}", "master", "br0")
            ns[name].run("ip", "addr", "add", f"{ADDR[name]}/24", "dev", "eth0")
            ns[name].run("ip", "link", "set", "lo", "up")
        from overlay.zk.server import ZooKeeperServer

        zk = ZooKeeperServer(os.path.join(base, "zk"), ADDR["ctl"], 2181, netns=ns["ctl"].name, fsync=False,
                             die_with_parent=True)
        zk.start(timeout=60)
        certs = os.path.join(base, "certs")
        certlib.init(certs, (ADDR["ctl"],))
        for n in ("peer-1", "mallory"):
            certlib.issue(certs, n)
        tls = {"ca": f"{certs}/ca.crt", "cert": f"{certs}/controller.crt", "key": f"{certs}/controller.key"}
        ctl_cfg = os.path.join(base, "controller.yaml")
        with open(ctl_cfg, "w") as fh:
            yaml.safe_dump({"overlay_subnet": SUBNET, "registry": {"hosts": [zk.address], "prefix": "/trust"},
                            "controller": {"listen": CTL, "tls": tls, "attest_public": ["lan"]}}, fh)
        log = open(os.path.join(base, "procs.log"), "w")
        procs.append(ns["ctl"].popen(*OVERLAY, "controller", "-c", ctl_cfg, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=REPO))
        operator = ["--controller", CTL, "--certs", certs]
        wait_for(lambda: ns["ctl"].run(*OVERLAY, "nodes", "list", *operator, check=False, cwd=REPO).returncode == 0,
                 timeout=120, interval=0.5, what="the controller")
        # the operator grants the peer its group before it starts (grant first, then run)
        res = ns["ctl"].run(*OVERLAY, "nodes", "groups", "peer-1", "web", *operator, cwd=REPO)
        assert "peer-1 may hold web" in res.stdout
        peer_cfg = os.path.join(base, "peer.yaml")
        with open(peer_cfg, "w") as fh:
            yaml.safe_dump({
                "node_id": "peer-1", "network": "lan", "overlay_subnet": SUBNET, "groups": ["web"],
                "addresses": {"private": ADDR["peer"], "public": ADDR["peer"]},
                "registry": {"backend": "grpc", "controller": CTL, "timeout_s": 20,
                             "tls": {"ca": f"{certs}/ca.crt", "cert": f"{certs}/peer-1.crt",
                                     "key": f"{certs}/peer-1.key"}},
                "datapath": {"backend": "ebpf", "interface": "eth0", "pin_root": pin_root},
                "filter": {"reject_all": True},
                "status_listen": "127.0.0.1:9464",
                "control_socket": os.path.join(base, "run", "peer.sock"),
            }, fh)
        procs.append(ns["peer"].popen(*OVERLAY, "daemon", "-c", peer_cfg, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=REPO))
        yield {"ns": ns, "certs": certs, "operator": operator, "pin_root": pin_root}
    finally:
        for p in reversed(procs):
            stop_process(p, 20)
        if zk is not None:
            zk.stop()
        make.close()
        shutil.rmtree(pin_root, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def _status(w) -> dict | None:
    res = w["ns"]["peer"].run(*OVERLAY, "status", "--json", "--listen", "127.0.0.1:9464", check=False, cwd=REPO)
    return json.loads(res.stdout) if res.returncode == 0 else None


def _maps(w) -> dict:
    res = w["ns"]["peer"].run(*OVERLAY, "maps", "--json", "--interface", "eth0", "--pin-root", w["pin_root"],
                              cwd=REPO)
    return json.loads(res.stdout)


def _identity_of(maps: dict, real: str) -> str | None:
    """The group set of the peer at ``real`` in the live maps ("" for none), None if absent."""
    entry = maps["ovl_peers"]["entries"].get(real)
    if entry is None:
        return None
    return maps["ovl_names"]["entries"].get(f"identity:{entry['identity']}", "")


def _mallory(w, public: str) -> dict:
    res = w["ns"]["mal"].run(PYTHON, "-c", MALLORY, CTL, w["certs"], ADDR["mal"], public, cwd=REPO, timeout=60)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_attestation_and_granted_groups_in_the_live_maps(world):
    w = world
    wait_for(lambda: (s := _status(w)) and s["ready"], timeout=240, interval=0.5, what="the peer daemon ready")
    # attestation: a public address that is not where mallory connects from is refused
    got = _mallory(w, "198.18.0.66")
    assert got["kind"] == "PermissionDenied" and "198.18.0.66 is not the address this connection comes from " \
        f"({ADDR['mal']})" in got["error"], got
    # its own address passes; the groups it claims are not granted
    got = _mallory(w, ADDR["mal"])
    assert got["ok"] and got["ungranted"] == ["admin", "web"], got
    status = wait_for(lambda: (s := _status(w)) and [p["node_id"] for p in s["peers"]] == ["mallory"] and s,
                      timeout=60, interval=0.2, what="the peer to apply mallory")
    assert status["peers"][0]["groups"] == []
    maps = _maps(w)
    assert _identity_of(maps, ADDR["mal"]) == ""                       # a member with no group
    assert not [v for v in maps["ovl_names"]["entries"].values() if "admin" in v.split(",")]

    # the operator grants admin; the peer's next apply carries it
    applies = _status(w)["applies"]
    res = w["ns"]["ctl"].run(*OVERLAY, "nodes", "groups", "mallory", "admin", *w["operator"], cwd=REPO)
    assert "mallory may hold admin" in res.stdout
    after = wait_for(lambda: (s := _status(w)) and s["applies"] > applies and s, timeout=60, interval=0.05,
                     what="the next apply")
    assert after["applies"] == applies + 1 and after["peers"][0]["groups"] == ["admin"]
    assert _identity_of(_maps(w), ADDR["mal"]) == "admin"              # web is still not granted
    res = w["ns"]["ctl"].run(*OVERLAY, "nodes", "groups", "mallory", *w["operator"], cwd=REPO)
    assert res.stdout.strip() == "mallory: admin"
    # and revoked again: gone at the next apply
    w["ns"]["ctl"].run(*OVERLAY, "nodes", "groups", "mallory", "--none", *w["operator"], cwd=REPO)
    wait_for(lambda: _identity_of(_maps(w), ADDR["mal"]) == "", timeout=60, interval=0.2, what="admin revoked")
