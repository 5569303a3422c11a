"""A policy change on probation (``overlay policies apply FILE --confirm-within S``; pure).

The pending change lives in ZooKeeper at ``<prefix>/config/pending`` (JSON, below): the
policies as they were (``previous``), as applied (``applied``) and the wall-clock
``deadline``. Every registry view that reads it agrees: before the deadline the policies
in ``policies/`` hold; from the deadline on, unless ``overlay policies confirm`` has
deleted the pending record, ``previous`` holds (:func:`effective`), on every daemon and
in the controller, whether or not the operator's CLI is still alive. ``overlay policies
rollback`` (or the next ``apply``/``confirm``) then writes ``previous`` back into
``policies/`` and removes the record. Deadlines are wall-clock: hosts are assumed to keep
NTP time (a skew of a second moves the rollback by a second).

:func:`verdict_changes` is ``overlay policies plan``: which hosts change verdict for
which (source, protocol, ports) before anything is applied.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from overlay.errors import InvalidRecord
from overlay.model import Policy, policy_from_dict, valid_name

MAX_PENDING_BYTES = 512 * 1024


@dataclass(frozen=True)
class Pending:
    change_id: str
    created: float
    deadline: float
    previous: Mapping[str, Policy]
    applied: Mapping[str, Policy]


def _policies(obj: Any, what: str) -> dict[str, Policy]:
    if not isinstance(obj, dict):
        raise InvalidRecord(f"pending change: {what} must be a mapping of policy id to policy")
    out = {}
    for pid, rec in obj.items():
        try:
            valid_name(pid, "policy id")
        except ValueError as exc:
            raise InvalidRecord(f"pending change: {what}: {exc}") from None
        try:
            out[pid] = policy_from_dict(rec, pid)
        except (InvalidRecord, ValueError) as exc:
            raise InvalidRecord(f"pending change: {what}.{pid}: {exc}") from None
    return out


def serialise_pending(p: Pending) -> bytes:
    data = json.dumps({"v": 1, "id": p.change_id, "created": p.created, "deadline": p.deadline,
                       "previous": {k: v.to_dict() for k, v in sorted(p.previous.items())},
                       "applied": {k: v.to_dict() for k, v in sorted(p.applied.items())}},
                      separators=(",", ":"), sort_keys=True).encode()
    if len(data) > MAX_PENDING_BYTES:
        raise InvalidRecord(f"pending change is {len(data)} bytes, over {MAX_PENDING_BYTES}")
    return data


def parse_pending(data: bytes) -> Pending:
    if len(data) > MAX_PENDING_BYTES:
        raise InvalidRecord(f"pending change is {len(data)} bytes, over {MAX_PENDING_BYTES}")
    try:
        obj = json.loads(bytes(data).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRecord(f"pending change is not JSON: {exc}") from None
    if not isinstance(obj, dict) or obj.get("v") != 1:
        raise InvalidRecord("pending change must be a JSON object with \"v\": 1")
    unknown = set(obj) - {"v", "id", "created", "deadline", "previous", "applied"}
    if unknown:
        raise InvalidRecord(f"pending change: unknown keys {sorted(unknown)}")
    for key in ("created", "deadline"):
        if isinstance(obj.get(key), bool) or not isinstance(obj.get(key), (int, float)):
            raise InvalidRecord(f"pending change: {key} must be a number (seconds since the epoch)")
    if not isinstance(obj.get("id"), str) or not obj["id"]:
        raise InvalidRecord("pending change: id must be a non-empty string")
    return Pending(obj["id"], float(obj["created"]), float(obj["deadline"]),
                   _policies(obj.get("previous"), "previous"), _policies(obj.get("applied"), "applied"))


def effective(current: Mapping[str, Policy], pending: Pending | None, now: float) -> tuple[dict[str, Policy], bool]:
    """``(policies in force, rolled back?)``: ``previous`` once the deadline has passed."""
    if pending is not None and now >= pending.deadline:
        return dict(pending.previous), True
    return dict(current), False


# --- plan ------------------------------------------------------------------------------------


def _source(p: Policy) -> str:
    return f"group {p.src.group}" if p.src.group is not None else f"cidr {p.src.cidr}"


def _ports_text(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _allowed(groups: set[str], policies: Mapping[str, Policy], source: str, proto: str,
             lo: int, hi: int) -> str:
    """``open`` (no policy selects the host), ``allow`` (policies cover every port of lo..hi),
    ``partial`` or ``deny``."""
    selecting = [p for p in policies.values() if p.dst.group in groups]
    if not selecting:
        return "open"
    spans = sorted((max(a, lo), min(b, hi)) for p in selecting if _source(p) == source and p.proto == proto
                   for a, b in (p.ports or ((0, 65535),)) if a <= hi and b >= lo)
    covered, nxt = 0, lo
    for a, b in spans:
        if b < nxt:
            continue
        covered += b - max(a, nxt) + 1
        nxt = b + 1
    if covered == hi - lo + 1:
        return "allow"
    return "partial" if covered else "deny"


def verdict_changes(hosts: Mapping[str, tuple[str, ...]], before: Mapping[str, Policy],
                    after: Mapping[str, Policy]) -> list[dict]:
    """For each host (id -> its granted groups) and each (source, proto, ports) that a policy
    of either set names, the verdict before and after, where it differs. Verdicts: ``open``
    (no policy selects the host: everything not dropped by its local filter passes),
    ``allow``, ``partial`` (some ports), ``deny``. The failsafe (SSH whitelist, registry and
    controller addresses) is never subject to policies and is not listed."""
    pairs = sorted({(_source(p), p.proto, a, b) for p in (*before.values(), *after.values())
                    for a, b in (p.ports or ((0, 65535),))})
    out = []
    for host in sorted(hosts):
        groups = set(hosts[host])
        for source, proto, lo, hi in pairs:
            was, now = _allowed(groups, before, source, proto, lo, hi), _allowed(groups, after, source, proto, lo, hi)
            if was != now:
                out.append({"host": host, "from": source, "proto": proto, "ports": _ports_text(lo, hi),
                            "before": was, "after": now})
    return out


def load_policy_file(obj: Any) -> dict[str, Policy]:
    """A policy FILE (YAML or JSON): ``{policies: {<id>: <policy record>}}``, the whole set
    wanted (ids not in it are deleted). The records' ``v`` may be left out."""
    if not isinstance(obj, dict) or set(obj) != {"policies"}:
        raise InvalidRecord("a policy file is a mapping with one key, policies: {<id>: {from, to, proto, ports}}")
    recs = {} if obj["policies"] is None else obj["policies"]
    if not isinstance(recs, dict):
        raise InvalidRecord("policies must be a mapping of policy id to policy")
    return _policies({k: {"v": 1, **v} if isinstance(v, dict) else v for k, v in recs.items()}, "policies")
