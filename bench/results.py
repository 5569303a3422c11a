"""Benchmark results: rows, summaries, machine information and the JSON file.

Contract (DESIGN §4.4): ``bench/results/latest.json`` holds
``{"machine": {...}, "run": {...}, "rows": [...], "goals": [...]}`` and every
row has at least ``suite``, ``backend``, ``peers``, ``metric``, ``value`` and
``unit``. Rows here also carry ``min``, ``max``, ``reps`` and the raw
``samples`` (``value`` is their median), so any ratio can be recomputed.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field

CONTRACT_KEYS = ("suite", "backend", "peers", "metric", "value", "unit")
SUITES = ("conn_setup", "rr", "stream", "update_one", "full_sync", "memory", "fanout", "controller_limits")
BACKENDS = ("bare", "iptables", "ebpf-tc")


@dataclass
class Row:
    suite: str
    backend: str
    peers: int
    metric: str
    value: float
    unit: str
    min: float | None = None
    max: float | None = None
    reps: int = 1
    samples: list[float] = field(default_factory=list)
    note: str | None = None
    agents: int | None = None  # fanout: agent processes
    server_filter: bool | None = None  # traffic suites: the server runs a datapath too

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("note", "agents", "server_filter"):
            if d[key] is None:
                del d[key]
        return d


def summarize(samples: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the samples."""
    if not samples:
        raise ValueError("no samples")
    return statistics.median(samples), min(samples), max(samples)


def make_row(suite: str, backend: str, peers: int, metric: str, unit: str,
             samples: list[float], note: str | None = None, digits: int = 4,
             agents: int | None = None, server_filter: bool | None = None) -> Row:
    samples = [round(float(s), digits) for s in samples]
    med, lo, hi = summarize(samples)
    return Row(suite, backend, int(peers), metric, round(med, digits), unit, lo, hi,
               len(samples), samples, note, agents, server_filter)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _cmd(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict:
    cpuinfo = _read("/proc/cpuinfo")
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                  if ln.startswith("model name")), platform.processor())
    mem_kb = next((int(ln.split()[1]) for ln in _read("/proc/meminfo").splitlines()
                   if ln.startswith("MemTotal:")), 0)
    loadavg = _read("/proc/loadavg").split()[:3]
    return {
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "os": _os_release(),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "gcc": _cmd("gcc", "-dumpfullversion"),
        "iptables": _cmd("iptables", "--version"),
        "loadavg_start": [float(x) for x in loadavg] if loadavg else [],
    }


def _os_release() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.platform()


def loadavg() -> list[float]:
    return [float(x) for x in _read("/proc/loadavg").split()[:3]]


class ResultSet:
    """Rows of one run plus its metadata; written atomically as JSON."""

    def __init__(self, profile: str, params: dict | None = None):
        self.rows: list[Row] = []
        self.machine = machine_info()
        self.run = {
            "profile": profile,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "params": params or {},
            "git": _cmd("git", "-C", os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "rev-parse", "--short", "HEAD"),
            "errors": [],
        }
        self.t0 = time.monotonic()

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def error(self, suite: str, message: str) -> None:
        self.run["errors"].append({"suite": suite, "error": message})

    def to_dict(self) -> dict:
        from bench.goals import evaluate

        run = dict(self.run)
        run["wall_s"] = round(time.monotonic() - self.t0, 1)
        machine = dict(self.machine)
        machine["loadavg_end"] = loadavg()
        rows = [r.to_dict() for r in self.rows]
        return {"machine": machine, "run": run, "rows": rows, "goals": evaluate(rows)}

    def write(self, path: str) -> dict:
        data = self.to_dict()
        write_json(path, data)
        return data


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def find(rows: list[dict], suite: str, backend: str, metric: str,
         peers: int | None = None) -> dict | None:
    for r in rows:
        if (r["suite"], r["backend"], r["metric"]) == (suite, backend, metric) and (
            peers is None or r["peers"] == peers
        ):
            return r
    return None
