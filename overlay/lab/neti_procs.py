"""The lab's old-format (Neti) hosts at run time: start their emulators
(:mod:`overlay.lab.neti_agent`), wait until they have converged, and move one to Overlay
(stop its emulator, start a daemon with the same id on that host).

:class:`NetiProcesses` is a mixin of :class:`overlay.lab.lab.Lab`, like
:class:`~overlay.lab.procs.LabProcesses`; the pure half is :mod:`overlay.lab.neti_lab`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from overlay import netns as nx
from overlay.lab.procs import LabError, _child_env, require_root
from overlay.lab.topology import Topology

NETI_READY_TIMEOUT = 60.0


def neti_key(host: str) -> str:
    """The state file's key of the emulator of old-format host ``host``."""
    return f"neti:{host}"


class NetiProcesses:
    """Mixin of :class:`~overlay.lab.lab.Lab` (its paths, names, state file and topology)."""

    def neti_config_path(self, host: str) -> str:
        return os.path.join(self.host_dir(host), "neti.json")

    def neti_log(self, host: str) -> str:
        return os.path.join(self.run_dir, "logs", f"neti-{host}.log")

    def neti_state(self, host: str) -> dict | None:
        """What the emulator of ``host`` last applied (``overlay``, ``entry``, ``peers``), or None."""
        from overlay.lab.neti_lab import agent_config

        path = agent_config(self.topology(), host, run_dir=self.run_dir)["state_file"]
        with contextlib.suppress(OSError, ValueError):
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        return None

    def _start_neti(self, topo: Topology, state: dict, hosts) -> None:
        from overlay.lab.neti_lab import agent_config

        os.makedirs(os.path.join(self.run_dir, "logs"), exist_ok=True)
        try:
            for h in hosts:
                os.makedirs(self.host_dir(h.name), exist_ok=True)
                cfg = agent_config(topo, h, run_dir=self.run_dir)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(cfg["state_file"])       # a restarted emulator has applied nothing yet
                with open(self.neti_config_path(h.name), "w", encoding="utf-8") as fh:
                    json.dump(cfg, fh, indent=2)
                argv = nx.nsenter(self.names.host(h), [sys.executable, "-m", "overlay.lab.neti_agent",
                                                       self.neti_config_path(h.name)])
                pid, st = nx.start_process(argv, self.neti_log(h.name), cwd=self.host_dir(h.name),
                                           env=_child_env(), die_with_parent=self.die_with_parent)
                state["procs"][neti_key(h.name)] = {"pid": pid, "start": st, "log": self.neti_log(h.name)}
        finally:
            self._save_state(state)

    def _restart_neti(self, topo: Topology, state: dict, restarted: list[str], notes: list[str]) -> None:
        """``up`` on a lab that is up: start the emulators that died."""
        dead = [h for h in topo.neti_hosts if not self._proc_alive(state, neti_key(h.name))]
        if dead:
            self._start_neti(topo, state, dead)
            restarted += [neti_key(h.name) for h in dead]
            notes.append("restarted " + ", ".join(neti_key(h.name) for h in dead))

    def _neti_status(self, host: str, procs: dict) -> dict:
        """``neti_agent`` of an old-format host in ``overlay lab status --json``."""
        p = procs.get(neti_key(host))
        return {"pid": (p or {}).get("pid"), "log": self.neti_log(host),
                "running": bool(p) and nx.alive(p.get("pid"), p.get("start"))}

    def _wait_neti(self, topo: Topology, state: dict, timeout: float = NETI_READY_TIMEOUT) -> str:
        """Wait until every old-format host has applied rules for every other host with an
        overlay address (members and old hosts); records their addresses in the state."""
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        want = len(topo.joined) - 1
        while True:
            pending = {}
            for h in topo.neti_hosts:
                if not self._proc_alive(state, neti_key(h.name)):
                    raise LabError(f"the old-format host {h.name} exited; last lines of {self.neti_log(h.name)}:\n"
                                   f"{nx.tail(self.neti_log(h.name))}")
                s = self.neti_state(h.name)
                if s is None:
                    pending[h.name] = "no rules applied yet"
                    continue
                state["overlays"][h.name] = s["overlay"]
                if len(s["peers"]) != want:
                    pending[h.name] = f"{len(s['peers'])} of {want} peers"
            if not pending:
                self._save_state(state)
                return (f"{len(topo.neti_hosts)} old-format hosts with {want} peers each, "
                        f"in {time.monotonic() - t0:.1f} s")
            if time.monotonic() > deadline:
                first = sorted(pending)[0]
                raise LabError(f"old-format hosts not converged after {timeout:g} s: "
                               + "; ".join(f"{k}: {v}" for k, v in sorted(pending.items()))
                               + f"\nlast lines of {self.neti_log(first)}:\n{nx.tail(self.neti_log(first))}")
            time.sleep(0.25)

    def wait_neti(self, timeout: float = NETI_READY_TIMEOUT) -> str:
        """:meth:`_wait_neti` on the lab that is up."""
        return self._wait_neti(self.topology(), self._require_state(), timeout)

    def move_to_overlay(self, host: str, ready_timeout: float = 120.0) -> dict:
        """Move old-format host ``host`` to Overlay: stop its emulator (it removes its rules and
        leaves the party), then start a daemon with the same id on that host (it keeps the old
        allocation). Waits until every daemon and old host has converged; returns
        ``{"host", "overlay_before", "overlay_after", "seconds"}``."""
        require_root("move")
        t0 = time.monotonic()
        state = self._require_state()
        topo = self.topology()
        h = topo.host(host)
        if not h.neti:
            raise LabError(f"{host} is not an old-format host (neti: true) of this lab")
        before = (self.neti_state(host) or {}).get("overlay")
        p = state["procs"].pop(neti_key(host), None)
        if p:
            nx.stop_process(p["pid"], p.get("start"), timeout=10)
        state.setdefault("moved", []).append(host)
        self._save_state(state)
        self._topo = None
        topo = self.topology()          # now with ``host`` a member
        if topo.registry_of(host) == "grpc":
            self._make_certs(topo)
        self._write_configs(topo, [topo.host(host)])
        self._start_daemons(topo, state, [topo.host(host)])
        self._wait_ready(topo, state, topo.members, ready_timeout)
        self._offload_off_datapath(topo, [topo.host(host)])
        if topo.neti_hosts:
            self._wait_neti(topo, state)
        return {"host": host, "overlay_before": before, "overlay_after": state["overlays"].get(host),
                "seconds": round(time.monotonic() - t0, 1)}
