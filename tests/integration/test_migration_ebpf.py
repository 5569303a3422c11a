"""Issue 18 on the eBPF datapath: old-format hosts in the live maps, and the dead-man switch
cutting and restoring real connections.

One set of namespaces on one bridge (``sw``) serves both tests:

- ``zk`` 10.77.0.100: ZooKeeper (registry prefix /mig, the old system's prefix /neti);
- ``d1`` 10.77.0.1 and ``d2`` 10.77.0.2 (public 198.18.77.1/.2 on the same link): ``overlay
  daemon`` on the eBPF datapath, network ec2, ``registry.neti`` (ec2 = flag 0, vpc = flag 1),
  ``reject_all``, granted group ``db``; each runs the lab's echo server on TCP 7300 and a line
  echo on TCP 7310 (tests.support.dpctl serve-lines);
- ``op`` 10.77.0.30: the operator's host (not a member): runs the ``overlay policies`` CLI and
  connects to the daemons' echo servers;
- ``old0`` 10.77.0.20: an old host with flag 0 (same as the daemons): only its private address
  is there; ``old1`` 198.18.77.21: an old host with flag 1 (vpc): only its public address is
  there (its private 10.66.0.21 exists nowhere; it answers 10.77.0.0/24 on the link). Both are made the old way
  (overlay.lab.neti_host: old allocation, party entry) over a kazoo session of the test.

The policy in force before the tests lets ``op`` reach ``db`` on TCP 7300 and 7310; with
``reject_all`` everything else from ``op`` is dropped.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from overlay import netns as nx
from overlay.config_neti import NetiConfig
from overlay.lab.neti_host import join_party, old_allocate, read_party
from overlay.zk.server import ZooKeeperServer
from tests.support.daemons import Daemon, statuses
from tests.support.netns import NetnsSet, finish, new_pin_root, require_bcc, veth
from tests.support.paths import PYTHON, REPO
from tests.support.wait import stop_process, wait_for
from tests.support.zk import client_in_netns

pytestmark = [pytest.mark.root, pytest.mark.zk]

ZK = "10.77.0.100:2181"
PREFIX = "/mig"
SUBNET = ipaddress.IPv4Network("192.168.0.0/18")
NETI = NetiConfig("/neti", vpcflag=(("ec2", 0), ("vpc", 1)))
DAEMONS = {"d1": ("10.77.0.1", "198.18.77.1"), "d2": ("10.77.0.2", "198.18.77.2")}
OP = "10.77.0.30"
OLD = {  # name: (id, public, private, flag, the address present in its namespace)
    "old0": ("i-old0", "198.18.77.20", "10.77.0.20", 0, "10.77.0.20/24"),
    "old1": ("i-old1", "198.18.77.21", "10.66.0.21", 1, "198.18.77.21/24"),
}
SVC, LINES = 7300, 7310     # the echo server (one line per connection), a line echo (long-lived)
ALLOW_OP = {"v": 1, "from": {"cidr": f"{OP}/32"}, "to": {"group": "db"}, "proto": "tcp", "ports": [SVC, LINES]}
# the whole set after the change: op may reach db on another port only, so 7300 is cut
CUT_OP = {"policies": {"op-other": {"from": {"cidr": f"{OP}/32"}, "to": {"group": "db"}, "proto": "tcp",
                                    "ports": [SVC + 1]}}}


def _daemon_config(name: str, pin_root: str, work: str) -> dict:
    private, public = DAEMONS[name]
    return {
        "node_id": name, "network": "ec2", "overlay_subnet": str(SUBNET), "groups": ["db"],
        "addresses": {"private": private, "public": public},
        "registry": {"backend": "zookeeper", "hosts": [ZK], "prefix": PREFIX, "timeout_s": 6,
                     "neti": {"prefix": NETI.prefix, "vpcflag": dict(NETI.vpcflag)}},
        "datapath": {"backend": "ebpf", "interface": "eth0", "pin_root": pin_root},
        "filter": {"reject_all": True},
        "state_dir": os.path.join(work, name, "state"),
        "control_socket": os.path.join(work, name, "run", "control.sock"),
    }


@pytest.fixture(scope="module")
def world():
    require_bcc()
    make = NetnsSet()
    work = tempfile.mkdtemp(prefix="ovl-mig-")
    pins = {n: new_pin_root(f"mig{n}") for n in DAEMONS}
    zk = client = None
    daemons: dict[str, Daemon] = {}
    echoes: list = []
    try:
        ns = {n: make(n) for n in ("sw", "zk", *DAEMONS, "op", *OLD)}
        ns["sw"].run("ip", "link", "add", "br0", "type", "bridge")
        ns["sw"].run("ip", "link", "set", "br0", "up")
        addrs = {"zk": ["10.77.0.100/24"], "op": [f"{OP}/24"],
                 **{n: [f"{a}/24" for a in DAEMONS[n]] for n in DAEMONS}, **{n: [OLD[n][4]] for n in OLD}}
        for i, (name, cidrs) in enumerate(addrs.items(), start=1):
            veth(ns[name], "eth0", ns["sw"], f"p{i}")
            ns["sw"].run("ip", "link", "set", f"p{i}", "master", "br0")
            for cidr in cidrs:
                ns[name].run("ip", "addr", "add", cidr, "dev", "eth0")
        # old1 answers the daemons' private addresses on the link (no edge NAT emulated here)
        ns["old1"].run("ip", "route", "add", "10.77.0.0/24", "dev", "eth0")
        zk = ZooKeeperServer(os.path.join(work, "zk"), ZK.split(":")[0], 2181, netns=ns["zk"].name, fsync=False,
                             heap_mb=256, die_with_parent=True)
        zk.start(timeout=60)
        # the test's session (from the zk namespace): the operator's writes and the old hosts' entries
        client = client_in_netns(ns["zk"].name, ZK)
        for path in ("alloc/id-to-ip", "alloc/ip-to-id", "nodes", "config", "policies", "assignments"):
            client.ensure_path(f"{PREFIX}/{path}")
        for n in DAEMONS:
            client.create(f"{PREFIX}/assignments/{n}", json.dumps({"v": 1, "groups": ["db"]}).encode())
        client.create(f"{PREFIX}/policies/op-svc", json.dumps(ALLOW_OP).encode())
        old = {}
        for n, (node_id, public, private, flag, _) in OLD.items():
            ip = old_allocate(client, NETI, SUBNET, node_id)
            join_party(client, NETI, public, private, ip, flag)
            old[n] = ip
        for n in DAEMONS:
            echoes.append(ns[n].popen(PYTHON, "-m", "overlay.lab.echo", "--port", str(SVC), "--name", n,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO))
            echoes.append(ns[n].helper_bg("serve-lines", port=LINES, timeout=900))
            daemons[n] = Daemon(ns[n].name, _daemon_config(n, pins[n], work), os.path.join(work, n))
            daemons[n].start()

        def ready():
            got = statuses([d.netns for d in daemons.values()])
            return all(s and s["ready"] and {"i-old0", "i-old1"} <= {p["node_id"] for p in s["peers"]}
                       and s["policy"]["enforced"] for s in got)

        wait_for(ready, timeout=240, interval=0.5, what="both daemons ready with the old hosts and the policy")
        for n in DAEMONS:     # the product leaves offload alone; the tests switch it off (DESIGN §5)
            for dev in ("ovl0", "ovl0p"):
                ns[n].offload_off(dev)
        yield {"ns": ns, "zk": client, "daemons": daemons, "old": old, "work": work}
    finally:
        for d in daemons.values():
            d.stop()
        for p in echoes:
            stop_process(p, timeout=10)
        if client is not None:
            client.stop()
            client.close()
        if zk is not None:
            zk.stop()
        make.close()
        for path in pins.values():
            shutil.rmtree(path, ignore_errors=True)
        logs = {n: open(d.log).read() for n, d in daemons.items()}
        shutil.rmtree(work, ignore_errors=True)
    for n, text in logs.items():
        assert "Traceback" not in text, (n, text[-3000:])


def _maps(d: Daemon) -> dict:
    return json.loads(d.run("maps", "--json", "-c", d.config_path).stdout)


# --- acceptance 1: an old host in an eBPF daemon's live maps ---------------------------------------


def test_live_maps_translate_old_hosts_by_vpcflag_and_packets_arrive(world):
    old, daemons, ns = world["old"], world["daemons"], world["ns"]
    # the reference: flag 0 = ec2 = the daemons' network -> private; flag 1 = vpc -> public
    want = {old["old0"]: OLD["old0"][2], old["old1"]: OLD["old1"][1]}
    for name, d in daemons.items():
        maps = _maps(d)
        nat = maps["ovl_nat"]["entries"]
        assert {ip: nat[ip]["real"] for ip in want} == want, (name, nat)
        assert not any(nat[ip]["override"] for ip in want)
        for real in want.values():
            assert real in maps["ovl_peers"]["entries"], name     # a member: passes reject_all
        # and the old hosts see the daemon: its party entry, read by an old host's rules
        mine = d.status()["overlay"]
        assert read_party(world["zk"], NETI, 0)[mine] == DAEMONS[name][0]
        assert read_party(world["zk"], NETI, 1)[mine] == DAEMONS[name][1]

    # a real datagram from d1 to each old host's overlay address arrives in that host's
    # namespace (which holds only the address it must arrive at), and the reply comes back
    # from the overlay address
    before = _maps(daemons["d1"])["ovl_counters"]["entries"]["nat_egress"]
    for n, port in (("old0", 7401), ("old1", 7402)):
        srv = ns[n].helper_bg("serve-udp", port=port, timeout=20)
        res = ns["d1"].helper("send-udp", host=old[n], port=port)
        assert res["ok"], (n, res)
        assert res["reply_from"] == old[n], (n, res)
        seen = finish(srv)["seen"]
        assert seen == [res["server_saw"]] and seen[0] in DAEMONS["d1"], (n, seen)
        print(f"\n{n}: {old[n]} -> arrived at {OLD[n][4].split('/')[0]}, from {seen[0]}")
    assert _maps(daemons["d1"])["ovl_counters"]["entries"]["nat_egress"] >= before + 2


# --- acceptance 4: the dead-man switch with real connections ---------------------------------------


class Prober:
    """Connects from inside ``ns`` to each target's echo server again and again, one thread per
    target (a fresh TCP connection each time, 0.2 s connect timeout: a dropped SYN is not
    retried within it), and records ``(start wall time, target, ok)``. Bounded: at most
    ``limit_s`` seconds."""

    def __init__(self, ns: str, targets: list[str], limit_s: float = 150):
        self.ns, self.targets, self.limit_s = ns, targets, limit_s
        self.log: list[tuple[float, str, bool]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(h,), name=f"probe-{h}", daemon=True)
                        for h in targets]

    @staticmethod
    def _probe(host: str) -> bool:
        try:
            with socket.create_connection((host, SVC), timeout=0.2) as s:
                s.settimeout(2)
                return json.loads(s.makefile().readline())["peer"] == OP
        except (OSError, ValueError):
            return False

    def _run(self, host: str) -> None:
        nx.setns(self.ns)
        end = time.monotonic() + self.limit_s
        while not self.stop.is_set() and time.monotonic() < end:
            t = time.time()
            self.log.append((t, host, self._probe(host)))
            self.stop.wait(0.05)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def since(self, t: float, host: str) -> list[tuple[float, bool]]:
        return [(ts, ok) for ts, h, ok in list(self.log) if h == host and ts >= t]

    def state_after(self, t: float, host: str, ok: bool, runs: int = 3) -> float | None:
        """Start time of the first of ``runs`` consecutive probes of ``host`` from ``t`` on with
        result ``ok``; None if not (yet) seen."""
        seq = self.since(t, host)
        for i in range(len(seq) - runs + 1):
            if all(r == ok for _, r in seq[i:i + runs]):
                return seq[i][0]
        return None


class Held:
    """One TCP connection from inside ``ns`` to ``host``'s line echo, held open: a numbered line
    is written every 0.1 s (TCP queues what is not acknowledged), and each echoed line's arrival
    time recorded. Bounded: writes stop after ``limit_s`` seconds."""

    def __init__(self, ns: str, host: str, limit_s: float = 150):
        self.host, self.limit_s = host, limit_s
        self.sent: list[float] = []                  # line i written at sent[i] (wall time)
        self.echoed: list[tuple[int, float]] = []    # (line number, arrival wall time)
        self.stop = threading.Event()
        res = nx.in_netns(ns, socket.create_connection, (host, LINES), 5)
        if isinstance(res, BaseException):
            raise res
        self.sock = res
        self.sock.settimeout(None)
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._write, self._read)]
        for t in self.threads:
            t.start()

    def _write(self) -> None:
        end = time.monotonic() + self.limit_s
        while not self.stop.is_set() and time.monotonic() < end:
            self.sent.append(time.time())
            self.sock.sendall(f"{len(self.sent) - 1}\n".encode())
            self.stop.wait(0.1)

    def _read(self) -> None:
        with self.sock.makefile("rb") as lines:
            for line in lines:
                self.echoed.append((int(line), time.time()))

    def close(self) -> None:
        self.stop.set()
        self.threads[0].join(5)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.threads[1].join(5)

    def first_echo_after(self, t: float) -> float | None:
        return next((at for _, at in list(self.echoed) if at >= t), None)


def _all_reach(probe: Prober, since: float | dict, ok: bool, by: float, what: str) -> dict[str, float]:
    """Per target: when ``ok`` became its steady state (3 probes in a row) after ``since`` (a time,
    or a time per target), waiting until wall time ``by`` at most."""
    return {h: wait_for(lambda h=h: probe.state_after(since[h] if isinstance(since, dict) else since, h, ok),
                        timeout=max(0.1, by - time.time()), interval=0.05, what=f"{h} {what}")
            for h in probe.targets}


def _cli(world, *argv: str) -> subprocess.CompletedProcess:
    return world["ns"]["op"].run(PYTHON, "-m", "overlay.cli", *argv, check=False, timeout=60, cwd=REPO)


def test_unconfirmed_cut_is_restored_on_every_daemon_and_a_confirmed_one_stays(world):
    ops = os.path.join(world["work"], "ops.json")
    pol = os.path.join(world["work"], "cut.json")
    with open(ops, "w") as fh:
        json.dump({"network": "ec2", "registry": {"hosts": [ZK], "prefix": PREFIX}}, fh)
    with open(pol, "w") as fh:
        json.dump(CUT_OP, fh)
    targets = [DAEMONS[n][0] for n in DAEMONS]
    zk = world["zk"]
    drops0 = {n: _maps(d)["ovl_counters"]["entries"]["drop_policy"] for n, d in world["daemons"].items()}
    with contextlib.ExitStack() as stack:
        held = {h: Held(world["ns"]["op"].name, h) for h in targets}
        for h in targets:
            stack.callback(held[h].close)
        with Prober(world["ns"]["op"].name, targets) as probe:
            t0 = time.time()
            for h in targets:
                wait_for(lambda h=h: probe.state_after(t0, h, True), timeout=15, what=f"op reaching {h}")
                wait_for(lambda h=h: held[h].first_echo_after(t0), timeout=15, what=f"the held connection to {h}")

            # 1. unconfirmed: cut on every daemon before the deadline, restored by itself after it
            t_apply = time.time()
            res = _cli(world, "policies", "apply", "-c", ops, pol, "--confirm-within", "5")
            assert res.returncode == 0 and "rolls it back" in res.stdout, res.stderr
            deadline = json.loads(zk.get(f"{PREFIX}/config/pending")[0])["deadline"]
            cut = _all_reach(probe, t_apply, False, deadline, "cut before the deadline")
            back = _all_reach(probe, cut, True, deadline + 6, "restored within 6 s of the deadline")
            for h in targets:
                # from the cut to the restoration every probe failed, and none succeeded before the deadline
                between = [ok for ts, ok in probe.since(cut[h], h) if ts < back[h]]
                assert between and not any(between), h
                assert back[h] >= deadline - 0.05, (h, back[h] - deadline)
            # the rollback took effect after the last failed probe started and before the first good one
            last_cut = {h: max(ts for ts, ok in probe.since(cut[h], h) if ts < back[h]) for h in targets}
            print(f"\nconfirm-within 5: written {deadline - 5 - t_apply:+.2f} s after the CLI started; "
                  + "; ".join(f"{h}: cut {cut[h] - (deadline - 5):.2f} s after the write, new connections back "
                              f"between {last_cut[h] - deadline:+.2f} and {back[h] - deadline:+.2f} s after the "
                              "deadline" for h in targets))
            # the held connections: nothing written from just after the cut to just before the deadline
            # came back before the deadline; then the same connection carried on (TCP's retransmission
            # timer decides when after the rollback), every line echoed, in order
            resumed = {h: wait_for(lambda h=h: held[h].first_echo_after(deadline), timeout=deadline + 20 - time.time(),
                                   interval=0.05, what=f"the held connection to {h} carrying on") for h in targets}
            window = {h: [i for i, at in enumerate(held[h].sent) if max(cut.values()) + 0.5 <= at <= deadline - 0.5]
                      for h in targets}
            assert all(window.values()), window
            wait_for(lambda: all(len(held[h].echoed) > window[h][-1] for h in targets), timeout=20,
                     what="the lines written during the cut echoed")
            for h in targets:
                arrived = dict(held[h].echoed)
                assert all(arrived[i] >= deadline - 0.05 for i in window[h]), h
            for h in targets:
                assert [i for i, _ in held[h].echoed] == list(range(len(held[h].echoed))), h
            print("held connections: carried on " + ", ".join(f"{h} {resumed[h] - deadline:.2f} s" for h in targets)
                  + " after the deadline (TCP retransmission backoff included)")
            # the cut was the datapath dropping op's packets for the policy, on every daemon
            drops = {n: _maps(d)["ovl_counters"]["entries"]["drop_policy"] for n, d in world["daemons"].items()}
            assert all(drops[n] > drops0[n] for n in drops), (drops0, drops)
            # ZooKeeper still holds the change until someone writes the rollback
            res = _cli(world, "policies", "rollback", "-c", ops)
            assert res.returncode == 0, res.stderr
            assert zk.get_children(f"{PREFIX}/policies") == ["op-svc"]
            assert zk.exists(f"{PREFIX}/config/pending") is None

            # 2. confirmed: the cut stays past its deadline
            t_apply = time.time()
            res = _cli(world, "policies", "apply", "-c", ops, pol, "--confirm-within", "12")
            assert res.returncode == 0, res.stderr
            deadline = json.loads(zk.get(f"{PREFIX}/config/pending")[0])["deadline"]
            cut = _all_reach(probe, t_apply, False, deadline, "cut")
            res = _cli(world, "policies", "confirm", "-c", ops)
            assert res.returncode == 0 and "confirmed" in res.stdout, res.stderr
            assert time.time() < deadline, "confirmed too late to show anything"
            time.sleep(max(0.0, deadline + 3 - time.time()))
            for h in targets:
                after = probe.since(cut[h], h)
                assert after and after[-1][0] > deadline + 2 and not any(ok for _, ok in after), h
            for h in targets:     # the held connections are cut again for good
                assert held[h].first_echo_after(cut[h] + 0.5) is None, h
    assert zk.get_children(f"{PREFIX}/policies") == ["op-other"]
    print(f"confirmed: still cut {time.time() - deadline:.1f} s after its deadline on every daemon")
