"""The churn guard (DESIGN §1, item 4): pure, no threads, no clock of its own.

A registry hiccup must not wipe a fleet's firewall: an update that removes peers, or
changes their real addresses, beyond ``threshold`` at once is held until the threshold
is raised (``<prefix>/config/max_change``, live) or an operator releases it (``overlay
guard release``). Additions always go through.

:func:`weigh` measures the churn between the peers applied now and the ones wanted,
by overlay address; :meth:`Guard.decide` says whether to hold it. A hiccup arrives as a
stream of events, not one: removals and changes first wait ``settle_s`` (the batch
settles), then the whole batch is weighed. The agent owns the clock and the tables;
it passes ``now`` in and keeps what the decision holds as applied.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from overlay.plan import AppliedPeer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Churn:
    """Overlay addresses applied now that the wanted state removes, or moves to another
    real address. Additions are not churn."""

    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """What the guard weighs against its threshold."""
        return len(self.removed) + len(self.changed)


def weigh(applied: Mapping[str, AppliedPeer], wanted: Mapping[str, AppliedPeer]) -> Churn:
    """The churn from ``applied`` to ``wanted`` (both by overlay address), sorted."""
    removed = tuple(sorted(o for o in applied if o not in wanted))
    changed = tuple(sorted(o for o in applied if o in wanted and wanted[o].real != applied[o].real))
    return Churn(removed, changed)


@dataclass(frozen=True)
class Decision:
    hold: bool                          # keep the churn's peers as they are applied
    settle_until: float | None = None   # settling: decide again at this time


@dataclass
class Guard:
    """The guard's state; :meth:`to_dict` is the ``guard`` object of ``/status``."""

    threshold: int = 20
    node_id: str = ""                   # for log lines
    tripped: bool = False
    size: int = 0                       # churn held while tripped
    held: dict[str, list[str]] = field(default_factory=lambda: {"removed": [], "changed": []})
    release_requested: bool = False
    trips: int = 0
    settling: int = 0                   # churn waiting for its batch to settle
    churn_since: float | None = None    # when the churn now settling began

    def decide(self, churn: Churn, now: float, settle_s: float, applied: Mapping[str, AppliedPeer]) -> Decision:
        """Hold ``churn`` or let it through. ``applied`` (by overlay) names the held nodes."""
        size = churn.size
        if size and not self.tripped and not self.release_requested and settle_s > 0:
            if self.churn_since is None:
                self.churn_since = now
            settle_end = self.churn_since + settle_s
            if now < settle_end:
                self.settling = size
                return Decision(hold=True, settle_until=settle_end)
        self.settling = 0
        if size <= self.threshold or self.release_requested:
            self.churn_since = None
            if self.tripped:
                how = "released by the operator" if self.release_requested else f"threshold now {self.threshold}"
                log.warning("[%s] churn guard: applying %d held changes (%s)", self.node_id, self.size, how)
            self.tripped, self.size, self.release_requested = False, 0, False
            self.held = {"removed": [], "changed": []}
            return Decision(hold=False)
        if not self.tripped or self.size != size:
            self.trips += 1 if not self.tripped else 0
            log.warning(
                "[%s] churn guard tripped: %d removed and %d changed peers exceed max_change %d; "
                "holding them (raise the threshold or run `overlay guard release`)",
                self.node_id, len(churn.removed), len(churn.changed), self.threshold,
            )
        self.tripped, self.size = True, size
        self.held = {"removed": [applied[o].node_id for o in churn.removed],
                     "changed": [applied[o].node_id for o in churn.changed]}
        return Decision(hold=True)

    def request_release(self) -> tuple[bool, str]:
        """The operator's release: ``(released, message)``; the next decision lets the held
        churn through."""
        if not self.tripped:
            return False, "the churn guard is not holding anything"
        self.release_requested = True
        return True, f"released: {self.size} held changes will be applied"

    def to_dict(self) -> dict:
        return {
            "tripped": self.tripped,
            "threshold": self.threshold,
            "size": self.size,
            "held": {k: list(v) for k, v in self.held.items()},
            "trips": self.trips,
            "settling": self.settling,
        }
