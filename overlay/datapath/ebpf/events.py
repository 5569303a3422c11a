"""The drop events of the ring buffer ``ovl_events``: following them, and each one as a
record (JSON types) and as a line of text.

:func:`follow` consumes the pinned ring buffer until a count, a deadline or Ctrl-C;
events already in the buffer when it starts are skipped unless ``backlog``. A ring
buffer has one consumer position: run one follower per host. ``overlay drops
--follow`` (:mod:`overlay.cli.node`) prints what it hands over; docs/policies.md shows it.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable

from overlay import abi
from overlay.abi import proto_name

FRAGMENT_NOTES = {
    "frag_short": "a first fragment without its full L4 header, or a later one overlapping it",
    "frag_orphan": "a later fragment whose first fragment was not seen or not allowed",
    "martian": "a loopback or own source address arriving from the wire",
}
POLL_MS = 500


class Namer:
    """Policy ids by index, from ``ovl_names`` (a ``MapSet``; looked up once per index)."""

    def __init__(self, maps):
        self.maps = maps
        self.cache: dict[int, str | None] = {}

    def policy(self, index: int) -> str | None:
        if not index:
            return None
        if index not in self.cache:
            self.cache[index] = self.maps.lookup("names", ("policy", index))
        return self.cache[index]


def event_record(ev, namer, mono_to_wall: Callable[[int], float]) -> dict:
    """An ``OvlDropEvent`` as a record of JSON types (``namer.policy(index)`` names its policy)."""
    reason = abi.DROP_REASONS.get(ev.reason, str(ev.reason))
    wall = mono_to_wall(ev.ts_ns)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall * 1000) % 1000:03d}Z"
    return {
        "time": stamp,
        "ts_ns": ev.ts_ns,
        "direction": "egress" if ev.direction else "ingress",
        "reason": reason,
        "audit": bool(ev.audit),
        "proto": proto_name(ev.proto),
        "family": ev.family or None,
        "src": abi.words_to_ip(ev.saddr, ev.family) if ev.family else None,
        "sport": abi.be16_to_port(ev.sport),
        "dst": abi.words_to_ip(ev.daddr, ev.family) if ev.family else None,
        "dport": abi.be16_to_port(ev.dport),
        "policy": namer.policy(ev.policy),
        "policy_index": ev.policy or None,
    }


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_event(r: dict) -> str:
    """One line of text for a record of :func:`event_record`."""
    if r["src"] is None:
        flow = "(not parsed)"
    elif r["proto"] in ("tcp", "udp") and r["reason"] not in ("frag_orphan",):
        flow = f"{r['proto']} {_hostport(r['src'], r['sport'])} -> {_hostport(r['dst'], r['dport'])}"
    elif r["proto"] in ("icmp", "icmpv6"):
        flow = f"{r['proto']} {r['src']} -> {r['dst']} (id {r['sport']})"
    else:
        flow = f"{'proto ' + r['proto'] if r['proto'] not in ('tcp', 'udp') else r['proto']} {r['src']} -> {r['dst']}"
    text = f"{r['time']} {r['direction']} {'AUDIT (passed)' if r['audit'] else 'drop'} {r['reason']} {flow}"
    if r["reason"] == "policy":
        text += f"  default-deny: node selected by policy {r['policy'] or '#' + str(r['policy_index'])}"
    elif r["reason"] in FRAGMENT_NOTES:
        text += f"  ({FRAGMENT_NOTES[r['reason']]})"
    return text


def mono_to_wall() -> Callable[[int], float]:
    """CLOCK_MONOTONIC nanoseconds (the events' ``ts_ns``) -> wall-clock seconds."""
    offset = time.time() - time.clock_gettime_ns(time.CLOCK_MONOTONIC) / 1e9
    return lambda ts_ns: offset + ts_ns / 1e9


class _Done(Exception):
    pass


def follow(pin_dir: str, maps, on_record: Callable[[dict], None], *, backlog: bool = False,
           count: int | None = None, timeout: float | None = None,
           on_start: Callable[[], None] | None = None) -> int:
    """Hand every new drop event of ``<pin_dir>/ovl_events`` to ``on_record`` (a record of
    :func:`event_record`; ``maps`` names the policies) until ``count`` events, ``timeout``
    seconds or Ctrl-C; ``on_start()`` once the buffer is open. Returns the events handed."""
    from overlay.datapath.ebpf import bpfsys

    namer = Namer(maps)
    to_wall = mono_to_wall()
    start_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    size = ctypes.sizeof(abi.OvlDropEvent)
    seen = 0

    def on_event(data: bytes) -> None:
        nonlocal seen
        if len(data) < size:
            return
        ev = abi.OvlDropEvent.from_buffer_copy(data[:size])
        if not backlog and ev.ts_ns < start_ns:
            return  # was in the buffer before we started
        on_record(event_record(ev, namer, to_wall))
        seen += 1
        if count and seen >= count:
            raise _Done

    fd = bpfsys.obj_get(os.path.join(pin_dir, "ovl_events"))
    deadline = time.monotonic() + timeout if timeout else None
    try:
        with bpfsys.RingBuffer(fd, on_event) as rb:
            if on_start is not None:
                on_start()
            while True:
                wait = POLL_MS
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    wait = max(1, min(wait, int(left * 1000)))
                try:
                    rb.poll(wait)
                except _Done:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        bpfsys.close(fd)
    return seen
