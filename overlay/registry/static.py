"""``registry.backend: static``: peers listed in the config file.

Useful for small fixed fleets, for tests and for the lab's bootstrap. The peers'
groups are taken as written (the file is the operator's: no assignments); of two peers
claiming one address the one listed first keeps it. The
daemon reloads the config on SIGHUP and hands the new peer list to
:meth:`StaticRegistry.replace`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from overlay.config import Config
from overlay.errors import RegistryError
from overlay.model import Node
from overlay.registry import Listener, RegistryView


class StaticRegistry:
    name = "static"

    @classmethod
    def from_config(cls, config: Config) -> StaticRegistry:
        return cls(config.registry.peers)

    def __init__(self, peers: Iterable[Node] = ()):
        self._lock = threading.Lock()
        self._nodes: dict[str, Node] = {p.node_id: p for p in peers}
        self._self: Node | None = None
        self._listener: Listener | None = None
        self._revision = 1

    def start(self, listener: Listener) -> None:
        self._listener = listener
        listener()

    def allocate(self, node_id: str, requested: str | None = None) -> str:
        if requested:
            return requested
        peer = self._nodes.get(node_id)
        if peer is not None:
            return peer.overlay
        raise RegistryError(
            f"registry.backend static cannot allocate an overlay address for {node_id}: "
            "set addresses.overlay in the config"
        )

    def register(self, node: Node) -> None:
        with self._lock:
            self._self = node
            self._nodes[node.node_id] = node
            self._revision += 1
        self._notify()

    def replace(self, peers: Iterable[Node]) -> None:
        with self._lock:
            self._nodes = {p.node_id: p for p in peers}
            if self._self is not None:
                self._nodes[self._self.node_id] = self._self
            self._revision += 1
        self._notify()

    def view(self) -> RegistryView:
        with self._lock:
            # the order of the file decides address conflicts (overlay.ownership)
            return RegistryView(nodes=dict(self._nodes), revision=self._revision,
                                order={node_id: i for i, node_id in enumerate(self._nodes)})

    def release_guard(self) -> None:
        return None

    def close(self) -> None:
        self._listener = None

    def _notify(self) -> None:
        if self._listener is not None:
            self._listener()
