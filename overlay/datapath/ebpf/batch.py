"""Batched map writes from bulk buffers: ``BPF_MAP_UPDATE_BATCH`` and ``BPF_MAP_DELETE_BATCH``.

A full sync writes tens of thousands of entries into one map. Going through one
Python object per entry (a ``(key, value)`` pair of ``bytes``, a ctypes buffer per
call) costs more than the kernel's own work, so the entries travel here as one
:class:`Batch` per map: every key back to back in one ``bytes`` buffer, every value
in another (built in bulk by :func:`overlay.datapath.ebpf.codec.encode_bulk`, or
joined from per-entry encodings), handed to the kernel as they are (no copy).

bcc 0.26's Python has no batch wrapper that takes such buffers (``items_update_batch``
builds ctypes arrays of its own), so the calls go through libbpf's
``bpf_map_update_batch`` / ``bpf_map_delete_batch`` (each one ``bpf(2)`` command), loaded
by :mod:`overlay.datapath.ebpf.bpfsys`.

Where the kernel refuses the batch command for a map type (``EINVAL``, ``ENOTSUPP``,
``EOPNOTSUPP``: devmaps, cpumaps and socket maps on kernel 6.18, which batches hash,
array and LPM trie maps; older kernels refuse more) the remaining entries are written
one by one; a delete batch that stops at an absent key (``ENOENT``) goes on one by one too
(an absent key is not an error). The kernel reports how many elements it handled
before it stopped, so no entry is written twice.
"""

from __future__ import annotations

import ctypes
import errno as _errno
from collections.abc import Iterable

from overlay.datapath.ebpf import bpfsys
from overlay.errors import DatapathError


class Batch:
    """``count`` map entries: ``keys`` (count x key size bytes) and ``values``
    (count x value size bytes; empty for a batch of deletions)."""

    __slots__ = ("keys", "values", "count")

    def __init__(self, keys: bytes, values: bytes, count: int):
        self.keys = keys
        self.values = values
        self.count = count

    @classmethod
    def of_pairs(cls, pairs: Iterable[tuple[bytes, bytes]]) -> Batch:
        pairs = list(pairs)
        return cls(b"".join(bytes(k) for k, _ in pairs), b"".join(bytes(v) for _, v in pairs),
                   len(pairs))

    @classmethod
    def of_keys(cls, keys: Iterable[bytes]) -> Batch:
        keys = [bytes(k) for k in keys]
        return cls(b"".join(keys), b"", len(keys))

    def key_list(self, key_size: int) -> list[bytes]:
        k = self.keys
        return [k[i:i + key_size] for i in range(0, self.count * key_size, key_size)]

    def pairs(self, key_size: int, value_size: int) -> list[tuple[bytes, bytes]]:
        v = self.values
        return [(k, v[i * value_size:(i + 1) * value_size])
                for i, k in enumerate(self.key_list(key_size))]

    def __len__(self) -> int:
        return self.count


def _opts(flags: int = 0) -> bpfsys._MapBatchOpts:
    return bpfsys._MapBatchOpts(sz=ctypes.sizeof(bpfsys._MapBatchOpts), elem_flags=flags)


def _check(batch: Batch, key_size: int, value_size: int | None, op: str) -> None:
    if len(batch.keys) != batch.count * key_size or (
            value_size is not None and len(batch.values) != batch.count * value_size):
        raise DatapathError(f"{op}: {batch.count} entries do not match the buffers "
                            f"({len(batch.keys)} key bytes, {len(batch.values)} value bytes)")


def _done(reported: int, n: int) -> int:
    """How many entries the kernel handled before it failed. A command the map type
    does not have (ENOTSUPP) or refused before its loop leaves the count as given
    (libbpf copies it back): that is none, not all."""
    return reported if reported < n else 0


def update(fd: int, batch: Batch, key_size: int, value_size: int,
           flags: int = bpfsys.BPF_ANY) -> None:
    """Write every entry of ``batch``: one BPF_MAP_UPDATE_BATCH where the kernel accepts
    it for the map type, else (from where the kernel stopped) one update per entry."""
    n = batch.count
    if not n:
        return
    _check(batch, key_size, value_size, "update_batch")
    count = ctypes.c_uint32(n)
    # bytes are immutable to Python and only read by the kernel: passed without a copy
    ret = bpfsys._lib().bpf_map_update_batch(fd, batch.keys, batch.values, ctypes.byref(count),
                                              ctypes.byref(_opts(flags)))
    if ret >= 0:
        return
    code = bpfsys._err(ret)
    done = _done(count.value, n)
    if code not in bpfsys._REFUSED:
        bpfsys._raise("bpf_map_update_batch", code, f"(after {done} of {n} elements)")
    # Refused for this map type (or one entry was invalid: the per-entry path then
    # reports that entry's own error).
    for k, v in batch.pairs(key_size, value_size)[done:]:
        bpfsys.update(fd, k, v, key_size, value_size, flags)


def delete(fd: int, batch: Batch, key_size: int) -> None:
    """Delete every key of ``batch`` (absent keys are ignored): one BPF_MAP_DELETE_BATCH
    where the kernel accepts it, else (from where it stopped) one delete per key."""
    n = batch.count
    if not n:
        return
    _check(batch, key_size, None, "delete_batch")
    count = ctypes.c_uint32(n)
    ret = bpfsys._lib().bpf_map_delete_batch(fd, batch.keys, ctypes.byref(count),
                                              ctypes.byref(_opts()))
    if ret >= 0:
        return
    code = bpfsys._err(ret)
    done = _done(count.value, n)
    if code not in bpfsys._REFUSED and code != _errno.ENOENT:
        bpfsys._raise("bpf_map_delete_batch", code, f"(after {done} of {n} elements)")
    # ENOENT stops the batch at the first absent key: go on one by one.
    for k in batch.key_list(key_size)[done:]:
        bpfsys.delete(fd, k, key_size)


def update_pairs(fd: int, pairs: list[tuple[bytes, bytes]], key_size: int, value_size: int,
                 flags: int = bpfsys.BPF_ANY) -> None:
    """:func:`update` for a list of ``(key, value)`` pairs."""
    update(fd, Batch.of_pairs(pairs), key_size, value_size, flags)


def delete_keys(fd: int, keys: list[bytes], key_size: int) -> None:
    """:func:`delete` for a list of keys."""
    delete(fd, Batch.of_keys(keys), key_size)


def count_keys(fd: int, info: bpfsys.MapInfo, limit: int) -> set[bytes]:
    """The keys of a map (at most ``limit``), read in batches where the kernel can
    (a few hundred calls for 50,000 entries instead of one get_next_key per key)."""
    return {k for k, _ in bpfsys.items(fd, info, limit)}
