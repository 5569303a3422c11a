"""The lab's processes: ZooKeeper, the test-port servers, the controller and the daemons.

:class:`LabProcesses` is the half of :class:`overlay.lab.lab.Lab` that starts, stops and
asks them (``/status`` and ``/readyz`` inside each namespace); the other half builds and
removes the namespaces. Every process is recorded in the lab's state file with its
start time, so a later ``overlay lab`` command acts on exactly those processes.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import sys
import time

from overlay import netns as nx
from overlay.lab.render import render_config, render_controller_config
from overlay.lab.topology import STATUS_LISTEN, Host, Topology

READY_TIMEOUT = 120.0
ZK_START_TIMEOUT = 60.0
CONTROLLER_START_TIMEOUT = 60.0


class LabError(nx.NetnsError):
    """The lab could not do what was asked; the message names the step and the cause."""


def zk_key(server: int) -> str:
    """The state file's key of ZooKeeper server ``server`` (1, 2, ...)."""
    return "zookeeper" if server == 1 else f"zookeeper:{server}"


def controller_key(replica: int) -> str:
    """The state file's key of controller replica ``replica`` (1, 2, ...)."""
    return "controller" if replica == 1 else f"controller:{replica}"


class LabProcesses:
    """Mixin of :class:`~overlay.lab.lab.Lab` (its paths, names, state file and topology)."""

    def _proc_alive(self, state: dict, key: str) -> bool:
        p = state.get("procs", {}).get(key)
        return bool(p) and nx.alive(p.get("pid"), p.get("start"))

    def _zk_server(self, topo: Topology, server: int = 1):
        """ZooKeeper server ``server`` of the topology (one of an ensemble when ``ensemble`` > 1)."""
        from overlay.zk.server import ZooKeeperServer

        addresses = tuple(a for _, a in topo.zk_servers)
        return ZooKeeperServer(self.zk_dir_of(server), addresses[server - 1], topo.zk_port,
                               netns=self.names.zookeeper(topo, server), fsync=False, heap_mb=256,
                               max_session_ms=30000, die_with_parent=self.die_with_parent,
                               ensemble=addresses if len(addresses) > 1 else (), server_id=server)

    def _start_zookeeper(self, topo: Topology, state: dict, servers=None) -> None:
        """Start ZooKeeper servers ``servers`` (default: all) and wait until each serves (an
        ensemble's servers serve once a quorum of them is up: all are started first)."""
        from overlay.zk.server import ZooKeeperError

        servers = list(servers or range(1, topo.ensemble + 1))
        made = {i: self._zk_server(topo, i) for i in servers}
        try:
            for i, zk in made.items():
                zk.start(timeout=ZK_START_TIMEOUT, wait=False)
                self._zk[i] = zk
                state["procs"][zk_key(i)] = {"pid": zk.pid, "start": nx.proc_start_time(zk.pid),
                                             "log": self.zk_log_of(i)}
            self._save_state(state)
            for zk in made.values():
                zk.wait_serving(timeout=ZK_START_TIMEOUT)
        except ZooKeeperError as exc:
            raise LabError(f"ZooKeeper did not start: {exc}") from None

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
        """The CA, the controllers' certificate (naming every replica's address) and one node
        certificate per member of a ``registry: grpc`` network; existing files are kept."""
        from overlay.controller import certs

        certs.init(self.certs_dir, tuple(hp.rpartition(":")[0] for hp in topo.controllers))
        for h in topo.grpc_members:
            crt, key = (os.path.join(self.certs_dir, f"{h.name}.{ext}") for ext in ("crt", "key"))
            if not (os.path.exists(crt) and os.path.exists(key)):
                certs.issue(self.certs_dir, h.name, force=True)

    def _start_controller(self, topo: Topology, state: dict, replicas=None) -> None:
        """Start replicas ``replicas`` (default: all) of ``overlay controller`` in the first
        ZooKeeper machine's namespace, each at its own address; wait until each serves."""
        os.makedirs(os.path.join(self.run_dir, "logs"), exist_ok=True)
        ns = self.names.zookeeper(topo)
        replicas = list(replicas or range(1, len(topo.controllers) + 1))
        for i in replicas:
            with open(self.controller_config_of(i), "w", encoding="utf-8") as fh:
                fh.write(render_controller_config(topo, run_dir=self.run_dir, replica=i))
            argv = nx.nsenter(ns, [*overlay_command(), "--log-level", "info", "controller",
                                   "-c", self.controller_config_of(i)])
            with open(self.controller_log_of(i), "a", encoding="utf-8") as fh:
                fh.write(f"---- lab: starting the controller at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            pid, st = nx.start_process(argv, self.controller_log_of(i), cwd=self.run_dir, env=_child_env(),
                                       die_with_parent=self.die_with_parent)
            state["procs"][controller_key(i)] = {"pid": pid, "start": st, "log": self.controller_log_of(i)}
        self._save_state(state)
        # it listens only once it has loaded its journal from ZooKeeper: accepting is serving
        deadline = time.monotonic() + CONTROLLER_START_TIMEOUT
        waiting = list(replicas)
        while waiting:
            for i in list(waiting):
                host, _, port = topo.controllers[i - 1].rpartition(":")
                if nx.in_netns(ns, _tcp_accepts, host, int(port), 1.0, timeout=5) is True:
                    waiting.remove(i)
                elif not self._proc_alive(state, controller_key(i)):
                    raise LabError(f"the controller exited; last lines of {self.controller_log_of(i)}:\n"
                                   f"{nx.tail(self.controller_log_of(i))}")
            if waiting and time.monotonic() > deadline:
                i = waiting[0]
                raise LabError(f"the controller is not serving on {topo.controllers[i - 1]} after "
                               f"{CONTROLLER_START_TIMEOUT:g} s; last lines of {self.controller_log_of(i)}:\n"
                               f"{nx.tail(self.controller_log_of(i))}")
            if waiting:
                time.sleep(0.2)

    def grant_groups(self) -> None:
        """``overlay lab grant``: :meth:`_grant_groups` on the lab that is up."""
        self._require_state()
        self._grant_groups(self.topology())

    def _grant_groups(self, topo: Topology) -> None:
        """The operator's step: grant every member the groups the topology gives it
        (``assignments/<host>``), written inside the ZooKeeper machine's namespace."""
        from overlay.config import RegistryConfig
        from overlay.lab.render import registry_prefix
        from overlay.zk.layout import grant_groups

        config = RegistryConfig(hosts=tuple(topo.zookeeper.split(",")), prefix=registry_prefix(topo), timeout_s=10.0)
        grants = {h.name: tuple(h.groups) for h in topo.members}
        res = nx.in_netns(self.names.zookeeper(topo), grant_groups, config, grants, timeout=60)
        if isinstance(res, BaseException):
            raise LabError(f"granting the members' groups failed: {res}")

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
        require_root("daemon start")
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
        require_root("daemon stop|kill")
        state = self._require_state()
        p = state["procs"].get(f"daemon:{host}")
        if not p or not nx.alive(p["pid"], p.get("start")):
            raise LabError(f"the daemon of {host} is not running")
        nx.stop_process(p["pid"], p.get("start"), sig=sig, timeout=10)
        return p["pid"]

    def _which(self, what: str, n: int, which: int | None) -> list[int]:
        if which is not None and not 1 <= which <= n:
            raise LabError(f"this lab has no {what} {which} (1 to {n})")
        return [which] if which is not None else list(range(1, n + 1))

    def _stop_keys(self, state: dict, keys: list[str], sig: int) -> None:
        for key in keys:
            p = state["procs"].get(key)
            if p:
                nx.stop_process(p["pid"], p.get("start"), timeout=10, sig=sig)

    def zookeeper_stop(self, server: int | None = None, sig: int = signal.SIGTERM) -> None:
        """Stop the lab's ZooKeeper (``server``: one server of the ensemble; ``sig`` SIGKILL: a
        crash). Its data stays: ``zookeeper_start`` brings it back."""
        require_root("zookeeper stop")
        state = self._require_state()
        servers = self._which("ZooKeeper server", self.topology().ensemble, server)
        self._stop_keys(state, [zk_key(i) for i in servers], sig)
        for i in servers:
            zk = self._zk.pop(i, None)
            if zk is not None:
                zk.stop()    # reaps it (already gone)

    def zookeeper_start(self, server: int | None = None) -> None:
        require_root("zookeeper start")
        state = self._require_state()
        topo = self.topology()
        dead = [i for i in self._which("ZooKeeper server", topo.ensemble, server) if not self._proc_alive(state, zk_key(i))]
        if dead:
            self._start_zookeeper(topo, state, dead)

    def zookeeper_role(self, server: int) -> str | None:
        """``leader``, ``follower`` or ``standalone`` (ZooKeeper's ``srvr``), None if it does not answer."""
        topo = self.topology()
        self._which("ZooKeeper server", topo.ensemble, server)
        return self._zk_server(topo, server).role()

    def controller_stop(self, replica: int | None = None, sig: int = signal.SIGTERM) -> None:
        """Stop the lab's controller (``replica``: one of them; ``sig`` SIGKILL: a crash). The
        daemons that use it fail over to another replica, or fail static when none is left."""
        require_root("controller stop")
        state = self._require_state()
        self._stop_keys(state, [controller_key(i) for i in
                                self._which("controller replica", len(self.topology().controllers), replica)], sig)

    def controller_start(self, replica: int | None = None) -> None:
        require_root("controller start")
        state = self._require_state()
        topo = self.topology()
        if topo.controller is None or not state.get("daemons", True):
            raise LabError("this lab runs no controller (no network has registry: grpc, or --no-daemons)")
        dead = [i for i in self._which("controller replica", len(topo.controllers), replica)
                if not self._proc_alive(state, controller_key(i))]
        if dead:
            self._make_certs(topo)
            self._start_controller(topo, state, dead)

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
        calls = [(self.names.host(h), http_get, (STATUS_LISTEN, "/status", timeout)) for h in hosts
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
        calls = [(self.names.host(h), http_get, (STATUS_LISTEN, "/readyz", timeout)) for h in hosts]
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
        names = {h.name for h in topo.joined}     # members see the old-format hosts as peers too
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
                return (f"{len(topo.members)} daemons ready, each with {len(names) - 1} peers, "
                        f"in {time.monotonic() - t0:.1f} s")
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

def require_root(action: str) -> None:
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


def http_get(listen: str, path: str, timeout: float) -> tuple[int, bytes]:
    """``GET path`` from ``listen`` (``host:port``) in the calling thread's namespace: (status, body)."""
    host, _, port = listen.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
