"""Fixtures for the BPF_PROG_TEST_RUN tests: compile once per session, clear
the maps before every test.

Every test here needs root and bcc; without them the whole directory is
skipped with the reason.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from overlay.datapath.ebpf import abi

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
        self.bpf[b"ovl_nat"][ctypes.c_uint32(abi.ip_to_be32(overlay))] = abi.OvlNatVal(
            abi.ip_to_be32(real), flags
        )
        self.bpf[b"ovl_rnat"][ctypes.c_uint32(abi.ip_to_be32(real))] = ctypes.c_uint32(
            abi.ip_to_be32(overlay)
        )

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

    def set_ct(self, key: abi.OvlCtKey, overlay: str | None = None, flags: int = abi.CT_F_EGRESS,
               last_seen: int = 1) -> None:
        val = abi.OvlCtVal(abi.ip_to_be32(overlay) if overlay else 0, flags, last_seen)
        self.bpf[b"ovl_ct"][key] = val

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
        for key, overlay, flags in seed.get("ct", ()):
            self.set_ct(key, overlay, flags)

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
        """{(saddr, daddr, sport, dport, proto): (overlay or None, flags, last_seen)}"""
        out = {}
        for k, v in self.bpf[b"ovl_ct"].items():
            key = (
                abi.be32_to_ip(k.saddr),
                abi.be32_to_ip(k.daddr),
                abi.be16_to_port(k.sport),
                abi.be16_to_port(k.dport),
                k.proto,
            )
            out[key] = (abi.be32_to_ip(v.overlay) if v.overlay else None, v.flags, v.last_seen_ns)
        return out

    def drain_events(self) -> list[abi.OvlDropEvent]:
        self.bpf.ring_buffer_consume()
        events, self.events = self.events, []
        return events

    # -- reset
    def reset(self) -> None:
        for name in ("ovl_nat", "ovl_rnat", "ovl_peers", "ovl_ct", "ovl_failsafe", "ovl_cidr_ident",
                     "ovl_policy", "ovl_names"):
            self.bpf[name.encode()].clear()
        # Every word, not only those open_port() set: tests that program the maps
        # through MapSet.apply (test_policy.py, with Hypothesis-chosen ports) open
        # ports too, and a bit left behind turns a later case's drop into a pass.
        ports = self.bpf[b"ovl_ports"]
        for idx in range(abi.PortSlot.SLOTS * abi.PORT_WORDS):
            if ports[ctypes.c_int(idx)].value:
                ports[ctypes.c_int(idx)] = ctypes.c_uint64(0)
        cfg = self.bpf[b"ovl_cfg"]
        for i in range(abi.CfgIndex.MAX):
            cfg[ctypes.c_int(i)] = ctypes.c_uint64(0)
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
