"""Waiting for changes in the watched directories: inotify (through ctypes), or polling.

:meth:`Watcher.wait` returns the ``(kind, filename)`` pairs that changed, an empty set when
nothing did (timeout, or a wake-up), or None when the caller must rescan everything: the
polling watcher always says so after ``poll_s`` (a rescan compares each file's identity
and re-reads only what changed); the inotify watcher says so when the kernel's queue
overflowed, or a watched directory or one of its parents in the layout was removed or
renamed (it then sets its watches again, by path, on the next call; while that fails,
``wait`` raises :class:`OSError`). inotify sees changes made through this host's kernel
only: on a network file system shared between hosts (NFS, CIFS) use ``registry.watch: poll``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import struct

log = logging.getLogger(__name__)

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# a file written in place (an editor, `echo > f`) ends with IN_CLOSE_WRITE; one renamed into
# place (how this plugin writes) with IN_MOVED_TO
WATCH_MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
# on the layout's parent directories: a watched directory removed or renamed away, with them
PARENT_MASK = IN_MOVED_FROM | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
RESCAN_MASK = IN_Q_OVERFLOW | IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name


class Waker:
    """A pipe that interrupts :meth:`Watcher.wait` (closing the registry)."""

    def __init__(self):
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        try:
            os.write(self.w, b"x")
        except BlockingIOError:
            pass  # already awake

    def drain(self) -> None:
        try:
            while os.read(self.r, 512):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class PollWatcher:
    """Rescan every ``poll_s``."""

    mode = "poll"

    def __init__(self, dirs: dict[str, str], parents: list[str], waker: Waker, poll_s: float):
        self.waker = waker
        self.poll_s = poll_s

    def wait(self) -> set[tuple[str, str]] | None:
        ready, _, _ = select.select([self.waker.r], [], [], self.poll_s)
        if ready:
            self.waker.drain()
            return set()
        return None

    def close(self) -> None:
        return None


class InotifyUnavailable(OSError):
    """This kernel or C library has no inotify (or no more instances): ``auto`` polls instead."""


def _libc():
    name = ctypes.util.find_library("c") or "libc.so.6"
    libc = ctypes.CDLL(name, use_errno=True)
    if not hasattr(libc, "inotify_init1"):
        raise InotifyUnavailable(0, "this C library has no inotify")
    libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
    return libc


class InotifyWatcher:
    """inotify watches on each directory of ``dirs`` ({kind: path}) and on ``parents``."""

    mode = "inotify"

    def __init__(self, dirs: dict[str, str], parents: list[str], waker: Waker, poll_s: float):
        self.dirs = dict(dirs)
        self.parents = list(parents)
        self.waker = waker
        self.poll_s = poll_s
        self._libc = _libc()
        self._fd: int | None = None
        self._kinds: dict[int, str | None] = {}  # watch descriptor -> kind (None: a parent)
        self._setup()

    def _setup(self) -> None:
        self.close()
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise InotifyUnavailable(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd
        watches = [(kind, path, WATCH_MASK) for kind, path in self.dirs.items()]
        watches += [(None, path, PARENT_MASK) for path in self.parents]
        for kind, path, mask in watches:
            wd = self._libc.inotify_add_watch(fd, os.fsencode(path), mask)
            if wd < 0:
                err = ctypes.get_errno()
                self.close()
                raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
            self._kinds[wd] = kind

    def wait(self) -> set[tuple[str, str]] | None:
        if self._fd is None:  # the watches were dropped (a rescan was due): set them again
            self._setup()  # raises OSError while a directory is missing
            return None
        ready, _, _ = select.select([self._fd, self.waker.r], [], [])
        if self.waker.r in ready:
            self.waker.drain()
        if self._fd not in ready:
            return set()
        changed: set[tuple[str, str]] = set()
        rescan = False
        while True:
            try:
                buf = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset + _EVENT.size <= len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, offset)
                name = buf[offset + _EVENT.size: offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                kind = self._kinds.get(wd)
                if mask & RESCAN_MASK or (kind is None and wd in self._kinds):
                    rescan = True
                elif kind is not None and name:
                    changed.add((kind, os.fsdecode(name)))
        if rescan:
            log.info("inotify: queue overflow, or a watched directory was removed or renamed: rescanning")
            self.close()
            return None
        return changed

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._kinds = {}


def make_watcher(mode: str, dirs: dict[str, str], parents: list[str], waker: Waker, poll_s: float):
    """The watcher for ``registry.watch``: ``inotify``, ``poll``, or ``auto`` (inotify when the
    kernel and C library have it, else polling). A missing directory raises :class:`OSError`."""
    if mode == "poll":
        return PollWatcher(dirs, parents, waker, poll_s)
    try:
        return InotifyWatcher(dirs, parents, waker, poll_s)
    except InotifyUnavailable as exc:
        if mode == "inotify":
            raise
        log.warning("inotify is not available (%s): polling every %g s", exc, poll_s)
        return PollWatcher(dirs, parents, waker, poll_s)
