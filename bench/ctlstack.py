"""A loopback controller for the controller suites: a standalone ZooKeeper on 127.0.0.1,
a CA with node certificates, and an ``overlay controller`` process pinned to CPU 1 (the
clients go on CPU 0, as the other suites pin client and server), all removed on exit.

Used by ``controller_limits`` and ``controller_fanout``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from bench.procs import PYTHON, REPO, reap  # noqa: F401  (PYTHON, REPO: re-exported to the controller suites)

SUBNET = "192.168.0.0/18"


@dataclass(frozen=True)
class Stack:
    address: str      # the controller, host:port
    certs: str        # the CA directory: operator.crt/.key and one pair per node issued
    log: object       # the open log file of the run (controller output, client errors)
    two_cpus: bool    # server on CPU 1, clients on CPU 0
    pid: int          # the controller process


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def on_cpu(cpu: int | None) -> list[str]:
    """A command prefix pinning a process to ``cpu`` (empty without taskset or a CPU)."""
    return ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the controller did not listen on {port} in {timeout:g} s")


@contextlib.contextmanager
def controller_stack(log_dir: str, name: str, nodes: list[str],
                     limits: dict | None = None) -> Iterator[Stack]:
    """ZooKeeper, certificates for ``nodes`` and a controller (``controller.limits`` =
    ``limits`` when given); logs in ``<log_dir>/<name>.log``."""
    from overlay.controller import certs as certlib
    from overlay.zk.server import ZooKeeperServer

    work = tempfile.mkdtemp(prefix=f"ovl-bench-{name}-", dir=log_dir)
    log = open(os.path.join(log_dir, f"{name}.log"), "w")
    zk = ctl = None
    try:
        zk_port, ctl_port = free_port(), free_port()
        zk = ZooKeeperServer(os.path.join(work, "zk"), "127.0.0.1", zk_port, fsync=False,
                             die_with_parent=True)
        zk.start(timeout=60)
        certs = os.path.join(work, "certs")
        certlib.init(certs)
        for n in nodes:
            certlib.issue(certs, n)
        controller = {"listen": f"127.0.0.1:{ctl_port}", "tls": {
            "ca": f"{certs}/ca.crt", "cert": f"{certs}/controller.crt", "key": f"{certs}/controller.key"}}
        if limits:
            controller["limits"] = limits
        cfg = os.path.join(work, "controller.yaml")
        with open(cfg, "w") as fh:
            json.dump({"overlay_subnet": SUBNET, "registry": {"hosts": [zk.address], "prefix": "/bench"},
                       "controller": controller}, fh)
        two = (os.cpu_count() or 1) >= 2
        ctl = subprocess.Popen([*on_cpu(1 if two else None), PYTHON, "-m", "overlay.cli", "controller", "-c", cfg],
                               cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        wait_port(ctl_port, 60)
        yield Stack(f"127.0.0.1:{ctl_port}", certs, log, two, ctl.pid)
    finally:
        if ctl is not None:
            ctl.terminate()
            reap(ctl, 20)
        if zk is not None:
            zk.stop()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def client_parser(sub, name: str, help: str, streams: tuple[str, int]):
    """A sub-command of a client process of these suites: --controller, --certs, --node
    and a count (``streams`` = (option, default))."""
    c = sub.add_parser(name, help=help)
    c.add_argument("--controller", required=True)
    c.add_argument("--certs", required=True)
    c.add_argument("--node", required=True)
    c.add_argument(streams[0], type=int, default=streams[1])
    return c


def paced_writes(op, changes: int, interval_s: float, prefix: str, groups: int) -> dict[int, float]:
    """The operator client ``op`` writes ``changes`` groups (``<prefix>-<i % groups>``),
    ``interval_s`` apart; {revision: CLOCK_MONOTONIC time the write began}."""
    sent: dict[int, float] = {}
    tag = f"{time.monotonic_ns()}"
    for i in range(changes):
        start = time.monotonic()
        rev = op.put_group(f"{prefix}-{i % groups}", f"{tag}-{i}")
        if rev:
            sent[rev] = start
        time.sleep(max(0.0, interval_s - (time.monotonic() - start)))
    return sent
