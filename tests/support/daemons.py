"""Real ``overlay daemon`` processes inside test namespaces, and their ``/status``.

A :class:`Daemon` writes its config (YAML) and log under a work directory, runs
``overlay daemon -c`` inside a namespace (``nsenter --net``), and dies with the test
process. ``/status`` is read from inside the namespace by a thread moved into it
(no process per poll), so tests can watch peers many times a second.
"""

from __future__ import annotations

import json
import os
import signal

import yaml

from overlay import netns as nx
from overlay.lab.procs import http_get, overlay_command

STATUS_LISTEN = "127.0.0.1:9464"


def statuses(namespaces: list[str], listen: str = STATUS_LISTEN, timeout: float = 2.0) -> list[dict | None]:
    """``/status`` of the daemon in each namespace (None where it does not answer)."""
    res = nx.parallel_in_netns([(ns, http_get, (listen, "/status", timeout)) for ns in namespaces], timeout=timeout + 3)
    return [json.loads(r[1]) if isinstance(r, tuple) and r[0] == 200 else None for r in res]


def peer_ids(status: dict | None) -> set[str] | None:
    return None if status is None else {p["node_id"] for p in status.get("peers", [])}


class Daemon:
    """``overlay daemon`` with ``config`` (a mapping) in namespace ``netns``; files under ``workdir``."""

    def __init__(self, netns: str, config: dict, workdir: str):
        self.netns = netns
        self.node_id = config["node_id"]
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.config_path = os.path.join(workdir, "overlay.yaml")
        self.log = os.path.join(workdir, "daemon.log")
        self.proc: tuple[int, int] | None = None
        self.write(config)

    def write(self, config: dict) -> None:
        self.config = config
        with open(self.config_path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(config, fh)

    def start(self) -> int:
        argv = nx.nsenter(self.netns, [*overlay_command(), "--log-level", "info", "daemon", "-c", self.config_path])
        with open(self.log, "a", encoding="utf-8") as fh:
            fh.write("---- test: starting the daemon\n")
        self.proc = nx.start_process(argv, self.log, cwd=self.workdir, die_with_parent=True)
        return self.proc[0]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.proc is not None:
            nx.stop_process(*self.proc, timeout=timeout, sig=sig)
            self.proc = None

    def signal(self, sig: int) -> None:
        if self.proc is not None and nx.alive(*self.proc):
            os.kill(self.proc[0], sig)

    @property
    def running(self) -> bool:
        return self.proc is not None and nx.alive(*self.proc)

    def status(self) -> dict | None:
        return statuses([self.netns])[0]

    def tail(self) -> str:
        return nx.tail(self.log, 30)

    def run(self, *argv: str, timeout: float = 60):
        """``overlay ARGV`` inside this daemon's namespace (e.g. ``maps --json -c <config>``)."""
        return nx.run(nx.nsenter(self.netns, [*overlay_command(), *argv]), timeout=timeout)
