"""The pure differ: (desired tables, observed tables) -> minimal ops.

Only keys whose value differs produce an op. Ops are ordered so that a
flow never sees a half state: NAT entries go away first, then the filter
and reverse tables change, then new NAT entries appear (a peer is allowed
and reverse-mapped before traffic is sent to it).
"""

from __future__ import annotations

from collections.abc import Mapping

from overlay.ops import TABLES, Op


def _sorted_keys(keys) -> list:
    return sorted(keys, key=lambda k: (type(k).__name__, k))


def diff_table(name: str, desired: Mapping, observed: Mapping) -> tuple[list[Op], list[Op]]:
    """(deletes, puts) for one table."""
    deletes = [Op(name, k) for k in _sorted_keys(k for k in observed if k not in desired)]
    puts = [Op(name, k, v) for k in _sorted_keys(desired) if observed.get(k, _MISSING) != (v := desired[k])]
    return deletes, puts


_MISSING = object()


def diff(desired: Mapping[str, Mapping], observed: Mapping[str, Mapping]) -> list[Op]:
    """Ops that turn ``observed`` into ``desired``; [] when they agree."""
    nat_del, nat_put = diff_table("nat", desired.get("nat", {}), observed.get("nat", {}))
    middle: list[Op] = []
    for name in TABLES:
        if name == "nat":
            continue
        deletes, puts = diff_table(name, desired.get(name, {}), observed.get(name, {}))
        middle.extend(deletes)
        middle.extend(puts)
    return nat_del + middle + nat_put


def apply_ops(state: dict[str, dict], ops: list[Op]) -> dict[str, dict]:
    """Apply ops to an in-memory state (for the dry-run datapath and for tests)."""
    for op in ops:
        table = state.setdefault(op.table, {})
        if op.is_delete:
            table.pop(op.key, None)
        else:
            table[op.key] = op.value
    return state
