"""Datapath conformance: one suite, the same expectations, every backend.

Each backend gets the same topology (an emulation, in namespaces named
``ovl-conf-<backend>-<pid>-*``; nothing touches the root namespace)::

    network A (10.0.0.0/24)                network B (10.0.0.0/24: the overlap)
    h1 10.0.0.1 --+                         h3 10.0.0.11 --- edgeB 10.0.0.254
    h2 10.0.0.2 --+- br0 in "sw"                                | 1:1 NAT
    h4 10.0.0.4 --+  10.0.0.254, 1:1 NAT                        | 198.18.2.0/24
    (outsider)       198.18.1.0/24 ------- wan 198.18.0.0/30 ---+

h1..h3 are members: each runs the datapath, programmed through the real pure
core as the daemon's agent does (``config_from_dict`` -> ``Node`` -> ``plan``
-> ``diff`` against ``observe()`` -> ``apply``, in a process inside the
namespace, see tests/support/conformance.py), with ``reject_all: true``, an open
port (8080, TCP and UDP) and an ``ssh_whitelist`` holding the outsider's
addresses. h4 is an outsider running no datapath. Checksum offload is off on
every veth (the backend's own included).

:data:`MATRIX` is the one table of expected verdicts, checked against both
backends: TCP, UDP and ICMP echo from every host to every member's overlay
address (and to an overlay address with no peer), to the same-network
private addresses and to the other network's public addresses.

``ebpf-socket`` is the eBPF backend in socket mode (``datapath.mode: socket``): every
process of the lab runs in a cgroup-v2 directory of the test's own
(tests/support/cgroups.py), which is each member's ``datapath.cgroup``; the three
members' programs share it, each translating only its own namespace's sockets. The same
table holds, with the same counters (ICMP takes the tc path).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import time

import pytest

from tests.support.cgroups import joining, own_cgroup
from tests.support.netns import HelperNetns
from tests.support.paths import program
from tests.support.twonets import wire_networks

pytestmark = [pytest.mark.root, pytest.mark.timeout(360)]  # a bound: three bcc compiles at once on a loaded machine

SUPPORT = program("conformance")
SERVER = program("iptctl")  # "serve PORT...": TCP and UDP, answers "<peer ip>\n"

# variant -> short name in namespace names; a variant is a backend, or "ebpf-socket"
BACKENDS = {"ebpf": "ebpf", "iptables": "ipt", "ebpf-socket": "ebs"}
SUBNET = "192.168.0.0/18"
NO_PEER = "192.168.0.77"  # in the subnet, nobody's overlay address
SERVICE, OPEN, SSH = 7000, 8080, 22
ECHO, ECHO_OPEN = 7001, 8081  # UDP echo servers on h1: members only, and an open port

HOSTS = {
    "h1": {"network": "A", "private": "10.0.0.1", "public": "198.18.1.1", "overlay": "192.168.0.1"},
    "h2": {"network": "A", "private": "10.0.0.2", "public": "198.18.1.2", "overlay": "192.168.0.2"},
    "h3": {"network": "B", "private": "10.0.0.11", "public": "198.18.2.11", "overlay": "192.168.0.3"},
    "h4": {"network": "A", "private": "10.0.0.4", "public": "198.18.1.4", "overlay": None},
}
MEMBERS = ("h1", "h2", "h3")
OUTSIDER = "h4"
# IPv6 on network A's link (IPv6 is left on in these namespaces: link-local addresses too);
# the members h1 and h2 publish theirs as private6 (records v2), the outsider has one too
V6 = {"h1": "2001:db8:a::1", "h2": "2001:db8:a::2", "h4": "2001:db8:a::4"}
MEMBERS6 = ("h1", "h2")
SSH_WHITELIST = ["10.0.0.4/32", "198.18.1.4/32"]  # the outsider, as either network sees it

# -- the expectations: ONE table for every backend -------------------------------------
#
# Targets: "ovl:X" X's overlay address ("ovl:none": NO_PEER), "prv:X" X's private
# address (same network), "pub:X" X's public address (across). Verdicts per column:
# "+" an answer comes back, "-" none does (dropped, refused or unreachable).
# For every "+": the client's view of the other end (TCP getpeername, the source of
# the UDP and ICMP replies) is exactly the target address, and a TCP/UDP server saw
# the "server sees" address: the client's private address within a network, its
# public one across. SELF: a host talking to its own overlay address; the server
# sees one of the host's own addresses (which one is the kernel's local source
# choice: the overlay address where it is configured on a device, else private).

COLUMNS = (("tcp", SERVICE), ("udp", SERVICE), ("tcp", OPEN), ("udp", OPEN),
           ("tcp", SSH), ("udp", SSH), ("icmp", 0))
SELF = "self"

MATRIX = (
    # source  target      tcp udp tcp udp tcp udp icmp    server sees
    #                     7000    8080    22
    ("h1", "ovl:h1",   "+ + + + + + +", SELF),
    ("h1", "ovl:h2",   "+ + + + + + +", "10.0.0.1"),
    ("h1", "ovl:h3",   "+ + + + + + +", "198.18.1.1"),
    ("h1", "ovl:none", "- - - - - - -", None),
    ("h1", "prv:h2",   "+ + + + + + +", "10.0.0.1"),
    ("h1", "prv:h4",   "+ + + + + + +", "10.0.0.1"),     # members -> outsider: open
    ("h1", "pub:h3",   "+ + + + + + +", "198.18.1.1"),
    ("h2", "ovl:h1",   "+ + + + + + +", "10.0.0.2"),
    ("h2", "ovl:h2",   "+ + + + + + +", SELF),
    ("h2", "ovl:h3",   "+ + + + + + +", "198.18.1.2"),
    ("h2", "ovl:none", "- - - - - - -", None),
    ("h2", "prv:h1",   "+ + + + + + +", "10.0.0.2"),
    ("h2", "prv:h4",   "+ + + + + + +", "10.0.0.2"),
    ("h2", "pub:h3",   "+ + + + + + +", "198.18.1.2"),
    ("h3", "ovl:h1",   "+ + + + + + +", "198.18.2.11"),
    ("h3", "ovl:h2",   "+ + + + + + +", "198.18.2.11"),
    ("h3", "ovl:h3",   "+ + + + + + +", SELF),
    ("h3", "ovl:none", "- - - - - - -", None),
    ("h3", "pub:h1",   "+ + + + + + +", "198.18.2.11"),
    ("h3", "pub:h2",   "+ + + + + + +", "198.18.2.11"),
    ("h3", "pub:h4",   "+ + + + + + +", "198.18.2.11"),
    # the outsider: no datapath, so no route to the overlay subnet; under reject_all
    # only the open port (TCP and UDP) and SSH from the whitelist (TCP only) get in
    ("h4", "ovl:h1",   "- - - - - - -", None),
    ("h4", "ovl:h2",   "- - - - - - -", None),
    ("h4", "ovl:h3",   "- - - - - - -", None),
    ("h4", "prv:h1",   "- - + + + - -", "10.0.0.4"),
    ("h4", "prv:h2",   "- - + + + - -", "10.0.0.4"),
    ("h4", "pub:h3",   "- - + + + - -", "198.18.1.4"),
)

SHARED_COUNTERS = ("drop_no_peer", "drop_not_allowed", "pass_failsafe", "pass_established",
                   "pass_loopback", "pass_member", "pass_open_port", "pass_default", "drop_martian",
                   "pass_ndp")


def expected_counts(name: str, backend: str = "iptables") -> tuple[dict[str, int], dict[str, int]]:
    """(exact, at least) growth of member ``name``'s counters while MATRIX runs.

    Derived from the table: the first packet of a flow to ``name`` is credited to
    the filter step that passes it (members before open ports), and a dropped
    flow costs at least one packet. Later packets of an admitted flow: iptables
    credits them to ``pass_established`` (the kernel's conntrack), so the first
    packets are exact; the eBPF datapath tracks only flows this host initiated
    and judges every packet of the others again (revocation applies to the next
    packet), so there the first-packet counts are lower bounds.
    """
    exact = {"pass_member": 0, "pass_open_port": 0, "pass_default": 0}
    at_least = {"drop_no_peer": 0, "drop_not_allowed": 0, "pass_failsafe": 0, "pass_established": 1}
    for src, target, verdicts, _sees in MATRIX:
        kind, _, dst = target.partition(":")
        for (proto, port), v in zip(COLUMNS, verdicts.split(), strict=True):
            if target == "ovl:none":
                at_least["drop_no_peer"] += src == name
            elif dst != name or src == name or (src == OUTSIDER and kind == "ovl"):
                continue  # not to this host, local, or never sent (no route)
            elif src in MEMBERS:
                exact["pass_member"] += 1
            elif v == "-":
                at_least["drop_not_allowed"] += 1
            elif (proto, port) == ("tcp", SSH):
                at_least["pass_failsafe"] += 1
            else:
                exact["pass_open_port"] += 1
    if backend == "ebpf":
        at_least.update(exact)
        exact = {"pass_default": 0}
    return exact, at_least


def address_of(target: str) -> str:
    kind, _, name = target.partition(":")
    if target == "ovl:none":
        return NO_PEER
    return HOSTS[name][{"ovl": "overlay", "prv": "private", "pub": "public"}[kind]]


# -- environment -------------------------------------------------------------------------


def _require(backend: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, iptables, eBPF)")
    tools = ["ip", "ethtool", "nsenter", "tc", "iptables", "iptables-save", "iptables-restore", "ipset"]
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if backend.startswith("ebpf"):
        if not os.path.ismount("/sys/fs/bpf"):
            pytest.skip("bpffs is not mounted at /sys/fs/bpf")
        pytest.importorskip("bcc", reason="bcc (python3-bpfcc) is not installed")


class Agent:
    """The per-host control process (tests.support.conformance agent); bounded reads."""

    def __init__(self, ns: HelperNetns, log_path: str):
        self.ns = ns
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = ns.popen(*SUPPORT, "agent", stdin=subprocess.PIPE,
                             stderr=self._log, text=True)

    def send(self, cmd: str, **kw) -> None:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float = 30) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"[{self.ns.name}] agent: no answer in {timeout} s\n{self.stderr()}")
        out = json.loads(line)
        assert out["ok"], f"[{self.ns.name}] {out.get('trace') or out}"
        return out

    def call(self, cmd: str, timeout: float = 30, **kw) -> dict:
        self.send(cmd, **kw)
        return self.receive(timeout)

    def stderr(self) -> str:
        with contextlib.suppress(OSError), open(self.log_path) as f:
            return f.read()[-3000:]
        return ""

    def stop(self) -> None:
        """Quit (the datapath stays in place, as when the daemon stops)."""
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)
        self._log.close()


class ConformanceLab:
    """The topology above for one backend; every object it makes is removed by close()."""

    def __init__(self, variant: str, cgroup: str | None = None):
        self.variant = variant
        self.backend = "ebpf" if variant == "ebpf-socket" else variant
        self.cgroup = cgroup    # socket mode: every process of the lab runs in it
        self.prefix = f"ovl-conf-{BACKENDS[variant]}-{os.getpid()}-"
        self.pin_base = f"/sys/fs/bpf/overlay/conf-{os.getpid()}"
        self.made_overlay_dir = not os.path.exists("/sys/fs/bpf/overlay")
        self.log_dir = f"/tmp/{self.prefix}logs"
        self.ns: dict[str, HelperNetns] = {}
        self.agents: dict[str, Agent] = {}
        self.servers: list[subprocess.Popen] = []
        self.started: dict[str, dict] = {}
        self.first: dict[str, dict] = {}

    # -- build --

    def _netns(self, name: str) -> HelperNetns:
        ns = HelperNetns.add(self.prefix + name)
        if self.cgroup:
            cmd, cgroup = ns.cmd, self.cgroup
            ns.cmd = lambda *argv: joining(cgroup, cmd(*argv))
        self.ns[name] = ns
        return ns

    def build(self) -> None:
        for name in ("sw", "edgeB", *HOSTS):
            self._netns(name)
        wire_networks(self.ns, HOSTS)
        for name, addr in V6.items():
            self.ns[name].run("ip", "-6", "addr", "add", f"{addr}/64", "dev", "eth0", "nodad")
        for _ in range(10):  # the bridge forwards once its ports are up; bounded
            if self.probe({"h1": [{"proto": "icmp", "host": "10.0.0.2"}]}, timeout=1.0)["h1"][0]["ok"]:
                break
        self.link_local = {name: self.wait_link_local(name) for name in V6}

    def wait_link_local(self, name: str) -> str:
        """eth0's fe80:: address once DAD is done (bounded)."""
        for _ in range(50):
            out = self.ns[name].run("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link").stdout
            if out and "tentative" not in out:
                return out.split()[3].split("/")[0]
            time.sleep(0.1)
        raise AssertionError(f"{name}: no link-local address on eth0: {out!r}")

    def mac(self, name: str) -> str:
        # not /sys/class/net: nsenter --net keeps the root namespace's sysfs mount
        out = self.ns[name].run("ip", "-o", "link", "show", "dev", "eth0").stdout.split()
        return out[out.index("link/ether") + 1]

    def config(self, name: str) -> dict:
        h = HOSTS[name]
        return {
            "node_id": name,
            "network": h["network"],
            "overlay_subnet": SUBNET,
            "addresses": {"private": h["private"], "public": h["public"], "overlay": h["overlay"],
                          **({"private6": V6[name]} if name in MEMBERS6 else {})},
            "registry": {"backend": "static", "peers": [
                {"node_id": m, "network": HOSTS[m]["network"], "private": HOSTS[m]["private"],
                 "public": HOSTS[m]["public"], "overlay": HOSTS[m]["overlay"],
                 **({"private6": V6[m]} if m in MEMBERS6 else {})} for m in MEMBERS
            ]},
            "datapath": {"backend": self.backend, "interface": "eth0", "overlay_device": "ovl0",
                         **({"mode": "socket", "cgroup": self.cgroup} if self.cgroup else {}),
                         "pin_root": f"{self.pin_base}/{name}",
                         "sizes": {"nat": 1024, "peers": 1024, "conntrack": 16384, "failsafe": 64}},
            "filter": {"reject_all": True, "open_ports": [OPEN, ECHO_OPEN], "ssh_whitelist": SSH_WHITELIST},
        }

    def offload_off_everywhere(self, name: str) -> None:
        """Checksum offload off on every veth of the namespace (the backend's too)."""
        out = self.ns[name].run("ip", "-o", "link", "show", "type", "veth").stdout
        for line in out.splitlines():
            dev = line.split(":")[1].strip().split("@")[0]
            self.ns[name].offload_off(dev)

    def start(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        for name in HOSTS:
            proc = self.ns[name].popen(*SERVER, "serve", str(SERVICE), str(OPEN), str(SSH),
                                       text=True, stderr=subprocess.DEVNULL)
            self.servers.append(proc)
        for proc in self.servers:
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready and proc.stdout.readline().strip() == "ready", "a server did not start"
        self.echo_path = os.path.join(self.log_dir, "h1-echo.jsonl")
        with open(self.echo_path, "w") as out:
            self.servers.append(self.ns["h1"].popen(*SUPPORT, "echo", str(ECHO), str(ECHO_OPEN),
                                                    stdout=out, stderr=subprocess.DEVNULL))
        self.echo_offset = 0
        assert self.echo_seen(wait=30, until_ready=True), "the echo server did not start"
        for name in MEMBERS:
            self.agents[name] = self.new_agent(name, "agent")
        for name in MEMBERS:  # in parallel: the eBPF programs compile concurrently
            self.agents[name].send("start", config=self.config(name))
        for name in MEMBERS:
            self.started[name] = self.agents[name].receive(timeout=240)  # three compiles at once, bounded
            self.offload_off_everywhere(name)
        for name in MEMBERS:
            self.first[name] = self.agents[name].call("program")

    def new_agent(self, name: str, tag: str) -> Agent:
        return Agent(self.ns[name], os.path.join(self.log_dir, f"{name}-{tag}.log"))

    # -- use --

    def probe(self, batches: dict[str, list[dict]], timeout: float = 2.0) -> dict[str, list[dict]]:
        """Run each host's probes in parallel (all hosts at once); bounded."""
        procs = {
            src: self.ns[src].popen(*SUPPORT, "probe",
                                    json.dumps({"probes": items, "timeout": timeout}), text=True)
            for src, items in batches.items()
        }
        out = {}
        for src, proc in procs.items():
            try:
                stdout, stderr = proc.communicate(timeout=timeout + 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate(timeout=5)
                raise AssertionError(f"{src}: probes did not finish") from None
            assert proc.returncode == 0, f"{src}: probe failed: {stderr}"
            out[src] = json.loads(stdout.strip().splitlines()[-1])
        return out

    def counters(self) -> dict[str, dict[str, int]]:
        return {name: self.agents[name].call("counters")["counters"] for name in MEMBERS}

    def run_json(self, name: str, *argv: str, timeout: float = 30) -> dict:
        out = self.ns[name].run(*SUPPORT, *argv, timeout=timeout).stdout
        return json.loads(out.strip().splitlines()[-1])

    def echo_seen(self, wait: float = 1.5, until_ready: bool = False) -> list[dict]:
        """What h1's echo server received since the last call, after ``wait`` seconds
        (or, ``until_ready``, as soon as it says it is ready; bounded by ``wait``)."""
        deadline = time.monotonic() + wait
        while True:
            with open(self.echo_path) as f:
                f.seek(self.echo_offset)
                text = f.read()
            done = text.endswith("\n") and (not until_ready or '"ready"' in text)
            if (until_ready and done) or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        text = text[: text.rfind("\n") + 1]
        self.echo_offset += len(text.encode())
        return [json.loads(line) for line in text.splitlines()]

    # -- remove --

    def close(self) -> None:
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                agent.stop()
        for proc in self.servers:
            proc.kill()
        deadline = time.monotonic() + 5
        for proc in self.servers:
            with contextlib.suppress(Exception):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for ns in reversed(list(self.ns.values())):
            ns.delete()
        shutil.rmtree(self.pin_base, ignore_errors=True)
        if self.made_overlay_dir:
            with contextlib.suppress(OSError):
                os.rmdir("/sys/fs/bpf/overlay")  # only if we made it and it is empty
        shutil.rmtree(self.log_dir, ignore_errors=True)


@pytest.fixture(scope="module", params=list(BACKENDS))
def lab(request):
    variant = request.param
    _require(variant)
    with contextlib.ExitStack() as stack:
        cgroup = stack.enter_context(own_cgroup("conf"))[0] if variant == "ebpf-socket" else None
        lab = ConformanceLab(variant, cgroup)
        try:
            lab.build()
            lab.start()
            yield lab
        finally:
            lab.close()


def run_matrix(lab: ConformanceLab) -> dict:
    batches: dict[str, list[dict]] = {}
    cells: dict[str, list[tuple]] = {}
    for src, target, _verdicts, _sees in MATRIX:
        for proto, port in COLUMNS:
            batches.setdefault(src, []).append({"proto": proto, "host": address_of(target), "port": port})
            cells.setdefault(src, []).append((src, target, proto, port))
    before = lab.counters()
    got = lab.probe(batches)
    after = lab.counters()
    results = {}
    for src, keys in cells.items():
        results.update(zip(keys, got[src], strict=True))
    return {"results": results, "before": before, "after": after}


@pytest.fixture(scope="module")
def matrix(lab):
    return run_matrix(lab)


def _render(results: dict) -> list[str]:
    """The actual matrix in MATRIX's format (for the failure message)."""
    rows = []
    for src, target, _v, _s in MATRIX:
        cells = [results[(src, target, proto, port)] for proto, port in COLUMNS]
        verdicts = " ".join("+" if c["ok"] else "-" for c in cells)
        sees = sorted({c["seen"] for c in cells if c["ok"] and c["seen"]})
        rows.append(f"{src} {target:<9} {verdicts}  {','.join(sees) or '-'}")
    return rows


# -- the tests -----------------------------------------------------------------------------


def test_matrix_table_is_consistent():
    """The table's own rules (catches typos in it, not backend behaviour)."""
    seen = set()
    for src, target, verdicts, sees in MATRIX:
        assert (src, target) not in seen, (src, target)
        seen.add((src, target))
        assert len(verdicts.split()) == len(COLUMNS), (src, target)
        assert (sees is None) == ("+" not in verdicts), (src, target)
        kind, _, dst = target.partition(":")
        if kind == "prv":
            assert HOSTS[src]["network"] == HOSTS[dst]["network"], (src, target)
        if kind == "pub":
            assert HOSTS[src]["network"] != HOSTS[dst]["network"], (src, target)
        if sees not in (None, SELF):
            same = kind == "prv" or (kind == "ovl" and HOSTS[src]["network"] == HOSTS[dst]["network"])
            assert sees == HOSTS[src]["private" if same else "public"], (src, target)


def test_programmed_through_the_pure_core(lab):
    for name in MEMBERS:
        assert lab.started[name]["backend"] == lab.backend
        first = lab.first[name]
        assert first["ops"], name  # a fresh host: everything is new
        assert first["peers"] == [m for m in MEMBERS if m != name]
        assert first["excluded"] == []


def test_connectivity_matrix(lab, matrix):
    results = matrix["results"]
    problems = []
    for src, target, verdicts, sees in MATRIX:
        addr = address_of(target)
        for (proto, port), want in zip(COLUMNS, verdicts.split(), strict=True):
            got = results[(src, target, proto, port)]
            cell = f"{src} -> {target} {addr} {proto}/{port}"
            if want == "-":
                if got["ok"]:
                    problems.append(f"{cell}: expected no answer, got one (server saw {got['seen']})")
                continue
            if not got["ok"]:
                problems.append(f"{cell}: expected an answer, got {got['error']}")
                continue
            if got["peer"] != addr:
                problems.append(f"{cell}: the client saw the other end as {got['peer']}, not {addr}")
            if proto == "icmp":
                continue
            if sees == SELF:
                own = {HOSTS[src]["private"], HOSTS[src]["overlay"]}
                if got["seen"] not in own:
                    problems.append(f"{cell}: the server saw {got['seen']}, not one of {sorted(own)}")
            elif got["seen"] != sees:
                problems.append(f"{cell}: the server saw {got['seen']}, expected {sees}")
    expected = [f"{s} {t:<9} {v}  {e or '-'}" for s, t, v, e in MATRIX]
    assert not problems, (
        f"backend {lab.backend}: {len(problems)} cells differ\n" + "\n".join(problems)
        + "\n\nexpected:\n" + "\n".join(expected) + "\n\nactual:\n" + "\n".join(_render(results))
    )


def test_counters(lab, matrix):
    """The shared counter names, grown as the table implies (same numbers for every backend)."""
    before, after = matrix["before"], matrix["after"]
    problems = []
    for name in MEMBERS:
        missing = [c for c in SHARED_COUNTERS if c not in after[name]]
        if missing:
            problems.append(f"{name}: counters() lacks {missing}")
            continue
        delta = {c: after[name][c] - before[name].get(c, 0) for c in SHARED_COUNTERS}
        exact, at_least = expected_counts(name, lab.backend)
        for c, n in exact.items():
            if delta[c] != n:
                problems.append(f"{name}: {c} grew by {delta[c]}, expected {n}")
        for c, n in at_least.items():
            if delta[c] < n:
                problems.append(f"{name}: {c} grew by {delta[c]}, expected at least {n}")
    if lab.variant == "ebpf-socket":
        # the TCP and UDP cells to other members' overlay addresses were translated at
        # the socket: none of them through ovl0 (only ICMP echo and "ovl:none" are)
        for name in MEMBERS:
            d = {c: after[name].get(c, 0) - before[name].get(c, 0)
                 for c in ("sock_connect", "sock_sendmsg", "nat_egress")}
            others = sum(1 for src, target, _v, _s in MATRIX
                         if src == name and target.startswith("ovl:h") and target != f"ovl:{name}")
            tcp_udp = sum(1 for proto, _port in COLUMNS if proto != "icmp")
            if d["sock_connect"] + d["sock_sendmsg"] < others * tcp_udp:
                problems.append(f"{name}: {d}: fewer socket translations than {others * tcp_udp} TCP/UDP cells")
    assert not problems, f"backend {lab.variant}:\n" + "\n".join(problems)


# -- IPv6, fragments, martians, revocation: the same rows for every backend ------------------
#
# Where a backend cannot hold a row the way the other does, the row names the backend and
# docs/datapath.md ("What the iptables backend covers") says why.

COLUMNS6 = (("tcp", SERVICE), ("udp", SERVICE), ("tcp", OPEN), ("udp", OPEN), ("tcp", SSH))
IPV6_ROWS = (
    # source target    tcp udp tcp udp tcp   (7000, 8080 open, 22)
    ("h2", "v6:h1", "+ + + + +"),   # a member, by its private6 (records v2)
    ("h4", "v6:h1", "- - + + -"),   # an outsider: the open port only (the ssh whitelist is IPv4)
    ("h4", "ll:h1", "- - + + -"),   # the same to h1's link-local address
    ("h2", "ll:h1", "- - + + -"),   # a member's link-local address is not its member address
    ("h1", "v6:h4", "+ + + + +"),   # a flow h1 opens: its replies pass as established
)


def test_ipv6_rows(lab):
    """IPv6 is judged like IPv4 under reject_all; NDP keeps the link working."""
    def addr(target: str) -> str:
        kind, _, name = target.partition(":")
        return V6[name] if kind == "v6" else f"{lab.link_local[name]}%eth0"

    before = lab.counters()
    batches: dict[str, list[dict]] = {}
    for src, target, _v in IPV6_ROWS:
        for proto, port in COLUMNS6:
            batches.setdefault(src, []).append({"proto": proto, "host": addr(target), "port": port})
    got = lab.probe(batches)
    problems = []
    index = dict.fromkeys(batches, 0)
    for src, target, verdicts in IPV6_ROWS:
        kind, _, dst = target.partition(":")
        source = V6[src] if kind == "v6" else lab.link_local[src]
        for (proto, port), want in zip(COLUMNS6, verdicts.split(), strict=True):
            cell = got[src][index[src]]
            index[src] += 1
            where = f"{src} -> {target} {proto}/{port}"
            if (want == "+") != cell["ok"]:
                problems.append(f"{where}: expected {'an answer' if want == '+' else 'none'}: {cell}")
            elif want == "+" and (cell["peer"] != addr(target).split("%")[0] or cell["seen"] != source):
                problems.append(f"{where}: peer {cell['peer']}, server saw {cell['seen']} (want {source})")
    assert not problems, f"backend {lab.backend}:\n" + "\n".join(problems)
    after = lab.counters()
    assert after["h1"]["pass_ndp"] > before["h1"]["pass_ndp"], "neighbour discovery passed uncounted"


# nmap -f / -ff style SYNs from the outsider: (fragment size, port, answered per backend).
# The eBPF filter judges a first fragment too short for the whole TCP header on its
# addresses and ports alone (never as part of an established flow): to an open port it
# passes, as the whole SYN would, to a closed one it is dropped (frag_short). iptables'
# conntrack match has the kernel reassemble the datagram before the filter table, which
# then judges the whole SYN. Either way the outsider learns exactly what a plain SYN scan
# tells it, and nothing more.
FRAG_SYN_ROWS = (
    (8, SERVICE, {"ebpf": False, "iptables": False}),
    (16, SERVICE, {"ebpf": False, "iptables": False}),
    (8, OPEN, {"ebpf": True, "iptables": True}),
    (16, OPEN, {"ebpf": True, "iptables": True}),
    (24, OPEN, {"ebpf": True, "iptables": True}),   # not cut: the whole 24-byte header fits
)


def test_fragments(lab):
    """Datagrams larger than the MTU pass in every fragment where the datagram is
    allowed (translated both ways through the overlay), and are refused where it is not;
    tiny first fragments never open a closed port."""
    big = 4000
    got = lab.probe({
        "h2": [{"proto": "udp", "host": HOSTS["h1"]["overlay"], "port": ECHO, "size": big}],
        "h3": [{"proto": "udp", "host": HOSTS["h1"]["overlay"], "port": ECHO, "size": big}],
        "h4": [{"proto": "udp", "host": HOSTS["h1"]["private"], "port": ECHO, "size": big},
               {"proto": "udp", "host": HOSTS["h1"]["private"], "port": ECHO_OPEN, "size": big}],
    }, timeout=3.0)
    assert got["h2"][0]["ok"] and got["h2"][0]["peer"] == HOSTS["h1"]["overlay"], got["h2"]
    assert got["h3"][0]["ok"] and got["h3"][0]["peer"] == HOSTS["h1"]["overlay"], got["h3"]
    assert not got["h4"][0]["ok"], "an outsider's fragmented datagram to a closed port got an answer"
    assert got["h4"][1]["ok"] and got["h4"][1]["peer"] == HOSTS["h1"]["private"], got["h4"]
    lab.echo_seen(wait=0.2)
    before = lab.counters()["h1"]
    rows = []
    for size, port, want in FRAG_SYN_ROWS:
        res = lab.run_json("h4", "fragsyn", json.dumps({"dst": HOSTS["h1"]["private"], "dport": port,
                                                        "size": size, "timeout": 1.5}))
        rows.append((size, port, res["answered"], want[lab.backend]))
    assert [r[2] for r in rows] == [r[3] for r in rows], f"backend {lab.backend}: {rows}"
    after = lab.counters()["h1"]
    if lab.backend == "ebpf":
        # the two short SYNs to the closed port, each dropped at its first fragment
        assert after["drop_frag_short"] - before["drop_frag_short"] >= 2


def test_martians(lab):
    """Datagrams from the wire with a loopback source or one of h1's own addresses never
    reach a service, even on an open port; a real source does."""
    own4 = [HOSTS["h1"]["private"], HOSTS["h1"]["overlay"], HOSTS["h1"]["public"]]
    spoofed = [{"src": s, "dst": HOSTS["h1"]["private"], "dport": ECHO_OPEN} for s in ["127.0.0.1", *own4]]
    spoofed += [{"src": s, "dst": V6["h1"], "dport": ECHO_OPEN} for s in ["::1", V6["h1"]]]
    control = [{"src": HOSTS["h4"]["private"], "dst": HOSTS["h1"]["private"], "dport": ECHO_OPEN},
               {"src": V6["h4"], "dst": V6["h1"], "dport": ECHO_OPEN}]
    lab.echo_seen(wait=0.2)
    before = lab.counters()["h1"]
    sent = lab.run_json("h4", "spoof", json.dumps({"iface": "eth0", "dst_mac": lab.mac("h1"),
                                                   "datagrams": spoofed + control}))
    assert sent["sent"] == len(spoofed) + len(control)
    seen = {e["from"] for e in lab.echo_seen(wait=1.5)}
    assert seen == {HOSTS["h4"]["private"], V6["h4"]}, f"backend {lab.backend}: the service saw {seen}"
    grew = lab.counters()["h1"]["drop_martian"] - before["drop_martian"]
    # eBPF sees every one on the uplink before the stack; with iptables the kernel's own
    # martian check drops IPv4 loopback and own sources (and ::1) during routing, before
    # the filter table, so only the IPv6 own-address rule counts (docs/datapath.md)
    want = len(spoofed) if lab.backend == "ebpf" else 1
    assert grew >= want, f"backend {lab.backend}: drop_martian grew by {grew}, want >= {want}"


def test_revocation_of_a_removed_peer(lab):
    """h2 reaches h1 from fixed source ports (a TCP connection, a UDP flow with replies);
    h1's registry view drops h2; within that one apply the same 4-tuples are refused,
    IPv4 and IPv6; with h2 back they pass again."""
    def probes():
        return lab.probe({"h2": [
            {"proto": "tcp", "host": HOSTS["h1"]["private"], "port": SERVICE, "sport": 45000},
            {"proto": "udp", "host": HOSTS["h1"]["private"], "port": ECHO, "sport": 45001, "size": 100},
            {"proto": "tcp", "host": V6["h1"], "port": SERVICE, "sport": 45002},
            {"proto": "udp", "host": V6["h1"], "port": ECHO, "sport": 45003, "size": 100},
        ]}, timeout=1.5)["h2"]

    assert [p["ok"] for p in probes()] == [True] * 4
    removed = lab.agents["h1"].call("program", members=["h1", "h3"])
    assert removed["peers"] == ["h3"] and removed["ops"]
    try:
        assert [p["ok"] for p in probes()] == [False] * 4, f"backend {lab.backend}: a removed peer got in"
    finally:
        assert lab.agents["h1"].call("program")["peers"] == ["h2", "h3"]
    assert [p["ok"] for p in probes()] == [True] * 4


def test_reapply_same_plan_yields_no_ops(lab):
    for name in MEMBERS:
        assert lab.agents[name].call("program")["ops"] == [], name


def test_restarted_agent_adopts_with_no_ops(lab):
    """A new process (a restarted daemon) starts, observes the installed state and
    finds nothing to do; traffic through the overlay still flows."""
    for name in MEMBERS:
        agent = lab.new_agent(name, "restart")
        try:
            agent.call("start", timeout=90, config=lab.config(name))
            assert agent.call("program")["ops"] == [], name
            agent.call("close")
        finally:
            agent.stop()
    got = lab.probe({"h1": [{"proto": "tcp", "host": HOSTS["h3"]["overlay"], "port": SERVICE}],
                     "h3": [{"proto": "udp", "host": HOSTS["h2"]["overlay"], "port": SERVICE}]})
    assert got["h1"][0]["ok"] and got["h1"][0]["seen"] == HOSTS["h1"]["public"], got
    assert got["h3"][0]["ok"] and got["h3"][0]["peer"] == HOSTS["h2"]["overlay"], got


def footprint(lab: ConformanceLab, name: str) -> dict[str, str]:
    """What either backend could leave behind in a member's namespace, non-empty only."""
    ns = lab.ns[name]

    def sh(*argv: str) -> str:
        return ns.run(*argv).stdout.strip()

    found = {
        "iptables": "\n".join(ln for ln in sh("iptables-save").splitlines() if "OVERLAY" in ln),
        "ipset": sh("ipset", "list", "-n"),
        "routes": "\n".join(filter(None, (sh("ip", "-4", "route", "show", "proto", "79"),
                                          sh("ip", "-4", "route", "show", SUBNET)))),
        "addresses": "\n".join(ln for ln in sh("ip", "-4", "-o", "addr").splitlines() if " 192.168." in ln),
        "links": "\n".join(ln for ln in sh("ip", "-o", "link").splitlines() if ": ovl0" in ln),
        "tc": "\n".join(filter(None, (sh("tc", "filter", "show", "dev", "eth0", "ingress"),
                                      sh("tc", "filter", "show", "dev", "eth0", "egress"),
                                      "clsact" if "clsact" in sh("tc", "qdisc", "show", "dev", "eth0") else ""))),
        "pins": "present" if os.path.exists(f"{lab.pin_base}/{name}") else "",
    }
    return {k: v for k, v in found.items() if v}


def test_teardown_leaves_nothing(lab):
    for name in MEMBERS:
        assert footprint(lab, name), f"{name}: the footprint check sees nothing installed"
    for name in MEMBERS:
        lab.agents[name].call("teardown")
    left = {name: fp for name in MEMBERS if (fp := footprint(lab, name))}
    assert not left, f"backend {lab.backend} left: {left}"
    # plain networking is unaffected; overlay addresses are gone with the datapath
    got = lab.probe({"h1": [{"proto": "tcp", "host": HOSTS["h2"]["private"], "port": SERVICE},
                            {"proto": "tcp", "host": HOSTS["h2"]["overlay"], "port": SERVICE}],
                     "h4": [{"proto": "tcp", "host": HOSTS["h1"]["private"], "port": SERVICE}]},
                    timeout=1.0)
    assert got["h1"][0]["ok"] and not got["h1"][1]["ok"], got
    assert got["h4"][0]["ok"], got  # reject_all went with the datapath
