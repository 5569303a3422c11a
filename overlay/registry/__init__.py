"""Registries: where nodes, allocations, groups and policies live.

A registry is selected by name (``registry.backend``) and follows the
:class:`Registry` protocol. It keeps its own view of the fleet, updated
incrementally, and calls the listener given to :meth:`Registry.start` (with
no arguments) whenever that view changed; the agent then reads
:meth:`Registry.view`. Backends are found by name in
:data:`overlay.backends.REGISTRIES`: the built-ins, then the
``overlay.registries`` entry point group; the name resolves to a class whose
``from_config(config)`` builds the registry for this node's config. A plugin's class
may also have ``validate_config(section) -> options`` for its keys of ``registry``
(kept as ``config.registry.options``; docs/plugins.md).

Optional methods, used when a backend has them: ``detach()`` (the daemon stopping: stop
but leave this node's record, so that a restart does not remove it from its peers; else
the daemon calls ``close()``), ``deregister()`` (``overlay deregister``: remove this
node's record for good) and ``status_extra()`` (a mapping merged into ``/status``
``registry``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from overlay.model import Node, Policy

Listener = Callable[[], None]

log = logging.getLogger(__name__)


def notify_listener(listener: Listener | None, node_id: str) -> None:
    """Call a registry listener, if any; a failing listener is logged, never raised into
    the registry's watch thread."""
    if listener is None:
        return
    try:
        listener()
    except Exception:
        log.exception("node %s: registry listener failed", node_id)


@dataclass(frozen=True)
class RegistryView:
    """What the registry holds now, as seen by this node.

    ``nodes`` holds only records that validated; ``rejected`` maps the key
    of every ignored record to the reason. ``connected`` is False while the
    registry is unreachable: the agent then keeps the datapath as it is.

    ``order`` gives each node its order key (who registered earlier wins an address
    conflict: :mod:`overlay.ownership`); ``grants`` maps node ids to the groups their
    assignments grant, or is None when the records carry granted groups only (static
    peers, written by the operator; the controller, which filtered them).
    """

    nodes: Mapping[str, Node] = field(default_factory=dict)
    rejected: Mapping[str, str] = field(default_factory=dict)
    policies: Mapping[str, Policy] = field(default_factory=dict)
    max_change: int | None = None
    connected: bool = True
    synced: bool = True
    revision: int = 0
    order: Mapping[str, int] = field(default_factory=dict)
    grants: Mapping[str, tuple[str, ...]] | None = None


@dataclass
class ViewState:
    """A registry's view while it changes: the fields of :class:`RegistryView`, changed
    under ``lock``; :meth:`snapshot` is what ``view()`` returns."""

    nodes: dict[str, Node] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    policies: dict[str, Policy] = field(default_factory=dict)
    max_change: int | None = None
    connected: bool = False
    synced: bool = False
    revision: int = 0
    order: dict[str, int] = field(default_factory=dict)
    grants: dict[str, tuple[str, ...]] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> RegistryView:
        """A consistent copy (fresh dicts: a caller may keep or change what it gets)."""
        with self.lock:
            return RegistryView(nodes=dict(self.nodes), rejected=dict(self.rejected),
                                policies=dict(self.policies), max_change=self.max_change,
                                connected=self.connected, synced=self.synced, revision=self.revision,
                                order=dict(self.order),
                                grants=None if self.grants is None else dict(self.grants))


@runtime_checkable
class Registry(Protocol):
    """What the agent needs of a registry. Its class also has a classmethod
    ``from_config(config: Config) -> Registry`` (how :mod:`overlay.backends` builds it;
    not part of the runtime check)."""

    name: str

    def start(self, listener: Listener) -> None:
        """Connect and begin watching; call ``listener()`` after every change of the view."""

    def allocate(self, node_id: str, requested: str | None = None) -> str:
        """Return this node's overlay address, claiming a free one if it has none."""

    def register(self, node: Node) -> None:
        """Publish this node's record; keep it published (re-register after session loss)."""

    def view(self) -> RegistryView:
        """The current view (a consistent snapshot)."""

    def release_guard(self) -> None:
        """Operator action: accept a change the churn guard is holding (optional)."""

    def close(self) -> None:
        """Stop watching and drop the connection (ephemeral records go away)."""
