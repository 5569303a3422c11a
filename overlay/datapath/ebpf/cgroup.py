"""Socket mode's cgroup attachments (docs/datapath.md, "Socket mode").

The four sock_addr programs (``build.SOCK_PROGRAMS``) are attached to one cgroup-v2
directory (``datapath.cgroup``, default the root ``/sys/fs/cgroup``) through BPF
links, one per hook, pinned beside the datapath's other pins as ``<pin dir>/link_<hook>``:

- a link attachment is always a multi-attachment: programs others attached to the same
  cgroup and hook keep running, and ours never replaces or detaches theirs (an exclusive,
  non-multi attachment of someone else's makes the kernel refuse ours: reported);
- the pinned link holds the attachment when the daemon dies (``kill -9``) and is how a
  restart finds it: adoption swaps the program inside the link (``BPF_LINK_UPDATE``, no
  window without a program) or leaves it alone when it already runs the pinned one;
- teardown detaches each link (``BPF_LINK_DETACH``, even if another process still holds
  an fd of it) and unpins it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
from dataclasses import dataclass
from functools import lru_cache

from overlay.datapath.ebpf import bpfsys
from overlay.errors import DatapathError, UnsupportedError

log = logging.getLogger(__name__)

DEFAULT_CGROUP = "/sys/fs/cgroup"
LINK_PREFIX = "link_"
_CGROUP2_SUPER_MAGIC = 0x63677270


class _LinkInfo(ctypes.Structure):
    """struct bpf_link_info: type, id, prog_id, then the cgroup member of its union."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("cgroup_id", ctypes.c_uint64),
        ("attach_type", ctypes.c_uint32),
        ("_rest", ctypes.c_uint8 * 36),
    ]


@dataclass(frozen=True)
class LinkInfo:
    id: int
    prog_id: int
    cgroup_id: int     # 0 once the cgroup is gone (a defunct link)
    attach_type: int


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    lib = bpfsys._lib()
    sigs = {
        "bpf_link_create": ([ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
        "bpf_link_update": ([ctypes.c_int, ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
        "bpf_link_detach": ([ctypes.c_int], ctypes.c_int),
    }
    for name, (argtypes, restype) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype
    return lib


def check_cgroup(path: str) -> None:
    """UnsupportedError unless ``path`` is a directory of a cgroup-v2 mount."""
    if not os.path.isdir(path):
        raise UnsupportedError(f"datapath.cgroup {path} is not a directory (a cgroup-v2 directory is needed "
                               "for socket mode)")
    from overlay.datapath.ebpf.build import _statfs_type

    if _statfs_type(path) != _CGROUP2_SUPER_MAGIC:
        raise UnsupportedError(f"datapath.cgroup {path} is not on a cgroup-v2 (unified) mount")


def cgroup_id(path: str) -> int:
    """The id the kernel gives the cgroup at ``path`` (its inode number on cgroup v2)."""
    return os.stat(path).st_ino


def link_info(fd: int) -> LinkInfo:
    info = _LinkInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    ret = bpfsys._lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if ret < 0:
        bpfsys._raise("bpf_obj_get_info_by_fd(link)", bpfsys._err(ret))
    return LinkInfo(info.id, info.prog_id, info.cgroup_id, info.attach_type)


def _pinned_link(path: str) -> tuple[int, LinkInfo] | None:
    """(fd, info) of the link pinned at ``path``; None when there is none (or it is no link)."""
    from overlay.datapath.ebpf.pins import open_pinned

    fd = open_pinned(path)
    if fd is None:
        return None
    try:
        return fd, link_info(fd)
    except DatapathError:
        bpfsys.close(fd)
        return None


def attach(pin_dir: str, cgroup: str, progs: dict[str, tuple[int, int]]) -> list[str]:
    """Make each hook of ``progs`` ({hook: (prog fd, attach type)}) run that program on
    ``cgroup`` through the link pinned at ``<pin_dir>/link_<hook>``; returns the hooks
    that were attached or updated (empty: everything already in place)."""
    check_cgroup(cgroup)
    want_cg = cgroup_id(cgroup)
    changed = []
    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for hook, (prog_fd, attach_type) in progs.items():
            path = os.path.join(pin_dir, LINK_PREFIX + hook)
            prog_id = bpfsys.prog_info(prog_fd).id
            found = _pinned_link(path)
            if found is not None:
                fd, info = found
                try:
                    if info.cgroup_id == want_cg and info.attach_type == attach_type:
                        if info.prog_id != prog_id:
                            ret = _lib().bpf_link_update(fd, prog_fd, None)
                            if ret < 0:
                                bpfsys._raise("bpf_link_update", bpfsys._err(ret), path)
                            changed.append(hook)
                        continue
                    _lib().bpf_link_detach(fd)   # another cgroup (config changed) or a defunct link
                finally:
                    bpfsys.close(fd)
            ret = _lib().bpf_link_create(prog_fd, cg_fd, attach_type, None)
            if ret < 0:
                code = bpfsys._err(ret)
                hint = (" (a program attached to it without BPF_F_ALLOW_MULTI excludes others)"
                        if code == errno.EPERM else "")
                bpfsys._raise("attaching the socket program " + hook, code, f"to {cgroup}{hint}")
            try:
                bpfsys.pin_replace(ret, path)
            finally:
                bpfsys.close(ret)
            changed.append(hook)
    finally:
        os.close(cg_fd)
    if changed:
        log.info("socket mode: %s attached to cgroup %s", ", ".join(changed), cgroup)
    return changed


def detach(pin_dir: str) -> list[str]:
    """Detach and unpin every socket-mode link pinned in ``pin_dir``; the hooks removed."""
    removed = []
    if not os.path.isdir(pin_dir):
        return removed
    for entry in sorted(os.listdir(pin_dir)):
        if not entry.startswith(LINK_PREFIX):
            continue
        path = os.path.join(pin_dir, entry)
        found = _pinned_link(path)
        if found is not None:
            fd, _info = found
            try:
                _lib().bpf_link_detach(fd)
            finally:
                bpfsys.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        removed.append(entry.removeprefix(LINK_PREFIX))
    if removed:
        log.info("socket mode: detached %s", ", ".join(removed))
    return removed


def links(pin_dir: str, hooks) -> dict[str, dict]:
    """What each socket hook's pinned link runs, and where (for status and tests)."""
    out = {}
    for hook in hooks:
        found = _pinned_link(os.path.join(pin_dir, LINK_PREFIX + hook))
        if found is None:
            out[hook] = {"link_id": None, "prog_id": None, "cgroup_id": None}
            continue
        fd, info = found
        bpfsys.close(fd)
        out[hook] = {"link_id": info.id, "prog_id": info.prog_id, "cgroup_id": info.cgroup_id}
    return out
