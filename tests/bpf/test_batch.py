"""overlay.datapath.ebpf.batch against real kernel maps: a batch of N entries written,
then every entry read back one by one (bpf_map_lookup_elem), on both paths:

- the batch path: a hash map, which the kernel batch-updates in one command;
- the fallback: a devmap_hash (values: the loopback's ifindex), for which the kernel
  refuses BPF_MAP_UPDATE_BATCH and BPF_MAP_DELETE_BATCH (ENOTSUPP; kernel 6.18 batches
  hash, array and LPM trie maps): every entry is then written one by one.

Then MapSet.apply on the datapath's own maps, bulk-encoded (nat in ovl_nat's slots and
ovl_nat_ext, peers from one diff-like run of distinct keys) and per entry (a table given
twice), read back.
The expected entries are built here from the addresses' octets, not by the encoders.
"""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

from overlay import abi
from overlay.datapath.ebpf import batch, bpfsys
from overlay.ops import NatEntry, Op, PeerEntry

N = 3000


@pytest.fixture
def hash_map():
    fd = bpfsys.map_create(bpfsys.MAP_TYPE_HASH, "ovl_t_batch", 4, 8, N + 8)
    yield fd
    bpfsys.close(fd)


MAP_TYPE_DEVMAP_HASH = 25  # enum bpf_map_type: no batch commands
LOOPBACK_IFINDEX = 1


@pytest.fixture
def devmap():
    fd = bpfsys.map_create(MAP_TYPE_DEVMAP_HASH, "ovl_t_devmap", 4, 4, 512)
    yield fd
    bpfsys.close(fd)


def _kernel_refuses_batch(fd: int, key_size: int, value_size: int) -> int:
    """The errno of one raw BPF_MAP_UPDATE_BATCH of one entry (0 if accepted)."""
    count = ctypes.c_uint32(1)
    opts = bpfsys._MapBatchOpts(sz=ctypes.sizeof(bpfsys._MapBatchOpts))
    ret = bpfsys._lib().bpf_map_update_batch(fd, bytes(key_size), bytes(value_size),
                                             ctypes.byref(count), ctypes.byref(opts))
    return bpfsys._err(ret) if ret < 0 else 0


