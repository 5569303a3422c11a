"""Processes the orchestrator runs inside namespaces: the datapath host and the
load generator (``bench/bin/ovlbench``, built from ``bench/src/ovlbench.c``)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time

from bench.netns import Netns

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
SRC = os.path.join(BENCH_DIR, "src", "ovlbench.c")
BIN = os.path.join(BENCH_DIR, "bin", "ovlbench")
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable

CFLAGS = ["-O2", "-Wall", "-Wextra", "-pthread"]


class BenchError(RuntimeError):
    pass


def reap(proc: subprocess.Popen, grace: float) -> None:
    """Wait up to ``grace`` seconds for ``proc`` (already told to stop) to exit, then kill it."""
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def build_loadgen(force: bool = False) -> str:
    """Compile the load generator with gcc when missing or older than its source."""
    if not force and os.path.exists(BIN) and os.path.getmtime(BIN) >= os.path.getmtime(SRC):
        return BIN
    os.makedirs(os.path.dirname(BIN), exist_ok=True)
    subprocess.run(["gcc", *CFLAGS, "-o", BIN, SRC], check=True, timeout=120)
    return BIN


def _last_json(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    if not lines:
        raise BenchError(f"no JSON in output: {text[-500:]!r}")
    return json.loads(lines[-1])


def _niced(argv: list[str], nice: int | None) -> list[str]:
    return ["nice", "-n", str(nice), *argv] if nice else argv


def loadgen(ns: Netns, mode: str, *, host: str, port: int, seconds: float, cpu: int | None = None,
            nice: int | None = None, **extra) -> dict:
    """Run one bounded client of ``ovlbench`` in ``ns``; its JSON result. ``nice`` (e.g. -10)
    lowers the interference of other work on a shared machine."""
    argv = [BIN, mode, "--host", host, "--port", str(port), "--seconds", f"{seconds:g}"]
    for k, v in extra.items():
        argv += [f"--{k}", str(v)]
    if cpu is not None:
        argv += ["--cpu", str(cpu)]
    proc = ns.run(*_niced(argv, nice), check=False, timeout=seconds + 30)
    try:
        out = _last_json(proc.stdout)
    except BenchError:
        raise BenchError(f"[{ns.name}] ovlbench {mode}: exit {proc.returncode}: "
                         f"{proc.stderr.strip()[-300:]}") from None
    if "error" in out:
        raise BenchError(f"[{ns.name}] ovlbench {mode} to {host}:{port}: {out['error']}")
    return out


class LoadServer:
    """``ovlbench server`` in a namespace (three listeners from ``port``), bounded lifetime."""

    def __init__(self, ns: Netns, port: int, seconds: float, cpu: int | None = None,
                 nice: int | None = None):
        argv = [BIN, "server", "--port", str(port), "--seconds", f"{seconds:g}"]
        if cpu is not None:
            argv += ["--cpu", str(cpu)]
        self.proc = ns.popen(*_niced(argv, nice), text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        first = self.proc.stdout.readline() if ready else ""
        if "listening" not in first:
            self.stop()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise BenchError(f"[{ns.name}] ovlbench server did not start: {first!r} {err!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


class DpHost:
    """A ``bench.dphost`` process in a namespace, spoken to in JSON lines. With
    ``root`` (an extracted revision, bench/before.py) the same driver runs on that
    revision's ``overlay`` and ``bpf``."""

    def __init__(self, ns: Netns, log_path: str, cpu: int | None = None, root: str = REPO):
        self.ns = ns
        self.log = open(log_path, "a")
        argv = [PYTHON, "-m", "bench.dphost"] if root == REPO else [PYTHON, os.path.join(BENCH_DIR, "dphost.py")]
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = ns.popen(*argv, stdin=subprocess.PIPE, stderr=self.log, text=True, cwd=root,
                             env=env)
        self._read(120)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"[{self.ns.name}] dphost: no answer within {timeout:g} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                raise BenchError(f"[{self.ns.name}] dphost exited ({self.proc.poll()}); "
                                 f"see {self.log.name}")
            if line.startswith("{"):
                out = json.loads(line)
                if not out.get("ok"):
                    raise BenchError(f"[{self.ns.name}] dphost: {out.get('error')}\n"
                                     f"{out.get('trace', '')}")
                return out

    def call(self, cmd: str, timeout: float = 600, **args) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self, teardown: bool = True) -> None:
        try:
            if self.proc.poll() is None:
                if teardown:
                    with contextlib.suppress(Exception):
                        self.call("teardown", timeout=120)
                with contextlib.suppress(Exception):
                    self.call("quit", timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            self.log.close()
