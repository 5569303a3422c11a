"""``overlay audit``: the fleet against an inventory, in both layouts (pure; docs/migration.md).

:class:`Snapshot` is what the registry holds (read by :mod:`overlay.zk.audit_read`):
live hosts of the Overlay layout (``nodes/``) and of the old one (its party), and the
allocations of both with their ZooKeeper times. :func:`audit` answers:

- ``missing``: inventory entries (an id or an address) matching no live host;
- ``unlisted``: live hosts matching no inventory entry (only with an inventory);
- ``versions``: live hosts by agent version (``neti`` for hosts seen only in the old
  layout, ``unknown`` for Overlay records without ``agent_version``) and ``below``, those
  under ``min_version`` (``neti`` and ``unknown`` count as below);
- ``only_neti``: hosts live only in the old layout;
- ``addresses``: allocated and free host addresses of the subnet (either layout);
- ``stale``: allocations with no live host now, whose allocation znodes were last written
  more than ``stale_days`` ago. That is what ZooKeeper can tell: when the allocation was
  made or last changed (``mtime``), and whether a host is live now (ephemeral records
  leave no history), not how long ago the host went away.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import re
from dataclasses import dataclass, field

ID_COLUMNS = ("node_id", "id", "instance_id", "host", "hostname", "name")
ADDRESS_COLUMNS = ("address", "ip", "overlay", "private", "public", "private_ip", "public_ip", "overlay_ip")
DAY_S = 86400.0


@dataclass(frozen=True)
class Host:
    """A live host: its id (None when the old layout names none) and addresses."""

    node_id: str | None
    layout: str                 # "native" or "neti"
    overlay: str
    private: str
    public: str
    agent_version: str | None = None


@dataclass(frozen=True)
class Allocation:
    node_id: str
    overlay: str
    layout: str                 # "native" or "neti"
    mtime: float                # seconds since the epoch (ZooKeeper mtime of id-to-ip/<id>)


@dataclass
class Snapshot:
    subnet: ipaddress.IPv4Network
    hosts: list[Host] = field(default_factory=list)
    allocations: list[Allocation] = field(default_factory=list)


def parse_inventory(text: str, column: str | None = None) -> list[str]:
    """One id or address per line (``#`` comments, blank lines skipped), or a CSV whose header
    names the column (``column``, else the first of :data:`ID_COLUMNS` + :data:`ADDRESS_COLUMNS`
    found). Raises ValueError naming what is wrong."""
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        return []
    if "," not in lines[0] and column is None:
        bad = [ln for ln in lines if re.search(r"[\s,]", ln)]
        if bad:
            raise ValueError(f"line {bad[0]!r}: one id or address per line (or a CSV with a header)")
        return list(dict.fromkeys(lines))
    reader = csv.reader(io.StringIO("\n".join(lines)))
    header = [h.strip() for h in next(reader)]
    names = [h.lower() for h in header]
    if column is not None:
        if column.lower() not in names:
            raise ValueError(f"the CSV header has no column {column!r} (it has {', '.join(header)})")
        idx = names.index(column.lower())
    else:
        found = [c for c in (*ID_COLUMNS, *ADDRESS_COLUMNS) if c in names]
        if not found:
            raise ValueError(f"the CSV header names no id or address column (one of {', '.join(ID_COLUMNS)}, "
                             f"{', '.join(ADDRESS_COLUMNS)}); give --column")
        idx = names.index(found[0])
    out = []
    for n, row in enumerate(reader, start=2):
        if idx >= len(row) or not row[idx].strip():
            raise ValueError(f"CSV row {n} has no value in column {header[idx]!r}")
        out.append(row[idx].strip())
    return list(dict.fromkeys(out))


def version_key(text: str) -> tuple[int, ...] | None:
    """``1.2.3rc1`` -> (1, 2, 3); None when it does not start with a number."""
    m = re.match(r"^(\d+(?:\.\d+)*)", text)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def _merge_hosts(hosts: list[Host]) -> list[Host]:
    """One host per id (or per overlay when the old layout names no id): the native record wins."""
    out: dict[str, Host] = {}
    for h in sorted(hosts, key=lambda h: h.layout != "native"):
        key = h.node_id or f"@{h.overlay}"
        out.setdefault(key, h)
    return [out[k] for k in sorted(out)]


def audit(snap: Snapshot, inventory: list[str] | None, min_version: str | None, stale_days: float,
          now: float) -> dict:
    hosts = _merge_hosts(snap.hosts)
    neti_ids = {h.node_id or f"@{h.overlay}" for h in snap.hosts if h.layout == "neti"}
    native_ids = {h.node_id for h in snap.hosts if h.layout == "native"}
    report: dict = {"hosts": len(hosts)}

    def keys(h: Host) -> set[str]:
        return {k for k in (h.node_id, h.overlay, h.private, h.public) if k}

    if inventory is not None:
        known = set().union(*(keys(h) for h in hosts)) if hosts else set()
        report["missing"] = [e for e in inventory if e not in known]
        inv = set(inventory)
        report["unlisted"] = [h.node_id or h.overlay for h in hosts if not keys(h) & inv]
    versions: dict[str, list[str]] = {}
    for h in hosts:
        v = "neti" if h.layout == "neti" else (h.agent_version or "unknown")
        versions.setdefault(v, []).append(h.node_id or h.overlay)
    report["versions"] = {v: sorted(ids) for v, ids in sorted(versions.items())}
    if min_version is not None:
        floor = version_key(min_version)
        if floor is None:
            raise ValueError(f"--min-version {min_version!r} is not a version (like 0.2 or 1.4.1)")
        report["min_version"] = min_version
        report["below"] = sorted(i for v, ids in versions.items() for i in ids
                                 if (vk := version_key(v)) is None or vk < floor)
    report["only_neti"] = sorted(k.lstrip("@") for k in neti_ids - native_ids)
    total = snap.subnet.num_addresses - 2 if snap.subnet.prefixlen < 31 else snap.subnet.num_addresses
    allocated = {a.overlay for a in snap.allocations if ipaddress.IPv4Address(a.overlay) in snap.subnet}
    report["addresses"] = {"subnet": str(snap.subnet), "total": total, "allocated": len(allocated),
                           "free": total - len(allocated)}
    live = {h.node_id for h in snap.hosts if h.node_id} | {h.overlay for h in snap.hosts}
    stale: dict[tuple[str, str], dict] = {}
    for a in snap.allocations:
        if a.node_id in live or a.overlay in live:
            continue
        age = (now - a.mtime) / DAY_S
        if age < stale_days:
            continue
        cur = stale.setdefault((a.node_id, a.overlay), {"node_id": a.node_id, "overlay": a.overlay,
                                                         "layouts": [], "age_days": round(age, 1)})
        cur["layouts"] = sorted({*cur["layouts"], a.layout})
        cur["age_days"] = min(cur["age_days"], round(age, 1))
    report["stale_days"] = stale_days
    report["stale"] = [stale[k] for k in sorted(stale)]
    return report


def format_report(r: dict) -> list[str]:
    lines = [f"hosts live: {r['hosts']}"]
    a = r["addresses"]
    lines.append(f"addresses of {a['subnet']}: {a['allocated']} allocated, {a['free']} free of {a['total']}")
    for key, title in (("missing", "in the inventory, not registered"), ("unlisted", "registered, not in the inventory")):
        if key in r:
            lines.append(f"{title}: {len(r[key])}")
            lines += [f"  {x}" for x in r[key]]
    lines.append("hosts by agent version:")
    lines += [f"  {v:<12} {len(ids):>5}  {' '.join(ids[:20])}{' ...' if len(ids) > 20 else ''}"
              for v, ids in r["versions"].items()]
    if "below" in r:
        lines.append(f"below {r['min_version']}: {len(r['below'])}")
        lines += [f"  {x}" for x in r["below"]]
    lines.append(f"only in the old layout: {len(r['only_neti'])}")
    lines += [f"  {x}" for x in r["only_neti"]]
    lines.append(f"stale allocations (no live host, allocated over {r['stale_days']:g} days ago): {len(r['stale'])}")
    lines += [f"  {s['node_id']:<24} {s['overlay']:<16} {','.join(s['layouts']):<13} {s['age_days']} days"
              for s in r["stale"]]
    return lines
