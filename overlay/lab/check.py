"""The lab's connectivity check: the expected matrix, the probes, the table.

From every host, a TCP connection to the test port of every member's
overlay address and of every other same-network host's private address.
Expected (with daemons running, ``reject_all: true``):

============================  ==========  =========================================
from -> to                    expected    why
============================  ==========  =========================================
member -> member overlay      open        members admit members
outsider -> member overlay    closed      no route to the overlay subnet
any -> outsider private       open        outsiders filter nothing
member -> member private      open        members admit members
outsider -> member private    closed      ``reject_all`` drops non-members
============================  ==========  =========================================

An old-format host (``neti: true``, ``overlay lab up --with-neti``) counts as a member
here, in both directions: the daemons see it through ``registry.neti``, it sees them in
the old party, and it runs ``reject_all`` too.

An open probe must also reach the right server, and the server must have
seen the client's private address (same network) or public address (across
networks), while the client's peer is the address it dialled (the overlay
address): DESIGN §5.
"""

from __future__ import annotations

import errno
import json
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from overlay.lab.topology import Host, Names, Topology

OVERLAY = "overlay"
PRIVATE = "private"


@dataclass(frozen=True)
class Probe:
    src: str
    dst: str
    kind: str                  # overlay | private
    address: str | None        # what the client dials (None: the overlay address is unknown)
    expect_open: bool
    expect_seen: str | None    # the client address the server should report
    why: str


@dataclass
class Result:
    probe: Probe
    state: str                 # open | timeout | refused | unreachable | error | skipped
    server: str | None = None
    seen: str | None = None
    peer: str | None = None
    ms: float = 0.0
    detail: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def open(self) -> bool:
        return self.state == "open"

    @property
    def ok(self) -> bool:
        return self.open == self.probe.expect_open and not self.problems and self.state != "skipped"

    def as_dict(self) -> dict:
        d = asdict(self.probe)
        d.update(state=self.state, open=self.open, ok=self.ok, server=self.server, seen=self.seen,
                 peer=self.peer, ms=round(self.ms, 1), detail=self.detail, problems=self.problems)
        return d


def expected_probes(topo: Topology, overlays: Mapping[str, str | None], daemons: bool = True) -> list[Probe]:
    """The expected matrix. ``daemons=False`` (a lab built with ``--no-daemons``):
    no overlay probes, and every private address is open."""
    probes: list[Probe] = []
    for src in topo.hosts:
        if daemons:
            for dst in topo.joined:
                if dst.name == src.name:
                    continue
                same = dst.network == src.network
                if src.joins:
                    probes.append(Probe(src.name, dst.name, OVERLAY, overlays.get(dst.name), True,
                                        src.private if same else src.public, _admit(src, dst)))
                else:
                    probes.append(Probe(src.name, dst.name, OVERLAY, overlays.get(dst.name), False, None,
                                        "outsider -> member overlay: no route to the overlay subnet"))
        for dst in topo.network(src.network).hosts:
            if dst.name == src.name:
                continue
            if not daemons or not dst.joins:
                why = "no daemons: nothing filters" if not daemons else "-> outsider: outsiders filter nothing"
                probes.append(Probe(src.name, dst.name, PRIVATE, dst.private, True, src.private, why))
            elif src.joins:
                probes.append(Probe(src.name, dst.name, PRIVATE, dst.private, True, src.private, _admit(src, dst)))
            else:
                probes.append(Probe(src.name, dst.name, PRIVATE, dst.private, False, None,
                                    "outsider -> member: reject_all drops non-members"))
    return probes


def _admit(src: Host, dst: Host) -> str:
    if src.neti or dst.neti:
        return (f"{'old' if src.neti else 'member'} -> {'old' if dst.neti else 'member'}: "
                "each lists the other (the old party, registry.neti)")
    return "member -> member: members admit members"


# --- probing --------------------------------------------------------------------------


def probe_once(address: str, port: int, timeout: float) -> dict:
    """Connect to ``address:port`` from the calling thread's namespace; read the server's line."""
    t0 = time.monotonic()
    out: dict = {"state": "error"}
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect((address, port))
        except TimeoutError:
            out["state"] = "timeout"
            return out
        except ConnectionRefusedError:
            out["state"] = "refused"
            return out
        except OSError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                out["state"] = "unreachable"
            else:
                out["detail"] = exc.strerror or str(exc)
            return out
        out["state"] = "open"
        out["peer"] = s.getpeername()[0]
        buf = b""
        try:
            while b"\n" not in buf and len(buf) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
        except OSError as exc:
            out["detail"] = f"reading the answer: {exc.strerror or exc}"
        try:
            answer = json.loads(buf.split(b"\n", 1)[0] or b"{}")
            out["server"] = answer.get("host")
            out["seen"] = answer.get("peer")
        except ValueError:
            out["detail"] = f"unreadable answer {buf[:80]!r}"
        return out
    finally:
        out["ms"] = (time.monotonic() - t0) * 1000
        s.close()


