"""The file registry against a real directory, with the plugin installed (no root needed).

Expectations are written out by hand: the records the tests write, and what a node must
see of them.
"""

from __future__ import annotations

import ipaddress
import json
import multiprocessing
import os
import shutil
import threading
import time

import pytest
from overlay.config import config_from_dict
from overlay.errors import AlreadyExists, InvalidConfigError, RegistryError
from overlay.model import Node

from overlay_file_registry import FileRegistry, FileRegistryOptions, validate_config

SUBNET = ipaddress.IPv4Network("192.168.0.0/24")


def node(name: str, overlay: str, private: str = "10.0.0.1", **kw) -> Node:
    return Node(name, "lab", private, "198.18.0.1", overlay, **kw)


def wait_for(pred, timeout: float = 10.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


@pytest.fixture
def registries(tmp_path):
    made = []

    def make(node_id: str, watch: str = "poll", poll_s: float = 0.05, directory=None) -> FileRegistry:
        reg = FileRegistry(FileRegistryOptions(str(directory or tmp_path / "fleet"), watch, poll_s), SUBNET, node_id,
                           timeout_s=5)
        made.append(reg)
        return reg

    yield make
    for reg in made:
        reg.close()


# --- the config hook ---------------------------------------------------------------------------


@pytest.mark.parametrize("section, want", [
    ({"directory": "/srv/fleet"}, FileRegistryOptions("/srv/fleet", "auto", 1.0)),
    ({"directory": "/srv/fleet/", "watch": "poll", "poll_s": 2}, FileRegistryOptions("/srv/fleet", "poll", 2.0)),
    ({"directory": "/srv/x", "watch": "inotify", "poll_s": 0.5}, FileRegistryOptions("/srv/x", "inotify", 0.5)),
])
def test_validate_config_accepts(section, want):
    assert validate_config(section) == want


@pytest.mark.parametrize("section, path, fragment", [
    ({}, "directory", "is required"),
    ({"directory": "srv/fleet"}, "directory", "must be an absolute path"),
    ({"directory": 7}, "directory", "must be a non-empty string"),
    ({"directory": "/srv", "colour": "red"}, "colour", "unknown key for registry.backend file"),
    ({"directory": "/srv", "watch": "fanotify"}, "watch", "'fanotify' is not one of: auto, inotify, poll"),
    ({"directory": "/srv", "poll_s": 0}, "poll_s", "between 0.05 and 3600"),
    ({"directory": "/srv", "poll_s": True}, "poll_s", "must be a number"),
])
def test_validate_config_refuses_with_a_relative_key_path(section, path, fragment):
    with pytest.raises(InvalidConfigError) as info:
        validate_config(section)
    assert info.value.path == path and fragment in info.value.reason


def _cfg(registry: dict) -> dict:
    return {"node_id": "a", "network": "lab", "addresses": {"private": "10.0.0.1", "public": "198.18.0.1"},
            "registry": registry}


def test_overlay_config_selects_the_plugin_and_keeps_its_options():
    cfg = config_from_dict(_cfg({"backend": "file", "directory": "/srv/fleet", "poll_s": 0.5, "timeout_s": 3}))
    assert cfg.registry.backend == "file" and cfg.registry.timeout_s == 3.0
    assert cfg.registry.options == FileRegistryOptions("/srv/fleet", "auto", 0.5)
    assert cfg.registry.hosts == ()  # no ZooKeeper defaults for a plugin (nothing added to the failsafe)


@pytest.mark.parametrize("registry, path, fragment", [
    ({"backend": "file", "directory": "/srv", "hosts": ["127.0.0.1:2181"]}, "registry.hosts", "unknown key"),
    ({"backend": "file"}, "registry.directory", "is required"),
    ({"backend": "file", "directory": "/srv", "poll_s": "fast"}, "registry.poll_s", "must be a number"),
    ({"backend": "file", "directory": "/srv", "timeout_s": -1}, "registry.timeout_s", "between 0 and 3600"),
])
def test_overlay_config_prefixes_the_plugins_errors(registry, path, fragment):
    with pytest.raises(InvalidConfigError) as info:
        config_from_dict(_cfg(registry))
    assert info.value.path == path and fragment in info.value.reason


def test_from_config_builds_it():
    cfg = config_from_dict(_cfg({"backend": "file", "directory": "/srv/fleet"}))
    reg = FileRegistry.from_config(cfg)
    assert reg.node_id == "a" and reg.layout.directory == "/srv/fleet" and reg.name == "file"


# --- allocation ----------------------------------------------------------------------------------


def test_allocation_is_kept_across_restarts_and_requests_are_honoured(registries, tmp_path):
    a = registries("a")
    ip = a.allocate("a")
    assert ipaddress.IPv4Address(ip) in SUBNET and ip not in ("192.168.0.0", "192.168.0.255")
    fleet = tmp_path / "fleet"
    assert (fleet / "alloc/id-to-ip/a").read_text() == ip
    assert (fleet / "alloc/ip-to-id" / ip).read_text() == "a"
    assert registries("a").allocate("a") == ip  # a restart: the same address
    b = registries("b")
    assert b.allocate("b", "192.168.0.20") == "192.168.0.20"
    with pytest.raises(AlreadyExists, match=r"192.168.0.20 is already allocated to node 'b'"):
        a.allocate("a", "192.168.0.20")
    assert a.allocate("a") == ip  # refused: a keeps its address
    # a configured address moves the node, and frees the old one
    assert a.allocate("a", "192.168.0.30") == "192.168.0.30"
    assert not (fleet / "alloc/ip-to-id" / ip).exists()
    assert (fleet / "alloc/id-to-ip/a").read_text() == "192.168.0.30"
    with pytest.raises(RegistryError, match="outside|not"):
        a.allocate("a", "10.0.0.1")


def _allocate_in_child(directory: str, node_id: str, out) -> None:
    reg = FileRegistry(FileRegistryOptions(directory, "poll", 1.0), ipaddress.IPv4Network("192.168.0.0/28"),
                       node_id, timeout_s=30)
    try:
        out.put((node_id, reg.allocate(node_id)))
    except Exception as exc:  # reported to the parent
        out.put((node_id, f"error: {type(exc).__name__}: {exc}"))


def test_concurrent_allocators_in_separate_processes_never_share_an_address(tmp_path):
    # a /28 has 14 host addresses: 14 processes take all of them, the 15th finds none
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    names = [f"n{i}" for i in range(15)]
    procs = [ctx.Process(target=_allocate_in_child, args=(str(tmp_path), n, out)) for n in names]
    os.makedirs(tmp_path / "alloc/ip-to-id")
    os.makedirs(tmp_path / "alloc/id-to-ip")
    for p in procs:
        p.start()
    got = dict(out.get(timeout=60) for _ in names)
    for p in procs:
        p.join(30)
    addresses = [v for v in got.values() if not v.startswith("error")]
    errors = [v for v in got.values() if v.startswith("error")]
    assert len(addresses) == 14 and len(set(addresses)) == 14
    assert set(addresses) == {f"192.168.0.{i}" for i in range(1, 15)}
    assert len(errors) == 1 and "AllocationExhausted" in errors[0]
    for n, ip in got.items():  # both directions agree
        if not ip.startswith("error"):
            assert (tmp_path / "alloc/ip-to-id" / ip).read_text() == n
            assert (tmp_path / "alloc/id-to-ip" / n).read_text() == ip


# --- watching ----------------------------------------------------------------------------------


@pytest.mark.parametrize("watch", ["inotify", "poll"])
def test_two_nodes_see_each_other_and_what_is_wrong(registries, tmp_path, watch):
    # inotify with a 1-hour poll period: only the kernel's events can make it see the changes
    poll_s = 3600 if watch == "inotify" else 0.05
    a, b = registries("a", watch, poll_s), registries("b", watch, poll_s)
    seen_by_b = Counter()
    a.start(Counter())
    b.start(seen_by_b)
    assert (a.watch_mode, b.watch_mode) == (watch, watch)
    assert b.view().connected and b.view().synced and b.view().nodes == {}
    na = node("a", a.allocate("a"), groups=("web",))
    nb = node("b", b.allocate("b"), private="10.0.0.2")
    a.register(na)
    b.register(nb)
    wait_for(lambda: b.view().nodes == {"a": na}, what="b to see a")
    wait_for(lambda: a.view().nodes == {"b": nb}, what="a to see b")
    assert seen_by_b.calls >= 2
    fleet = tmp_path / "fleet"
    assert json.loads((fleet / "nodes/a.json").read_text()) == {
        "v": 1, "node_id": "a", "network": "lab", "private": "10.0.0.1", "public": "198.18.0.1",
        "overlay": na.overlay, "groups": ["web"], "open_ports": []}

    # records that must be ignored, each with its reason; written in place like an operator would
    (fleet / "nodes/bad-json.json").write_text("{nope")
    (fleet / "nodes/liar.json").write_text(json.dumps({**json.loads((fleet / "nodes/a.json").read_text()),
                                                       "node_id": "a"}))
    (fleet / "nodes/squatter.json").write_text(json.dumps(
        {"v": 1, "node_id": "squatter", "network": "lab", "private": "10.0.0.9", "public": "198.18.0.9",
         "overlay": na.overlay}))
    (fleet / "nodes/unallocated.json").write_text(json.dumps(
        {"v": 1, "node_id": "unallocated", "network": "lab", "private": "10.0.0.8", "public": "198.18.0.8",
         "overlay": "192.168.0.250"}))
    (fleet / "nodes/notes.txt").write_text("not a record")
    (fleet / "nodes/.a.json.swp").write_text("editor state")
    (fleet / "policies/web.json").write_text(json.dumps(
        {"v": 1, "from": {"group": "web"}, "to": {"group": "db"}, "proto": "tcp", "ports": [5432]}))
    (fleet / "config/max_change").write_text("7\n")
    wait_for(lambda: len(b.view().rejected) == 4 and b.view().max_change == 7 and b.view().policies,
             what="b to judge the new records")
    view = b.view()
    assert view.nodes == {"a": na}
    assert set(view.rejected) == {"bad-json", "liar", "squatter", "unallocated"}
    assert "not JSON" in view.rejected["bad-json"]
    assert "names node_id 'a' but lives in nodes/liar.json" in view.rejected["liar"]
    assert view.rejected["squatter"] == f"overlay {na.overlay} is allocated to 'a', not 'squatter'"
    assert "not allocated to unallocated" in view.rejected["unallocated"]
    assert set(view.policies) == {"web"} and view.policies["web"].ports == ((5432, 5432),)

    (fleet / "config/max_change").write_text("many")
    wait_for(lambda: "config:max_change" in b.view().rejected, what="a bad max_change to be refused")
    assert b.view().max_change is None

    # a stops: its record goes, and b drops it
    a.close()
    assert not (fleet / "nodes/a.json").exists()
    wait_for(lambda: "a" not in b.view().nodes, what="b to drop a")


def test_a_deleted_own_record_is_written_again(registries, tmp_path):
    a = registries("a")
    a.start(Counter())
    na = node("a", a.allocate("a"))
    a.register(na)
    path = tmp_path / "fleet/nodes/a.json"
    data = path.read_bytes()
    path.unlink()
    wait_for(path.exists, what="the record written again")
    assert path.read_bytes() == data


def test_close_leaves_a_newer_record_of_the_same_node_alone(registries, tmp_path):
    a = registries("a")
    a.start(Counter())
    a.register(node("a", a.allocate("a")))
    path = tmp_path / "fleet/nodes/a.json"
    newer = json.dumps({**json.loads(path.read_text()), "groups": ["db"]})
    path.write_text(newer)  # another process of node a took over
    a.close()
    assert path.read_text() == newer


@pytest.mark.parametrize("watch", ["inotify", "poll"])
def test_an_unreachable_directory_keeps_the_view_and_says_so(registries, tmp_path, watch):
    fleet = tmp_path / "fleet"
    a, b = registries("a", watch, 0.05), registries("b", watch, 0.05)
    a.start(Counter())
    b.start(Counter())
    na = node("a", a.allocate("a"))
    a.register(na)
    wait_for(lambda: b.view().nodes == {"a": na}, what="b to see a")
    moved = tmp_path / "moved"
    os.rename(fleet, moved)
    wait_for(lambda: not b.view().connected, what="b to notice the directory is gone")
    assert b.view().nodes == {"a": na}  # fail static: the last view is kept
    os.rename(moved, fleet)
    wait_for(lambda: b.view().connected, what="b to reconnect")
    assert b.view().nodes == {"a": na}
    # and it follows changes again: a stops, its record goes
    a.close()
    assert not (fleet / "nodes/a.json").exists()
    wait_for(lambda: b.view().nodes == {}, what="b to drop a after the reconnection")


def test_the_listener_runs_once_per_change_not_per_poll(registries):
    a = registries("a", "poll", 0.02)
    calls = Counter()
    a.start(calls)
    after_start = calls.calls
    time.sleep(0.5)  # about 25 rescans that find nothing new
    assert calls.calls == after_start


def test_start_on_an_unusable_directory_is_an_error_not_a_traceback(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    reg = FileRegistry(FileRegistryOptions(str(blocker / "fleet"), "poll", 1.0), SUBNET, "a")
    with pytest.raises(RegistryError, match="registry directory"):
        reg.start(Counter())
    reg.close()


def test_close_without_start_and_twice_is_harmless(tmp_path):
    reg = FileRegistry(FileRegistryOptions(str(tmp_path), "poll", 1.0), SUBNET, "a")
    reg.close()
    reg.close()
    assert not reg.view().connected


def test_many_writers_at_once_are_all_seen(registries, tmp_path):
    b = registries("b", "inotify", 3600)
    b.start(Counter())
    fleet = tmp_path / "fleet"
    writers = [registries(f"w{i}") for i in range(20)]

    def join(reg):
        reg.register(node(reg.node_id, reg.allocate(reg.node_id), private=f"10.0.1.{int(reg.node_id[1:]) + 1}"))

    threads = [threading.Thread(target=join, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    wait_for(lambda: len(b.view().nodes) == 20, what="b to see 20 writers")
    assert set(b.view().nodes) == {f"w{i}" for i in range(20)}
    assert len({n.overlay for n in b.view().nodes.values()}) == 20
    shutil.rmtree(fleet / "nodes")
    wait_for(lambda: not b.view().connected, what="b to notice nodes/ is gone")
