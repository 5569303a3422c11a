"""Where a datapath's pins live, and whose they are (docs/datapath.md, "Pin layout").

bpffs is one filesystem for the whole machine, shared by every network namespace, while
an interface name (``eth0``) is unique only inside one namespace. So the pins of the
datapath of ``interface`` live under the identity of the network namespace that runs it::

    <pin_root>/<netns>/<interface>/

``<netns>`` is the inode number of the calling thread's network namespace
(``/proc/thread-self/ns/net``; what ``stat -L -c %i /run/netns/NAME`` prints for a
named one). Two daemons in two namespaces, both on ``eth0`` with the default
``pin_root``, therefore never meet.

The pinned state also records its owner, in a one-entry array map ``owner`` beside the
others: the namespace's inode and its cookie (``SO_NETNS_COOKIE``, unique for the life
of the machine). Inode numbers are reused once a namespace is gone, cookies are not: a
pin directory whose owner cookie is not ours belongs to a namespace that no longer
exists (a live one cannot have our inode), and is reloaded, never adopted.

Before this layout the pins were ``<pin_root>/<interface>/``. A daemon that finds such a
directory adopts it once, moving it into the new layout, only if it is its own: the
program its interface's ingress filter runs is the one pinned there. Otherwise it is left
alone (its own daemon moves it when it restarts) and this one loads afresh.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from dataclasses import dataclass

from overlay.datapath.ebpf import bpfsys, netdev
from overlay.errors import DatapathError

log = logging.getLogger(__name__)

OWNER_MAP = "owner"
OWNER_VALUE = struct.Struct("=QQ")     # netns inode, netns cookie
SO_NETNS_COOKIE = 71                   # <asm-generic/socket.h>, Linux 5.14+
LEGACY_MARK = "loader"                 # every complete load pins this map (datapath.LOADER_MAP)


@dataclass(frozen=True)
class Owner:
    inode: int
    cookie: int   # 0: the kernel does not tell (before 5.14)


def netns_inode() -> int:
    """The inode of the calling thread's network namespace."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def netns_cookie() -> int:
    """The cookie of the calling thread's network namespace (0 if the kernel has none)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
    except OSError:
        return 0


def this_owner() -> Owner:
    return Owner(netns_inode(), netns_cookie())


def pin_dir(interface: str, pin_root: str) -> str:
    """``<pin_root>/<netns inode>/<interface>``: the one place this namespace's datapath on
    ``interface`` is pinned."""
    return os.path.join(pin_root, str(netns_inode()), interface)


def open_pinned(path: str) -> int | None:
    """A new fd of the object pinned at ``path`` (the caller closes it); None when nothing
    (usable) is pinned there."""
    if not os.path.exists(path):
        return None
    try:
        return bpfsys.obj_get(path)
    except DatapathError:
        return None


def read_entry(path: str, value_size: int) -> bytes | None:
    """The value of a pinned one-entry array map (the loader digest, the owner), None when
    there is none or it has another geometry."""
    fd = open_pinned(path)
    if fd is None:
        return None
    try:
        info = bpfsys.map_info(fd)
        if info.key_size != 4 or info.value_size != value_size:
            return None
        return bpfsys.lookup(fd, b"\0\0\0\0", 4, value_size)
    finally:
        bpfsys.close(fd)


def write_entry(path: str, name: str, value: bytes) -> None:
    """Pin (atomically replacing) a new one-entry array map ``name`` holding ``value`` at ``path``."""
    fd = bpfsys.map_create(bpfsys.MAP_TYPE_ARRAY, name, 4, len(value), 1)
    try:
        bpfsys.update(fd, b"\0\0\0\0", value, 4, len(value))
        bpfsys.pin_replace(fd, path)
    finally:
        bpfsys.close(fd)


def read_owner(directory: str) -> Owner | None:
    """The owner recorded in ``directory`` (None when none is)."""
    raw = read_entry(os.path.join(directory, OWNER_MAP), OWNER_VALUE.size)
    return Owner(*OWNER_VALUE.unpack(raw)) if raw else None


def write_owner(directory: str, owner: Owner | None = None) -> None:
    """Record ``owner`` (default: this namespace) in ``directory``."""
    owner = owner or this_owner()
    write_entry(os.path.join(directory, OWNER_MAP), "ovl_owner", OWNER_VALUE.pack(owner.inode, owner.cookie))


def foreign_owner(directory: str) -> Owner | None:
    """The recorded owner of ``directory`` if it is not this namespace, else None."""
    owner = read_owner(directory)
    if owner is None:
        return None
    me = this_owner()
    if owner.inode != me.inode or (owner.cookie and me.cookie and owner.cookie != me.cookie):
        return owner
    return None


def claim_legacy(interface: str, pin_root: str, directory: str, uplink: int, ingress_pin: str) -> bool:
    """Move ``<pin_root>/<interface>`` (the old layout) to ``directory`` if it is ours: the
    program ``interface``'s ingress filter runs is the one pinned there as ``ingress_pin``.
    True if it was moved."""
    legacy = os.path.join(pin_root, interface)
    if os.path.exists(directory) or not os.path.exists(os.path.join(legacy, LEGACY_MARK)):
        return False
    try:
        fd = bpfsys.obj_get(os.path.join(legacy, ingress_pin))
    except DatapathError:
        fd = None
    pinned = None
    if fd is not None:
        try:
            pinned = bpfsys.prog_info(fd).id
        finally:
            bpfsys.close(fd)
    running = netdev.our_filter(uplink, netdev.INGRESS)
    if pinned is None or running is None or running.prog_id != pinned:
        log.info("%s (the old pin layout) is not this namespace's datapath (its ingress filter does not run "
                 "the program pinned there); leaving it alone and loading into %s", legacy, directory)
        return False
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    os.rename(legacy, directory)
    log.info("moved this namespace's pinned datapath from %s (the old layout) to %s", legacy, directory)
    return True
