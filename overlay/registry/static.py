"""``registry.backend: static``: peers listed in the config file.

Useful for small fixed fleets, for tests and for the lab's bootstrap. The peers'
groups are taken as written (the file is the operator's: no assignments); of two peers
claiming one address the one listed first keeps it. The
daemon reloads the config on SIGHUP and hands the new peer list to
:meth:`StaticRegistry.replace`.
"""

from __future__ import annotations

from collections.abc import Iterable

from overlay.config import Config
from overlay.errors import RegistryError
from overlay.model import Node
from overlay.registry import Listener, ViewBacked, ViewState


class StaticRegistry(ViewBacked):
    name = "static"

    @classmethod
    def from_config(cls, config: Config) -> StaticRegistry:
        return cls(config.registry.peers)

    def __init__(self, peers: Iterable[Node] = ()):
        self._v = ViewState(connected=True, synced=True, revision=1)
        self._self: Node | None = None
        self._listener: Listener | None = None
        self._set({p.node_id: p for p in peers})

    def start(self, listener: Listener) -> None:
        self._listener = listener
        listener()

    def allocate(self, node_id: str, requested: str | None = None) -> str:
        if requested:
            return requested
        peer = self._v.nodes.get(node_id)
        if peer is not None:
            return peer.overlay
        raise RegistryError(
            f"registry.backend static cannot allocate an overlay address for {node_id}: "
            "set addresses.overlay in the config"
        )

    def register(self, node: Node) -> None:
        self._self = node
        self._set({**self._file(), node.node_id: node})
        self._notify()

    def replace(self, peers: Iterable[Node]) -> None:
        new = {p.node_id: p for p in peers}
        if self._self is not None:
            new[self._self.node_id] = self._self
        self._set(new)
        self._notify()

    def _file(self) -> dict[str, Node]:
        return dict(self._v.nodes)

    def _set(self, new: dict[str, Node]) -> None:
        """Change the view to ``new`` key by key (the change feed sees only what changed);
        the order of the file decides address conflicts (overlay.ownership)."""
        v = self._v
        with v.lock:
            for node_id in [n for n in v.nodes if n not in new]:
                del v.nodes[node_id]
                del v.order[node_id]
            for i, (node_id, node) in enumerate(new.items()):
                if v.nodes.get(node_id) != node:
                    v.nodes[node_id] = node
                if v.order.get(node_id) != i:
                    v.order[node_id] = i
            v.revision += 1

    def release_guard(self) -> None:
        return None

    def close(self) -> None:
        self._listener = None

    def _notify(self) -> None:
        if self._listener is not None:
            self._listener()
