"""``datapath.backend: dryrun``: keeps the state in memory and logs every op.

Used by ``overlay daemon --dry-run`` and by tests of the agent. The ops it
was given are kept (bounded) so ``/status`` and tests can show them.
"""

from __future__ import annotations

import logging
from collections import deque

from overlay.diff import apply_ops
from overlay.ops import Op, empty_state

log = logging.getLogger(__name__)


def format_op(op: Op) -> str:
    value = op.value
    if value is None:
        return f"del {op.table} {_key(op.key)}"
    if hasattr(value, "real"):
        text = f"{value.real}" + (" (override)" if getattr(value, "override", False) else "")
    elif hasattr(value, "identity"):
        text = f"identity={value.identity} flags={value.flags}"
    elif op.table == "ports":
        text = f"{value:#018x}"
    else:
        text = str(value)
    return f"put {op.table} {_key(op.key)} -> {text}"


def _key(key) -> str:
    if isinstance(key, tuple):
        return ":".join(str(k) for k in key)
    return str(key)


class DryRunDatapath:
    name = "dryrun"

    def __init__(self, history: int = 10000, **_ignored):
        self.state: dict[str, dict] = empty_state()
        self.history: deque[Op] = deque(maxlen=history)
        self.applies = 0

    def start(self) -> None:
        return None

    def observe(self) -> dict[str, dict]:
        return {t: dict(v) for t, v in self.state.items()}

    def apply(self, ops: list[Op]) -> None:
        for op in ops:
            log.info("dry-run: %s", format_op(op))
        apply_ops(self.state, ops)
        self.history.extend(ops)
        self.applies += 1

    def counters(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        return None

    def teardown(self) -> None:
        self.state = empty_state()
