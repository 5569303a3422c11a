"""Which controller replica leads the journal: the lowest ``controllers/n-<seq>``.

Each replica holds one EPHEMERAL_SEQUENTIAL member znode in its session; the replica
whose member sorts first is the leader, and the only one that appends to the journal
(its appends are fenced by its member znode: a replica that lost its session cannot
append). Worker thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from overlay.zk.client import Session
from overlay.zk.layout import Layout

log = logging.getLogger(__name__)


class Election:
    """``on_lead()`` is called when this replica becomes the leader."""

    def __init__(self, session: Session, layout: Layout, acl: list, replica: str, on_lead: Callable[[], None]):
        self._zk = session
        self._layout = layout
        self._acl = acl
        self.replica = replica
        self._on_lead = on_lead
        self.member: str | None = None    # our znode's path
        self.leader = False

    def join(self) -> None:
        """Hold a member znode in this session (again, after a session was replaced); elect."""
        client = self._zk.client
        if self.member is not None and self._zk.wait(client.exists_async(self.member)) is None:
            self.member = None
        if self.member is None:
            self.member = self._zk.wait(client.create_async(
                f"{self._layout.controllers}/n-", self.replica.encode(), acl=self._acl,
                ephemeral=True, sequence=True))
        self.elect()

    def elect(self) -> None:
        """Read the members and decide (a member changed, or we joined)."""
        if self.member is None:
            self.leader = False
            return
        children = sorted(c for c in self._zk.wait(self._zk.client.get_children_async(self._layout.controllers))
                          if c.startswith("n-"))
        mine = self.member.rsplit("/", 1)[-1]
        if mine not in children:
            self.member = None
            self.leader = False
            self.join()
            return
        leader = children[0] == mine
        if leader and not self.leader:
            log.info("controller %s: leading the journal (%d replicas)", self.replica, len(children))
            self._on_lead()
        elif not leader and self.leader:
            log.info("controller %s: following the journal", self.replica)
        self.leader = leader

    def lost(self) -> None:
        """The member znode is gone (session lost, or an append found it missing)."""
        self.member = None
        self.leader = False
