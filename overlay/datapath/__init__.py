"""Datapaths: what enforces the desired state on a host.

A datapath is selected by name (``datapath.backend``) and follows the
:class:`Datapath` protocol. Backends are found by name in
:data:`overlay.backends.DATAPATHS`: the built-ins, then the
``overlay.datapaths`` entry point group; the name resolves to a class built
with keyword arguments (``interface``, ``overlay_subnet``, ``self_private``,
``self_overlay``, ``sizes``, ``pin_root``, ``overlay_device``, ``extra_routes``,
``options``: what a plugin's ``validate_config`` made of its keys of ``datapath``,
docs/plugins.md; a backend ignores what it does not use). To remove an
installed datapath without a running one (``overlay datapath teardown``), a
backend may offer a classmethod ``remove(**kwargs)``; otherwise it is built
and its ``teardown()`` called.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from overlay.ops import Op


@runtime_checkable
class Datapath(Protocol):
    """The methods every datapath has. Optional, used when present (not part of
    the runtime check): ``fill() -> {map: {"entries": n, "max_entries": m}}``,
    the fill levels ``/status`` reports, and ``sweep() -> {map: deleted}``,
    called by the agent every few seconds to delete expired state in bounded
    rounds (the eBPF datapath has both)."""

    name: str

    def start(self) -> None:
        """Load or adopt the datapath. Idempotent; must not disturb a live one."""

    def observe(self) -> dict[str, dict]:
        """Report the state held now, table by table (see overlay.ops)."""

    def apply(self, ops: list[Op]) -> None:
        """Apply ops in order, all or nothing where the backend allows it."""

    def counters(self) -> dict[str, int]:
        """Per-reason counters, summed: {"drop_no_peer": 3, "pass_member": 10, ...}."""

    def close(self) -> None:
        """Release handles and leave the datapath in place (traffic keeps flowing)."""

    def teardown(self) -> None:
        """Remove everything this datapath installed."""
