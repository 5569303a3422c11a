"""bpfsys and maps against maps that bcc creates here (no programs attached).

The maps are declared with the ABI header's structures, with the same
types and names build.py uses, so MapSet is exercised on real kernel maps
without the datapath's programs.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct

import pytest

from overlay import abi
from overlay.errors import CapacityError, DatapathError
from overlay.ops import NatEntry, Op, PeerEntry
from tests.support.netns import require_root

pytestmark = [pytest.mark.root]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MAPS_C = r"""
#include "overlay_abi.h"
BPF_ARRAY(ovl_nat, struct ovl_nat_val, 64);
BPF_F_TABLE("hash", u32, struct ovl_nat_val, ovl_nat_ext, 8, BPF_F_NO_PREALLOC);
BPF_HASH(ovl_peers, u32, struct ovl_peer_val, 8);
BPF_ARRAY(ovl_ports, u64, 2048);
BPF_LPM_TRIE(ovl_failsafe, struct ovl_lpm_key, u32, 8);
BPF_TABLE("lru_hash", struct ovl_ct_key, struct ovl_ct_val, ovl_ct, 64);
BPF_ARRAY(ovl_cfg, u64, 32);
BPF_PERCPU_ARRAY(ovl_counters, u64, 32);
BPF_F_TABLE("lpm_trie", struct ovl_lpm_key, u32, ovl_cidr_ident, 4, BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct ovl_policy_key, u32, ovl_policy, 8, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct ovl_name_key, struct ovl_name, ovl_names, 4, BPF_F_NO_PREALLOC);
BPF_HASH(ovl_peers6, struct ovl_addr6, struct ovl_peer_val, 8);
BPF_F_TABLE("lpm_trie", struct ovl_lpm6_key, u32, ovl_failsafe6, 8, BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct ovl_lpm6_key, u32, ovl_cidr_ident6, 4, BPF_F_NO_PREALLOC);
BPF_HASH(ovl_self, struct ovl_addr6, u32, 8);
BPF_TABLE("lru_hash", struct ovl_ct6_key, struct ovl_ct_val, ovl_ct6, 64);
BPF_TABLE("lru_hash", struct ovl_ct6_key, struct ovl_ct_in_val, ovl_ct_in, 64);
BPF_TABLE("lru_hash", struct ovl_frag_key, struct ovl_frag_val, ovl_frag, 64);
BPF_TABLE("lru_hash", struct ovl_sock_key, u32, ovl_sock, 64);
int dummy(struct __sk_buff *skb) {
    u32 k = 0;
    u64 *v = ovl_cfg.lookup(&k);
    struct ovl_nat_val *n = ovl_nat.lookup(&k);
    struct ovl_nat_val *r = ovl_nat_ext.lookup(&k);
    struct ovl_peer_val *p = ovl_peers.lookup(&k);
    u64 *w = ovl_ports.lookup(&k);
    struct ovl_lpm_key lk = {32, 0};
    u32 *f = ovl_failsafe.lookup(&lk);
    struct ovl_ct_key ck = {};
    struct ovl_ct_val *c = ovl_ct.lookup(&ck);
    u64 *cn = ovl_counters.lookup(&k);
    return (v ? 1 : 0) + (n ? 1 : 0) + (r ? 1 : 0) + (p ? 1 : 0) + (w ? 1 : 0)
        + (f ? 1 : 0) + (c ? 1 : 0) + (cn ? 1 : 0);
}
"""


@pytest.fixture
def bpf():
    require_root()
    bcc = pytest.importorskip("bcc", reason="bcc (python3-bpfcc) is not installed")
    b = bcc.BPF(text=MAPS_C, cflags=[f"-I{REPO}/bpf/include"])
    b.load_func("dummy", bcc.BPF.SCHED_CLS)
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture
def pin_dir():
    require_root()
    path = f"/sys/fs/bpf/ovl-test-bpfsys-{os.getpid()}"
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_pin_get_info_and_elements(bpf, pin_dir):
    from overlay.datapath.ebpf import bpfsys

    nat = bpf["ovl_nat_ext"]
    path = os.path.join(pin_dir, "ovl_nat_ext")
    bpfsys.obj_pin(nat.map_fd, path)
    with pytest.raises(DatapathError, match="EEXIST"):
        bpfsys.obj_pin(nat.map_fd, path)
    fd = bpfsys.obj_get(path)
    try:
        info = bpfsys.map_info(fd)
        assert (info.type, info.key_size, info.value_size, info.max_entries) == (
            bpfsys.MAP_TYPE_HASH, 4, 8, 8)
        assert info.name == "ovl_nat_ext"
        assert info.id == bpfsys.map_info(nat.map_fd).id
        key = struct.pack("=I", abi.ip_to_be32("192.168.0.5"))
        val = bytes(abi.OvlNatVal(abi.ip_to_be32("10.0.0.5"), 0))
        assert bpfsys.lookup(fd, key, 4, 8) is None
        bpfsys.update(fd, key, val, 4, 8)
        # visible through bcc's own handle on the same map
        assert nat[nat.Key(abi.ip_to_be32("192.168.0.5"))].real == abi.ip_to_be32("10.0.0.5")
        assert bpfsys.lookup(fd, key, 4, 8) == val
        assert bpfsys.get_next_key(fd, None, 4) == key
        assert bpfsys.get_next_key(fd, key, 4) is None
        assert bpfsys.delete(fd, key, 4) is True
        assert bpfsys.delete(fd, key, 4) is False
        with pytest.raises(DatapathError, match="expected 4 bytes"):
            bpfsys.lookup(fd, b"\0" * 3, 4, 8)
        # full map: E2BIG with errno text
        for i in range(8):
            bpfsys.update(fd, struct.pack("=I", i + 1), val, 4, 8)
        with pytest.raises(DatapathError, match="E2BIG"):
            bpfsys.update(fd, struct.pack("=I", 100), val, 4, 8)
    finally:
        bpfsys.close(fd)
    with pytest.raises(DatapathError, match="ENOENT"):
        bpfsys.obj_get(os.path.join(pin_dir, "absent"))


def test_batches_and_fallbacks(bpf):
    from overlay.datapath.ebpf import batch, bpfsys

    fd = bpf["ovl_nat_ext"].map_fd
    items = [(struct.pack("=I", i), struct.pack("=II", i * 10, 1)) for i in range(1, 7)]
    batch.update_pairs(fd, items, 4, 8)
    info = bpfsys.map_info(fd)
    assert sorted(bpfsys.items(fd, info)) == sorted(items)
    # delete batch with an absent key in the middle: the rest still goes
    batch.delete_keys(fd, [items[0][0], struct.pack("=I", 99), items[1][0]], 4)
    assert sorted(bpfsys.items(fd, info)) == sorted(items[2:])

    # LPM tries: batched on kernels that have it (6.18), else the per-element fallback
    lfd = bpf["ovl_failsafe"].map_fd
    linfo = bpfsys.map_info(lfd)
    assert linfo.type == bpfsys.MAP_TYPE_LPM_TRIE
    lpm = [(bytes(abi.lpm_key(c)), struct.pack("=I", 1)) for c in ("10.0.0.0/8", "198.18.0.0/15")]
    batch.update_pairs(lfd, lpm, 8, 4)
    assert sorted(bpfsys.items(lfd, linfo)) == sorted(lpm)
    batch.delete_keys(lfd, [lpm[0][0], bytes(abi.lpm_key("1.2.3.0/24"))], 8)
    assert bpfsys.items(lfd, linfo) == [lpm[1]]

    # per-CPU arrays: one 8-byte slot per possible CPU
    cinfo = bpfsys.map_info(bpf["ovl_counters"].map_fd)
    assert cinfo.percpu and cinfo.value_buffer_size == 8 * bpfsys.num_possible_cpus()
    assert len(bpfsys.items(bpf["ovl_counters"].map_fd, cinfo)) == 32


def test_mapset_roundtrip_and_capacity(bpf):
    from overlay.datapath.ebpf import bpfsys
    from overlay.datapath.ebpf.maps import to_jsonable
    from tests.support.bpfmaps import mapset_of

    ms = mapset_of(bpf)
    try:
        state = ms.read_all()
        assert state == {
            "nat": {}, "peers": {}, "ports": {}, "failsafe": {},
            "config": {"reject_all": 0, "mode": 0}, "policy": {}, "cidr_ident": {}, "names": {},
            "self": {},
        }
        ms.set_nat_base(0xC0A80000)  # 192.168.0.0: slots 192.168.0.0-63, ovl_nat_ext the rest
        ops = [
            Op("nat", "192.168.0.2", NatEntry("10.0.0.2")),
            Op("nat", "192.168.63.1", NatEntry("10.0.0.250", override=True)),
            Op("peers", "10.0.0.2", PeerEntry(7, 1)),
            Op("ports", (0, 1), 1 << 16),       # tcp 80
            Op("ports", (1, 0), 1 << 53),       # udp 53
            Op("failsafe", "198.18.0.0/15", abi.FS_SSH),
            Op("failsafe", "2001:db8::/32", abi.FS_ALL),
            Op("peers", "2001:db8::2", PeerEntry(7, 1)),
            Op("self", "10.0.0.1", 1),
            Op("self", "2001:db8::1", 1),
            Op("config", "reject_all", 1),
            Op("config", "ct_udp_s", 60),
            Op("nat", "192.168.0.9", NatEntry("10.0.0.9")),
            Op("nat", "192.168.0.9", None),     # last op wins
        ]
        ms.apply(ops)
        state = ms.read_all()
        assert state["nat"] == {
            "192.168.0.2": NatEntry("10.0.0.2"),
            "192.168.63.1": NatEntry("10.0.0.250", True),
        }
        assert state["peers"] == {"10.0.0.2": PeerEntry(7, 1), "2001:db8::2": PeerEntry(7, 1)}
        assert state["ports"] == {(0, 1): 1 << 16, (1, 0): 1 << 53}
        assert state["failsafe"] == {"198.18.0.0/15": abi.FS_SSH, "2001:db8::/32": abi.FS_ALL}
        assert state["config"] == {"reject_all": 1, "mode": 0, "ct_udp_s": 60}
        assert state["self"] == {"10.0.0.1": 1, "2001:db8::1": 1}
        # the IPv6 entries live in their own maps
        assert len(bpfsys.items(bpf["ovl_peers6"].map_fd, bpfsys.map_info(bpf["ovl_peers6"].map_fd))) == 1
        assert ms.get_cfg(abi.CfgIndex.NAT_GEN) == 1  # the apply wrote nat entries
        assert to_jsonable(state)["ports"] == {"tcp": [80], "udp": [53]}

        # the kernel side agrees on the layout
        ext = bpf["ovl_nat_ext"]
        v = ext[ext.Key(abi.ip_to_be32("192.168.63.1"))]
        assert (v.real, v.flags) == (abi.ip_to_be32("10.0.0.250"), abi.NAT_F_OVERRIDE)
        v = bpf["ovl_nat"][ctypes.c_int(2)]       # 192.168.0.2: slot 2
        assert (v.real, v.flags) == (abi.ip_to_be32("10.0.0.2"), 0)
        assert bpf["ovl_nat"][ctypes.c_int(9)].real == 0   # 192.168.0.9: put then deleted

        # capacity: ovl_nat_ext holds 8; 1 present + 8 new = 9 -> nothing applied (the
        # array's slots never overflow)
        too_many = [Op("nat", f"192.168.1.{i}", NatEntry(f"10.0.1.{i}")) for i in range(8)]
        with pytest.raises(CapacityError, match=r"nat: 9 entries would exceed ovl_nat_ext max_entries 8 "
                                                r"\(datapath.sizes.nat\)"):
            ms.apply(too_many + [Op("peers", "10.0.0.3", PeerEntry())])
        assert ms.read_all() == state
        # ... but fits when the same batch deletes one
        ms.apply(too_many + [Op("nat", "192.168.63.1", None)])
        assert len(ms.read_all()["nat"]) == 9
        with pytest.raises(CapacityError):
            ms.apply([Op("ports", (0, 1024), 1)])
        with pytest.raises(DatapathError):
            ms.apply([Op("nat", "not-an-ip", NatEntry("10.0.0.1"))])

        # deletes of array entries write zero and disappear from read_all
        ms.apply([Op("ports", (0, 1), None), Op("config", "reject_all", None),
                  Op("config", "ct_udp_s", None)])
        state = ms.read_all()
        assert state["ports"] == {(1, 0): 1 << 53}
        assert state["config"] == {"reject_all": 0, "mode": 0}

        counters = ms.counters()
        assert counters["drop_not_allowed"] == 0 and counters["pass_member"] == 0
        assert counters["nat_egress"] == 0 and "drop_no_peer" in counters
        fill = ms.fill()
        assert fill["ovl_nat"] == {"entries": 1, "max_entries": 64}
        assert fill["ovl_nat_ext"] == {"entries": 8, "max_entries": 8}
        assert fill["ovl_ports"]["entries"] == 1
        for name in ("ovl_ct", "ovl_ct6", "ovl_ct_in", "ovl_frag"):  # conntrack fill for /status
            assert fill[name] == {"entries": 0, "max_entries": 64}, name
        assert ms.ct_entries() == []

        # the overlay subnet moves (same slot count): every entry keeps its overlay address
        before = ms.read_table("nat")
        ms.set_nat_base(0xC0A80100)  # 192.168.1.0: the 192.168.1.x entries now take slots
        assert ms.get_cfg(abi.CfgIndex.NAT_BASE) == 0xC0A80100
        assert ms.read_table("nat") == before
        assert bpf["ovl_nat"][ctypes.c_int(3)].real == abi.ip_to_be32("10.0.1.3")
        assert ms.fill()["ovl_nat"]["entries"] == 8 and ms.fill()["ovl_nat_ext"]["entries"] == 1
        # an ovl_nat_ext entry that has a slot now (left by a smaller subnet): moved there
        ext[ext.Key(abi.ip_to_be32("192.168.1.40"))] = abi.OvlNatVal(abi.ip_to_be32("10.0.1.40"), 0)
        assert ms.lookup("nat", "192.168.1.40") is None   # where the programs look: empty
        ms.set_nat_base(0xC0A80100)
        assert ms.lookup("nat", "192.168.1.40") == NatEntry("10.0.1.40")
        assert bpf["ovl_nat"][ctypes.c_int(40)].real == abi.ip_to_be32("10.0.1.40")
        assert ms.fill()["ovl_nat_ext"]["entries"] == 1
    finally:
        ms.close()


def test_mapset_policy_tables_roundtrip_and_capacity(bpf):
    """The policy maps: encoding both ways, the kernel's LPM matching on what
    MapSet wrote, and capacity refused whole (issue 6)."""
    from overlay.datapath.ebpf import bpfsys
    from tests.support.bpfmaps import mapset_of

    ms = mapset_of(bpf)
    try:
        ops = [
            Op("policy", (7, 6, 5432, 16), 3),
            Op("policy", (7, 17, 8000, 10), 4),          # 8000-8063
            Op("policy", (0x80000001, 6, 0, 0), 5),      # every port
            Op("cidr_ident", "198.51.100.0/24", 0x80000001),
            Op("names", ("policy", 3), "web-db"),
            Op("names", ("identity", 7), "web"),
            Op("config", "policy_enforced", 1),
            Op("config", "policy_default", 3),
        ]
        ms.apply(ops)
        state = ms.read_all()
        assert state["policy"] == {(7, 6, 5432, 16): 3, (7, 17, 8000, 10): 4, (0x80000001, 6, 0, 0): 5}
        assert state["cidr_ident"] == {"198.51.100.0/24": 0x80000001}
        assert state["names"] == {("policy", 3): "web-db", ("identity", 7): "web"}
        assert state["config"] == {"reject_all": 0, "mode": 0, "policy_enforced": 1, "policy_default": 3}

        # the kernel's longest-prefix match on the keys as written
        info = ms.info("ovl_policy")

        def lookup(identity, proto, port):
            raw = bpfsys.lookup(ms.fd("ovl_policy"), bytes(abi.policy_key(identity, proto, port, 16)),
                                info.key_size, info.value_size)
            return None if raw is None else struct.unpack("=I", raw[:4])[0]

        assert lookup(7, 6, 5432) == 3 and lookup(7, 6, 5433) is None and lookup(8, 6, 5432) is None
        assert [lookup(7, 17, p) for p in (7999, 8000, 8063, 8064)] == [None, 4, 4, None]
        assert lookup(0x80000001, 6, 1) == 5 and lookup(0x80000001, 6, 65535) == 5
        assert lookup(0x80000001, 17, 1) is None

        # capacity: ovl_policy holds 8; 3 + 6 = 9 -> refused whole, naming the map and the size key
        more = [Op("policy", (9, 6, p, 16), 1) for p in range(1, 7)]
        with pytest.raises(CapacityError, match=r"policy: 9 entries would exceed ovl_policy max_entries 8 "
                                                r"\(datapath.sizes.policy\)"):
            ms.apply(more + [Op("names", ("policy", 1), "x")])
        assert ms.read_all() == state
        # several maps over at once: all named, nothing written
        with pytest.raises(CapacityError) as exc:
            ms.apply(more + [Op("cidr_ident", f"10.{i}.0.0/16", 0x80000002 + i) for i in range(4)])
        assert "ovl_policy" in str(exc.value) and "ovl_cidr_ident" in str(exc.value)
        assert "nothing applied" in str(exc.value)
        assert ms.read_all() == state
        # fits when the same batch deletes enough
        ms.apply(more[:5] + [Op("policy", (7, 17, 8000, 10), None)])
        assert len(ms.read_all()["policy"]) == 7
        fill = ms.fill()
        assert fill["ovl_policy"] == {"entries": 7, "max_entries": 8}
        assert fill["ovl_cidr_ident"] == {"entries": 1, "max_entries": 4}
        assert fill["ovl_names"] == {"entries": 2, "max_entries": 4}

        # bad values are refused before anything is written
        for bad in (Op("policy", (7, 6, 5433, 10), 1), Op("policy", (7, 6, 0, 17), 1),
                    Op("names", ("colour", 1), "x"), Op("names", ("policy", 1), "x" * 300),
                    Op("cidr_ident", "10.0.0.1/8", 1)):
            with pytest.raises(DatapathError):
                ms.apply([bad])
        # policy config keys are reported only when non-zero
        ms.apply([Op("config", "policy_enforced", None), Op("config", "policy_default", None)])
        assert ms.read_all()["config"] == {"reject_all": 0, "mode": 0}
    finally:
        ms.close()
