"""Fixtures for the BPF_PROG_TEST_RUN tests: compile once per session, clear
the maps before every test.

Every test here needs root and bcc; without them the whole directory is
skipped with the reason.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

import pytest

from overlay import abi
from tests.support.wait import now_ns

HERE = Path(__file__).resolve().parent


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (BPF maps, programs and BPF_PROG_TEST_RUN)"
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return f"bcc (python3-bpfcc) is not importable: {e}"
    try:
        ctypes.CDLL("libbpf.so.1")
    except OSError as e:
        return f"libbpf.so.1 is not available: {e}"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    for item in items:
        if HERE not in Path(str(item.fspath)).resolve().parents:
            continue
        item.add_marker(pytest.mark.root)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


PROTO = {"tcp": abi.PortSlot.TCP, "udp": abi.PortSlot.UDP}
# The overlay subnet of the tables (tests/bpf/tables.py): OVL_CFG_NAT_BASE after reset, so
# that its addresses take ovl_nat's slots (65,536 by default) and others ovl_nat_ext.
NAT_SUBNET = "192.168.0.0/16"


class Datapath:
    """The compiled datapath with seeding and inspection helpers for tests."""

    def __init__(self, bpf, progs):
        self.bpf = bpf
        self.progs = progs
        self.events: list[abi.OvlDropEvent] = []
        self._cb = None

    # -- running
    def run(self, prog: str, packet, ctx=None) -> tuple[int, bytes]:
        from overlay.datapath.ebpf import testrun

        return testrun.run(self.progs[prog].fd, bytes(packet), ctx=ctx)

    # -- seeding
    def table(self, name: str):
        return self.bpf[name.encode()]

    def set_cfg(self, index: int, value: int) -> None:
        self.bpf[b"ovl_cfg"][ctypes.c_int(int(index))] = ctypes.c_uint64(value)

    def set_nat(self, overlay: str, real: str, flags: int = 0) -> None:
        """The NAT entry where the programs look: the ovl_nat slot of ``overlay``'s
        offset from OVL_CFG_NAT_BASE (NAT_SUBNET after reset) when below the slot
        count, else ovl_nat_ext (the offset computed here by hand)."""
        base = self.bpf[b"ovl_cfg"][ctypes.c_int(abi.CfgIndex.NAT_BASE)].value
        offset = (int.from_bytes(bytes(int(o) for o in overlay.split(".")), "big") - base) % (1 << 32)
        val = abi.OvlNatVal(abi.ip_to_be32(real), flags)
        if offset < self.nat_slots:
            self.bpf[b"ovl_nat"][ctypes.c_uint32(offset)] = val
        else:
            self.bpf[b"ovl_nat_ext"][ctypes.c_uint32(abi.ip_to_be32(overlay))] = val

    @property
    def nat_slots(self) -> int:
        from overlay.datapath.ebpf import bpfsys

        return bpfsys.map_info(self.bpf[b"ovl_nat"].map_fd).max_entries

    def set_peer(self, real: str, flags: int = abi.PEER_F_MEMBER, identity: int = 0) -> None:
        self.bpf[b"ovl_peers"][ctypes.c_uint32(abi.ip_to_be32(real))] = abi.OvlPeerVal(
            identity, flags
        )

    def open_port(self, proto: str, port: int) -> None:
        idx = PROTO[proto] * abi.PORT_WORDS + port // 64
        table = self.bpf[b"ovl_ports"]
        word = table[ctypes.c_int(idx)].value | (1 << (port % 64))
        table[ctypes.c_int(idx)] = ctypes.c_uint64(word)

    def set_failsafe(self, cidr: str, flags: int) -> None:
        self.bpf[b"ovl_failsafe"][abi.lpm_key(cidr)] = ctypes.c_uint32(flags)

    def set_ct(self, key, overlay: str | None = None, flags: int = abi.CT_F_EGRESS,
               last_seen: int | None = None, state: int | None = None, gen: int = 0,
               age_s: float = 0.0) -> None:
        """Seed an ovl_ct (OvlCtKey) or ovl_ct6 (OvlCt6Key) entry. ``state``
        defaults to ESTABLISHED for TCP, NEW otherwise; ``last_seen`` to now
        minus ``age_s`` (bpf_ktime_get_ns is CLOCK_MONOTONIC)."""
        if state is None:
            state = abi.CtState.ESTABLISHED if key.proto == 6 else abi.CtState.NEW
        if last_seen is None:
            # modulo 2^64: the programs take the age as a signed 64-bit difference, so an
            # age older than the clock itself (5 days on a young machine) is exact too
            last_seen = (now_ns() - int(age_s * 1e9)) % (1 << 64)
        val = abi.OvlCtVal(abi.ip_to_be32(overlay) if overlay else 0, gen, last_seen, int(state), flags)
        table = b"ovl_ct6" if isinstance(key, abi.OvlCt6Key) else b"ovl_ct"
        self.bpf[table][key] = val

    def set_marker(self, key: abi.OvlCt6Key, age_s: float = 0.0) -> None:
        self.bpf[b"ovl_ct_in"][key] = abi.OvlCtInVal((now_ns() - int(age_s * 1e9)) % (1 << 64))

    def set_self(self, addr: str) -> None:
        """An own address, with its bit in OVL_CFG_SELF_HINT (as MapSet.apply keeps it)."""
        key = abi.addr6(addr)
        self.bpf[b"ovl_self"][key] = ctypes.c_uint32(abi.SELF_F_OWN)
        cfg = self.bpf[b"ovl_cfg"]
        hint = cfg[ctypes.c_int(abi.CfgIndex.SELF_HINT)].value
        self.set_cfg(abi.CfgIndex.SELF_HINT, hint | 1 << abi.self_hint_bit(list(key.addr)))

    def set_peer6(self, real: str, flags: int = abi.PEER_F_MEMBER, identity: int = 0) -> None:
        self.bpf[b"ovl_peers6"][abi.addr6(real)] = abi.OvlPeerVal(identity, flags)

    def set_failsafe6(self, cidr: str, flags: int) -> None:
        self.bpf[b"ovl_failsafe6"][abi.lpm6_key(cidr)] = ctypes.c_uint32(flags)

    def seed(self, seed: dict) -> None:
        for index, value in seed.get("cfg", {}).items():
            self.set_cfg(index, value)
        for overlay, real in seed.get("nat", {}).items():
            self.set_nat(overlay, real)
        for real, flags in seed.get("peers", {}).items():
            self.set_peer(real, flags)
        for proto, port in seed.get("ports", ()):
            self.open_port(proto, port)
        for cidr, flags in seed.get("failsafe", {}).items():
            self.set_failsafe(cidr, flags)
        for entry in seed.get("ct", ()):
            key, overlay, flags, *rest = entry
            self.set_ct(key, overlay, flags, **(rest[0] if rest else {}))
        for key in seed.get("markers", ()):
            self.set_marker(key)
        for addr in seed.get("self", ()):
            self.set_self(addr)
        for real, flags in seed.get("peers6", {}).items():
            self.set_peer6(real, flags)
        for cidr, flags in seed.get("failsafe6", {}).items():
            self.set_failsafe6(cidr, flags)

    # -- inspection
    def counters(self) -> dict[abi.Reason, int]:
        table = self.bpf[b"ovl_counters"]
        out = {}
        for reason in range(abi.Reason.COUNTER_MAX):
            total = table.sum(ctypes.c_int(reason)).value
            if total:
                out[abi.Reason(reason) if reason in abi.Reason._value2member_map_ else reason] = total
        return out

    def ct_entries(self) -> dict[tuple, tuple]:
        """ovl_ct and ovl_ct6: {(saddr, daddr, sport, dport, proto): (overlay or None,
        flags, state, last_seen, nat_gen)}"""
        out = {}
        for table in (b"ovl_ct", b"ovl_ct6"):
            for k, v in self.bpf[table].items():
                if table == b"ovl_ct":
                    s, d = abi.be32_to_ip(k.saddr), abi.be32_to_ip(k.daddr)
                else:
                    s, d = abi.words_to_ip(k.saddr, k.family), abi.words_to_ip(k.daddr, k.family)
                key = (s, d, abi.be16_to_port(k.sport), abi.be16_to_port(k.dport), k.proto)
                out[key] = (abi.be32_to_ip(v.overlay) if v.overlay else None, v.flags,
                            abi.CtState(v.state), v.last_seen_ns, v.nat_gen)
        return out

    def markers(self) -> set[tuple]:
        """ovl_ct_in: {(family, saddr, daddr, sport, dport, proto)}"""
        return {
            (k.family, abi.words_to_ip(k.saddr, k.family), abi.words_to_ip(k.daddr, k.family),
             abi.be16_to_port(k.sport), abi.be16_to_port(k.dport), k.proto)
            for k, _ in self.bpf[b"ovl_ct_in"].items()
        }

    def frags(self) -> dict[tuple, tuple]:
        """ovl_frag: {(family, saddr, daddr, id, proto): (verdict, overlay or None)}"""
        return {
            (k.family, abi.words_to_ip(k.saddr, k.family), abi.words_to_ip(k.daddr, k.family),
             k.id, k.proto): (abi.Reason(v.verdict), abi.be32_to_ip(v.overlay) if v.overlay else None)
            for k, v in self.bpf[b"ovl_frag"].items()
        }

    def drain_events(self) -> list[abi.OvlDropEvent]:
        self.bpf.ring_buffer_consume()
        events, self.events = self.events, []
        return events

    # -- reset
    @staticmethod
    def _written_indexes(array) -> set[int]:
        """The indexes of an array's non-zero values (ovl_ports words, ovl_nat slots), also
        those written through MapSet (one batch read)."""
        from overlay.datapath.ebpf import bpfsys

        info = bpfsys.map_info(array.map_fd)
        return {struct.unpack("=I", k)[0] for k, v in bpfsys.items(array.map_fd, info) if any(v)}

    def reset(self) -> None:
        for name in ("ovl_nat_ext", "ovl_peers", "ovl_ct", "ovl_failsafe", "ovl_cidr_ident",
                     "ovl_policy", "ovl_names", "ovl_peers6", "ovl_failsafe6", "ovl_cidr_ident6",
                     "ovl_self", "ovl_ct6", "ovl_ct_in", "ovl_frag"):
            self.bpf[name.encode()].clear()
        ports = self.bpf[b"ovl_ports"]
        for idx in self._written_indexes(ports):
            ports[ctypes.c_int(idx)] = ctypes.c_uint64(0)
        nat = self.bpf[b"ovl_nat"]
        for idx in self._written_indexes(nat):  # the slots in use (non-zero values)
            nat[ctypes.c_uint32(idx)] = abi.OvlNatVal(0, 0)
        cfg = self.bpf[b"ovl_cfg"]
        for i in range(abi.CfgIndex.MAX):
            cfg[ctypes.c_int(i)] = ctypes.c_uint64(0)
        cfg[ctypes.c_int(abi.CfgIndex.NAT_BASE)] = ctypes.c_uint64(abi.nat_base(NAT_SUBNET))
        self.bpf[b"ovl_counters"].clear()
        self.drain_events()


@pytest.fixture(scope="session")
def compiled():
    from overlay.datapath.ebpf import build

    bpf = build.compile_programs()
    progs = build.load_programs(bpf)
    dp = Datapath(bpf, progs)

    def on_event(_ctx, data, size):
        raw = ctypes.string_at(data, size)
        dp.events.append(abi.OvlDropEvent.from_buffer_copy(raw[: ctypes.sizeof(abi.OvlDropEvent)]))
        return 0

    dp._cb = on_event
    bpf[b"ovl_events"].open_ring_buffer(on_event)
    yield dp
    bpf.cleanup()


@pytest.fixture
def dp(compiled) -> Datapath:
    compiled.reset()
    yield compiled
    compiled.reset()


@pytest.fixture
def maps(dp):
    """A MapSet on the compiled datapath's maps (written the way the daemon writes them)."""
    from tests.support.bpfmaps import mapset_of

    ms = mapset_of(dp.bpf)
    try:
        yield ms
    finally:
        ms.close()
