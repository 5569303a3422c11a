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

**Change feed** (optional, issue 14): ``changes(since: int) -> ViewChanges | None``. The
view's ``seq`` counts its changes; ``changes(seq)`` answers what changed after ``seq``:
the current value (None: gone) of every node record, order key and assignment of the
node ids touched, and of every policy touched, with the new ``seq``. ``None`` means
"unknown" (``seq`` older than the feed keeps, or the view was replaced wholesale, as
after a reconnect's snapshot): the agent then resyncs in full (``view()``, plan, diff).
A plugin without ``changes`` gets a full resync on every change, as before. The
built-in registries keep their view in a :class:`ViewState`, which records its changes
itself (every dict write goes through it) and answers ``changes``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
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
    peers, written by the operator; the controller, which filtered them). ``sources`` names
    where a node came from when that is not the backend's native records (``"neti"``: the old
    system's layout, ``registry.neti``); a node absent from it is ``"native"``.
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
    sources: Mapping[str, str] = field(default_factory=dict)

    seq: int = -1                   # the change feed's position of this view (-1: no feed)

    def source_of(self, node_id: str) -> str:
        return self.sources.get(node_id, "native")


@dataclass(frozen=True)
class ViewChanges:
    """What changed in a view after a given ``seq`` (the change feed): current values of
    the touched keys, None for those gone. ``grants`` is None when the registry does not
    grant groups (as :attr:`RegistryView.grants`); ``rejected`` is the whole map of
    ignored records when it changed, else None."""

    seq: int
    nodes: Mapping[str, Node | None] = field(default_factory=dict)
    order: Mapping[str, int | None] = field(default_factory=dict)
    grants: Mapping[str, tuple[str, ...] | None] | None = None
    policies: Mapping[str, Policy | None] = field(default_factory=dict)
    rejected: Mapping[str, str] | None = None
    max_change: int | None = None
    connected: bool = True
    synced: bool = True
    sources: Mapping[str, str | None] = field(default_factory=dict)   # of the touched nodes

    @property
    def empty(self) -> bool:
        return not (self.nodes or self.policies or self.grants)


FEED_KEEP = 4096           # changed keys the feed remembers; an agent further behind resyncs in full
_FEED_KIND = {"nodes": "node", "order": "node", "grants": "node", "sources": "node", "policies": "policy",
              "rejected": "rejected"}
_FEED_RESET = frozenset({"policy_override"})   # setting these makes every earlier position "unknown"


class _Tracked(dict):
    """A dict of a :class:`ViewState` that reports every key it writes or removes."""

    __slots__ = ("_touch", "_kind")

    def __init__(self, data: Mapping, touch: Callable[[str, str], None], kind: str):
        super().__init__(data)
        self._touch, self._kind = touch, kind

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self._touch(self._kind, key)

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        self._touch(self._kind, key)

    def pop(self, key, *default):
        if key in self:
            self._touch(self._kind, key)
        return super().pop(key, *default)

    def setdefault(self, key, value=None):
        if key not in self:
            self[key] = value
        return self[key]

    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def popitem(self):
        key, value = super().popitem()
        self._touch(self._kind, key)
        return key, value

    def clear(self) -> None:
        for key in list(self):
            del self[key]


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
    sources: dict[str, str] = field(default_factory=dict)
    # the policies in force when they are not ``policies`` (a pending change rolled back at its
    # deadline: overlay.pending); None: ``policies``
    policy_override: dict[str, Policy] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # The change feed: every write to nodes, order, grants, policies and rejected is
    # recorded (key -> seq of its last change, oldest first); replacing one of those
    # dicts wholesale (a snapshot) makes every earlier position "unknown".
    def __setattr__(self, name: str, value) -> None:
        kind = _FEED_KIND.get(name)
        if kind is not None and value is not None:
            d = self.__dict__
            if "_log" not in d:
                d["seq"], d["floor"], d["_log"] = 0, 0, OrderedDict()
            d["seq"] += 1
            d["floor"] = d["seq"]
            value = _Tracked(value, self._touch, kind)
        elif (kind is not None or name in _FEED_RESET) and "_log" in self.__dict__:
            self.__dict__["seq"] += 1
            self.__dict__["floor"] = self.__dict__["seq"]
        object.__setattr__(self, name, value)

    def _touch(self, kind: str, key: str) -> None:
        """Caller holds ``lock`` (the registries change the view under it)."""
        d = self.__dict__
        d["seq"] += 1
        log_ = d["_log"]
        log_[(kind, key)] = d["seq"]
        log_.move_to_end((kind, key))
        if len(log_) > FEED_KEEP:
            _, d["floor"] = log_.popitem(last=False)

    def snapshot(self) -> RegistryView:
        """A consistent copy (fresh dicts: a caller may keep or change what it gets)."""
        with self.lock:
            return RegistryView(nodes=dict(self.nodes), rejected=dict(self.rejected),
                                policies=dict(self.policies if self.policy_override is None
                                              else self.policy_override), max_change=self.max_change,
                                connected=self.connected, synced=self.synced, revision=self.revision,
                                order=dict(self.order),
                                grants=None if self.grants is None else dict(self.grants),
                                sources=dict(self.sources), seq=self.seq)

    def changes(self, since: int) -> ViewChanges | None:
        """What changed after ``since`` (a ``seq`` this view gave), or None: unknown."""
        with self.lock:
            if since < self.floor or since > self.seq or self.policy_override is not None:
                return None       # (a pending policy change rolled back: rare, resync in full)
            node_ids: set[str] = set()
            policy_ids: set[str] = set()
            rejected = False
            for key in reversed(self._log):
                if self._log[key] <= since:
                    break
                kind, ident = key
                if kind == "node":
                    node_ids.add(ident)
                elif kind == "policy":
                    policy_ids.add(ident)
                else:
                    rejected = True
            grants = self.grants
            return ViewChanges(
                seq=self.seq,
                nodes={i: self.nodes.get(i) for i in node_ids},
                order={i: self.order.get(i) for i in node_ids},
                grants=None if grants is None else {i: grants.get(i) for i in node_ids},
                policies={i: self.policies.get(i) for i in policy_ids},
                rejected=dict(self.rejected) if rejected else None,
                max_change=self.max_change, connected=self.connected, synced=self.synced,
                sources={i: self.sources.get(i) for i in node_ids})


class ViewBacked:
    """For a registry whose view is a :class:`ViewState` at ``self._v``: ``view()`` and the
    change feed ``changes(since)``."""

    _v: ViewState

    def view(self) -> RegistryView:
        return self._v.snapshot()

    def changes(self, since: int) -> ViewChanges | None:
        return self._v.changes(since)


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
