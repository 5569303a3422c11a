"""Suite ``prog_cost``: what one packet costs each tc program, in the kernel.

BPF_PROG_TEST_RUN runs a program on a frame ``repeat`` times and reports the mean
time per run, so the number hardly moves with the machine's load (the best of
several batches is kept), unlike the traffic suites. The programs of this revision
(backend ``ebpf-tc``) and, with ``--before-rev``, those of another one
(``ebpf-tc-before``, bench/before.py) are compiled in one process and measured
interleaved on the same frames, with the same state seeded: a member peer with a
NAT entry, ``reject_all``, a translated flow's conntrack entry, this host's own
addresses, and the failsafe ranges every node has (an SSH management range and the
registry's address, neither holding the peer). The fixed cost of a test run (building the skb) is included alike;
case ``noop_ns`` (an empty program, this revision only) measures it, so ``<case> - noop`` is
the program's own work.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

HOST, PEER, OVL, PUBLIC = "10.0.0.11", "10.0.0.12", "192.168.0.17", "198.18.0.11"
SUBNET = "192.168.0.0/18"  # OVL's overlay subnet
FAILSAFE = (("198.18.0.0/15", 1), ("10.0.0.2/32", 2))   # (cidr, OVL_FS_SSH=1 / OVL_FS_ALL=2)

# case -> (program, frame builder): the common packets of a member and of a reply
CASES = {
    "ingress_reply_ns": "a reply of a translated flow this host opened (client side)",
    "ingress_member_ns": "a data packet of a flow a member opened (server side)",
    "ingress_member_syn_ns": "a member's SYN (server side: a new inbound flow, marked)",
    "egress_data_ns": "a TCP data packet leaving the uplink",
    "egress_synack_ns": "the SYN-ACK of an inbound connection leaving the uplink",
    "overlay_egress_data_ns": "a TCP data packet to an overlay address (ovl0: translated)",
    "noop_ns": "an empty tc program on the member's data packet: the fixed cost of a test run, "
               "included in every other case",
}
NOOP = "int ovl_noop(struct __sk_buff *skb) { return 0; }"


def _frames() -> dict[str, tuple[str, bytes]]:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    def frame(l3) -> bytes:
        return bytes(Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b") / l3)

    body = b"x" * 64
    return {
        "ingress_reply_ns": ("ingress", frame(IP(src=PEER, dst=HOST) / TCP(sport=80, dport=40000, flags="A") / body)),
        "ingress_member_ns": ("ingress", frame(IP(src=PEER, dst=HOST) / TCP(sport=40001, dport=5432, flags="A") / body)),
        "ingress_member_syn_ns": ("ingress", frame(IP(src=PEER, dst=HOST) / TCP(sport=40002, dport=5432, flags="S"))),
        "egress_data_ns": ("egress", frame(IP(src=HOST, dst=PEER) / TCP(sport=5432, dport=40001, flags="A") / body)),
        "egress_synack_ns": ("egress", frame(IP(src=HOST, dst=PEER) / TCP(sport=5432, dport=40002, flags="SA"))),
        "overlay_egress_data_ns": ("overlay_egress", frame(IP(src=HOST, dst=OVL) / TCP(sport=40000, dport=80, flags="A") / body)),
    }


def _compile(root: Path):
    import bcc

    from overlay.datapath.ebpf import build

    flags = [f"-I{root / 'include'}", f"-I{root / 'lib'}"]
    flags += [f"-D{k}={v}" for k, v in sorted(build.DEFAULT_SIZES.items())]
    b = bcc.BPF(text=build.assemble_source(root).encode(), cflags=flags)
    progs = {k: b.load_func(n.encode(), bcc.BPF.SCHED_CLS) for k, n in build.PROGRAMS.items()}
    return b, progs


def _seed(b) -> None:
    """The same state in either ABI, through the types bcc derived for each map."""
    from overlay import abi

    be = abi.ip_to_be32
    nat = b[b"ovl_nat"]
    try:
        b[b"ovl_nat_ext"]
    except KeyError:  # before ABI 4: a hash keyed by the overlay address
        nat[nat.Key(be(OVL))] = nat.Leaf(be(PEER), 0)
    else:             # ABI 4: the slot of OVL's offset from the base (192.168.0.0: 17)
        from overlay.datapath.ebpf.codec import NatLayout

        layout = NatLayout.of_subnet(SUBNET)
        b[b"ovl_cfg"][ctypes.c_int(abi.CfgIndex.NAT_BASE)] = ctypes.c_uint64(layout.base)
        nat[nat.Key(layout.slot(OVL))] = nat.Leaf(be(PEER), 0)
    peers = b[b"ovl_peers"]
    peers[peers.Key(be(PEER))] = peers.Leaf(1, 1)
    b[b"ovl_cfg"][ctypes.c_int(0)] = ctypes.c_uint64(1)  # REJECT_ALL, slot 0 in every ABI
    failsafe = b[b"ovl_failsafe"]
    for cidr, flags in FAILSAFE:
        k = abi.lpm_key(cidr)
        failsafe[failsafe.Key(k.prefixlen, k.addr)] = ctypes.c_uint32(flags)
    ct = b[b"ovl_ct"]
    key = ct.Key(be(PEER), be(HOST), abi.port_to_be16(80), abi.port_to_be16(40000), 6)
    fields = {f[0] for f in ct.Leaf._fields_}
    seen = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 3600 * 10**9  # stays live
    value = {"overlay": be(OVL), "flags": abi.CT_F_EGRESS | abi.CT_F_NAT, "last_seen_ns": seen}
    if "state" in fields:
        value["state"] = abi.CtState.ESTABLISHED
    ct[key] = ct.Leaf(**{k: v for k, v in value.items() if k in fields})
    try:
        own = b[b"ovl_self"]
    except KeyError:
        return  # no martian map in that revision
    hint = 0
    for addr in (HOST, OVL, PUBLIC):
        k = abi.addr6(addr)
        own[k] = ctypes.c_uint32(abi.SELF_F_OWN)
        hint |= 1 << abi.self_hint_bit(list(k.addr))
    b[b"ovl_cfg"][ctypes.c_int(abi.CfgIndex.SELF_HINT)] = ctypes.c_uint64(hint)


def measure(before_root: str | None, batches: int = 15, repeat: int = 100_000) -> dict[str, dict[str, float]]:
    """{backend: {case: best ns per run over ``batches`` interleaved batches}}."""
    from overlay.datapath.ebpf import build, testrun

    trees = {"ebpf-tc": build.bpf_dir()}
    if before_root:
        trees["ebpf-tc-before"] = Path(before_root) / "bpf"
    loaded = {}
    try:
        for backend, root in trees.items():
            b, progs = _compile(root)
            loaded[backend] = (b, progs)
            _seed(b)
        import bcc

        noop = bcc.BPF(text=NOOP.encode())
        loaded["noop"] = (noop, {"noop": noop.load_func(b"ovl_noop", bcc.BPF.SCHED_CLS)})
        frames = _frames()
        frames["noop_ns"] = ("noop", frames["ingress_member_ns"][1])
        best: dict[str, dict[str, float]] = {backend: {} for backend in trees}
        for _ in range(batches):
            for backend in trees:
                progs = {**loaded[backend][1], **loaded["noop"][1]}
                for case, (prog, pkt) in frames.items():
                    if prog == "noop" and backend != "ebpf-tc":
                        continue
                    ns = testrun.run_ex(progs[prog].fd, pkt, repeat=repeat).duration_ns
                    best[backend][case] = min(best[backend].get(case, float("inf")), ns)
        return best
    finally:
        for b, _progs in loaded.values():
            b.cleanup()
