"""``registry.backend: file``: the fleet as files in one shared directory (layout.py).

The registry follows overlay's ``Registry`` protocol (``overlay/registry/__init__.py``):

- ``start(listener)`` creates the layout if missing, sets the watches (watch.py), reads
  every record once, then follows changes in a thread of its own, calling ``listener()``
  after every change of the view;
- ``allocate(node_id, requested)`` claims an overlay address under the directory's lock;
- ``register(node)`` writes ``nodes/<node_id>.json`` and keeps it there (written again if
  it is deleted while the daemon runs); ``close()`` removes it, as a ZooKeeper session's end
  removes an ephemeral node;
- ``view()`` is the validated records: a node record counts only if it parses (the
  ZooKeeper record rules), lives in the file of its own ``node_id`` and
  ``alloc/ip-to-id/<overlay>`` names that node; every other record is in ``rejected`` with
  its reason (logged once per reason). This node's own record is left out.

A node that dies without ``close()`` (SIGKILL, power loss) leaves its record behind, and its
peers keep it, until it starts again or an operator deletes the file: unlike ZooKeeper's
ephemeral nodes, a file has no session.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import threading
from typing import Any

from overlay.errors import InvalidRecord, RegistryError, Unavailable
from overlay.model import Node, Policy, parse_node_record, parse_policy_record, serialise_node, valid_name
from overlay.registry import Listener, RegistryView, ViewState, notify_listener

from overlay_file_registry.layout import Allocator, Layout, read_small, record_name, remove, write_atomic
from overlay_file_registry.options import FileRegistryOptions, validate_config
from overlay_file_registry.watch import Waker, make_watcher

log = logging.getLogger(__name__)

MAX_MAX_CHANGE = 1_000_000


class FileRegistry:
    """The Registry protocol over a directory (see the module docstring and README.md)."""

    name = "file"
    validate_config = staticmethod(validate_config)  # overlay's config hook (docs/plugins.md)

    @classmethod
    def from_config(cls, config: Any) -> FileRegistry:
        options = config.registry.options
        if not isinstance(options, FileRegistryOptions):
            raise RegistryError("registry.backend file: the registry section was not validated by this plugin "
                                "(load the config with overlay.config.load_config)")
        return cls(options, config.overlay_subnet, config.node_id, timeout_s=config.registry.timeout_s)

    def __init__(self, options: FileRegistryOptions, subnet: Any, node_id: str, *, timeout_s: float = 10.0,
                 rng: random.Random | None = None):
        self.options = options
        self.subnet = ipaddress.IPv4Network(subnet)
        self.node_id = valid_name(node_id, "node_id")
        self.layout = Layout(options.directory)
        self._alloc = Allocator(self.layout, self.subnet, timeout_s, rng)
        self._v = ViewState()
        self._listener: Listener | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._waker: Waker | None = None
        self._watcher = None
        self._own_lock = threading.Lock()
        self._own_data: bytes | None = None
        # what the worker knows (its thread only, after start)
        self._seen: dict[tuple[str, str], tuple[int, int, int, int]] = {}  # (kind, name) -> file identity
        self._nodes: dict[str, tuple[Node | None, str | None]] = {}
        self._owners: dict[str, str] = {}
        self._policies: dict[str, tuple[Policy | None, str | None]] = {}
        self._max_change: tuple[int | None, str | None] = (None, None)
        self._logged: dict[str, str] = {}
        self._error: str | None = None

    @property
    def watch_mode(self) -> str | None:
        """``inotify`` or ``poll`` once started (``registry.watch: auto`` picks one)."""
        return self._watcher.mode if self._watcher is not None else None

    # --- Registry protocol ----------------------------------------------------------------

    def start(self, listener: Listener) -> None:
        self._listener = listener
        self.layout.ensure()
        self._waker = Waker()
        try:
            self._watcher = make_watcher(self.options.watch, self.layout.dirs(), self.layout.parents(),
                                         self._waker, self.options.poll_s)
            self._rescan()
        except OSError as exc:
            raise Unavailable(f"registry directory {self.layout.directory}: {exc.strerror or exc}") from None
        log.info("node %s: file registry at %s, watching with %s", self.node_id, self.layout.directory,
                 self.watch_mode)
        self._publish(connected=True)
        self._thread = threading.Thread(target=self._run, name=f"file-registry-{self.node_id}", daemon=True)
        self._thread.start()

    def allocate(self, node_id: str, requested: str | None = None) -> str:
        self.layout.ensure()
        try:
            return self._alloc.allocate(node_id, requested)
        except OSError as exc:
            raise Unavailable(f"allocating an overlay address for {node_id} in {self.layout.directory}: "
                              f"{exc.strerror or exc}") from None

    def register(self, node: Node) -> None:
        if node.node_id != self.node_id:
            raise RegistryError(f"this registry serves node {self.node_id!r}, not {node.node_id!r}")
        data = serialise_node(node)
        with self._own_lock:
            self._own_data = data
            self._write_own()

    def view(self) -> RegistryView:
        return self._v.snapshot()

    def release_guard(self) -> None:
        return None

    def close(self) -> None:
        self._closed.set()
        self._listener = None
        if self._waker is not None:
            self._waker.wake()
        if self._thread is not None:
            self._thread.join(10)
        if self._watcher is not None:
            self._watcher.close()
        if self._waker is not None:
            self._waker.close()
            self._waker = None
        with self._own_lock:
            path = self.layout.node_path(self.node_id)
            if self._own_data is not None and read_small(path) == self._own_data:
                remove(path)  # ours, not a newer process's of the same node
            self._own_data = None
        with self._v.lock:
            self._v.connected = self._v.synced = False
            self._v.revision += 1

    # --- the worker -----------------------------------------------------------------------

    def _write_own(self) -> None:
        try:
            write_atomic(self.layout.node_path(self.node_id), self._own_data)
        except OSError as exc:
            raise Unavailable(f"registering node {self.node_id} in {self.layout.directory}: "
                              f"{exc.strerror or exc}") from None

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                changes = self._watcher.wait()
                if self._closed.is_set():
                    return
                if changes is None:
                    self._rescan()
                else:
                    for kind, filename in sorted(changes):
                        self._refresh(kind, filename)
                self._keep_own()
                self._publish(connected=True)
            except (OSError, Unavailable) as exc:
                self._watcher.close()  # inotify: set the watches again, by path, next time
                self._publish(connected=False, error=str(exc))
                self._closed.wait(self.options.poll_s)

    def _rescan(self) -> None:
        """Read every file whose identity changed; forget those that are gone."""
        present = set()
        for kind, path in self.layout.dirs().items():
            with os.scandir(path) as entries:
                for entry in entries:
                    name = record_name(kind, entry.name)
                    if name is not None:
                        present.add((kind, name))
                        self._refresh(kind, entry.name)
        for key in set(self._seen) - present:
            self._drop(*key)

    def _refresh(self, kind: str, filename: str) -> None:
        name = record_name(kind, filename)
        if name is None:
            return
        path = os.path.join(self.layout.dirs()[kind], filename)
        try:
            st = os.stat(path)
            ident = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if self._seen.get((kind, name)) == ident:
                return
            data = read_small(path)
        except FileNotFoundError:
            data = None
        except OSError as exc:  # a directory or an unreadable file where a record should be
            self._seen[(kind, name)] = (0, 0, 0, -1)
            self._store(kind, name, None, f"{kind}/{filename} cannot be read ({exc.strerror})")
            return
        if data is None:
            self._drop(kind, name)
            return
        self._seen[(kind, name)] = ident
        self._store(kind, name, data, None)

    def _store(self, kind: str, name: str, data: bytes | None, reason: str | None) -> None:
        if kind == "ip-to-id":
            if data is not None:
                self._owners[name] = data.decode("utf-8", "replace").strip()
            return
        value = None
        if reason is None:
            try:
                if kind == "nodes":
                    value = parse_node_record(data, self.subnet)
                    if value.node_id != name:
                        raise InvalidRecord(f"node record names node_id {value.node_id!r} but lives in "
                                            f"nodes/{name}.json")
                elif kind == "policies":
                    value = parse_policy_record(data, name)
                else:
                    value = self._parse_config(name, data)
            except (InvalidRecord, ValueError) as exc:
                value, reason = None, str(exc)
        if kind == "nodes":
            self._nodes[name] = (value, reason)
        elif kind == "policies":
            self._policies[name] = (value, reason)
        elif name == "max_change":
            self._max_change = (value, reason)

    @staticmethod
    def _parse_config(name: str, data: bytes) -> int | None:
        if name != "max_change":
            return None  # not a key of this layout: ignored
        text = data.decode("utf-8", "replace").strip()
        if not text.isdigit() or int(text) > MAX_MAX_CHANGE:
            raise ValueError(f"config/max_change holds {text[:40]!r}, not an integer in 0..{MAX_MAX_CHANGE}")
        return int(text)

    def _drop(self, kind: str, name: str) -> None:
        self._seen.pop((kind, name), None)
        if kind == "ip-to-id":
            self._owners.pop(name, None)
        elif kind == "policies":
            self._policies.pop(name, None)
        elif kind == "config" and name == "max_change":
            self._max_change = (None, None)
        elif kind == "nodes":
            self._nodes.pop(name, None)

    def _keep_own(self) -> None:
        """Write this node's record again if it is gone (after a round of changes)."""
        if ("nodes", self.node_id) in self._seen:
            return
        with self._own_lock:
            path = self.layout.node_path(self.node_id)
            if self._own_data is not None and not self._closed.is_set() and not os.path.exists(path):
                log.warning("node %s: own record %s was deleted: writing it again", self.node_id, path)
                self._write_own()

    def _judge(self) -> tuple[dict[str, Node], dict[str, str], dict[str, Policy]]:
        nodes, rejected, policies = {}, {}, {}
        for name, (node, reason) in self._nodes.items():
            if name == self.node_id:
                continue
            if node is not None:
                owner = self._owners.get(node.overlay)
                if owner == name:
                    nodes[name] = node
                    continue
                reason = (f"overlay {node.overlay} is not allocated to {name} (no alloc/ip-to-id/{node.overlay})"
                          if owner is None else f"overlay {node.overlay} is allocated to {owner!r}, not {name!r}")
            rejected[name] = reason
        for pid, (policy, reason) in self._policies.items():
            if policy is not None:
                policies[pid] = policy
            else:
                rejected[f"policy:{pid}"] = reason
        if self._max_change[1] is not None:
            rejected["config:max_change"] = self._max_change[1]
        return nodes, rejected, policies

    def _publish(self, connected: bool, error: str | None = None) -> None:
        """Update the view from what the worker knows; call the listener if it changed."""
        if error != self._error:
            if error is not None:
                log.warning("node %s: registry directory unreachable, keeping the last view: %s", self.node_id, error)
            elif self._error is not None:
                log.info("node %s: registry directory reachable again", self.node_id)
            self._error = error
        nodes, rejected, policies = self._judge() if connected else (None, None, None)
        for key, reason in (rejected or {}).items():
            if self._logged.get(key) != reason:
                log.warning("node %s: ignoring registry record %s: %s", self.node_id, key, reason)
        if rejected is not None:
            self._logged = dict(rejected)
        with self._v.lock:
            v = self._v
            new = (v.nodes if nodes is None else nodes, v.rejected if rejected is None else rejected,
                   v.policies if policies is None else policies,
                   v.max_change if not connected else self._max_change[0], connected, v.synced or connected)
            if new == (v.nodes, v.rejected, v.policies, v.max_change, v.connected, v.synced):
                return
            v.nodes, v.rejected, v.policies, v.max_change, v.connected, v.synced = new
            v.revision += 1
        notify_listener(self._listener, self.node_id)
