"""The example plugin, really plugged in (issue 17, acceptance 3).

``examples/plugins/overlay-file-registry`` is built and installed with pip, as a third
party's package would be, into a temporary ``--target`` directory (never into the shared
``.venv``: only the processes given that directory on ``PYTHONPATH`` can see it). Then:

- the plugin's own test suite passes against the installed package;
- ``overlay plugins`` lists it (distribution, version, module, loads, validates its section),
  and lists a broken distribution with its error, without a traceback;
- a bad key in its section exits 2 naming ``registry.<key>``, and without the plugin on the
  path ``registry.backend: file`` exits 2 naming ``registry.backend`` and what is available;
- (root) two daemons with ``registry.backend: file`` on one shared directory, each in its
  own namespace with the real eBPF datapath, get their overlay addresses from it, see each
  other and carry overlay traffic both ways; one inotify, one polling; when one stops, the
  other drops it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.support.netns import new_pin_root, require_bcc, veth
from tests.support.paths import PYTHON, REPO

PLUGIN = Path(REPO) / "examples" / "plugins" / "overlay-file-registry"
OVERLAY = [PYTHON, "-m", "overlay.cli"]
HOSTS = {
    "a": {"private": "10.0.0.1", "public": "198.18.0.1", "status": 9491, "watch": {"watch": "auto"}},
    "b": {"private": "10.0.0.2", "public": "198.18.0.2", "status": 9492, "watch": {"watch": "poll", "poll_s": 0.2}},
}
SUBNET = "192.168.0.0/18"
PORT = 7171


@pytest.fixture(scope="module")
def plugin_site():
    """``<tmp>/site``: the plugin, built from a copy of its source (the checkout stays clean of
    build output) and installed with pip; ``<tmp>`` is removed at the end."""
    tmp = Path(tempfile.mkdtemp(prefix="overlay-plugin-test-"))
    try:
        shutil.copytree(PLUGIN, tmp / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        res = subprocess.run([PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                              "--no-build-isolation", "--target", str(tmp / "site"), str(tmp / "src")],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _env(site: Path | str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return env


def _overlay(*args: str, site: Path | str | None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*OVERLAY, *args], capture_output=True, text=True, timeout=timeout, env=_env(site),
                          cwd=REPO)


def test_the_shared_venv_does_not_have_it():
    res = subprocess.run([PYTHON, "-c", "import importlib.util; print(importlib.util.find_spec('overlay_file_registry'))"],
                         capture_output=True, text=True, timeout=60, env=_env(None), cwd="/")
    assert res.stdout.strip() == "None", "the example plugin must not be installed in the shared .venv"


def test_the_plugins_own_tests_pass_against_the_installed_package(plugin_site):
    res = subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(plugin_site / "src" / "tests")],
                         capture_output=True, text=True, timeout=600, env=_env(plugin_site / "site"),
                         cwd=str(plugin_site))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout and "failed" not in res.stdout
    where = subprocess.run([PYTHON, "-c", "import overlay_file_registry as m; print(m.__file__)"],
                           capture_output=True, text=True, timeout=60, env=_env(plugin_site / "site"),
                           cwd=str(plugin_site))
    assert where.stdout.strip().startswith(str(plugin_site / "site"))


def test_overlay_plugins_lists_it(plugin_site):
    res = _overlay("plugins", "--json", site=plugin_site / "site")
    assert res.returncode == 0, res.stderr
    rows = [r for r in json.loads(res.stdout)["overlay.registries"] if not r["builtin"]]
    assert rows == [{"name": "file", "builtin": False, "distribution": "overlay-file-registry", "version": "0.1.0",
                     "module": "overlay_file_registry:FileRegistry", "shadowed_by": None, "loads": True,
                     "error": None, "config_hook": True}]
    text = _overlay("plugins", site=plugin_site / "site")
    line = next(ln for ln in text.stdout.splitlines() if "overlay_file_registry" in ln)
    assert line.split()[:4] == ["file", "overlay-file-registry", "0.1.0", "overlay_file_registry:FileRegistry"]
    assert line.endswith("ok, validates its own section")
    # without it on the path, only the built-ins
    res = _overlay("plugins", "--json", site=None)
    assert [r["name"] for r in json.loads(res.stdout)["overlay.registries"]] == ["grpc", "static", "zookeeper"]


def test_a_broken_installed_plugin_is_listed_with_its_error(plugin_site, tmp_path):
    # a real distribution whose entry point names a module that does not exist
    broken = tmp_path / "broken"
    info = broken / "overlay_broken-0.2.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: overlay-broken\nVersion: 0.2.0\n")
    (info / "entry_points.txt").write_text("[overlay.registries]\nbroken = overlay_no_such_module:Registry\n")
    site = f"{plugin_site / 'site'}:{broken}"
    res = _overlay("plugins", "--json", site=site)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)["overlay.registries"] if not r["builtin"]}
    assert rows["broken"] == {"name": "broken", "builtin": False, "distribution": "overlay-broken", "version": "0.2.0",
                              "module": "overlay_no_such_module:Registry", "shadowed_by": None, "loads": False,
                              "error": "registry backend 'broken' (overlay_no_such_module:Registry) failed to load: "
                                       "No module named 'overlay_no_such_module'", "config_hook": None}
    assert rows["file"]["loads"] is True  # the others are unaffected
    text = _overlay("plugins", site=site)
    assert text.returncode == 0 and "Traceback" not in text.stdout + text.stderr
    line = next(ln for ln in text.stdout.splitlines() if "overlay_no_such_module" in ln)
    assert "ERROR: registry backend 'broken'" in line
    # choosing it is a config error at registry.backend, not a crash
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"node_id": "a", "network": "lab", "registry": {"backend": "broken"},
                                   "addresses": {"private": "10.0.0.1", "public": "198.18.0.1"}}))
    res = _overlay("check-config", str(cfg), site=site)
    assert res.returncode == 2
    assert res.stderr.strip() == ("overlay: invalid config: registry.backend: registry backend 'broken' "
                                  "(overlay_no_such_module:Registry) failed to load: No module named "
                                  "'overlay_no_such_module'")


def _config(name: str, fleet: str, pin_root: str, **registry) -> dict:
    h = HOSTS[name]
    return {
        "node_id": f"plug-{name}", "network": "lab", "overlay_subnet": SUBNET,
        "addresses": {"private": h["private"], "public": h["public"]},  # the overlay comes from the registry
        "registry": {"backend": "file", "directory": fleet, **h["watch"], **registry},
        "datapath": {"backend": "ebpf", "interface": "eth0", "pin_root": pin_root},
        "status_listen": f"127.0.0.1:{h['status']}",
    }


@pytest.mark.parametrize("registry, key, reason", [
    ({"colour": "red"}, "registry.colour", "unknown key for registry.backend file (known: directory, watch, poll_s)"),
    ({"directory": "relative/dir"}, "registry.directory", "must be an absolute path, got 'relative/dir'"),
    ({"poll_s": 0}, "registry.poll_s", "must be between 0.05 and 3600 seconds, got 0"),
])
def test_a_bad_key_in_its_section_exits_2_naming_it(plugin_site, tmp_path, registry, key, reason):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(_config("a", str(tmp_path / "fleet"), "/sys/fs/bpf/x", **registry)))
    for command in (["check-config", str(cfg)], ["daemon", "-c", str(cfg), "--dry-run"]):
        res = _overlay(*command, site=plugin_site / "site")
        assert res.returncode == 2, res.stdout + res.stderr
        assert res.stderr.strip() == f"overlay: invalid config: {key}: {reason}"
    assert not (tmp_path / "fleet").exists()  # refused before anything was created


def test_without_the_plugin_file_is_an_unknown_backend(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_config("a", str(tmp_path / "fleet"), "/sys/fs/bpf/x")))
    res = _overlay("check-config", str(cfg), site=None)
    assert res.returncode == 2
    assert res.stderr.startswith("overlay: invalid config: registry.backend: 'file' is not one of the available "
                                 "registry backends: grpc, static, zookeeper (")
    assert "Traceback" not in res.stderr


def _status(ns, name: str) -> dict | None:
    res = ns.run(*OVERLAY, "status", "--json", "--listen", f"127.0.0.1:{HOSTS[name]['status']}", check=False,
                 timeout=20, cwd=REPO)
    return json.loads(res.stdout) if res.returncode == 0 else None


def _wait_status(ns, name: str, proc, log: Path, pred, what: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"daemon {name} exited:\n{log.read_text()}"
        status = _status(ns, name)
        if status is not None and pred(status):
            return status
        assert time.monotonic() < deadline, f"daemon {name}: {what} not reached; last status {status}\n{log.read_text()}"
        time.sleep(0.3)


@pytest.mark.root
def test_two_daemons_on_one_directory_see_each_other_and_carry_traffic(plugin_site, netns_factory):
    require_bcc()
    ns = {name: netns_factory(f"fr{name}") for name in HOSTS}
    veth(ns["a"], "eth0", ns["b"], "eth0")
    for name, h in HOSTS.items():
        ns[name].run("ip", "addr", "add", f"{h['private']}/24", "dev", "eth0")
    work = plugin_site / "run"
    fleet = work / "fleet"
    work.mkdir()
    pins = {name: new_pin_root(f"fr{name}") for name in HOSTS}
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    handles = []
    try:
        for name in HOSTS:
            cfg = work / f"{name}.yaml"
            cfg.write_text(yaml.safe_dump(_config(name, str(fleet), pins[name])))
            logs[name] = work / f"{name}.log"
            fh = open(logs[name], "w")
            handles.append(fh)
            procs[name] = ns[name].popen(*OVERLAY, "daemon", "-c", str(cfg), stdout=fh, stderr=subprocess.STDOUT,
                                         env=_env(plugin_site / "site"), cwd=REPO)
        status = {name: _wait_status(ns[name], name, procs[name], logs[name],
                                     lambda s: s.get("ready") and len(s["peers"]) == 1, "ready with one peer")
                  for name in HOSTS}

        # the addresses came from the directory's allocation, one each, both directions agreeing
        overlays = {name: status[name]["overlay"] for name in HOSTS}
        assert len(set(overlays.values())) == 2
        for name in HOSTS:
            assert (fleet / "alloc/id-to-ip" / f"plug-{name}").read_text() == overlays[name]
            assert (fleet / "alloc/ip-to-id" / overlays[name]).read_text() == f"plug-{name}"
            record = json.loads((fleet / "nodes" / f"plug-{name}.json").read_text())
            assert (record["node_id"], record["overlay"], record["private"]) == (
                f"plug-{name}", overlays[name], HOSTS[name]["private"])
        for name, peer in (("a", "b"), ("b", "a")):
            s = status[name]
            assert s["registry"]["backend"] == "file" and s["registry"]["connected"]
            assert [(p["node_id"], p["overlay"], p["real"]) for p in s["peers"]] == [
                (f"plug-{peer}", overlays[peer], HOSTS[peer]["private"])]
            for off in ("ovl0", "ovl0p"):  # the product leaves offload alone; the test's veths go without
                ns[name].offload_off(off)

        # overlay traffic both ways: the application dials the overlay address and sees it as its peer
        for src, dst in (("a", "b"), ("b", "a")):
            server = ns[dst].helper_bg("serve-tcp", port=PORT, count=1, timeout=20)
            try:
                got = ns[src].helper("connect-tcp", host=overlays[dst], port=PORT, timeout=5)
            finally:
                server.wait(30)
            assert got["ok"], (src, dst, got)
            assert got["peer"] == overlays[dst]
            assert got["server_saw"] == HOSTS[src]["private"]

        # b stops: its record leaves the directory, and a drops it (a watches with inotify)
        procs["b"].send_signal(signal.SIGTERM)
        assert procs["b"].wait(30) == 0
        assert not (fleet / "nodes/plug-b.json").exists()
        _wait_status(ns["a"], "a", procs["a"], logs["a"], lambda s: s["peers"] == [], "b dropped", timeout=30)
        assert (fleet / "alloc/id-to-ip/plug-b").read_text() == overlays["b"]  # kept for b's next start
        for name in HOSTS:
            assert "Traceback" not in logs[name].read_text()
        assert "watching with inotify" in logs["a"].read_text()
        assert "watching with poll" in logs["b"].read_text()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for fh in handles:
            fh.close()
        for name in HOSTS:
            cfg = work / f"{name}.yaml"
            if cfg.exists():
                # the config names the plugin's backend: it is read with the plugin on the path
                ns[name].run("env", f"PYTHONPATH={plugin_site / 'site'}", *OVERLAY, "datapath", "teardown",
                             "-c", str(cfg), check=False, timeout=60, cwd=REPO)
        for path in pins.values():
            shutil.rmtree(path, ignore_errors=True)
