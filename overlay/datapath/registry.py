"""Datapath backends by name: the built-ins below, then the ``overlay.datapaths``
entry point group (third parties: ``name = "package.module:Class"``).

A backend is a class following :class:`overlay.datapath.Datapath`, built
with keyword arguments (``interface``, ``overlay_subnet``, ``self_private``,
``self_overlay``, ``sizes``, ``pin_root``, ``overlay_device``, ``extra_routes``:
the ``nat_overrides`` keys outside the overlay subnet; a backend ignores what it
does not use). To remove an installed datapath without a
running one (``overlay datapath teardown``), a backend may offer a
classmethod ``remove(**kwargs)``; otherwise ``teardown`` builds the backend
and calls its ``teardown()``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from overlay.errors import UnsupportedError

ENTRY_POINT_GROUP = "overlay.datapaths"

# name -> "module:attribute", imported only when that backend is asked for.
BUILTINS: dict[str, str] = {
    "ebpf": "overlay.datapath.ebpf.datapath:EbpfDatapath",
    "iptables": "overlay.datapath.iptables:IptablesDatapath",
    "dryrun": "overlay.datapath.dryrun:DryRunDatapath",
}


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def lookup(name: str):
    """The backend class registered as ``name``."""
    if name in BUILTINS:
        return _load(BUILTINS[name])
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    raise UnsupportedError(f"datapath backend {name!r} is not available (known: {', '.join(names())})")


def names() -> list[str]:
    found = set(BUILTINS)
    found.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(found)


def create(name: str, **kwargs):
    """Build the datapath backend ``name`` with ``kwargs``."""
    return lookup(name)(**kwargs)


def teardown(name: str, **kwargs) -> None:
    """Remove what backend ``name`` installed (see the module docstring)."""
    cls = lookup(name)
    remove = getattr(cls, "remove", None)
    if callable(remove):
        remove(**kwargs)
    else:
        cls(**kwargs).teardown()
