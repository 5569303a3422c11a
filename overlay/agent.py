"""The agent: register, watch, guard, throttle, plan, diff, apply.

Data flows one way: the registry's view -> plan -> churn guard -> diff
against what the datapath holds -> datapath.apply(ops). The agent keeps a
copy of the datapath state it last observed or applied, so a change costs
O(changed entries) in the kernel; a full re-observation happens at start,
after a reconnect and every ``resync_s``.

Clock, sleep and randomness are injectable so throttle and guard tests are
fast and deterministic (DESIGN §7.11).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from overlay.config import Config
from overlay.diff import apply_ops, diff
from overlay.errors import OverlayError
from overlay.guard import Guard, weigh
from overlay.incremental import IncrementalPlanner
from overlay.model import Node
from overlay.ops import NatEntry
from overlay.plan import AppliedPeer

log = logging.getLogger(__name__)

SWEEP_S = 5.0  # the datapath's sweep of expired conntrack and fragment state, every so often


class Agent:
    def __init__(
        self,
        config: Config,
        registry,
        datapath,
        self_node: Node,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        resync_s: float = 300.0,
        extra_failsafe: tuple[str, ...] = (),
    ):
        self.config = config
        self.registry = registry
        self.datapath = datapath
        self.self_node = self_node
        self.clock = clock
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.resync_s = resync_s
        self.extra_failsafe = extra_failsafe
        self.wake = threading.Event()
        self.lock = threading.RLock()
        self.guard = Guard(threshold=config.guard.max_change, node_id=self_node.node_id)
        self.observed: dict[str, dict] | None = None
        self.applied_peers: dict[str, AppliedPeer] = {}  # by overlay address
        self.excluded: tuple[tuple[str, str], ...] = ()
        self.selected_by: tuple[str, ...] = ()  # policies that select this node (default-deny)
        self.conflicts: tuple = ()              # peers excluded for an address held earlier (ownership.Conflict)
        self.ungranted: tuple[tuple[str, tuple[str, ...]], ...] = ()   # groups claimed, not granted
        self.groups: tuple[str, ...] = self_node.groups   # this node's effective groups
        self.rejected: dict[str, str] = {}
        self.sources: dict[str, str] = {}   # node id -> "neti" (the old layout); absent: native
        self.ready = False
        self.connected = False
        self.last_apply_ops = 0
        self.ops_total = 0
        self.applies = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_resync = float("-inf")
        self.heartbeat = clock()
        self._was_connected = True
        self.next_deadline: float | None = None
        self.last_sweep = float("-inf")
        self.swept: dict[str, int] = {}
        self.planner: IncrementalPlanner | None = None
        self.feed_seq: int | None = None        # the registry's change feed position
        self.held: dict[str, AppliedPeer] = {}   # peers the churn guard keeps as applied, by overlay

    # --- wiring -------------------------------------------------------------------------

    def notify(self) -> None:
        """Registry listener: cheap, thread-safe; the loop does the work."""
        self.wake.set()

    def request_release(self) -> str:
        with self.lock:
            released, message = self.guard.request_release()
        if released:
            self.wake.set()
        return message

    def set_config(self, config: Config) -> None:
        with self.lock:
            self.config = config
            self.feed_seq = None     # the next reconcile resyncs with the new config
        self.wake.set()

    # --- the loop -----------------------------------------------------------------------

    def run(self, stop: threading.Event, idle_s: float = 1.0) -> None:
        """Reconcile on every registry change (after the throttle) until ``stop`` is set."""
        self.wake.set()
        while not stop.is_set():
            self.heartbeat = self.clock()
            timeout = idle_s
            if self.next_deadline is not None:
                timeout = max(0.01, min(idle_s, self.next_deadline - self.clock()))
            if not self.wake.wait(timeout=timeout):
                now = self.clock()
                due = self.next_deadline is not None and now >= self.next_deadline
                if due or now - self.last_resync >= self.resync_s:
                    self.wake.set()
                self.sweep()
                continue
            self.step(stop)
            self.sweep()

    def sweep(self) -> None:
        """Let the datapath delete expired state (bounded work), every SWEEP_S."""
        now = self.clock()
        if now - self.last_sweep < SWEEP_S or not callable(getattr(self.datapath, "sweep", None)):
            return
        self.last_sweep = now
        try:
            with self.lock:
                for name, n in self.datapath.sweep().items():
                    self.swept[name] = self.swept.get(name, 0) + n
        except OverlayError as exc:
            log.debug("[%s] sweep failed: %s", self.self_node.node_id, exc)

    def step(self, stop: threading.Event | None = None) -> None:
        """One throttled reconcile: wait a jittered delay, coalescing what arrives meanwhile."""
        self.wake.clear()
        lo, hi = self.config.throttle.min_s, self.config.throttle.max_s
        if hi > 0 and self._has_applied():
            delay = self.rng.uniform(lo, hi)
            log.debug("[%s] throttle: applying in %.2f s", self.self_node.node_id, delay)
            self.sleep(delay)
        if stop is not None and stop.is_set():
            return
        try:
            self.reconcile()
        except OverlayError as exc:
            self.errors += 1
            self.last_error = str(exc)
            log.error("[%s] reconcile failed: %s", self.self_node.node_id, exc)

    def _has_applied(self) -> bool:
        return self.observed is not None and self.applies > 0

    # --- reconcile ----------------------------------------------------------------------

    def reconcile(self) -> list:
        """Bring the datapath to the desired state for the current view; return the ops.

        With a registry that has a change feed (``changes(since)``), an event costs what
        it touches: the incremental planner's delta, the guard over the touched and held
        peers, a diff of the touched keys only. A full resync (the whole view, a rebuilt
        plan, a diff against a fresh observation) runs at start, after a reconnect,
        every ``resync_s`` and whenever the feed answers "unknown"."""
        with self.lock:
            now = self.clock()
            feed = getattr(self.registry, "changes", None)
            full = (self.planner is None or self.feed_seq is None or not callable(feed) or self.observed is None
                    or not self._was_connected or now - self.last_resync >= self.resync_s)
            ch = None if full else feed(self.feed_seq)
            if ch is None:
                return self._resync(now)
            if ch.rejected is not None:
                self.rejected = dict(ch.rejected)
            for node_id, source in ch.sources.items():
                if source is None:
                    self.sources.pop(node_id, None)
                else:
                    self.sources[node_id] = source
            if not self._reachable(ch.connected, ch.synced, ch.max_change):
                return []
            touched = self.planner.update(nodes=ch.nodes, order=ch.order, grants=ch.grants or {},
                                          policies=ch.policies)
            self.feed_seq = ch.seq
            return self._converge(touched, full=False)

    def _reachable(self, connected: bool, synced: bool, max_change: int | None) -> bool:
        self.connected = connected
        if not connected or not synced:
            # Fail-static: keep the last applied state; not ready until in sync again.
            if self.ready:
                log.warning("[%s] registry unreachable: keeping the datapath as it is", self.self_node.node_id)
            self.ready = False
            self._was_connected = False
            return False
        self.guard.threshold = max_change if max_change is not None else self.config.guard.max_change
        return True

    def _resync(self, now: float) -> list:
        """The full path: the whole view, the plan rebuilt, the datapath observed again."""
        view = self.registry.view()
        self.rejected = dict(view.rejected)
        self.sources = dict(view.sources)
        if not self._reachable(view.connected, view.synced, view.max_change):
            return []
        self.observed = self.datapath.observe()
        self.last_resync = now
        if not self.applied_peers:
            self.applied_peers = _peers_from_tables(self.observed)
        self._was_connected = True
        if self.planner is None:
            self.planner = IncrementalPlanner(self.self_node, self.config, self.extra_failsafe)
        self.planner.config, self.planner.self_raw = self.config, self.self_node
        self.planner.rebuild(view.nodes, view.order, view.grants, view.policies)
        self.feed_seq = view.seq if view.seq >= 0 else None
        return self._converge(None, full=True)

    def _converge(self, touched: dict | None, full: bool) -> list:
        """Guard, diff and apply: over every key (``touched`` None) or the touched ones."""
        pl = self.planner
        if touched is None:
            overlays = set(self.applied_peers) | {p.overlay for p in pl.applied.values()}
        else:
            overlays = set(touched.get("nat", ())) | set(self.held)
        applied = {o: self.applied_peers[o] for o in overlays if o in self.applied_peers}
        wanted = {o: peer for o in overlays if (peer := pl.holder("overlay", o)) is not None}
        churn = weigh(applied, wanted)
        decision = self.guard.decide(churn, self.clock(), self.config.guard.settle_s, self.applied_peers)
        self.next_deadline = decision.settle_until
        held = {o: applied[o] for o in (*churn.removed, *churn.changed)} if decision.hold else {}
        ops = self._ops(touched, held, wanted)
        if ops:
            self.datapath.apply(ops)
            apply_ops(self.observed, ops)
        for o in overlays:
            peer = held.get(o) or wanted.get(o)
            if peer is None:
                self.applied_peers.pop(o, None)
            else:
                self.applied_peers[o] = peer
        self.held = held
        if ops:
            log.info("[%s] applied %d ops (%d peers)", self.self_node.node_id, len(ops), len(self.applied_peers))
        self.excluded = pl.excluded()
        self.selected_by = pl.pol.selected_by
        conflicts = pl.conflict_list()
        if conflicts != self.conflicts:
            for c in conflicts:
                log.warning("[%s] excluding %s: %s", self.self_node.node_id, c.node_id, c.reason)
        self.conflicts, self.ungranted, self.groups = conflicts, pl.ungranted(), pl.self_node.groups
        self.last_apply_ops = len(ops)
        self.ops_total += len(ops)
        self.applies += 1
        self.ready = True
        self.last_error = None
        return ops

    def _ops(self, touched: dict | None, held: dict[str, AppliedPeer], wanted: dict[str, AppliedPeer]) -> list:
        """The ops for the keys in question: the planner's tables, except that the peers the
        churn guard holds (``held``, and those it held before) keep what they have applied,
        with their identity's policy entries and name."""
        desired, observed = self.planner.tables, self.observed
        if touched is None:
            keys = {t: set(desired[t]) | set(observed.get(t, ())) for t in desired}
        else:
            keys = {t: set(k) for t, k in touched.items()}
        for table in ("nat", "peers", "policy", "names"):
            keys.setdefault(table, set())
        over: dict[str, dict] = {"nat": {}, "peers": {}, "policy": {}, "names": {}}
        drop: set[tuple[str, object]] = set()
        held_ids: set[int] = set()      # identities of the peers held now
        all_ids: set[int] = set()       # ... and of those held before (their entries may go now)
        for overlay, prev in [*self.held.items(), *held.items()]:
            keys["nat"].add(overlay)
            keys["peers"].add(prev.real)
            new = wanted.get(overlay)
            if new is not None:
                keys["peers"].add(new.real)
            value = observed.get("peers", {}).get(prev.real)
            if value is not None:
                all_ids.add(value.identity)
                if overlay in held:
                    held_ids.add(value.identity)
        for overlay in held:
            new = wanted.get(overlay)
            if new is not None:
                drop.add(("peers", new.real))
        for overlay, prev in held.items():
            over["nat"][overlay] = observed.get("nat", {}).get(overlay, NatEntry(prev.real))
            value = observed.get("peers", {}).get(prev.real)
            if value is not None:
                over["peers"][prev.real] = value
        if all_ids:
            for table, kind in (("policy", None), ("names", "identity")):
                for key, value in observed.get(table, {}).items():
                    ident = key[0] if kind is None else key[1] if key[0] == kind else None
                    if ident in all_ids:
                        keys[table].add(key)
                        if ident in held_ids and key not in desired[table]:
                            over[table][key] = value
        want: dict[str, dict] = {}
        have: dict[str, dict] = {}
        for table, ks in keys.items():
            d, o, ov = desired.get(table, {}), observed.get(table, {}), over.get(table, {})
            w = want[table] = {}
            h = have[table] = {}
            for k in ks:
                if k in ov:
                    w[k] = ov[k]
                elif k in d and (table, k) not in drop:
                    w[k] = d[k]
                if k in o:
                    h[k] = o[k]
        return diff(want, have)

    # --- reporting ----------------------------------------------------------------------

    def _registry_extra(self) -> dict:
        """What a registry adds to ``/status`` ``registry`` (grpc: the controller in use)."""
        extra = getattr(self.registry, "status_extra", None)
        return extra() if callable(extra) else {}

    def status(self) -> dict:
        with self.lock:
            try:
                counters = self.datapath.counters()
            except OverlayError as exc:
                counters = {}
                log.debug("counters unavailable: %s", exc)
            drops = {k[len("drop_"):]: v for k, v in counters.items() if k.startswith("drop_")}
            fill = None
            if callable(getattr(self.datapath, "fill", None)):
                try:
                    fill = self.datapath.fill()
                except OverlayError as exc:
                    log.debug("fill levels unavailable: %s", exc)
            return {
                "node_id": self.self_node.node_id,
                "network": self.self_node.network,
                "overlay": self.self_node.overlay,
                "private": self.self_node.private,
                "public": self.self_node.public,
                "groups": list(self.groups),
                "ready": self.ready,
                "registry": {"backend": self.registry.name, "connected": self.connected, **self._registry_extra()},
                "datapath": {"backend": self.datapath.name, "counters": counters},
                "peers": [{**p.to_dict(), "source": self.sources.get(p.node_id, "native")}
                          for p in sorted(self.applied_peers.values(), key=lambda p: p.node_id)],
                "excluded": [{"node_id": n, "reason": r} for n, r in self.excluded],
                "drops": drops,
                "policy": {
                    "enforced": bool(self.selected_by),
                    "selected_by": list(self.selected_by),
                    "mode": self.config.filter.mode,
                },
                "conflicts": len(self.conflicts),
                "conflict_entries": [c.to_dict() for c in self.conflicts[:100]],
                "ungranted": {node_id: list(groups) for node_id, groups in self.ungranted[:100]},
                "rejected": len(self.rejected),
                "rejected_records": dict(sorted(self.rejected.items())[:100]),
                "guard": self.guard.to_dict() | {"held_count": self.guard.size},
                "applies": self.applies,
                "ops_total": self.ops_total,
                "swept": dict(self.swept),
                "last_error": self.last_error,
            } | ({"fill": fill} if fill is not None else {})


def _peers_from_tables(tables: dict[str, dict]) -> dict[str, AppliedPeer]:
    """Peers as adopted from a live datapath (node ids unknown until the registry answers)."""
    out = {}
    for overlay, entry in tables.get("nat", {}).items():
        if getattr(entry, "override", False):
            continue
        out[overlay] = AppliedPeer(node_id=f"adopted:{overlay}", network="?", overlay=overlay, real=entry.real)
    return out
