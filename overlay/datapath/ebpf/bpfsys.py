"""A thin ctypes layer over ``libbpf.so.1`` for pinned maps and programs.

bcc's Python API works on the objects of the ``bcc.BPF`` that compiled them;
it cannot open a pinned map by path, read its layout or batch-update it.
This module adds exactly that, over the low-level ``bpf_*`` wrappers of
libbpf (each one is a single ``bpf(2)`` command):

- ``obj_get(path) -> fd`` and ``obj_pin(fd, path)``;
- ``lookup``, ``update``, ``delete``, ``get_next_key`` and ``keys``;
- ``items`` which batch-reads where it can, and ``scan``, a resumable bounded
  piece of a batched pass (the sweep); batched writes from bulk buffers are in
  :mod:`overlay.datapath.ebpf.batch`;
- ``map_info(fd)`` and ``prog_info(fd)`` (``bpf_obj_get_info_by_fd``);
- ``map_create`` for the loader's own small maps;
- :class:`RingBuffer`: a reader of a ring buffer map (``ring_buffer__new``,
  ``__poll``, ``__free``), e.g. the pinned ``ovl_events`` for ``overlay drops``.

Keys and values are ``bytes`` (or anything ``bytes()`` accepts: ctypes structures,
``bytearray``). Every failure raises :class:`overlay.errors.DatapathError` naming the
operation, the errno and its text. libbpf >= 1.0 returns ``-errno`` from these
wrappers; the module relies on that and on nothing else of libbpf's state.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
from dataclasses import dataclass
from functools import lru_cache

from overlay.errors import DatapathError, UnsupportedError

# enum bpf_map_type (include/uapi/linux/bpf.h), the ones this project meets.
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_PROG_ARRAY = 3
MAP_TYPE_PERCPU_HASH = 5
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_LRU_HASH = 9
MAP_TYPE_LRU_PERCPU_HASH = 10
MAP_TYPE_LPM_TRIE = 11
MAP_TYPE_RINGBUF = 27

MAP_TYPE_NAMES = {
    MAP_TYPE_HASH: "hash",
    MAP_TYPE_ARRAY: "array",
    MAP_TYPE_PROG_ARRAY: "prog_array",
    MAP_TYPE_PERCPU_HASH: "percpu_hash",
    MAP_TYPE_PERCPU_ARRAY: "percpu_array",
    MAP_TYPE_LRU_HASH: "lru_hash",
    MAP_TYPE_LRU_PERCPU_HASH: "lru_percpu_hash",
    MAP_TYPE_LPM_TRIE: "lpm_trie",
    MAP_TYPE_RINGBUF: "ringbuf",
}
PERCPU_MAP_TYPES = frozenset(
    {MAP_TYPE_PERCPU_HASH, MAP_TYPE_PERCPU_ARRAY, MAP_TYPE_LRU_PERCPU_HASH}
)
ARRAY_MAP_TYPES = frozenset({MAP_TYPE_ARRAY, MAP_TYPE_PERCPU_ARRAY})

# Update flags.
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# Map creation flags.
BPF_F_NO_PREALLOC = 1

# Errors that mean "this command is not available for this map or kernel".
_ENOTSUPP = 524  # the kernel-internal code some map types return
_REFUSED = frozenset({_errno.EINVAL, _errno.EOPNOTSUPP, _ENOTSUPP, _errno.ENOSYS})

BPF_OBJ_NAME_LEN = 16


class _MapBatchOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _BpfMapInfo(ctypes.Structure):
    """struct bpf_map_info, up to the fields this module reads (the kernel
    accepts a shorter info_len and fills what fits)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    ]


