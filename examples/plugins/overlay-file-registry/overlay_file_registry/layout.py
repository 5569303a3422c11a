"""The shared directory: ZooKeeper's layout (overlay's DESIGN §4.2), as files.

::

    <directory>/nodes/<node_id>.json       a node record: the JSON of a ZooKeeper node record
    <directory>/policies/<policy_id>.json  a policy record: the JSON of a ZooKeeper policy
    <directory>/config/max_change          the churn guard's threshold (an integer)
    <directory>/alloc/id-to-ip/<node_id>   the node's overlay address (kept across restarts)
    <directory>/alloc/ip-to-id/<overlay>   the node that owns the address
    <directory>/alloc/.lock                the allocation lock (flock)

Every file is written whole to a temporary name in its directory (a name starting with a
dot, which readers ignore) and renamed into place, so a reader sees the old content or
the new one, never a part. Allocation holds ``alloc/.lock`` (an exclusive ``flock``)
while it reads and writes both ``alloc`` directions, so two nodes never claim one
address.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import random
import time
from collections.abc import Iterator

from overlay import addr
from overlay.errors import AllocationExhausted, AlreadyExists, RegistryError, Unavailable
from overlay.model import MAX_RECORD_BYTES, valid_name

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".json"
# the watched directories, by kind: what a change in each means to the registry
KINDS = ("nodes", "policies", "config", "ip-to-id")


class Layout:
    """The paths under ``directory``."""

    def __init__(self, directory: str):
        self.directory = directory
        self.nodes = os.path.join(directory, "nodes")
        self.policies = os.path.join(directory, "policies")
        self.config = os.path.join(directory, "config")
        self.id_to_ip = os.path.join(directory, "alloc", "id-to-ip")
        self.ip_to_id = os.path.join(directory, "alloc", "ip-to-id")
        self.lock_file = os.path.join(directory, "alloc", ".lock")
        self.max_change = os.path.join(self.config, "max_change")

    def dirs(self) -> dict[str, str]:
        """The watched directory of each kind (:data:`KINDS`)."""
        return {"nodes": self.nodes, "policies": self.policies, "config": self.config,
                "ip-to-id": self.ip_to_id}

    def parents(self) -> list[str]:
        """The directories above the watched ones (their removal or renaming matters too)."""
        return [self.directory, os.path.dirname(self.id_to_ip)]

    def ensure(self) -> None:
        """Create the directories that are missing (the first node of a new registry does)."""
        for path in (*self.dirs().values(), self.id_to_ip):
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                raise Unavailable(f"registry directory {path}: {exc.strerror}") from None

    def node_path(self, node_id: str) -> str:
        return os.path.join(self.nodes, valid_name(node_id, "node_id") + RECORD_SUFFIX)


def record_name(kind: str, filename: str) -> str | None:
    """The record a file of directory ``kind`` holds (a node id, a policy id, an address, a
    config key), or None for a file that is not a record (temporary, hidden, other suffix)."""
    if filename.startswith("."):
        return None
    if kind in ("nodes", "policies"):
        if not filename.endswith(RECORD_SUFFIX) or filename == RECORD_SUFFIX:
            return None
        return filename[: -len(RECORD_SUFFIX)]
    return filename


def read_small(path: str, limit: int = MAX_RECORD_BYTES) -> bytes | None:
    """The content of ``path`` (at most ``limit`` + 1 bytes: enough to tell it is too big), or
    None when it does not exist."""
    try:
        with open(path, "rb") as fh:
            return fh.read(limit + 1)
    except FileNotFoundError:
        return None


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename (readers never see a partial file)."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


class Allocator:
    """Overlay addresses of ``subnet``, claimed in ``alloc/`` under the lock."""

    def __init__(self, layout: Layout, subnet: ipaddress.IPv4Network, timeout_s: float,
                 rng: random.Random | None = None):
        self.layout = layout
        self.subnet = subnet
        self.timeout_s = timeout_s
        self._rng = rng or random.SystemRandom()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold ``alloc/.lock`` (waits up to ``timeout_s`` for another allocator)."""
        fd = os.open(self.layout.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            deadline = time.monotonic() + self.timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                        raise Unavailable(f"cannot lock {self.layout.lock_file} within {self.timeout_s:g} s: "
                                          f"{exc.strerror}") from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # releases the lock

    def owner_of(self, ip: str) -> str | None:
        data = read_small(os.path.join(self.layout.ip_to_id, ip))
        return None if data is None else data.decode("utf-8", "replace").strip()

    def _current(self, node_id: str) -> str | None:
        data = read_small(os.path.join(self.layout.id_to_ip, node_id))
        if data is None:
            return None
        text = data.decode("utf-8", "replace").strip()
        try:
            return addr.in_subnet_host(text, self.subnet)
        except ValueError as exc:
            raise RegistryError(f"alloc/id-to-ip/{node_id} holds {text!r}, not an address of the overlay "
                                f"subnet {self.subnet} ({exc}); an operator must remove it") from None

    def _claim(self, node_id: str, ip: str) -> None:
        write_atomic(os.path.join(self.layout.ip_to_id, ip), node_id.encode())
        write_atomic(os.path.join(self.layout.id_to_ip, node_id), ip.encode())

    def allocate(self, node_id: str, requested: str | None = None) -> str:
        """``node_id``'s overlay address: the one it holds (moved to ``requested`` if that
        differs), else ``requested``, else a free one at random."""
        valid_name(node_id, "node_id")
        if requested is not None:
            try:
                requested = addr.in_subnet_host(requested, self.subnet)
            except ValueError as exc:
                raise RegistryError(f"requested overlay address {requested!r}: {exc}") from None
        with self.locked():
            current = self._current(node_id)
            if current is not None:
                owner = self.owner_of(current)
                if owner not in (None, node_id):
                    raise RegistryError(f"alloc/id-to-ip/{node_id} says {current}, but alloc/ip-to-id/{current} "
                                        f"belongs to {owner!r}; an operator must resolve the conflict")
                if requested is None or requested == current:
                    if owner is None:  # only an operator's partial clean-up leaves this
                        self._claim(node_id, current)
                        log.warning("node %s: restored missing alloc/ip-to-id/%s", node_id, current)
                    return current
            ip = requested or self._free()
            owner = self.owner_of(ip)
            if owner not in (None, node_id):
                keeps = f"; {node_id} keeps {current}" if current else ""
                raise AlreadyExists(f"overlay address {ip} is already allocated to node {owner!r} "
                                    f"(alloc/ip-to-id/{ip}){keeps}")
            self._claim(node_id, ip)
            if current is not None and current != ip:
                remove(os.path.join(self.layout.ip_to_id, current))
                log.warning("node %s: moved overlay address %s -> %s as configured", node_id, current, ip)
            else:
                log.info("node %s: allocated overlay address %s", node_id, ip)
            return ip

    def _free(self) -> str:
        lo, hi = int(self.subnet.network_address) + 1, int(self.subnet.broadcast_address) - 1
        total = hi - lo + 1
        taken = set()
        for name in os.listdir(self.layout.ip_to_id):
            try:
                ip = int(ipaddress.IPv4Address(name))
            except ValueError:
                continue  # temporary files, the operator's notes
            if lo <= ip <= hi:
                taken.add(ip)
        if len(taken) >= total:
            raise AllocationExhausted(f"overlay subnet {self.subnet} is exhausted: all {total} addresses are allocated")
        if len(taken) * 2 < total:
            for _ in range(64):
                ip = self._rng.randint(lo, hi)
                if ip not in taken:
                    return str(ipaddress.IPv4Address(ip))
        return str(ipaddress.IPv4Address(self._rng.choice([i for i in range(lo, hi + 1) if i not in taken])))
