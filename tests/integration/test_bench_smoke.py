"""A tiny end-to-end run of the benchmark harness in namespaces (root), well under a minute.
No timing threshold is asserted: only that the run works, writes the contract's rows and
leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from bench.results import CONTRACT_KEYS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_smoke_run_end_to_end(tmp_path):
    """A tiny run of one suite in namespaces (root only), well under a minute."""
    if os.geteuid() != 0 or not os.path.ismount("/sys/fs/bpf"):
        pytest.skip("needs root and bpffs (network namespaces, tc, iptables)")
    for tool in ("gcc", "ip", "nsenter", "iptables-restore", "ipset"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            pytest.skip(f"{tool} is not installed")
    out = tmp_path / "latest.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--profile", "smoke", "--suites", "conn_setup",
         "--backends", "bare,iptables,ebpf-tc", "--out", str(out), "--no-plots", "--no-report"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert not data["run"]["errors"], data["run"]["errors"]
    rows = [r for r in data["rows"] if r["suite"] == "conn_setup"]
    for r in rows:
        assert set(CONTRACT_KEYS) <= set(r)
        assert r["metric"].startswith("conn_per_s") and r["value"] > 0
    # both ends filtering (the default): bare is bare on both ends, the others' servers
    # ran the same datapath with reject_all and judged the client's packets as a member's
    shape = {(r["backend"], r["metric"], r["server_filter"]) for r in rows
             if r["metric"] in ("conn_per_s", "conn_per_s_vs_bare")}
    assert shape == {("bare", "conn_per_s", False),
                     ("iptables", "conn_per_s", True), ("iptables", "conn_per_s_vs_bare", True),
                     ("ebpf-tc", "conn_per_s", True), ("ebpf-tc", "conn_per_s_vs_bare", True)}
    counters = data["run"]["server_counters"]
    assert set(counters) == {"iptables", "ebpf-tc"}
    for backend, c in counters.items():
        assert c.get("pass_member", 0) > 0, (backend, c)
    # nothing left behind: no namespace or pin of that run
    run_pid = re.search(r"ovl-bench-(\d+)-srv", proc.stdout).group(1)
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"ovl-bench-{run_pid}-" not in left
    assert not os.path.exists(f"/sys/fs/bpf/overlay/bench/{run_pid}")
