"""``<prefix>/config/pending``: a policy change on probation, in ZooKeeper (overlay.pending).

:class:`PendingWatch` is the registry's side: it follows the record (watched with the
rest of ``config``), lays the policies in force over the view (``previous`` from the
deadline on) and wakes the registry's worker at the deadline, so that every daemon and
the controller roll back at the same time with nobody writing anything.
:func:`apply_change`, :func:`confirm` and :func:`rollback` are the operator's writes
(``overlay policies apply|confirm|rollback``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping

from kazoo.client import KazooClient
from kazoo.exceptions import NodeExistsError, NoNodeError

from overlay.errors import AlreadyExists, InvalidRecord, NotFound
from overlay.model import Policy, parse_policy_record, serialise_policy
from overlay.pending import Pending, effective, parse_pending, serialise_pending
from overlay.zk.client import Unreadable
from overlay.zk.layout import Layout

log = logging.getLogger(__name__)


def pending_path(layout: Layout) -> str:
    return f"{layout.config}/pending"


class PendingWatch:
    """The registry worker's memory of ``config/pending``; ``wake()`` is called (from a timer
    thread) when the deadline passes."""

    def __init__(self, layout: Layout, who: str, wake: Callable[[], None], clock: Callable[[], float] = time.time):
        self.path = pending_path(layout)
        self._who = who
        self._wake = wake
        self._clock = clock
        self.pending: Pending | None = None
        self.reason: str | None = None
        self._timer: threading.Timer | None = None

    def update(self, res: object) -> None:
        """From a get's result (None: no pending change)."""
        self.pending, self.reason = None, None
        if isinstance(res, Unreadable):
            self.reason = f"{self.path} cannot be read ({res.error})"
        elif res is not None:
            try:
                self.pending = parse_pending(res[0])
            except InvalidRecord as exc:
                self.reason = str(exc)
        if self.reason:
            log.warning("%s: ignoring %s: %s", self._who, self.path, self.reason)
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.pending is None:
            return
        delay = self.pending.deadline - self._clock()
        if delay > 0:
            self._timer = threading.Timer(delay + 0.05, self._wake)
            self._timer.daemon = True
            self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def lay_over(self, v, current: Mapping[str, Policy]) -> bool:
        """Set ``v.policy_override`` (lock held); True if it changed."""
        policies, rolled = effective(current, self.pending, self._clock())
        override = policies if rolled else None
        if rolled and v.policy_override is None:
            log.warning("%s: pending policy change %s was not confirmed by its deadline: the previous policies "
                        "are in force (run `overlay policies rollback` to write them back)", self._who,
                        self.pending.change_id)
        if override != v.policy_override:
            v.policy_override = override
            return True
        return False

    def status(self) -> dict | None:
        if self.pending is None:
            return None
        return {"id": self.pending.change_id, "deadline": self.pending.deadline,
                "rolled_back": self._clock() >= self.pending.deadline}


# --- the operator's writes --------------------------------------------------------------------


def current_policies(client: KazooClient, layout: Layout) -> dict[str, Policy]:
    out = {}
    for pid in client.get_children(layout.policies):
        try:
            out[pid] = parse_policy_record(client.get(f"{layout.policies}/{pid}")[0], pid)
        except NoNodeError:
            continue
        except (InvalidRecord, ValueError):
            continue   # an invalid record is not in force; the change replaces or deletes it below
    return out


def _write_set(tx, client: KazooClient, layout: Layout, want: Mapping[str, Policy], acl: list) -> None:
    have = set(client.get_children(layout.policies))
    for pid in sorted(have - set(want)):
        tx.delete(f"{layout.policies}/{pid}")
    for pid, pol in sorted(want.items()):
        if pid in have:
            tx.set_data(f"{layout.policies}/{pid}", serialise_policy(pol))
        else:
            tx.create(f"{layout.policies}/{pid}", serialise_policy(pol), acl=acl)


def _commit(tx, what: str) -> None:
    results = tx.commit()
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        first = next((e for e in errors if type(e).__name__ not in ("RolledBackError", "RuntimeInconsistency")),
                     errors[0])
        if isinstance(first, NodeExistsError):
            raise AlreadyExists(f"{what}: a policy change is already pending (`overlay policies confirm` or "
                                "`overlay policies rollback` first)")
        raise first


def read_pending(client: KazooClient, layout: Layout) -> tuple[Pending | None, int]:
    try:
        data, stat = client.get(pending_path(layout))
    except NoNodeError:
        return None, -1
    return parse_pending(data), stat.version


def apply_change(client: KazooClient, layout: Layout, want: Mapping[str, Policy], confirm_within: float | None,
                 acl: list, now: float | None = None) -> Pending | None:
    """Write ``want`` as the whole policy set; with ``confirm_within``, in the same transaction
    as the pending record (refused while another change is pending). An expired pending
    change is rolled back first."""
    now = time.time() if now is None else now
    pend, _ = read_pending(client, layout)
    if pend is not None and now >= pend.deadline:
        rollback(client, layout, acl)
        pend = None
    if pend is not None:
        raise AlreadyExists(f"policy change {pend.change_id} is pending until {time.ctime(pend.deadline)}: "
                            "`overlay policies confirm` or `overlay policies rollback` first")
    tx = client.transaction()
    _write_set(tx, client, layout, want, acl)
    out = None
    if confirm_within is not None:
        out = Pending(uuid.uuid4().hex[:12], now, now + confirm_within, current_policies(client, layout), dict(want))
        tx.create(pending_path(layout), serialise_pending(out), acl=acl)
    _commit(tx, "applying the policies")
    return out


def confirm(client: KazooClient, layout: Layout, acl: list, now: float | None = None) -> Pending:
    """Keep the pending change (delete the record), if its deadline has not passed; after the
    deadline it has been rolled back everywhere: this writes the rollback and says so."""
    now = time.time() if now is None else now
    pend, version = read_pending(client, layout)
    if pend is None:
        raise NotFound("no policy change is pending")
    if now >= pend.deadline:
        rollback(client, layout, acl)
        raise NotFound(f"policy change {pend.change_id} missed its deadline ({time.ctime(pend.deadline)}) and was "
                       "rolled back on every host; the previous policies are now written back: apply it again")
    client.delete(pending_path(layout), version=version)
    return pend


def rollback(client: KazooClient, layout: Layout, acl: list) -> Pending:
    """Write the pending change's ``previous`` policies back and remove the record (one transaction)."""
    pend, version = read_pending(client, layout)
    if pend is None:
        raise NotFound("no policy change is pending")
    tx = client.transaction()
    _write_set(tx, client, layout, pend.previous, acl)
    tx.delete(pending_path(layout), version=version)
    _commit(tx, "rolling back the policies")
    return pend


def describe(p: Pending) -> str:
    return json.dumps({"id": p.change_id, "deadline": p.deadline, "previous": sorted(p.previous),
                       "applied": sorted(p.applied)})