class _BpfProgInfo(ctypes.Structure):
    """struct bpf_prog_info, up to ``name``."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    ]


class _MapCreateOpts(ctypes.Structure):
    """struct bpf_map_create_opts as of libbpf 1.1 (only ``sz`` and
    ``map_flags`` are set by this module)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
        ("numa_node", ctypes.c_uint32),
        ("map_ifindex", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str

    @property
    def type_name(self) -> str:
        return MAP_TYPE_NAMES.get(self.type, str(self.type))

    @property
    def percpu(self) -> bool:
        return self.type in PERCPU_MAP_TYPES

    @property
    def value_buffer_size(self) -> int:
        """Bytes a lookup returns: per-CPU maps return one 8-aligned slot per possible CPU."""
        if self.percpu:
            return ((self.value_size + 7) & ~7) * num_possible_cpus()
        return self.value_size


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    tag: str
    name: str


_p = ctypes.c_void_p
_u32p = ctypes.POINTER(ctypes.c_uint32)


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as exc:
        raise UnsupportedError(f"libbpf.so.1 not found (install libbpf1): {exc}") from None
    sigs = {
        "bpf_obj_get": ([ctypes.c_char_p], ctypes.c_int),
        "bpf_obj_pin": ([ctypes.c_int, ctypes.c_char_p], ctypes.c_int),
        "bpf_map_lookup_elem": ([ctypes.c_int, _p, _p], ctypes.c_int),
        "bpf_map_update_elem": ([ctypes.c_int, _p, _p, ctypes.c_uint64], ctypes.c_int),
        "bpf_map_delete_elem": ([ctypes.c_int, _p], ctypes.c_int),
        "bpf_map_get_next_key": ([ctypes.c_int, _p, _p], ctypes.c_int),
        "bpf_map_update_batch": ([ctypes.c_int, _p, _p, _u32p, _p], ctypes.c_int),
        "bpf_map_delete_batch": ([ctypes.c_int, _p, _u32p, _p], ctypes.c_int),
        "bpf_map_lookup_batch": ([ctypes.c_int, _p, _p, _p, _p, _u32p, _p], ctypes.c_int),
        "bpf_obj_get_info_by_fd": ([ctypes.c_int, _p, _u32p], ctypes.c_int),
        "bpf_map_create": (
            [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, _p],
            ctypes.c_int,
        ),
        "bpf_prog_get_fd_by_id": ([ctypes.c_uint32], ctypes.c_int),
        "bpf_map_get_fd_by_id": ([ctypes.c_uint32], ctypes.c_int),
    }
    for name, (argtypes, restype) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype
    return lib


def _err(ret: int) -> int:
    """The errno of a failed libbpf call (libbpf 1.x returns -errno)."""
    if ret < -1:
        return -ret
    return ctypes.get_errno() or _errno.EIO


def _raise(op: str, code: int, what: str = "") -> None:
    where = f" {what}" if what else ""
    raise DatapathError(f"{op}{where}: {_errno.errorcode.get(code, code)} ({os.strerror(code)})")


def _buf(data, size: int, what: str) -> ctypes.Array:
    raw = bytes(data)
    if len(raw) != size:
        raise DatapathError(f"{what}: expected {size} bytes, got {len(raw)}")
    return ctypes.create_string_buffer(raw, size)


@lru_cache(maxsize=1)
def num_possible_cpus() -> int:
    """Number of possible CPUs, as the kernel sizes per-CPU map values."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            spec = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    total = 0
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            total += int(hi) - int(lo) + 1
        elif part:
            total += 1
    return max(total, 1)


# -- objects -------------------------------------------------------------------


def obj_get(path: str) -> int:
    """Open a pinned map or program; returns a new fd (caller closes it)."""
    fd = _lib().bpf_obj_get(os.fsencode(path))
    if fd < 0:
        _raise("bpf_obj_get", _err(fd), path)
    return fd


def obj_pin(fd: int, path: str) -> None:
    """Pin ``fd`` at ``path`` (EEXIST raises; see :func:`pin_replace`)."""
    ret = _lib().bpf_obj_pin(fd, os.fsencode(path))
    if ret < 0:
        _raise("bpf_obj_pin", _err(ret), path)


def pin_replace(fd: int, path: str) -> None:
    """Pin ``fd`` at ``path``, atomically replacing what is pinned there.

    bpffs has no rename-over, so this pins under a temporary name and
    renames (bpffs supports rename(2) within a directory)."""
    tmp = f"{path}_new{os.getpid()}"  # bpffs refuses names with dots
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    obj_pin(fd, tmp)
    try:
        os.rename(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        _raise("rename pin", exc.errno or _errno.EIO, path)


def close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def map_info(fd: int) -> MapInfo:
    info = _BpfMapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    ret = _lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if ret < 0:
        _raise("bpf_obj_get_info_by_fd(map)", _err(ret))
    return MapInfo(
        type=info.type,
        id=info.id,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
        name=info.name.decode(errors="replace"),
    )


def prog_info(fd: int) -> ProgInfo:
    info = _BpfProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    ret = _lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if ret < 0:
        _raise("bpf_obj_get_info_by_fd(prog)", _err(ret))
    return ProgInfo(
        type=info.type,
        id=info.id,
        tag=bytes(info.tag).hex(),
        name=info.name.decode(errors="replace"),
    )


def prog_get_fd_by_id(prog_id: int) -> int:
    fd = _lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        _raise("bpf_prog_get_fd_by_id", _err(fd), str(prog_id))
    return fd


def map_create(
    map_type: int, name: str, key_size: int, value_size: int, max_entries: int, flags: int = 0
) -> int:
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    fd = _lib().bpf_map_create(
        map_type, name.encode()[: BPF_OBJ_NAME_LEN - 1], key_size, value_size, max_entries,
        ctypes.byref(opts),
    )
    if fd < 0:
        _raise("bpf_map_create", _err(fd), name)
    return fd


# -- elements ------------------------------------------------------------------


def lookup(fd: int, key, key_size: int, value_size: int) -> bytes | None:
    """The value at ``key``, or None when absent. ``value_size`` is the
    buffer size (see :attr:`MapInfo.value_buffer_size` for per-CPU maps)."""
    k = _buf(key, key_size, "key")
    v = ctypes.create_string_buffer(value_size)
    ret = _lib().bpf_map_lookup_elem(fd, k, v)
    if ret < 0:
        code = _err(ret)
        if code == _errno.ENOENT:
            return None
        _raise("bpf_map_lookup_elem", code)
    return v.raw


def update(fd: int, key, value, key_size: int, value_size: int, flags: int = BPF_ANY) -> None:
    k = _buf(key, key_size, "key")
    v = _buf(value, value_size, "value")
    ret = _lib().bpf_map_update_elem(fd, k, v, flags)
    if ret < 0:
        _raise("bpf_map_update_elem", _err(ret))


def delete(fd: int, key, key_size: int) -> bool:
    """Delete ``key``; False when it was not there (not an error)."""
    k = _buf(key, key_size, "key")
    ret = _lib().bpf_map_delete_elem(fd, k)
    if ret < 0:
        code = _err(ret)
        if code == _errno.ENOENT:
            return False
        _raise("bpf_map_delete_elem", code)
    return True


def get_next_key(fd: int, key, key_size: int) -> bytes | None:
    """The key after ``key`` (the first one when ``key`` is None); None at the end."""
    k = None if key is None else _buf(key, key_size, "key")
    nk = ctypes.create_string_buffer(key_size)
    ret = _lib().bpf_map_get_next_key(fd, k, nk)
    if ret < 0:
        code = _err(ret)
        if code == _errno.ENOENT:
            return None
        _raise("bpf_map_get_next_key", code)
    return nk.raw


def keys(fd: int, key_size: int, limit: int) -> list[bytes]:
    """All keys, by get_next_key. Bounded: at most ``limit`` keys are
    returned, and a hash map that restarts from its first key (because the
    current key was deleted concurrently) cannot loop forever."""
    out: list[bytes] = []
    seen: set[bytes] = set()
    key = None
    for _ in range(2 * limit + 2):
        nk = get_next_key(fd, key, key_size)
        if nk is None:
            break
        if nk not in seen:
            seen.add(nk)
            out.append(nk)
            if len(out) >= limit:
                break
        key = nk
    return out


def items(fd: int, info: MapInfo, limit: int | None = None) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of a map: batched lookups where the kernel
    supports them for the map type, else get_next_key + lookup."""
    limit = info.max_entries if limit is None else limit
    vsize = info.value_buffer_size
    try:
        return _lookup_batch_from(fd, info.key_size, vsize, None, limit)[0][:limit]
    except _Refused:
        pass
    out = []
    for k in keys(fd, info.key_size, limit):
        v = lookup(fd, k, info.key_size, vsize)
        if v is not None:
            out.append((k, v))
    return out


class _Refused(Exception):  # the kernel refuses batch lookups for this map type
    pass


def _lookup_batch_from(fd: int, key_size: int, value_size: int, token: bytes | None,
                       limit: int) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """About ``limit`` pairs from batch position ``token`` (None: the start) and the next token."""
    out: list[tuple[bytes, bytes]] = []
    chunk = max(1, min(256, limit))
    token_size = max(key_size, 8)
    in_tok = ctypes.create_string_buffer(token_size)
    out_tok = ctypes.create_string_buffer(token_size)
    opts = _MapBatchOpts(sz=ctypes.sizeof(_MapBatchOpts))
    first = token is None
    if token is not None:
        ctypes.memmove(in_tok, token, min(len(token), token_size))
    # Each round returns at least one element or ends; bounded by limit.
    for _ in range(limit + 2):
        keys_buf = ctypes.create_string_buffer(key_size * chunk)
        vals_buf = ctypes.create_string_buffer(value_size * chunk)
        count = ctypes.c_uint32(chunk)
        ret = _lib().bpf_map_lookup_batch(
            fd, None if first else in_tok, out_tok, keys_buf, vals_buf,
            ctypes.byref(count), ctypes.byref(opts),
        )
        code = _err(ret) if ret < 0 else 0
        if code in _REFUSED and first and count.value == 0:
            raise _Refused()
        if code == _errno.ENOSPC and count.value == 0 and chunk < 1 << 20:
            chunk *= 2  # a hash bucket larger than the chunk
            continue
        if code not in (0, _errno.ENOENT):
            _raise("bpf_map_lookup_batch", code)
        kraw, vraw = keys_buf.raw, vals_buf.raw
        for i in range(count.value):
            out.append((kraw[i * key_size:(i + 1) * key_size],
                        vraw[i * value_size:(i + 1) * value_size]))
        if code == _errno.ENOENT:
            return out, None
        ctypes.memmove(in_tok, out_tok, token_size)
        first = False
        if len(out) >= limit:
            break
    return out, in_tok.raw


def scan(fd: int, info: MapInfo, cursor: bytes | None, limit: int) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """About ``limit`` pairs from ``cursor`` (None: the start), the next cursor (None: done)."""
    try:
        return _lookup_batch_from(fd, info.key_size, info.value_buffer_size, cursor, limit)
    except _Refused:
        return items(fd, info), None


# -- ring buffers ----------------------------------------------------------------

_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class RingBuffer:
    """Consume a BPF ring buffer map (by fd, e.g. from :func:`obj_get` of its pin).

    ``callback(data: bytes)`` is called from :meth:`poll` for every record;
    an exception it raises stops the poll and is raised again from there. A
    ring buffer has one consumer position, shared by every reader: two
    readers of the same map each see only part of the records.
    """

    def __init__(self, fd: int, callback):
        lib = _lib()
        lib.ring_buffer__new.argtypes = [ctypes.c_int, _SAMPLE_FN, _p, _p]
        lib.ring_buffer__new.restype = _p
        lib.ring_buffer__poll.argtypes = [_p, ctypes.c_int]
        lib.ring_buffer__poll.restype = ctypes.c_int
        lib.ring_buffer__free.argtypes = [_p]
        lib.ring_buffer__free.restype = None
        self._lib = lib
        self._error: BaseException | None = None

        def sample(_ctx, data, size):
            try:
                callback(ctypes.string_at(data, size))
            except BaseException as exc:  # noqa: BLE001 - re-raised from poll()
                self._error = exc
                return -1
            return 0

        self._sample = _SAMPLE_FN(sample)  # keep a reference while libbpf holds it
        ctypes.set_errno(0)
        self._rb = lib.ring_buffer__new(fd, self._sample, None, None)
        if not self._rb:
            _raise("ring_buffer__new", ctypes.get_errno() or _errno.EINVAL)

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for records and consume them; how many."""
        if not self._rb:
            raise DatapathError("ring buffer is closed")
        n = self._lib.ring_buffer__poll(self._rb, int(timeout_ms))
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc
        if n < 0:
            code = _err(n)
            if code == _errno.EINTR:
                return 0
            _raise("ring_buffer__poll", code)
        return n

    def close(self) -> None:
        if self._rb:
            self._lib.ring_buffer__free(self._rb)
            self._rb = None

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
