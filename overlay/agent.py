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

import copy
import logging
import random
import threading
import time
from collections.abc import Callable

from overlay.config import Config
from overlay.diff import apply_ops, diff
from overlay.errors import OverlayError
from overlay.guard import Guard, weigh
from overlay.model import Node
from overlay.ops import NatEntry
from overlay.plan import AppliedPeer, DesiredState, plan

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
        """Bring the datapath to the desired state for the current view; return the ops."""
        with self.lock:
            view = self.registry.view()
            self.rejected = dict(view.rejected)
            self.connected = view.connected
            if not view.connected or not view.synced:
                # Fail-static: keep the last applied state; not ready until in sync again.
                if self.ready:
                    log.warning("[%s] registry unreachable: keeping the datapath as it is", self.self_node.node_id)
                self.ready = False
                self._was_connected = False
                return []
            if view.max_change is not None:
                self.guard.threshold = view.max_change
            else:
                self.guard.threshold = self.config.guard.max_change
            now = self.clock()
            if self.observed is None or not self._was_connected or now - self.last_resync >= self.resync_s:
                self.observed = self.datapath.observe()
                self.last_resync = now
                if not self.applied_peers:
                    self.applied_peers = _peers_from_tables(self.observed)
            self._was_connected = True

            desired = plan(self.self_node, view.nodes.values(), self.config, self.extra_failsafe,
                           policies=view.policies.values(), grants=view.grants, order=view.order)
            tables, peers = self._guarded(desired)
            ops = diff(tables, self.observed)
            if ops:
                self.datapath.apply(ops)
                apply_ops(self.observed, ops)
                log.info("[%s] applied %d ops (%d peers)", self.self_node.node_id, len(ops), len(peers))
            self.applied_peers = peers
            self.excluded = desired.excluded
            self.selected_by = desired.selected_by
            if desired.conflicts != self.conflicts:
                for c in desired.conflicts:
                    log.warning("[%s] excluding %s: %s", self.self_node.node_id, c.node_id, c.reason)
            self.conflicts, self.ungranted, self.groups = desired.conflicts, desired.ungranted, desired.groups
            self.last_apply_ops = len(ops)
            self.ops_total += len(ops)
            self.applies += 1
            self.ready = True
            self.last_error = None
            return ops

    def _guarded(self, desired: DesiredState) -> tuple[dict, dict[str, AppliedPeer]]:
        """Apply the churn guard (:mod:`overlay.guard`): hold removals and real-address
        changes above the threshold, or while a batch settles; additions go through."""
        want = {p.overlay: p for p in desired.peers}
        churn = weigh(self.applied_peers, want)
        decision = self.guard.decide(churn, self.clock(), self.config.guard.settle_s, self.applied_peers)
        self.next_deadline = decision.settle_until
        if decision.hold:
            return self._hold(desired, want, churn.removed, churn.changed)
        return desired.tables, want

    def _hold(self, desired: DesiredState, want: dict[str, AppliedPeer], removed: tuple[str, ...],
              changed: tuple[str, ...]) -> tuple[dict, dict[str, AppliedPeer]]:
        """The desired tables with ``removed`` and ``changed`` peers kept as applied."""
        old = self.applied_peers
        tables = copy.deepcopy(desired.tables)
        peers = dict(want)
        observed = self.observed or {}
        held_identities: set[int] = set()
        for overlay in [*removed, *changed]:
            prev = old[overlay]
            new = want.get(overlay)
            if new is not None:
                tables["rnat"].pop(new.real, None)
                tables["peers"].pop(new.real, None)
            tables["nat"][overlay] = observed.get("nat", {}).get(overlay, NatEntry(prev.real))
            tables["rnat"][prev.real] = overlay
            peer_val = observed.get("peers", {}).get(prev.real)
            if peer_val is not None:
                tables["peers"][prev.real] = peer_val
                held_identities.add(peer_val.identity)
            peers[overlay] = prev
        # A held peer keeps its identity: keep that identity's policy entries and
        # name too, even when no peer of the desired state has it any more.
        policy, names = tables.setdefault("policy", {}), tables.setdefault("names", {})
        for key, value in observed.get("policy", {}).items():
            if key[0] in held_identities:
                policy.setdefault(key, value)
        for key, value in observed.get("names", {}).items():
            if key[0] == "identity" and key[1] in held_identities:
                names.setdefault(key, value)
        return tables, peers

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
                "peers": [p.to_dict() for p in sorted(self.applied_peers.values(), key=lambda p: p.node_id)],
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
