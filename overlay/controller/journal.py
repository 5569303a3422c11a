"""The change journal that gives Watch its revisions: one replica's copy, in memory.

Entries are ``(revision, key, value)``; ``key`` is ``(kind, id)`` (``overlay.rpc.convert.Key``)
and ``value`` a journal value (docs/grpc.md), ``None`` for a deletion. In ZooKeeper an
entry is ``changes/r-<revision>`` (:func:`entry_name`); :class:`Journal` is what a replica
folded from them: the state (every live item with the revision that last set it), the
tail of entries a Watch can resume from, and the superseded revisions compaction may
remove. Pure and thread-safe; the store reads and writes ZooKeeper around it.
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from overlay.ownership import granted
from overlay.registry import RegistryView
from overlay.rpc.convert import Key, key_parse, key_text

log = logging.getLogger(__name__)

ENTRY_PREFIX = "r-"


def entry_name(revision: int) -> str:
    return f"{ENTRY_PREFIX}{revision:020d}"


def entry_data(key: Key, value: dict | None) -> bytes:
    """The data of one journal entry znode."""
    return json.dumps({"k": key_text(key), "v": value}, sort_keys=True, separators=(",", ":")).encode()


def parse_entry(data: bytes) -> tuple[Key, dict | None]:
    """The (key, value) of an entry's data; raises ValueError if it is not one."""
    try:
        obj = json.loads(data.decode("utf-8"))
        key = key_parse(obj["k"])
        value = obj["v"]
    except (KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from None
    if value is not None and not isinstance(value, dict):
        raise ValueError("value is not an object")
    return key, value


@dataclass(frozen=True)
class Plan:
    """What a Watch stream at some revision is sent next (see :meth:`Journal.read_since`)."""

    kind: str                      # snapshot | delta | current | ahead
    epoch: str
    revision: int                  # where the client is after this
    base: int = 0                  # delta: applies on top of this
    items: tuple = ()              # (revision, key, value) in order; snapshot: sorted by key
    reset: bool = False
    coalesced: bool = False


def desired_items(view: RegistryView, groups: dict[str, str]) -> dict[Key, dict]:
    """The journal's items for what ZooKeeper holds now (validated by the observer): node
    records narrowed to their granted groups, with their order key (overlay.ownership)."""
    out: dict[Key, dict] = {}
    grants = view.grants if view.grants is not None else {}
    for node_id, node in view.nodes.items():
        out[("node", node_id)] = {"node": granted(node, grants)[0].to_dict(), "order": view.order.get(node_id, 0)}
        if view.sources.get(node_id):   # registry.neti: a host of the old system's layout
            out[("node", node_id)]["source"] = view.sources[node_id]
    for node_id, allowed in grants.items():
        out[("assignment", node_id)] = {"assignment": {"groups": list(allowed)}}
    for key, reason in view.rejected.items():
        if key.startswith("policy:"):
            out[("policy", key[len("policy:"):])] = {"rejected": reason}
        elif key.startswith("assignment:"):
            out[("assignment", key[len("assignment:"):])] = {"rejected": reason}
        elif not key.startswith(("config:", "neti:")):   # the old layout's rejections stay in the controller
            out[("node", key)] = {"rejected": reason}
    for pid, pol in view.policies.items():
        out[("policy", pid)] = {"policy": pol.to_dict()}
    if view.max_change is not None:
        out[("config", "max_change")] = {"max_change": view.max_change}
    for name, description in groups.items():
        out[("group", name)] = {"group": {"description": description}}
    return out


def coalesce(entries: list[tuple]) -> list[tuple]:
    """The last entry per item, in revision order."""
    last: dict[Any, tuple] = {}
    for e in entries:
        if e[1] is not None:
            last[e[1]] = e
    return sorted(last.values(), key=lambda e: e[0])


class Journal:
    """One replica's copy of the journal. ``window``: how many revisions back a Watch can
    resume (older ones get a snapshot). ``cond`` is notified on every advance."""

    def __init__(self, window: int):
        self.window = window
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self._state: dict[Key, tuple[int, dict]] = {}
        self._log: list[tuple] = []     # (revision, key, value): revisions log_base+1 .. head
        self.log_base = 0
        self.head = 0
        self.epoch = ""
        self.floor = 0
        self._dead: list[int] = []      # heap of superseded revisions (and deletions)
        self.loaded = False

    # --- reads ----------------------------------------------------------------------------

    def get(self, key: Key) -> tuple[int, dict] | None:
        with self.lock:
            return self._state.get(key)

    def items(self, kind: str) -> tuple[int, list[tuple[str, dict]]]:
        """``(head, [(id, value)])`` of one kind, sorted by id."""
        with self.lock:
            got = sorted((k[1], v) for k, (_, v) in self._state.items() if k[0] == kind)
            return self.head, got

    def values(self) -> dict[Key, dict]:
        with self.lock:
            return {k: v for k, (_, v) in self._state.items()}

    def size(self) -> int:
        return len(self._state)

    def entries(self) -> list[tuple]:
        """The entries held in memory, ``(revision, key, value)``, oldest first."""
        with self.lock:
            return list(self._log)

    def position(self) -> tuple[str, int] | None:
        """``(epoch, head)`` without the lock, None before the journal is loaded: a hint
        (the two may be from either side of a concurrent advance, which notifies after)."""
        return (self.epoch, self.head) if self.loaded else None

    def read_since(self, revision: int, epoch: str, coalesce_after: int, fresh: bool = False) -> Plan | None:
        """What a Watch client at ``revision`` (of ``epoch``) needs next; None before the journal is loaded.

        snapshot: for a ``fresh`` client (no state yet), or at a revision this replica cannot
        resume (``reset``);
        delta: the entries after ``revision`` (coalesced per item beyond ``coalesce_after``);
        current: nothing new; ahead: the client has seen more than this replica (wait).
        """
        with self.lock:
            if not self.loaded:
                return None
            same = not epoch or epoch == self.epoch
            if fresh or not same or revision < self.log_base:
                items = tuple(sorted(((r, k, v) for k, (r, v) in self._state.items()), key=lambda e: e[1]))
                return Plan("snapshot", self.epoch, self.head, items=items, reset=not fresh)
            if revision > self.head:
                return Plan("ahead", self.epoch, self.head)
            if revision == self.head:
                return Plan("current", self.epoch, self.head, base=self.head)
            entries = self._log[revision - self.log_base:]
            head = self.head
        if len(entries) > coalesce_after:
            return Plan("delta", self.epoch, head, base=revision, items=tuple(coalesce(entries)), coalesced=True)
        return Plan("delta", self.epoch, head, base=revision, items=tuple(e for e in entries if e[1] is not None))

    def wait_visible(self, key: Key, check: Callable[[dict | None], bool], timeout: float,
                     closed: Callable[[], bool]) -> int:
        """The revision at which ``check(value of key)`` holds, waiting up to ``timeout``; 0 if not yet."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                cur = self._state.get(key)
                if check(cur[1] if cur else None):
                    return cur[0] if cur else self.head
                left = deadline - time.monotonic()
                if left <= 0 or closed():
                    return 0
                self.cond.wait(min(left, 0.5))

    def wait_loaded(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.loaded:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))
        return True

    # --- writes ---------------------------------------------------------------------------

    def extend(self, entries: list[tuple]) -> None:
        """Apply entries that follow the head, in order (others are skipped)."""
        with self.cond:
            for r, key, value in entries:
                if r == self.head + 1:
                    self._apply(r, key, value)
            self.cond.notify_all()

    def load(self, entries: list[tuple], epoch: str, floor: int) -> None:
        """Replace everything by the fold of ``entries`` (all live ones, any order of arrival
        sorted by revision), resumable only from where the log is unbroken up to head."""
        with self.cond:
            self._state, self._log, self._dead = {}, [], []
            self.head = max(floor, 0)
            for r, key, value in entries:
                self._apply(r, key, value)
            start = len(self._log) - 1
            while start > 0 and self._log[start - 1][0] == self._log[start][0] - 1:
                start -= 1
            self._log = self._log[max(start, 0):]
            self.log_base = self._log[0][0] - 1 if self._log else self.head
            self.epoch, self.floor = epoch, floor
            self.loaded = True
            self.cond.notify_all()

    def _apply(self, revision: int, key: Key | None, value: dict | None) -> None:
        """Caller holds the lock."""
        if key is not None:
            prev = self._state.get(key)
            if prev is not None:
                heapq.heappush(self._dead, prev[0])
            if value is None:
                self._state.pop(key, None)
                heapq.heappush(self._dead, revision)
            else:
                self._state[key] = (revision, value)
        self._log.append((revision, key, value))
        self.head = revision
        if len(self._log) > self.window + self.window // 4 + 16:
            cut = len(self._log) - self.window
            del self._log[:cut]
            self.log_base = self._log[0][0] - 1

    # --- compaction -----------------------------------------------------------------------

    def take_dead(self, limit: int, most: int) -> list[int]:
        """Up to ``most`` superseded revisions at or below ``limit``, oldest first (removed
        from the heap: hand them back with :meth:`return_dead` if they stay)."""
        with self.lock:
            revs: list[int] = []
            while self._dead and self._dead[0] <= limit and len(revs) < most:
                revs.append(heapq.heappop(self._dead))
            return revs

    def return_dead(self, revs: list[int]) -> None:
        with self.lock:
            for r in revs:
                heapq.heappush(self._dead, r)

    def forget_dead(self, floor: int) -> None:
        """Followers: drop what the leader has compacted (at or below ``floor``) from the
        dead-revision heap, which otherwise grows with every update."""
        with self.lock:
            while self._dead and self._dead[0] <= floor:
                heapq.heappop(self._dead)