def test_batch_path_writes_every_entry_and_deletes_them(hash_map):
    assert _kernel_refuses_batch(hash_map, 4, 8) == 0  # this map takes the batch command
    bpfsys.delete(hash_map, bytes(4), 4)
    keys = [struct.pack("=I", 7 * i + 1) for i in range(N)]
    values = [struct.pack("=II", i, i ^ 0xA5A5) for i in range(N)]
    batch.update(hash_map, batch.Batch(b"".join(keys), b"".join(values), N), 4, 8)
    for k, v in zip(keys, values, strict=True):
        assert bpfsys.lookup(hash_map, k, 4, 8) == v
    info = bpfsys.map_info(hash_map)
    assert len(batch.count_keys(hash_map, info, N + 8)) == N

    # deletes: the batch stops at an absent key (ENOENT); the rest still goes
    gone = keys[: N // 2]
    batch.delete_keys(hash_map, [gone[0], struct.pack("=I", 2), *gone[1:]], 4)
    for k in gone:
        assert bpfsys.lookup(hash_map, k, 4, 8) is None
    for k, v in zip(keys[N // 2:], values[N // 2:], strict=True):
        assert bpfsys.lookup(hash_map, k, 4, 8) == v
    batch.delete(hash_map, batch.Batch(b"".join(keys[N // 2:]), b"", N - N // 2), 4)
    assert batch.count_keys(hash_map, info, N + 8) == set()


def test_fallback_when_the_kernel_refuses_the_batch(devmap):
    assert _kernel_refuses_batch(devmap, 4, 4) in (errno.EINVAL, errno.EOPNOTSUPP, 524)
    n = 300
    keys = [struct.pack("=I", 1000 + 3 * i) for i in range(n)]
    one = struct.pack("=I", LOOPBACK_IFINDEX)
    batch.update(devmap, batch.Batch(b"".join(keys), one * n, n), 4, 4)
    for k in keys:
        assert bpfsys.lookup(devmap, k, 4, 4) == one
    assert bpfsys.lookup(devmap, struct.pack("=I", 1001), 4, 4) is None
    absent = struct.pack("=I", 7)
    batch.delete(devmap, batch.Batch.of_keys([absent, *keys[:200]]), 4)
    for k in keys[:200]:
        assert bpfsys.lookup(devmap, k, 4, 4) is None
    for k in keys[200:]:
        assert bpfsys.lookup(devmap, k, 4, 4) == one


def test_buffers_that_do_not_match_the_count_are_refused(hash_map):
    from overlay.errors import DatapathError

    with pytest.raises(DatapathError, match="do not match"):
        batch.update(hash_map, batch.Batch(bytes(8), bytes(8), 1), 4, 8)


def be32(addr: str) -> int:
    return struct.unpack("=I", bytes(int(o) for o in addr.split(".")))[0]


def test_mapset_apply_bulk_and_per_entry(maps):
    """nat entries in the ovl_nat slots (the conftest's NAT_SUBNET 192.168.0.0/16) and in
    ovl_nat_ext (100.64.x), peers; read back by hand-computed slot and key."""
    n = 2000
    overlays = [f"192.168.{i // 250}.{i % 250 + 1}" if i % 2 else f"100.64.{i // 250}.{i % 250 + 1}"
                for i in range(n)]
    reals = [f"10.9.{i // 250}.{i % 250 + 1}" for i in range(n)]
    ops = [Op("peers", r, PeerEntry(identity=i + 1, flags=abi.PEER_F_MEMBER)) for i, r in enumerate(reals)]
    ops += [Op("nat", o, NatEntry(r, override=i % 3 == 0)) for i, (o, r) in enumerate(zip(overlays, reals, strict=True))]
    maps.apply(ops)
    nat_fd, ext_fd, peers_fd = maps.fd("ovl_nat"), maps.fd("ovl_nat_ext"), maps.fd("ovl_peers")
    for i, (o, r) in enumerate(zip(overlays, reals, strict=True)):
        flags = abi.NAT_F_OVERRIDE if i % 3 == 0 else 0
        want = struct.pack("=II", be32(r), flags)
        if i % 2:   # 192.168.a.b: slot a * 256 + b
            a, b = map(int, o.split(".")[2:])
            assert bpfsys.lookup(nat_fd, struct.pack("=I", a * 256 + b), 4, 8) == want
            assert bpfsys.lookup(ext_fd, struct.pack("=I", be32(o)), 4, 8) is None
        else:
            assert bpfsys.lookup(ext_fd, struct.pack("=I", be32(o)), 4, 8) == want
        assert bpfsys.lookup(peers_fd, struct.pack("=I", be32(r)), 4, 8) == \
            struct.pack("=II", i + 1, abi.PEER_F_MEMBER)
    assert maps.read_table("nat") == {
        o: NatEntry(r, i % 3 == 0) for i, (o, r) in enumerate(zip(overlays, reals, strict=True))}

    # one run mixing puts and deletes (bulk), then a table given twice with a key
    # repeated (per entry: the last op wins)
    maps.apply([Op("nat", o, None) for o in overlays[:1000]]
               + [Op("nat", overlays[1000], NatEntry("10.8.0.1"))])
    maps.apply([Op("nat", overlays[1], NatEntry("10.8.0.9")), Op("peers", reals[0], None),
                Op("nat", overlays[1], NatEntry("10.8.0.2")), Op("nat", overlays[2], NatEntry("10.8.0.3")),
                Op("nat", overlays[2], None)])
    nat = maps.read_table("nat")
    assert len(nat) == 1001
    assert nat[overlays[1000]] == NatEntry("10.8.0.1") and nat[overlays[1]] == NatEntry("10.8.0.2")
    assert all(o not in nat for o in overlays[2:1000])
    assert bpfsys.lookup(nat_fd, struct.pack("=I", 3), 4, 8) == bytes(8)  # 192.168.0.3: deleted = zero
    assert maps.lookup("nat", overlays[3]) is None and maps.lookup("nat", overlays[1]) == NatEntry("10.8.0.2")
    assert maps.fill()["ovl_nat"]["entries"] == 501 and maps.fill()["ovl_nat_ext"]["entries"] == 500
    maps.apply([Op("nat", o, None) for o in nat] + [Op("peers", r, None) for r in reals])
    assert maps.read_table("nat") == maps.read_table("peers") == {}


@pytest.mark.parametrize("ops", [
    # diff's order: nat's delete and put in one run (bulk), peers' delete and put in another
    [Op("nat", "192.168.0.5", None), Op("nat", "192.168.0.6", NatEntry("10.9.0.6")),
     Op("peers", "10.9.0.5", None), Op("peers", "10.9.0.6", PeerEntry(identity=6, flags=1))],
    # nat in two runs: entry by entry
    [Op("nat", "192.168.0.5", None), Op("peers", "10.9.0.5", None),
     Op("peers", "10.9.0.6", PeerEntry(identity=6, flags=1)), Op("nat", "192.168.0.6", NatEntry("10.9.0.6"))],
], ids=["bulk", "per-entry"])
def test_a_leaving_peers_slot_is_emptied_first_and_the_new_translation_written_last(maps, monkeypatch, ops):
    """The write order of docs/datapath.md ("translations go last on the way in and first on
    the way out"), with ovl_nat an array: the leaving peer's slot is emptied (zero written)
    before anything else, the arriving peer's slot written after its peers entry, the leaving
    peer's peers entry deleted last."""
    maps.apply([Op("nat", "192.168.0.5", NatEntry("10.9.0.5")),
                Op("peers", "10.9.0.5", PeerEntry(identity=5, flags=1))])
    names = {maps.fd(n): n for n in ("ovl_nat", "ovl_nat_ext", "ovl_peers")}
    calls = []
    update, delete = batch.update, batch.delete

    def rec_update(fd, b, *a, **k):
        calls.append(("update", names.get(fd), b.keys, b.values))
        return update(fd, b, *a, **k)

    def rec_delete(fd, b, *a, **k):
        calls.append(("delete", names.get(fd), b.keys, b""))
        return delete(fd, b, *a, **k)

    monkeypatch.setattr(batch, "update", rec_update)
    monkeypatch.setattr(batch, "delete", rec_delete)
    maps.apply(ops)
    slot = struct.Struct("=I").pack
    assert [c for c in calls if c[1]] == [
        ("update", "ovl_nat", slot(5), bytes(8)),
        ("update", "ovl_peers", slot(be32("10.9.0.6")), struct.pack("=II", 6, 1)),
        ("update", "ovl_nat", slot(6), struct.pack("=II", be32("10.9.0.6"), 0)),
        ("delete", "ovl_peers", slot(be32("10.9.0.5")), b""),
    ]
    assert maps.read_table("nat") == {"192.168.0.6": NatEntry("10.9.0.6")}
    assert set(maps.read_table("peers")) == {"10.9.0.6"}
    maps.apply([Op("nat", "192.168.0.6", None), Op("peers", "10.9.0.6", None)])
