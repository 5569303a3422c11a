"""Suite ``external``: a cross-check of the project's own load generator with tools
nobody here wrote, in the same run and on the same topology.

``sockperf ping-pong --tcp`` (round-trip p50 and p99, us) and ``iperf3`` (TCP
throughput, Gbit/s) from the ``bare`` client to the server's real address and from the
``ebpf-socket`` client to the target's overlay address, interleaved per repetition (the
order rotates), with paired ``*_vs_bare`` ratios as the traffic suites give them.
Servers run in the server namespace ``srv`` for the run's lifetime; every client is
bounded in time (``--time``/``-t`` and a process timeout). Debian packages ``sockperf``
and ``iperf3`` (scripts/bench-setup.sh).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

from bench.procs import BenchError

SOCKPERF_PORT, IPERF_PORT = 5011, 5012
BACKENDS = ("bare", "ebpf-socket")
_PCT = re.compile(r"percentile\s+(\d+\.\d+)\s*=\s*([\d.]+)")


def available() -> str | None:
    """None when both tools are installed, else what is missing."""
    missing = [t for t in ("sockperf", "iperf3") if shutil.which(t) is None]
    return ", ".join(missing) + " not installed (scripts/bench-setup.sh)" if missing else None


class Servers:
    """sockperf and iperf3 servers in ``ns``, killed by stop()."""

    def __init__(self, ns, seconds: float = 3600):
        self.procs = [
            ns.popen("timeout", f"{seconds:g}", "sockperf", "server", "--tcp", "-i", "0.0.0.0",
                     "-p", str(SOCKPERF_PORT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            ns.popen("timeout", f"{seconds:g}", "iperf3", "-s", "-p", str(IPERF_PORT),
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        ]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(5)


def sockperf(ns, host: str, seconds: float) -> dict[str, float]:
    """One bounded ``sockperf ping-pong --tcp --full-rtt``: {"rtt_us_p50", "rtt_us_p99"}."""
    proc = ns.run("sockperf", "ping-pong", "--tcp", "--full-rtt", "-i", host, "-p", str(SOCKPERF_PORT),
                  "-t", f"{max(1, round(seconds))}", check=False, timeout=seconds + 30)
    pct = {float(k): float(v) for k, v in _PCT.findall(proc.stdout + proc.stderr)}
    if 50.0 not in pct or 99.0 not in pct:
        raise BenchError(f"[{ns.name}] sockperf to {host}: no percentiles (exit {proc.returncode}): "
                         f"{(proc.stdout + proc.stderr).strip()[-300:]}")
    return {"rtt_us_p50": pct[50.0], "rtt_us_p99": pct[99.0]}


def iperf3(ns, host: str, seconds: float) -> dict[str, float]:
    """One bounded ``iperf3 -c``: {"gbps"} as the receiver counted it."""
    proc = ns.run("iperf3", "-c", host, "-p", str(IPERF_PORT), "-t", f"{max(1, round(seconds))}", "-J",
                  check=False, timeout=seconds + 30)
    try:
        bps = json.loads(proc.stdout)["end"]["sum_received"]["bits_per_second"]
    except (ValueError, KeyError) as exc:
        raise BenchError(f"[{ns.name}] iperf3 to {host}: {exc} (exit {proc.returncode}): "
                         f"{proc.stdout.strip()[-300:]}") from None
    return {"gbps": bps / 1e9}
