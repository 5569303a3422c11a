"""The controller's journal in ZooKeeper: ``changes`` and ``changes/r-<revision>`` (docs/grpc.md).

:class:`JournalSync` keeps a replica's :class:`~overlay.controller.journal.Journal` in step
with ZooKeeper: it loads every live entry (at start, on a new epoch, or when compaction
overtook this replica), catches up on the entries after head, and, for the leader, appends
(fenced by the leader's election znode) and compacts. Worker thread only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError

from overlay.controller.journal import ENTRY_PREFIX, Journal, entry_data, entry_name, parse_entry
from overlay.errors import RegistryError
from overlay.rpc.convert import Key
from overlay.zk.client import Session
from overlay.zk.layout import Layout

log = logging.getLogger(__name__)

MAX_ITEMS_PER_APPEND = 100
MAX_BYTES_PER_APPEND = 512 * 1024
CATCH_UP_BATCH = 64
COMPACT_BATCH = 500
META_CHECK_S = 2.0            # idle replicas re-read the journal's metadata this often


@dataclass
class JournalSync:
    """``journal`` in step with ``layout.changes`` through ``session``; the leader's entries
    get ``acl``; ``notify()`` is called after the journal advanced."""

    session: Session
    layout: Layout
    journal: Journal
    acl: list
    replica: str
    notify: Callable[[], None]
    _meta_checked: float = field(default=0.0, init=False)

    def hint(self, batch: list[tuple]) -> int:
        """The highest journal revision that the creation events of ``batch`` name."""
        prefix = f"{self.layout.changes}/{ENTRY_PREFIX}"
        best = 0
        for item in batch:
            if item[0] == "event" and item[2].startswith(prefix):
                digits = item[2][len(prefix):]
                if digits.isdigit():
                    best = max(best, int(digits))
        return best

    def ensure_paths(self) -> None:
        client = self.session.client
        for path in (self.layout.controllers, self.layout.groups, self.layout.leases, self.layout.holders,
                     self.layout.assignments):
            if self.session.wait(client.exists_async(path)) is None:
                with contextlib.suppress(NodeExistsError):
                    self.session.wait(client.create_async(path, b"", acl=self.acl, makepath=True))
        with contextlib.suppress(NodeExistsError):
            self.session.wait(client.create_async(self.layout.changes, _new_meta(), acl=self.acl, makepath=True))

    def _read_meta(self) -> tuple[str, int]:
        data, stat = self.session.wait(self.session.client.get_async(self.layout.changes))
        try:
            obj = json.loads(data.decode("utf-8"))
            epoch, floor = str(obj["epoch"]), int(obj["floor"])
            if not epoch:
                raise ValueError("empty epoch")
            return epoch, floor
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            # made by someone else (ensure_path): give the journal an epoch
            with contextlib.suppress(BadVersionError):
                self.session.wait(self.session.client.set_async(self.layout.changes, _new_meta(), version=stat.version))
            raise RegistryError(f"{self.layout.changes} had no journal metadata; initialised it") from None

    def check_meta(self) -> None:
        """Follow the journal's metadata: a new epoch, or compaction that overtook us, reloads."""
        epoch, floor = self._read_meta()
        self.journal.floor = max(self.journal.floor, floor)
        if not self.journal.loaded or epoch != self.journal.epoch or floor > self.journal.head:
            self.load(epoch, floor)

    def _entry(self, revision: int, data: bytes) -> tuple:
        try:
            return (revision, *parse_entry(data))
        except ValueError as exc:
            log.error("controller %s: journal entry %d is unreadable (%s); skipped", self.replica, revision, exc)
            return revision, None, None

    def load(self, epoch: str, floor: int) -> None:
        """Fold every live entry into the state (start, a new epoch, or fallen behind compaction)."""
        client = self.session.client
        names = self.session.wait(client.get_children_async(self.layout.changes))
        revs = sorted(int(n[len(ENTRY_PREFIX):]) for n in names
                      if n.startswith(ENTRY_PREFIX) and n[len(ENTRY_PREFIX):].isdigit())
        entries: list[tuple] = []
        for i in range(0, len(revs), 2000):
            pending = [(r, client.get_async(f"{self.layout.changes}/{entry_name(r)}")) for r in revs[i:i + 2000]]
            for r, res in pending:
                try:
                    data, _ = self.session.wait(res)
                except NoNodeError:
                    continue  # compacted meanwhile: superseded, so nothing is lost
                entries.append(self._entry(r, data))
        self.journal.load(entries, epoch, floor)
        log.info("controller %s: journal loaded: %d entries, %d items, head %d, resumable from %d",
                 self.replica, len(entries), self.journal.size(), self.journal.head, self.journal.log_base)
        self.notify()

    def catch_up(self, hint: int = 0) -> None:
        """Apply the entries after head, in order, up to the first missing one. ``hint`` is the
        highest revision that creation events named; without one a single get probes for more,
        and every ``META_CHECK_S`` the metadata is read (a new epoch, or compaction overtook us)."""
        if not self.journal.loaded:
            return
        client = self.session.client
        advanced = False
        batch = max(1, min(hint - self.journal.head, CATCH_UP_BATCH))
        while True:
            base = self.journal.head
            pending = [(r, client.get_async(f"{self.layout.changes}/{entry_name(r)}"))
                       for r in range(base + 1, base + 1 + batch)]
            got: list[tuple] = []
            for r, res in pending:
                try:
                    data, _ = self.session.wait(res)
                except NoNodeError:
                    break
                got.append(self._entry(r, data))
            for _, res in pending[len(got) + 1:]:
                with contextlib.suppress(NoNodeError):
                    self.session.wait(res)  # drain the rest of the pipeline
            if got:
                self.journal.extend(got)
                advanced = True
            if len(got) < batch:
                break
            batch = CATCH_UP_BATCH
        if advanced:
            self.notify()
        now = time.monotonic()
        if not advanced and now - self._meta_checked >= META_CHECK_S:
            self._meta_checked = now
            self.check_meta()

    def append(self, changes: list[tuple[Key, dict | None]], member: str) -> str | None:
        """Leader: append ``changes`` as the entries after head, fenced by ``member`` (our
        election znode). None when done; "lost" when ``member`` is gone (no longer the
        leader); "refused" when an entry was taken meanwhile (catch up, then diff again)."""
        client = self.session.client
        i = 0
        while i < len(changes):
            chunk: list[tuple[Key, dict | None, bytes]] = []
            size = 0
            while i < len(changes) and len(chunk) < MAX_ITEMS_PER_APPEND:
                key, value = changes[i]
                data = entry_data(key, value)
                if chunk and size + len(data) > MAX_BYTES_PER_APPEND:
                    break
                chunk.append((key, value, data))
                size += len(data)
                i += 1
            base = self.journal.head
            tx = client.transaction()
            tx.check(member, -1)
            for n, (_, _, data) in enumerate(chunk):
                tx.create(f"{self.layout.changes}/{entry_name(base + 1 + n)}", data, acl=self.acl)
            results = self.session.wait(tx.commit_async())
            failed = [r for r in results if isinstance(r, Exception)]
            if failed:
                if isinstance(results[0], Exception):
                    log.warning("controller %s: no longer the leader (election znode gone); not appending", self.replica)
                    return "lost"
                log.warning("controller %s: journal append at %d refused (%s); catching up",
                            self.replica, base + 1, type(failed[0]).__name__)
                return "refused"
            self.journal.extend([(base + 1 + n, key, value) for n, (key, value, _) in enumerate(chunk)])
            self.notify()
        return None

    def compact(self, member: str) -> None:
        """Leader: remove the entries superseded more than ``window`` revisions ago."""
        revs = self.journal.take_dead(self.journal.head - self.journal.window, 20 * COMPACT_BATCH)
        if not revs:
            return
        client = self.session.client
        new_floor = max(max(revs), self.journal.floor)
        if new_floor > self.journal.floor:
            meta = json.dumps({"epoch": self.journal.epoch, "floor": new_floor}).encode()
            tx = client.transaction()
            tx.check(member, -1)
            tx.set_data(self.layout.changes, meta)
            results = self.session.wait(tx.commit_async())
            if any(isinstance(r, Exception) for r in results):
                self.journal.return_dead(revs)
                return
            self.journal.floor = new_floor
        for j in range(0, len(revs), COMPACT_BATCH):
            pending = [client.delete_async(f"{self.layout.changes}/{entry_name(r)}") for r in revs[j:j + COMPACT_BATCH]]
            for res in pending:
                with contextlib.suppress(NoNodeError):
                    self.session.wait(res)


def _new_meta() -> bytes:
    return json.dumps({"epoch": uuid.uuid4().hex, "floor": 0}).encode()
