"""A registry for agent unit tests whose view is a real :class:`ViewState`, so the agent
takes the change-feed (incremental) path; the tests set its fields as on a plain fake."""

from __future__ import annotations

from overlay.model import Node
from overlay.registry import RegistryView, ViewChanges, ViewState


class FeedRegistry:
    name = "fake"

    def __init__(self):
        self._v = ViewState(connected=True, synced=True, policies={})
        self.listener = None

    # the fields a test changes, kept in the view state (every write is in the feed)
    nodes = property(lambda self: self._v.nodes, lambda self, v: setattr(self._v, "nodes", v))
    policies = property(lambda self: self._v.policies, lambda self, v: setattr(self._v, "policies", v))
    max_change = property(lambda self: self._v.max_change, lambda self, v: setattr(self._v, "max_change", v))

    @property
    def connected(self) -> bool:
        return self._v.connected

    @connected.setter
    def connected(self, up: bool) -> None:
        self._v.connected = self._v.synced = up

    def start(self, listener):
        self.listener = listener

    def view(self) -> RegistryView:
        return self._v.snapshot()

    def changes(self, since: int) -> ViewChanges | None:
        return self._v.changes(since)

    def put(self, node: Node):
        with self._v.lock:
            self._v.nodes[node.node_id] = node
        if self.listener:
            self.listener()
