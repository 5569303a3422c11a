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
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

from overlay import netns as nx
from overlay.lab.neti_lab import moved, with_neti
from overlay.lab.neti_procs import NetiProcesses
from overlay.lab.procs import (
    READY_TIMEOUT,
    LabError,
    LabProcesses,
    controller_key,
    overlay_command,
    require_root,
    zk_key,
)
from overlay.lab.render import certs_dir as topology_certs_dir
from overlay.lab.render import iter_links, node_script
from overlay.lab.topology import (
    STATUS_LISTEN,
    Names,
    Topology,
    lab_place,
    load_topology,
    parse_topology,
)

log = logging.getLogger(__name__)


STATE_VERSION = 1

Emit = Callable[[str, bool], None]


def _quiet(_text: str, _newline: bool = True) -> None:
    pass


class Lab(LabProcesses, NetiProcesses):
    """One lab: a topology, its run directory, its pin directory and namespace prefix.

    ``name`` picks all three (:func:`~overlay.lab.topology.lab_place`: default
    ``$OVERLAY_LAB_NAME`` or ``lab``); ``run_dir``, ``pin_dir`` and ``prefix`` override one.
    ``with_neti``: add old-format hosts (:func:`overlay.lab.neti_lab.with_neti`)."""

    def __init__(self, topology: str | None = None, *, name: str | None = None, run_dir: str | None = None,
                 pin_dir: str | None = None, prefix: str | None = None, emit: Emit | None = None,
                 die_with_parent: bool = False, with_neti: bool = False):
        place = lab_place(name)
        run_dir, pin_dir, prefix = run_dir or place.run_dir, pin_dir or place.pin_dir, prefix or place.prefix
        self.name = place.name
        self.topology_arg = topology
        self.with_neti = with_neti
        # tests: the lab's processes die with the thread that started them (a killed pytest
        # leaves no daemon behind); `overlay lab up` leaves them running, of course
        self.die_with_parent = die_with_parent
        self.run_dir = run_dir
        self.pin_dir = pin_dir
        self.names = Names(prefix)
        self.emit: Emit = emit or _quiet
        self._zk: dict = {}      # the ZooKeeperServers this process started, by server id
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
        return self.controller_config_of(1)

    @property
    def controller_log(self) -> str:
        return self.controller_log_of(1)

    def controller_config_of(self, replica: int) -> str:
        return os.path.join(self.run_dir, "controller.yaml" if replica == 1 else f"controller-{replica}.yaml")

    def controller_log_of(self, replica: int) -> str:
        return os.path.join(self.run_dir, "logs", "controller.log" if replica == 1 else f"controller-{replica}.log")

    def zk_dir_of(self, server: int) -> str:
        return self.zk_dir if server == 1 else os.path.join(self.run_dir, f"zookeeper-{server}")

    def zk_log_of(self, server: int) -> str:
        return os.path.join(self.zk_dir_of(server), "zookeeper.log")

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
        """The topology of the lab that is up (its saved copy, with the hosts moved to Overlay
        made members), else the one asked for."""
        if self._topo is None:
            saved = self.saved_topology_path
            state = self.load_state()
            if os.path.exists(saved) and state is not None:
                with open(saved, encoding="utf-8") as fh:
                    self._topo = moved(parse_topology(fh.read(), state.get("topology") or saved),
                                       state.get("moved") or ())
            else:
                self._topo = self._asked()
        return self._topo

    def _asked(self) -> Topology:
        topo = load_topology(self.topology_arg)
        return parse_topology(with_neti(topo.text, topo.source), topo.source) if self.with_neti else topo

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
        require_root("up")
        t0 = time.monotonic()
        state = self.load_state()
        if state is not None:
            topo = self.topology()
            if self.topology_arg and os.path.abspath(self.topology_arg) != os.path.abspath(state.get("topology", "")):
                if self._asked().text != topo.text:
                    raise LabError(f"a lab built from {state.get('topology')} is up; run `overlay lab down` "
                                   f"before building one from {self.topology_arg}")
            if self.with_neti and not (topo.neti_hosts or state.get("moved")):
                raise LabError("a lab without old-format hosts is up; run `overlay lab down` before "
                               "`overlay lab up --with-neti`")
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
        old = list(topo.neti_hosts) if daemons else []
        total = (12 if daemons else 7) + int(controller) + 2 * int(bool(old))
        self._steps = (0, total)
        nns = len(self.names.all(topo))
        via = (f", the controller ({len(topo.controllers)} replicas: {', '.join(topo.controllers)}) for "
               f"{len(topo.grpc_members)} of them" if controller else "")
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
            zk_where = (self.names.zookeeper(topo) if topo.ensemble == 1 else
                        f"{topo.ensemble} namespaces, {self.names.zookeeper(topo)}...")
            with self._step(f"ZooKeeper at {topo.zookeeper} in {zk_where}"):
                self._start_zookeeper(topo, state)
            with self._step(f"test-port servers on :{topo.test_port} ({len(topo.hosts)})"):
                self._start_echo(topo, state, topo.hosts)
            if controller:
                with self._step(f"controller at {', '.join(topo.controllers)} in {self.names.zookeeper(topo)} "
                                f"(mutual TLS, {len(topo.grpc_members)} node certificates)"):
                    self._make_certs(topo)
                    self._start_controller(topo, state)
            if daemons:
                with self._step(f"operator: grant the members' groups ({len(members)} assignments)"):
                    self._grant_groups(topo)
                with self._step(f"daemon configs ({len(members)})"):
                    self._write_configs(topo)
                if old:
                    with self._step(f"old-format (Neti) hosts ({len(old)}: {', '.join(h.name for h in old)})"):
                        self._start_neti(topo, state, old)
                with self._step(f"daemons ({len(members)}, eBPF datapath, reject_all)"):
                    self._start_daemons(topo, state, members)
                with self._step("daemons ready and converged") as notes:
                    notes.append(self._wait_ready(topo, state, members, ready_timeout))
                if old:
                    with self._step("old-format hosts converged") as notes:
                        notes.append(self._wait_neti(topo, state))
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
            dead = [i for i in range(1, topo.ensemble + 1) if not self._proc_alive(state, zk_key(i))]
            if dead:
                self._start_zookeeper(topo, state, dead)
                restarted += [zk_key(i) for i in dead]
                notes.append("restarted " + ", ".join(zk_key(i) for i in dead))
        with self._step("test-port servers") as notes:
            dead = [h for h in topo.hosts if not self._proc_alive(state, f"echo:{h.name}")]
            if dead:
                self._start_echo(topo, state, dead)
                restarted += [f"echo:{h.name}" for h in dead]
                notes.append("restarted " + ", ".join(h.name for h in dead))
        if daemons and topo.controller is not None:
            with self._step("controller") as notes:
                dead = [i for i in range(1, len(topo.controllers) + 1) if not self._proc_alive(state, controller_key(i))]
                if dead:
                    self._make_certs(topo)   # keeps the CA and certificates that are there
                    self._start_controller(topo, state, dead)
                    restarted += [controller_key(i) for i in dead]
                    notes.append("restarted " + ", ".join(controller_key(i) for i in dead))
        if daemons:
            with self._step("daemons running, ready and converged") as notes:
                dead = [h for h in members if not self._proc_alive(state, f"daemon:{h.name}")]
                if dead:
                    self._write_configs(topo, dead)
                    self._start_daemons(topo, state, dead)
                    restarted += [f"daemon:{h.name}" for h in dead]
                    notes.append("restarted " + ", ".join(h.name for h in dead))
                self._restart_neti(topo, state, restarted, notes)
                notes.append(self._wait_ready(topo, state, members, ready_timeout))
                if dead:
                    self._offload_off_datapath(topo, dead)
                if topo.neti_hosts:
                    notes.append(self._wait_neti(topo, state))

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
        for i, (server, _address) in enumerate(topo.zk_servers, start=1):
            jobs.append((n.zookeeper(topo, i), node_script(topo, server)))
        for net in topo.networks:
            jobs.append((n.edge(net), node_script(topo, net.edge_name)))
            for h in net.hosts:
                jobs.append((n.host(h), node_script(topo, h.name)))
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:
            for fut in [pool.submit(nx.sh, ns, script) for ns, script in jobs]:
                fut.result()

    # --- down -------------------------------------------------------------------------

    def down(self) -> dict:
        """Remove every namespace, process, pinned object and file of the lab. Idempotent."""
        require_root("down")
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
            procs = {key: p for key, p in (state.get("procs") or {}).items() if isinstance(p, dict) and p.get("pid")}
            # ZooKeeper last: its clients close their sessions while it still answers
            ran = set(nx.stop_processes([(p["pid"], p.get("start")) for k, p in procs.items()
                                         if not k.startswith("zookeeper")], timeout=8))
            for zk in self._zk.values():
                zk.stop()
            self._zk = {}
            ran |= set(nx.stop_processes([(p["pid"], p.get("start")) for k, p in procs.items()
                                          if k.startswith("zookeeper")], timeout=8))
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
                "overlay": overlay if h.joins else None, "member": h.member, "groups": list(h.groups),
                "netns_exists": nx.exists(ns), "neti": h.neti,
            }
            if h.neti:
                entry["neti_agent"] = self._neti_status(h.name, procs)
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

        def proc_info(key: str, netns: str, log: str, **extra) -> dict:
            p = procs.get(key)
            return {"netns": netns, "pid": (p or {}).get("pid"),
                    "running": bool(p) and nx.alive(p.get("pid"), p.get("start")), "log": log, **extra}

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
            # every server of the ensemble (one, by default), by server id
            "zookeepers": [proc_info(zk_key(i), self.names.zookeeper(topo, i), self.zk_log_of(i),
                                     server=i, address=f"{a}:{topo.zk_port}")
                           for i, (_n, a) in enumerate(topo.zk_servers, start=1)],
            # the gRPC controller: its first replica's host:port, or None when the lab runs none
            "controller": topo.controller if daemons else None,
        }
        if out["controller"] is not None:
            networks = [n.name for n in topo.networks if n.registry == "grpc"]
            out["controllers"] = [proc_info(controller_key(i), self.names.zookeeper(topo), self.controller_log_of(i),
                                            replica=i, address=a, config=self.controller_config_of(i))
                                  for i, a in enumerate(topo.controllers, start=1)]
            out["controller_info"] = {**out["controllers"][0], "certs": self.certs_dir, "networks": networks}
        return out

    # --- check ------------------------------------------------------------------------

    def check(self, timeout: float = 3.0):
        """Probe the connectivity matrix; returns ``(results, ok)``."""
        require_root("check")
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
        for h in topo.neti_hosts:
            overlays[h.name] = (self.neti_state(h.name) or {}).get("overlay") or overlays.get(h.name)
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
