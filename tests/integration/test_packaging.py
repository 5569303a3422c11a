"""The package as a fleet installs it: built, installed into a fresh virtualenv, run without the checkout.

``python -m build`` makes the sdist and, from it, the wheel (each in an isolated build
environment with the declared build requirements only). The wheel is installed into a
fresh virtualenv (``--system-site-packages``, for Debian's bcc) in a temporary
directory outside the checkout. Every command of that installation then runs in a
mount namespace where a tmpfs covers the checkout (``unshare --mount`` + ``mount -t
tmpfs``), with ``OVERLAY_BPF_DIR`` and ``PYTHONPATH`` unset and ``/`` as the working
directory: nothing it does can read the repository's ``bpf/``, ``proto/`` or package.
In that state two daemons of the fresh installation run in a namespace pair with the
static registry: overlay traffic flows both ways (and to a ``nat_overrides`` key
outside the overlay subnet), and ``overlay status --json`` answers; its ``overlay
install-unit`` writes the packaged units for that virtualenv.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.support.netns import new_pin_root, require_bcc, veth

REPO = Path(__file__).resolve().parents[2]
HOSTS = {
    "a": {"private": "10.0.0.1", "public": "198.18.0.1", "overlay": "192.168.0.1", "status": 9481},
    "b": {"private": "10.0.0.2", "public": "198.18.0.2", "overlay": "192.168.0.2", "status": 9482},
}
OVERRIDE = "10.9.9.9"  # a nat_overrides key outside 192.168.0.0/18, on host a, to b's private address
PORT = 7170


def _run(argv, timeout=300, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    assert res.returncode == 0, f"{shlex.join(map(str, argv))} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture(scope="module")
def dist():
    """sdist and wheel from ``python -m build``, in a temporary directory outside the checkout."""
    out = Path(tempfile.mkdtemp(prefix="overlay-pkg-test-"))
    try:
        _run([sys.executable, "-m", "build", "--outdir", str(out / "dist"), str(REPO)], timeout=600)
        (wheel,) = (out / "dist").glob("overlay-*.whl")
        (sdist,) = (out / "dist").glob("overlay-*.tar.gz")
        yield out, wheel, sdist
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _repo_files(rel: str) -> dict[str, bytes]:
    root = REPO / rel
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_wheel_and_sdist_carry_the_sources_the_proto_and_the_units(dist):
    _, wheel, sdist = dist
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for rel, pkg in (("bpf", "bpf"), ("proto", "proto"), ("packaging", "packaging")):
            want = _repo_files(rel)
            assert want, rel
            for path, data in want.items():  # every file, byte for byte, from the repository
                assert zf.read(f"overlay/_data/{pkg}/{path}") == data, path
        for gen in ("__init__.py", "overlay_pb2.py", "overlay_pb2_grpc.py"):
            assert f"overlay/_gen/{gen}" in names  # generated at build time
        assert "from . import overlay_pb2 as overlay__pb2" in zf.read("overlay/_gen/overlay_pb2_grpc.py").decode()
    with tarfile.open(sdist) as tf:
        top = tf.getnames()[0].split("/")[0]
        members = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert {"setup.py", "MANIFEST.in", "bpf/datapath.c", "bpf/include/overlay_abi.h", "proto/overlay.proto",
            "packaging/systemd/overlay.service", "packaging/overlay.yaml"} <= members, top
    assert not any(m.startswith("overlay/_gen") for m in members)  # generated, never shipped as source


class Hidden:
    """Commands of the fresh installation, with the checkout covered by an empty tmpfs."""

    def __init__(self, venv: Path):
        self.venv = venv
        self.env = {"PATH": f"{venv}/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}

    def argv(self, *cmd: str, netns: str | None = None) -> list[str]:
        inner = ["nsenter", f"--net=/run/netns/{netns}", *cmd] if netns else list(cmd)
        script = f"mount -t tmpfs -o mode=000,size=1m overlay-test-hidden {shlex.quote(str(REPO))} && cd / && exec \"$@\""
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *inner]

    def run(self, *cmd: str, netns: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*cmd, netns=netns), capture_output=True, text=True, timeout=timeout,
                              env=self.env, cwd="/")

    def popen(self, *cmd: str, netns: str, log) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*cmd, netns=netns), stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, cwd="/")


@pytest.fixture(scope="module")
def installed(dist) -> Hidden:
    out, wheel, _ = dist
    venv = out / "venv"
    _run(["/usr/bin/python3", "-m", "venv", "--without-pip", "--system-site-packages", str(venv)])
    # this checkout's pip installs into the fresh interpreter (dependencies from the index)
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
          "--disable-pip-version-check", str(wheel)], timeout=600)
    return Hidden(venv)


def _config(name: str, peer: str, pin_root: str) -> dict:
    me, other = HOSTS[name], HOSTS[peer]
    cfg = {
        "node_id": f"pkg-{name}", "network": "lab",
        "addresses": {k: me[k] for k in ("private", "public", "overlay")},
        "registry": {"backend": "static", "peers": [
            {"node_id": f"pkg-{peer}", "network": "lab", **{k: other[k] for k in ("private", "public", "overlay")}}]},
        "datapath": {"backend": "ebpf", "interface": "eth0", "pin_root": pin_root},
        "status_listen": f"127.0.0.1:{me['status']}",
    }
    if name == "a":
        cfg["nat_overrides"] = {OVERRIDE: HOSTS["b"]["private"]}
    return cfg


@pytest.mark.root
def test_installed_wheel_runs_a_daemon_pair_without_the_checkout(installed, netns_factory, dist):
    require_bcc()
    hidden = installed
    # the installation really cannot see the checkout, and needs nothing from it
    probe = hidden.run(str(hidden.venv / "bin" / "python"), "-c", (
        "import importlib.util, os, overlay, overlay._gen.overlay_pb2_grpc\n"
        "from overlay.datapath.ebpf import build\n"
        f"assert not os.path.exists({str(REPO / 'bpf')!r}), 'checkout visible'\n"
        "assert importlib.util.find_spec('grpc_tools') is None, 'grpcio-tools installed'\n"
        "print(overlay.__file__); print(build.bpf_dir())"))
    assert probe.returncode == 0, probe.stderr
    pkg_file, bpf_dir = probe.stdout.split()
    assert pkg_file.startswith(f"{hidden.venv}/lib/") and bpf_dir.startswith(f"{hidden.venv}/lib/")
    # the units and the sample config come from the wheel too, rendered for this virtualenv
    root = dist[0] / "root"
    res = hidden.run("overlay", "install-unit", "--root", str(root))
    assert res.returncode == 0, res.stderr
    unit = root / "etc/systemd/system/overlay.service"
    assert f"ExecStart={hidden.venv}/bin/overlay daemon -c /etc/overlay/overlay.yaml" in unit.read_text().splitlines()
    assert (root / "etc/overlay/overlay.yaml").read_bytes() == (REPO / "packaging/overlay.yaml").read_bytes()
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and "overlay.service" not in verify.stdout + verify.stderr, verify.stderr

    ns = {name: netns_factory(f"pkg{name}") for name in HOSTS}
    veth(ns["a"], "eth0", ns["b"], "eth0")
    for name, h in HOSTS.items():
        ns[name].run("ip", "addr", "add", f"{h['private']}/24", "dev", "eth0")
    tmp = dist[0]
    pins = {name: new_pin_root(f"pkg{name}") for name in HOSTS}
    procs: dict[str, subprocess.Popen] = {}
    logs = {}
    try:
        for name, peer in (("a", "b"), ("b", "a")):
            cfg = tmp / f"{name}.yaml"
            cfg.write_text(yaml.safe_dump(_config(name, peer, pins[name])))
            logs[name] = open(tmp / f"{name}.log", "w")
            procs[name] = hidden.popen("overlay", "daemon", "-c", str(cfg), netns=ns[name].name, log=logs[name])
        status = {}
        deadline = time.monotonic() + 180
        for name, h in HOSTS.items():
            while True:
                assert procs[name].poll() is None, (tmp / f"{name}.log").read_text()
                res = hidden.run("overlay", "status", "--json", "--listen", f"127.0.0.1:{h['status']}",
                                 netns=ns[name].name)
                if res.returncode == 0 and json.loads(res.stdout).get("ready"):
                    status[name] = json.loads(res.stdout)
                    break
                assert time.monotonic() < deadline, f"daemon {name} not ready:\n{res.stderr}"
                time.sleep(0.5)
        for name, peer in (("a", "b"), ("b", "a")):
            s = status[name]
            assert (s["node_id"], s["overlay"]) == (f"pkg-{name}", HOSTS[name]["overlay"])
            assert [(p["node_id"], p["real"]) for p in s["peers"]] == [(f"pkg-{peer}", HOSTS[peer]["private"])]
            for off in ("ovl0", "ovl0p"):  # the product leaves offload alone; the test's veths go without
                ns[name].offload_off(off)

        # overlay traffic both ways, and to the override outside the subnet
        for src, dst, target in (("a", "b", HOSTS["b"]["overlay"]), ("b", "a", HOSTS["a"]["overlay"]),
                                 ("a", "b", OVERRIDE)):
            server = ns[dst].helper_bg("serve-tcp", port=PORT, count=1, timeout=20)
            try:
                got = ns[src].helper("connect-tcp", host=target, port=PORT, timeout=5)
            finally:
                server.wait(30)
            assert got["ok"], (src, target, got)
            assert got["peer"] == target  # the application sees the address it dialled
            assert got["server_saw"] == HOSTS[src]["private"]
        for name in HOSTS:
            assert "Traceback" not in (tmp / f"{name}.log").read_text()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            hidden.run("overlay", "datapath", "teardown", "-c", str(tmp / f"{name}.yaml"), netns=ns[name].name)
        for fh in logs.values():
            fh.close()
        for path in pins.values():
            shutil.rmtree(path, ignore_errors=True)
    assert os.path.exists(REPO / "bpf" / "datapath.c")  # the tmpfs never covered the test's own view
