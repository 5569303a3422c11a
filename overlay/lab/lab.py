"""The netns lab: ``up``, ``down``, ``status``, ``check`` (DESIGN §4.3).

Everything lives in network namespaces named ``ovl-lab-*``; nothing is added
to the root namespace. State (process ids, the topology in use, logs,
configs, ZooKeeper's data, the controller's certificates) lives under
``/run/overlay-lab``; the members' pinned BPF objects under
``/sys/fs/bpf/overlay/lab/<host>``. When a network has ``registry: grpc``,
an ``overlay controller`` runs beside ZooKeeper (same namespace, same address)
and that network's daemons use it instead of ZooKeeper.

``up`` is idempotent: on a lab that is up it verifies (and restarts any dead
process) and returns; a half-built lab (a crash, an interrupted ``up``) is
removed and built again. If a step fails, ``up`` removes everything it made
and raises a :class:`LabError` naming the step. ``down`` works from the state
file, from the topology and from a scan of ``ovl-lab-*`` namespaces, so it
cleans up after a crash too.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from overlay import netns as nx
from overlay.lab.topology import (
    NS_PREFIX,
    PIN_DIR,
    RUN_DIR,
    STATUS_LISTEN,
    Host,
    Names,
    Topology,
    iter_links,
    load_topology,
    node_script,
    parse_topology,
    render_config,
    render_controller_config,
)
from overlay.lab.topology import certs_dir as topology_certs_dir

log = logging.getLogger(__name__)


class LabError(nx.NetnsError):
    """The lab could not do what was asked; the message names the step and the cause."""


STATE_VERSION = 1
READY_TIMEOUT = 120.0
ZK_START_TIMEOUT = 60.0
CONTROLLER_START_TIMEOUT = 60.0

Emit = Callable[[str, bool], None]


def _quiet(_text: str, _newline: bool = True) -> None:
    pass


class Lab:
    """One lab: a topology, its run directory, its pin directory and namespace prefix."""

    def __init__(self, topology: str | None = None, *, run_dir: str = RUN_DIR, pin_dir: str = PIN_DIR,
                 prefix: str = NS_PREFIX, emit: Emit | None = None, die_with_parent: bool = False):
        self.topology_arg = topology
        # tests: the lab's processes die with the thread that started them (a killed pytest
        # leaves no daemon behind); `overlay lab up` leaves them running, of course
        self.die_with_parent = die_with_parent
        self.run_dir = run_dir
        self.pin_dir = pin_dir
        self.names = Names(prefix)
        self.emit: Emit = emit or _quiet
        self._zk = None          # the ZooKeeperServer this process started, if any
        self._topo: Topology | None = None
        self._steps = (0, 0)
        self._step_title = ""

    # --- paths and state --------------------------------------------------------------

    @property
    def state_path(self) -> str:
        return os.path.join(self.run_dir, "state.json")

    @property
    def saved_topology_path(self) -> str:
        return os.path.join(self.run_dir, "topology.yaml")

    @property
    def zk_dir(self) -> str:
        return os.path.join(self.run_dir, "zookeeper")

    @property
    def zk_log(self) -> str:
        return os.path.join(self.zk_dir, "zookeeper.log")

    @property
    def certs_dir(self) -> str:
        return topology_certs_dir("netns", self.run_dir)

    @property
    def controller_config_path(self) -> str:
        return os.path.join(self.run_dir, "controller.yaml")

    @property
    def controller_log(self) -> str:
        return os.path.join(self.run_dir, "logs", "controller.log")

    def host_dir(self, host: str) -> str:
        return os.path.join(self.run_dir, "hosts", host)

    def config_path(self, host: str) -> str:
        return os.path.join(self.host_dir(host), "overlay.yaml")

    def daemon_log(self, host: str) -> str:
        return os.path.join(self.run_dir, "logs", f"{host}.log")

    def echo_log(self, host: str) -> str:
        return os.path.join(self.run_dir, "logs", f"echo-{host}.log")

    def load_state(self) -> dict | None:
        try:
            with open(self.state_path, encoding="utf-8") as fh:
                state = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("unreadable lab state %s: %s", self.state_path, exc)
            return {"phase": "broken", "namespaces": [], "procs": {}}
        return state if isinstance(state, dict) else {"phase": "broken", "namespaces": [], "procs": {}}

    def _save_state(self, state: dict) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        tmp = self.state_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=2, sort_keys=True)
        os.replace(tmp, self.state_path)

    def topology(self) -> Topology:
        """The topology of the lab that is up (its saved copy), else the one asked for."""
        if self._topo is None:
            saved = self.saved_topology_path
            state = self.load_state()
            if os.path.exists(saved) and state is not None:
                with open(saved, encoding="utf-8") as fh:
                    self._topo = parse_topology(fh.read(), state.get("topology") or saved)
            else:
                self._topo = load_topology(self.topology_arg)
        return self._topo

    # --- progress ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _step(self, title: str) -> Iterator[list[str]]:
        i, n = self._steps
        i += 1
        self._steps = (i, n)
        self._step_title = title
        self.emit(f"[{i:>2}/{n}] {title} ...", False)
        t0 = time.monotonic()
        notes: list[str] = []
        try:
            yield notes
        except BaseException:
            self.emit(f" FAILED ({time.monotonic() - t0:.2f} s)", True)
            raise
        extra = f" - {'; '.join(notes)}" if notes else ""
        self.emit(f" ok ({time.monotonic() - t0:.2f} s){extra}", True)

    # --- up ---------------------------------------------------------------------------

    def up(self, daemons: bool = True, ready_timeout: float = READY_TIMEOUT) -> dict:
        """Build the lab (or verify and repair the one that is up). Returns :meth:`status`."""
        _require_root("up")
        t0 = time.monotonic()
        state = self.load_state()
        if state is not None:
            topo = self.topology()
            if self.topology_arg and os.path.abspath(self.topology_arg) != os.path.abspath(state.get("topology", "")):
                asked = load_topology(self.topology_arg)
                if asked.text != topo.text:
                    raise LabError(f"a lab built from {state.get('topology')} is up; run `overlay lab down` "
                                   f"before building one from {self.topology_arg}")
            complete = state.get("phase") == "up" and all(nx.exists(ns) for ns in self.names.all(topo))
            if complete and bool(state.get("daemons", True)) == daemons:
                return self._verify(topo, state, t0, ready_timeout)
            self.emit("a previous lab is incomplete or different: removing it first", True)
            self.down()
            self._topo = None
        else:
            leftovers = [ns for ns in nx.list_netns() if ns.startswith(self.names.prefix)]
            if leftovers or os.path.exists(self.run_dir) or os.path.exists(self.pin_dir):
                self.emit("leftovers of an earlier lab found: removing them first", True)
                self.down()
        topo = self.topology()
        members = [h for h in topo.members] if daemons else []
        controller = daemons and topo.controller is not None
        total = (11 if daemons else 7) + int(controller)
        self._steps = (0, total)
        nns = len(self.names.all(topo))
        via = (f", the controller at {topo.controller} for {len(topo.grpc_members)} of them" if controller else "")
        self.emit(f"building the lab from {topo.source}: {len(topo.networks)} networks, {len(topo.hosts)} hosts "
                  f"({len(members)} running the daemon), ZooKeeper at {topo.zookeeper}{via}", True)
        state = {
            "version": STATE_VERSION, "phase": "building", "topology": topo.source, "daemons": daemons,
            "created": time.time(), "namespaces": [], "procs": {}, "overlays": {},
        }
        try:
            with self._step("preflight"):
                self._preflight(daemons)
            os.makedirs(os.path.join(self.run_dir, "logs"), exist_ok=True)
            with open(self.saved_topology_path, "w", encoding="utf-8") as fh:
                fh.write(topo.text)
            self._save_state(state)
            with self._step(f"namespaces ({nns})"):
                self._make_namespaces(topo, state)
            with self._step(f"switches, internet segment and {len(list(iter_links(topo, self.names)))} veth pairs"):
                self._make_links(topo)
            with self._step("addresses, routes, checksum offload off, 1:1 NAT on the edges"):
                self._configure(topo)
            with self._step(f"ZooKeeper at {topo.zookeeper} in {self.names.zookeeper(topo)}"):
                self._start_zookeeper(topo, state)
            with self._step(f"test-port servers on :{topo.test_port} ({len(topo.hosts)})"):
                self._start_echo(topo, state, topo.hosts)
            if controller:
                with self._step(f"controller at {topo.controller} in {self.names.zookeeper(topo)} "
                                f"(mutual TLS, {len(topo.grpc_members)} node certificates)"):
                    self._make_certs(topo)
                    self._start_controller(topo, state)
            if daemons:
                with self._step(f"daemon configs ({len(members)})"):
                    self._write_configs(topo)
                with self._step(f"daemons ({len(members)}, eBPF datapath, reject_all)"):
                    self._start_daemons(topo, state, members)
                with self._step("daemons ready and converged") as notes:
                    notes.append(self._wait_ready(topo, state, members, ready_timeout))
                with self._step("checksum offload off on the datapath's veths"):
                    self._offload_off_datapath(topo, members)
            with self._step("lab state saved"):
                state["phase"] = "up"
                state["up_at"] = time.time()
                self._save_state(state)
        except BaseException as exc:
            step = f"{self._steps[0]} ({self._step_title})"
            self.emit(f"step {step} failed: removing everything this attempt made ...", True)
            try:
                self.down()
            except Exception as down_exc:  # noqa: BLE001 - report both
                self.emit(f"clean-up also failed: {down_exc}", True)
            if isinstance(exc, nx.NetnsError):
                raise LabError(f"lab up failed at step {step}; everything it made was removed. {exc}") from None
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise LabError(f"lab up failed at step {step}; everything it made was removed. "
                           f"{type(exc).__name__}: {exc}") from exc
        self.emit(f"lab up in {time.monotonic() - t0:.1f} s. `overlay lab status` lists the hosts and logs; "
                  "`overlay lab check` tests connectivity.", True)
        return self.status()

    def _verify(self, topo: Topology, state: dict, t0: float, ready_timeout: float) -> dict:
        daemons = bool(state.get("daemons", True))
        members = list(topo.members) if daemons else []
        self._steps = (0, (4 + int(topo.controller is not None)) if daemons else 3)
        self.emit(f"the lab is already up (built from {topo.source}): verifying", True)
        restarted: list[str] = []
        try:
            self._repair(topo, state, members, restarted, ready_timeout)
        except nx.NetnsError as exc:
            raise LabError(f"the lab that is up failed verification at step {self._steps[0]} "
                           f"({self._step_title}): {exc}; "
                           "`overlay lab down` then `overlay lab up` rebuilds it") from None
        finally:
            self._save_state(state)
        what = f"restarted {', '.join(restarted)}" if restarted else "nothing to do"
        self.emit(f"lab is up ({what}; verified in {time.monotonic() - t0:.1f} s)", True)
        return self.status()

    def _repair(self, topo: Topology, state: dict, members, restarted: list[str], ready_timeout: float) -> None:
        daemons = bool(members)
        with self._step(f"namespaces ({len(self.names.all(topo))})"):
            pass
        with self._step("ZooKeeper") as notes:
            if not self._proc_alive(state, "zookeeper"):
                self._start_zookeeper(topo, state)
                restarted.append("zookeeper")
                notes.append("restarted")
        with self._step("test-port servers") as notes:
            dead = [h for h in topo.hosts if not self._proc_alive(state, f"echo:{h.name}")]
            if dead:
                self._start_echo(topo, state, dead)
                restarted += [f"echo:{h.name}" for h in dead]
                notes.append("restarted " + ", ".join(h.name for h in dead))
        if daemons and topo.controller is not None:
            with self._step("controller") as notes:
                if not self._proc_alive(state, "controller"):
                    self._make_certs(topo)   # keeps the CA and certificates that are there
                    self._start_controller(topo, state)
                    restarted.append("controller")
                    notes.append("restarted")
        if daemons:
            with self._step("daemons running, ready and converged") as notes:
                dead = [h for h in members if not self._proc_alive(state, f"daemon:{h.name}")]
                if dead:
                    self._write_configs(topo, dead)
                    self._start_daemons(topo, state, dead)
                    restarted += [f"daemon:{h.name}" for h in dead]
                    notes.append("restarted " + ", ".join(h.name for h in dead))
                notes.append(self._wait_ready(topo, state, members, ready_timeout))
                if dead:
                    self._offload_off_datapath(topo, dead)

    def _preflight(self, daemons: bool) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, bpffs, eBPF programs)")
        for cmd in ("ip", "nsenter", "ethtool", "iptables-restore", "sysctl", "sh"):
            if shutil.which(cmd) is None:
                raise LabError(f"{cmd}: command not found (make lab installs what is missing)")
        from overlay.zk.server import DEFAULT_CLASSPATH, debian_environment

        java = debian_environment().get("JAVA") or "/usr/bin/java"
        if not os.path.exists(java) or not os.path.exists(DEFAULT_CLASSPATH):
            raise LabError(f"ZooKeeper is not installed ({java}, {DEFAULT_CLASSPATH}): apt-get install zookeeper")
        if daemons:
            import importlib.util

            if not os.path.ismount("/sys/fs/bpf"):
                raise LabError("bpffs is not mounted at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)")
            if importlib.util.find_spec("bcc") is None:
                raise LabError("bcc is not importable: install python3-bpfcc and use the project's .venv")
            if not os.path.exists(overlay_command()[0]):
                raise LabError(f"{overlay_command()[0]} not found")

    def _make_namespaces(self, topo: Topology, state: dict) -> None:
        names = self.names.all(topo)
        state["namespaces"] = names       # recorded before they exist: a crash leaves nothing unknown
        self._save_state(state)
        for ns in names:
            if nx.exists(ns):
                raise LabError(f"namespace {ns} already exists (run `overlay lab down`)")
            nx.add_netns(ns)

    def _make_links(self, topo: Topology) -> None:
        n = self.names
        batches: dict[str, list[str]] = {n.internet: ["link add inet type bridge stp_state 0",
                                                      "link set inet up"]}
        for net in topo.networks:
            batches[n.switch(net)] = ["link add sw type bridge stp_state 0", "link set sw up"]
        for ns_a, dev_a, ns_b, dev_b in iter_links(topo, n):
            bridge = "inet" if ns_a == n.internet else "sw"
            batches[ns_a] += [f"link add {dev_a} type veth peer name {dev_b} netns {ns_b}",
                              f"link set {dev_a} master {bridge}", f"link set {dev_a} up"]
        for ns, cmds in batches.items():
            nx.ip_batch(ns, cmds)

    def _configure(self, topo: Topology) -> None:
        n = self.names
        jobs: list[tuple[str, str]] = []
        # the bridge sides: offload off on every port, no IPv6 chatter
        ports: dict[str, list[str]] = {n.internet: [], **{n.switch(net): [] for net in topo.networks}}
        for ns_a, dev_a, _ns_b, _dev_b in iter_links(topo, n):
            ports[ns_a].append(dev_a)
        for ns, devs in ports.items():
            lines = ["set -eu", "ip link set lo up",
                     "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1"]
            lines += [f"ethtool -K {d} tx off rx off >/dev/null" for d in devs]
            jobs.append((ns, "\n".join(lines)))
        jobs.append((n.zookeeper(topo), node_script(topo, topo.zk_name)))
        for net in topo.networks:
            jobs.append((n.edge(net), node_script(topo, net.edge_name)))
            for h in net.hosts:
                jobs.append((n.host(h), node_script(topo, h.name)))
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:
            for fut in [pool.submit(nx.sh, ns, script) for ns, script in jobs]:
                fut.result()

    # --- processes --------------------------------------------------------------------

    def _proc_alive(self, state: dict, key: str) -> bool:
        p = state.get("procs", {}).get(key)
        return bool(p) and nx.alive(p.get("pid"), p.get("start"))

    def _zk_server(self, topo: Topology):
        from overlay.zk.server import ZooKeeperServer

        return ZooKeeperServer(self.zk_dir, topo.zk_address, topo.zk_port, netns=self.names.zookeeper(topo),
                               fsync=False, heap_mb=256, max_session_ms=30000,
                               die_with_parent=self.die_with_parent)

    def _start_zookeeper(self, topo: Topology, state: dict) -> None:
        from overlay.zk.server import ZooKeeperError

        zk = self._zk_server(topo)
        try:
            zk.start(timeout=ZK_START_TIMEOUT)
        except ZooKeeperError as exc:
            raise LabError(f"ZooKeeper did not start: {exc}") from None
        self._zk = zk
        state["procs"]["zookeeper"] = {"pid": zk.pid, "start": nx.proc_start_time(zk.pid), "log": self.zk_log}
        self._save_state(state)

    def _start_echo(self, topo: Topology, state: dict, hosts) -> None:
        os.makedirs(os.path.join(self.run_dir, "logs"), exist_ok=True)
        for h in hosts:
            argv = nx.nsenter(self.names.host(h), [sys.executable, "-m", "overlay.lab.echo",
                                                   "--port", str(topo.test_port), "--name", h.name])
            pid, st = nx.start_process(argv, self.echo_log(h.name), cwd=self.run_dir, env=_child_env(),
                                       die_with_parent=self.die_with_parent)
            state["procs"][f"echo:{h.name}"] = {"pid": pid, "start": st, "log": self.echo_log(h.name)}
        self._save_state(state)
        from overlay.lab.check import probe_once

        def listening() -> list[Host]:
            calls = [(self.names.host(h), probe_once, ("127.0.0.1", topo.test_port, 1.0)) for h in hosts]
            res = nx.parallel_in_netns(calls, timeout=5)
            return [h for h, r in zip(hosts, res, strict=True) if not (isinstance(r, dict) and r["state"] == "open")]

        deadline = time.monotonic() + 15
        while True:
            missing = listening()
            if not missing:
                return
            for h in missing:
                if not self._proc_alive(state, f"echo:{h.name}"):
                    raise LabError(f"the test-port server of {h.name} exited:\n{nx.tail(self.echo_log(h.name))}")
            if time.monotonic() > deadline:
                raise LabError("test-port servers not listening after 15 s: " + ", ".join(h.name for h in missing))
            time.sleep(0.1)

    def _make_certs(self, topo: Topology) -> None:
        """The CA, the controller's certificate (naming the ZooKeeper machine's address) and one
        node certificate per member of a ``registry: grpc`` network; existing files are kept."""
        from overlay.controller import certs

        certs.init(self.certs_dir, (topo.zk_address,))
        for h in topo.grpc_members:
            crt, key = (os.path.join(self.certs_dir, f"{h.name}.{ext}") for ext in ("crt", "key"))
            if not (os.path.exists(crt) and os.path.exists(key)):
                certs.issue(self.certs_dir, h.name, force=True)

    def _start_controller(self, topo: Topology, state: dict) -> None:
        """Start ``overlay controller`` in the ZooKeeper machine's namespace; wait until it serves."""
        os.makedirs(os.path.join(self.run_dir, "logs"), exist_ok=True)
        with open(self.controller_config_path, "w", encoding="utf-8") as fh:
            fh.write(render_controller_config(topo, run_dir=self.run_dir))
        ns = self.names.zookeeper(topo)
        argv = nx.nsenter(ns, [*overlay_command(), "--log-level", "info", "controller",
                               "-c", self.controller_config_path])
        with open(self.controller_log, "a", encoding="utf-8") as fh:
            fh.write(f"---- lab: starting the controller at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        pid, st = nx.start_process(argv, self.controller_log, cwd=self.run_dir, env=_child_env(),
                                   die_with_parent=self.die_with_parent)
        state["procs"]["controller"] = {"pid": pid, "start": st, "log": self.controller_log}
        self._save_state(state)
        # it listens only once it has loaded its journal from ZooKeeper: accepting is serving
        deadline = time.monotonic() + CONTROLLER_START_TIMEOUT
        while True:
            if nx.in_netns(ns, _tcp_accepts, topo.zk_address, topo.controller_port, 1.0, timeout=5) is True:
                return
            if not self._proc_alive(state, "controller"):
                raise LabError(f"the controller exited; last lines of {self.controller_log}:\n"
                               f"{nx.tail(self.controller_log)}")
            if time.monotonic() > deadline:
                raise LabError(f"the controller is not serving on {topo.controller} after "
                               f"{CONTROLLER_START_TIMEOUT:g} s; last lines of {self.controller_log}:\n"
                               f"{nx.tail(self.controller_log)}")
            time.sleep(0.2)

    def _write_configs(self, topo: Topology, hosts=None) -> None:
        for h in hosts if hosts is not None else topo.members:
            os.makedirs(os.path.join(self.host_dir(h.name), "state"), exist_ok=True)
            text = render_config(topo, h, run_dir=self.run_dir, pin_dir=self.pin_dir)
            with open(self.config_path(h.name), "w", encoding="utf-8") as fh:
                fh.write(text)

    def _start_daemons(self, topo: Topology, state: dict, hosts) -> None:
        os.makedirs(self.pin_dir, exist_ok=True)
        try:
            for h in hosts:
                self.start_daemon(h.name, state=state, topo=topo)
        finally:
            self._save_state(state)

    def start_daemon(self, host: str, *, state: dict | None = None, topo: Topology | None = None) -> int:
        """Start (or restart) the daemon of lab host ``host``; returns its pid."""
        _require_root("daemon start")
        topo = topo or self.topology()
        own_state = state is None
        state = state if state is not None else self._require_state()
        h = topo.host(host)
        if self._proc_alive(state, f"daemon:{host}"):
            raise LabError(f"the daemon of {host} is already running (pid {state['procs'][f'daemon:{host}']['pid']})")
        argv = nx.nsenter(self.names.host(h), [*overlay_command(), "--log-level", "info", "daemon",
                                                "-c", self.config_path(host)])
        with open(self.daemon_log(host), "a", encoding="utf-8") as fh:
            fh.write(f"---- lab: starting the daemon at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        pid, st = nx.start_process(argv, self.daemon_log(host), cwd=self.host_dir(host), env=_child_env(),
                                   die_with_parent=self.die_with_parent)
        state["procs"][f"daemon:{host}"] = {"pid": pid, "start": st, "log": self.daemon_log(host)}
        if own_state:
            self._save_state(state)
        return pid

    def kill_daemon(self, host: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to the daemon of ``host`` (SIGKILL: a crash) and wait for it to go; returns its pid."""
        _require_root("daemon stop|kill")
        state = self._require_state()
        p = state["procs"].get(f"daemon:{host}")
        if not p or not nx.alive(p["pid"], p.get("start")):
            raise LabError(f"the daemon of {host} is not running")
        nx.stop_process(p["pid"], p.get("start"), sig=sig, timeout=10)
        return p["pid"]

    def zookeeper_stop(self) -> None:
        """Stop the lab's ZooKeeper (its data stays: ``zookeeper_start`` brings it back)."""
        _require_root("zookeeper stop")
        state = self._require_state()
        if self._zk is not None and self._zk.running():
            self._zk.stop()
        else:
            p = state["procs"].get("zookeeper")
            if p:
                nx.stop_process(p["pid"], p.get("start"), timeout=10)
        self._zk = None

    def zookeeper_start(self) -> None:
        _require_root("zookeeper start")
        state = self._require_state()
        if self._proc_alive(state, "zookeeper"):
            return
        self._start_zookeeper(self.topology(), state)

    def controller_stop(self) -> None:
        """Stop the lab's controller (the daemons that use it keep their datapath: fail static)."""
        _require_root("controller stop")
        state = self._require_state()
        p = state["procs"].get("controller")
        if p:
            nx.stop_process(p["pid"], p.get("start"), timeout=10)

    def controller_start(self) -> None:
        _require_root("controller start")
        state = self._require_state()
        topo = self.topology()
        if topo.controller is None or not state.get("daemons", True):
            raise LabError("this lab runs no controller (no network has registry: grpc, or --no-daemons)")
        if self._proc_alive(state, "controller"):
            return
        self._make_certs(topo)
        self._start_controller(topo, state)

    def _require_state(self) -> dict:
        state = self.load_state()
        if state is None or state.get("phase") != "up":
            raise LabError("the lab is not up (run `overlay lab up`)")
        return state

    # --- daemons' status --------------------------------------------------------------

    def daemon_statuses(self, hosts=None, timeout: float = 2.0) -> dict[str, dict | None]:
        """Each member's ``/status`` (None where it does not answer), fetched inside its namespace."""
        topo = self.topology()
        hosts = list(hosts if hosts is not None else topo.members)
        calls = [(self.names.host(h), _http_get, (STATUS_LISTEN, "/status", timeout)) for h in hosts
                 if nx.exists(self.names.host(h))]
        results = nx.parallel_in_netns(calls, timeout=timeout + 3) if calls else []
        out: dict[str, dict | None] = {h.name: None for h in hosts}
        for (ns, _fn, _args), r in zip(calls, results, strict=True):
            name = ns[len(self.names.prefix):]
            if isinstance(r, tuple) and r[0] == 200:
                with contextlib.suppress(ValueError):
                    out[name] = json.loads(r[1])
        return out

    def readyz(self, hosts=None, timeout: float = 2.0) -> dict[str, int | None]:
        """Each member's ``/readyz`` HTTP code (None where it does not answer)."""
        topo = self.topology()
        hosts = list(hosts if hosts is not None else topo.members)
        calls = [(self.names.host(h), _http_get, (STATUS_LISTEN, "/readyz", timeout)) for h in hosts]
        results = nx.parallel_in_netns(calls, timeout=timeout + 3)
        return {h.name: (r[0] if isinstance(r, tuple) else None) for h, r in zip(hosts, results, strict=True)}

    def maps(self, host: str) -> dict:
        """``overlay maps --json`` of ``host``, read from its pinned maps."""
        proc = nx.run(nx.nsenter(self.names.host(host), [*overlay_command(), "maps", "--json", "-c",
                                                          self.config_path(host)]), timeout=30)
        return json.loads(proc.stdout)

    def wait_converged(self, timeout: float = 60.0) -> str:
        """Wait until every daemon is ready and has every other member as a peer."""
        state = self._require_state()
        topo = self.topology()
        msg = self._wait_ready(topo, state, topo.members, timeout)
        return msg

    def _wait_ready(self, topo: Topology, state: dict, members, timeout: float) -> str:
        names = {h.name for h in topo.members}
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        last: dict[str, str] = {}
        while True:
            for h in members:
                if not self._proc_alive(state, f"daemon:{h.name}"):
                    raise LabError(f"the daemon of {h.name} exited; last lines of {self.daemon_log(h.name)}:\n"
                                   f"{nx.tail(self.daemon_log(h.name))}")
            statuses = self.daemon_statuses(topo.members)
            pending = {}
            for h in topo.members:
                s = statuses.get(h.name)
                if s is None:
                    pending[h.name] = "status endpoint not answering yet"
                    continue
                if s.get("overlay"):
                    state["overlays"][h.name] = s["overlay"]
                peers = {p.get("node_id") for p in s.get("peers", [])}
                missing = sorted(names - {h.name} - peers)
                if not s.get("ready"):
                    pending[h.name] = f"not ready ({s.get('last_error') or 'syncing'})"
                elif missing:
                    pending[h.name] = f"waiting for peers {', '.join(missing)}"
            if not pending:
                self._save_state(state)
                n = len(topo.members)
                return f"{n} daemons ready, each with {n - 1} peers, in {time.monotonic() - t0:.1f} s"
            last = pending
            if time.monotonic() > deadline:
                detail = "; ".join(f"{k}: {v}" for k, v in sorted(last.items()))
                first = sorted(last)[0]
                raise LabError(f"daemons not ready and converged after {timeout:g} s: {detail}\n"
                               f"last lines of {self.daemon_log(first)}:\n{nx.tail(self.daemon_log(first))}")
            time.sleep(0.25)

    def _offload_off_datapath(self, topo: Topology, members) -> None:
        for h in members:
            ns = self.names.host(h)
            out = nx.run(["ip", "-n", ns, "-o", "link", "show", "type", "veth"]).stdout
            devs = [line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
            devs = [d for d in devs if d != "eth0"]
            if devs:
                nx.sh(ns, "\n".join(f"ethtool -K {d} tx off rx off >/dev/null" for d in devs))

    # --- down -------------------------------------------------------------------------

    def down(self) -> dict:
        """Remove every namespace, process, pinned object and file of the lab. Idempotent."""
        _require_root("down")
        t0 = time.monotonic()
        state = self.load_state() or {}
        try:
            topo = self.topology()
        except Exception as exc:  # noqa: BLE001 - a broken topology must not block clean-up
            log.warning("cannot read the lab topology (%s); cleaning up from the state file and a scan", exc)
            topo = None
        self._steps = (0, 4)
        namespaces = set(state.get("namespaces") or [])
        if topo is not None:
            namespaces |= set(self.names.all(topo))
        namespaces |= {ns for ns in nx.list_netns() if ns.startswith(self.names.prefix)}
        present = sorted(ns for ns in namespaces if nx.exists(ns))
        stopped: list[str] = []
        with self._step("stop processes") as notes:
            if self._zk is not None:
                self._zk.stop()
                self._zk = None
            procs = {key: p for key, p in (state.get("procs") or {}).items() if isinstance(p, dict) and p.get("pid")}
            ran = set(nx.stop_processes([(p["pid"], p.get("start")) for p in procs.values()], timeout=8))
            stopped += sorted(key for key, p in procs.items() if p["pid"] in ran)
            strays = []
            for ns in present:
                strays += nx.kill_all_in(ns)
            notes.append(f"{len(stopped)} stopped" + (f", {len(strays)} more found in the namespaces" if strays else ""))
        with self._step(f"namespaces ({len(present)})"):
            for ns in present:
                nx.del_netns(ns)
            left = [ns for ns in present if nx.exists(ns)]
            if left:
                raise LabError(f"could not delete namespaces: {', '.join(left)}")
        with self._step(f"pinned objects ({self.pin_dir})") as notes:
            if os.path.exists(self.pin_dir):
                shutil.rmtree(self.pin_dir, ignore_errors=True)
                if os.path.exists(self.pin_dir):
                    raise LabError(f"could not remove {self.pin_dir}")
                notes.append("removed")
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(self.pin_dir))  # only if empty: other users may pin there
        with self._step(f"files ({self.run_dir})") as notes:
            if os.path.exists(self.run_dir):
                shutil.rmtree(self.run_dir, ignore_errors=True)
                notes.append("removed")
        self._topo = None
        nx.reap_children()
        self.emit(f"lab down in {time.monotonic() - t0:.1f} s", True)
        return {"namespaces": present, "processes": stopped}

    # --- status -----------------------------------------------------------------------

    def status(self, live: bool = True) -> dict:
        state = self.load_state()
        topo = self.topology()
        procs = (state or {}).get("procs", {})
        phase = (state or {}).get("phase", "down")
        statuses = self.daemon_statuses() if (live and state is not None and os.geteuid() == 0) else {}
        overlays = dict((state or {}).get("overlays", {}))
        hosts = []
        for h in topo.hosts:
            ns = self.names.host(h)
            s = statuses.get(h.name)
            overlay = (s or {}).get("overlay") or overlays.get(h.name) or h.overlay
            entry: dict[str, Any] = {
                "name": h.name, "netns": ns, "network": h.network, "private": h.private, "public": h.public,
                "overlay": overlay if h.member else None, "member": h.member, "groups": list(h.groups),
                "netns_exists": nx.exists(ns),
            }
            e = procs.get(f"echo:{h.name}")
            entry["test_server"] = {"port": topo.test_port, "pid": (e or {}).get("pid"),
                                    "running": bool(e) and nx.alive(e.get("pid"), e.get("start")),
                                    "log": self.echo_log(h.name)}
            if h.member:
                d = procs.get(f"daemon:{h.name}")
                entry["registry"] = topo.registry_of(h)
                entry["daemon"] = {
                    "pid": (d or {}).get("pid"),
                    "running": bool(d) and nx.alive(d.get("pid"), d.get("start")),
                    "ready": (s or {}).get("ready"),
                    "peers": len((s or {}).get("peers", [])) if s else None,
                    "status_url": f"http://{STATUS_LISTEN}/status (inside {ns})",
                    "config": self.config_path(h.name),
                    "pin_root": f"{self.pin_dir}/{h.name}",
                    "log": self.daemon_log(h.name),
                }
            hosts.append(entry)
        z = procs.get("zookeeper")
        daemons = bool((state or {}).get("daemons", True))
        out = {
            "state": phase if state is not None else "down",
            "topology": (state or {}).get("topology") or topo.source,
            "run_dir": self.run_dir,
            "daemons": daemons,
            "hosts": hosts,
            "zookeeper": topo.zookeeper,
            "zookeeper_info": {
                "netns": self.names.zookeeper(topo), "pid": (z or {}).get("pid"),
                "running": bool(z) and nx.alive(z.get("pid"), z.get("start")), "log": self.zk_log,
            },
            # the gRPC controller: host:port, or None when the lab runs none
            "controller": topo.controller if daemons else None,
        }
        if out["controller"] is not None:
            c = procs.get("controller")
            out["controller_info"] = {
                "netns": self.names.zookeeper(topo), "pid": (c or {}).get("pid"),
                "running": bool(c) and nx.alive(c.get("pid"), c.get("start")), "log": self.controller_log,
                "config": self.controller_config_path, "certs": self.certs_dir,
                "networks": [n.name for n in topo.networks if n.registry == "grpc"],
            }
        return out

    # --- check ------------------------------------------------------------------------

    def check(self, timeout: float = 3.0):
        """Probe the connectivity matrix; returns ``(results, ok)``."""
        _require_root("check")
        from overlay.lab.check import expected_probes, run_probes

        state = self._require_state()
        topo = self.topology()
        daemons = bool(state.get("daemons", True))
        overlays = dict(state.get("overlays", {}))
        if daemons:
            for name, s in self.daemon_statuses().items():
                if s and s.get("overlay"):
                    overlays[name] = s["overlay"]
        for h in topo.members:
            overlays.setdefault(h.name, h.overlay)
        probes = expected_probes(topo, overlays, daemons=daemons)
        results = run_probes(topo, probes, self.names, timeout=timeout)
        # A connection expected to open that timed out is probed once more: on a loaded
        # machine a SYN can wait longer than the timeout; a real break fails twice.
        again = [i for i, r in enumerate(results) if r.probe.expect_open and r.state == "timeout"]
        if again:
            retried = run_probes(topo, [results[i].probe for i in again], self.names, timeout=timeout)
            for i, r in zip(again, retried, strict=True):
                r.detail = (r.detail + " " if r.detail else "") + "(second probe; the first timed out)"
                results[i] = r
        return results, all(r.ok for r in results)

    def namespace_of(self, node: str) -> str:
        """The namespace of a lab machine: a host, ``<network>-edge``, ``<network>-sw``, ``inet`` or ZooKeeper."""
        topo = self.topology()
        for ns in self.names.all(topo):
            if ns == self.names.prefix + node:
                return ns
        raise LabError(f"no lab machine {node!r} (hosts, <network>-edge, <network>-sw, inet, {topo.zk_name})")


def _require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise LabError(f"overlay lab {action} needs root (network namespaces, bpffs, eBPF programs)")


def overlay_command() -> list[str]:
    """How to run the ``overlay`` CLI of this installation (the venv's console script)."""
    script = os.path.join(os.path.dirname(sys.executable), "overlay")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "import sys; from overlay.cli import main; sys.exit(main())"]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tcp_accepts(host: str, port: int, timeout: float) -> bool:
    """True if ``host:port`` accepts a TCP connection from the calling thread's namespace."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _http_get(listen: str, path: str, timeout: float) -> tuple[int, bytes]:
    host, _, port = listen.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