def run_probes(topo: Topology, probes: Sequence[Probe], names: Names, timeout: float = 3.0) -> list[Result]:
    from overlay.netns import parallel_in_netns

    calls, index = [], []
    results: list[Result | None] = [None] * len(probes)
    for i, p in enumerate(probes):
        if p.address is None:
            results[i] = Result(p, "skipped", detail="overlay address unknown (daemon never reported one)")
            continue
        calls.append((names.host(p.src), probe_once, (p.address, topo.test_port, timeout)))
        index.append(i)
    answers = parallel_in_netns(calls, timeout=timeout * 2 + 5)
    for i, ans in zip(index, answers, strict=True):
        p = probes[i]
        if isinstance(ans, BaseException):
            results[i] = Result(p, "error", detail=str(ans))
            continue
        results[i] = Result(p, ans["state"], ans.get("server"), ans.get("seen"), ans.get("peer"),
                            ans.get("ms", 0.0), ans.get("detail", ""))
    for r in results:
        assert r is not None
        if r.open and r.probe.expect_open:
            if r.server != r.probe.dst:
                r.problems.append(f"reached {r.server or 'no server'} instead of {r.probe.dst}")
            if r.seen != r.probe.expect_seen:
                r.problems.append(f"server saw {r.seen}, expected {r.probe.expect_seen}")
            if r.peer != r.probe.address:
                r.problems.append(f"client's peer is {r.peer}, expected {r.probe.address}")
    return results  # type: ignore[return-value]


# --- the table ------------------------------------------------------------------------

_GREEN, _RED, _DIM, _RESET = "\033[32m", "\033[31;1m", "\033[2m", "\033[0m"


def _cell(r: Result | None, color: bool, self_cell: bool = False) -> tuple[str, str]:
    """(text, colour) of one cell."""
    if self_cell:
        return "·", _DIM
    if r is None:
        return "", ""
    if r.ok:
        return ("open" if r.open else "shut"), _GREEN
    if r.state == "skipped":
        return "??", _RED
    if r.open and r.probe.expect_open:
        return "BAD!", _RED
    return ("OPEN!" if r.open else "SHUT!"), _RED


def _table(title: str, rows: Sequence[Host], cols: Sequence[Host], by: dict, color: bool) -> list[str]:
    w = max([7, *(len(c.name) + 2 for c in cols)])
    nw = max(len(h.name) for h in rows)
    rw = max(len(title), 2 + nw + 1 + 8)
    lines = [f"{title:<{rw}}" + "".join(f"{c.name:>{w}}" for c in cols)]
    for h in rows:
        role = "member" if h.member else "old" if h.neti else "outsider"
        line = f"  {h.name:<{nw}} {role:<8}".ljust(rw)
        for c in cols:
            text, col = _cell(by.get((h.name, c.name)), color, self_cell=h.name == c.name)
            pad = f"{text:>{w}}"
            line += f"{col}{pad}{_RESET}" if color and col else pad
        lines.append(line.rstrip())
    return lines


def format_matrix(topo: Topology, results: Sequence[Result], color: bool = False, verbose: bool = False) -> str:
    by_kind: dict[str, dict] = {OVERLAY: {}, PRIVATE: {}}
    for r in results:
        by_kind[r.probe.kind][(r.probe.src, r.probe.dst)] = r
    out = [f"connectivity to test port {topo.test_port} from every host "
           "(open/shut: as expected; OPEN!/SHUT!/BAD!/??: mismatch)", ""]
    if by_kind[OVERLAY]:
        out += _table("to overlay address", topo.hosts, topo.joined, by_kind[OVERLAY], color)
        out.append("")
    out += _table("to private address", topo.hosts, topo.hosts, by_kind[PRIVATE], color)
    out.append("")
    bad = [r for r in results if not r.ok]
    cross = [r for r in results if r.probe.kind == OVERLAY and r.probe.expect_open
             and topo.host(r.probe.src).network != topo.host(r.probe.dst).network]
    same = [r for r in results if r.probe.kind == OVERLAY and r.probe.expect_open and r not in cross]
    if cross or same:
        pub = sum(1 for r in cross if r.open and r.seen == r.probe.expect_seen)
        priv = sum(1 for r in same if r.open and r.seen == r.probe.expect_seen)
        peer = sum(1 for r in cross + same if r.open and r.peer == r.probe.address)
        out.append(f"overlay flows: the server saw the client's public address on {pub}/{len(cross)} "
                   f"cross-network flows and its private address on {priv}/{len(same)} same-network flows; "
                   f"the client's peer was the overlay address on {peer}/{len(cross) + len(same)}")
    if verbose:
        out.append("")
        for r in results:
            out.append("  " + describe(r))
    if bad:
        out.append(f"{len(bad)} of {len(results)} probes did not match the expected matrix:")
        out += ["  " + describe(r) for r in bad]
        summary = f"FAIL: {len(bad)} mismatch{'es' if len(bad) != 1 else ''}"
        out.append(f"{_RED}{summary}{_RESET}" if color else summary)
    else:
        summary = f"OK: all {len(results)} probes as expected"
        out.append(f"{_GREEN}{summary}{_RESET}" if color else summary)
    return "\n".join(out)


def describe(r: Result) -> str:
    p = r.probe
    exp = "open" if p.expect_open else "closed"
    got = r.state + (f" ({r.detail})" if r.detail else "")
    s = f"{p.src} -> {p.dst} {p.kind} {p.address or '?'}: expected {exp}, got {got}"
    if r.open:
        s += f"; server {r.server} saw {r.seen}, client peer {r.peer}, {r.ms:.0f} ms"
    if r.problems:
        s += "; " + "; ".join(r.problems)
    return s + ("" if r.ok else "  <-- mismatch") + f"  [{p.why}]"
