"""Pluggable parts by name: the built-ins, then the entry points of third parties.

One mechanism for the three kinds (DESIGN §3; docs/architecture.md):

=============  =======================  ============================  =======================================
kind           entry point group        built-ins                     what the name resolves to
=============  =======================  ============================  =======================================
registry       ``overlay.registries``   zookeeper, grpc, static       a class with ``from_config(config)``
                                                                      (:class:`overlay.registry.Registry`)
datapath       ``overlay.datapaths``    ebpf, iptables, dryrun        a class built with keyword arguments
                                                                      (:class:`overlay.datapath.Datapath`)
address        ``overlay.providers``    static, netlink, aws-imds     a callable ``provider(config) ->
provider                                                              (private, public)``
=============  =======================  ============================  =======================================

A built-in is imported only when it is asked for, and cannot be overridden: its
name is looked up first. A third party declares ``name = "package.module:attr"``
in its package's entry points; a plugin that fails to load is reported as an
error naming it, never with a traceback. (Config validation still accepts only
the built-in registry and datapath names.)
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from overlay.errors import DiscoveryError, OverlayError, UnsupportedError


class Backends:
    """The ``kind`` table: ``builtins`` maps a name to ``"module:attribute"``; entry points of
    ``group`` add more. Unknown names and broken plugins raise ``error``."""

    def __init__(self, kind: str, group: str, builtins: dict[str, str], error: type[OverlayError],
                 unknown: str = "{kind} {name!r} is not available (known: {known})"):
        self.kind = kind
        self.group = group
        self.builtins = dict(builtins)
        self._error = error
        self._unknown = unknown

    def _entry_points(self) -> list:
        return list(entry_points(group=self.group))

    def names(self) -> list[str]:
        return sorted(set(self.builtins) | {ep.name for ep in self._entry_points()})

    def lookup(self, name: str) -> Any:
        """What ``name`` resolves to (see the module docstring)."""
        if name in self.builtins:
            module, _, attr = self.builtins[name].partition(":")
            return getattr(importlib.import_module(module), attr)
        found = [ep for ep in self._entry_points() if ep.name == name]
        if not found:
            raise self._error(self._unknown.format(kind=self.kind, name=name, known=", ".join(self.names())))
        try:
            obj = found[0].load()
        except Exception as exc:  # a broken plugin must not crash with a traceback
            raise self._error(f"{self.kind} {name!r} ({found[0].value}) failed to load: {exc}") from None
        if not callable(obj):
            raise self._error(f"{self.kind} {name!r} ({found[0].value}) is not callable")
        return obj


REGISTRIES = Backends("registry backend", "overlay.registries", {
    "zookeeper": "overlay.registry.zookeeper:ZooKeeperRegistry",
    "grpc": "overlay.registry.grpc:GrpcRegistry",
    "static": "overlay.registry.static:StaticRegistry",
}, UnsupportedError)

DATAPATHS = Backends("datapath backend", "overlay.datapaths", {
    "ebpf": "overlay.datapath.ebpf.datapath:EbpfDatapath",
    "iptables": "overlay.datapath.iptables:IptablesDatapath",
    "dryrun": "overlay.datapath.dryrun:DryRunDatapath",
}, UnsupportedError)

PROVIDERS = Backends("address provider", "overlay.providers", {
    "static": "overlay.discovery.static:discover",
    "netlink": "overlay.discovery.netlink:discover",
    "aws-imds": "overlay.discovery.aws_imds:discover",
}, DiscoveryError, unknown="unknown {kind} {name!r}; known: {known}")


def create_registry(config: Any) -> Any:
    """The registry ``config.registry.backend`` names, for this node's ``config``."""
    return REGISTRIES.lookup(config.registry.backend).from_config(config)


def create_datapath(name: str, **kwargs: Any) -> Any:
    """Build the datapath backend ``name`` with ``kwargs`` (``interface``, ``overlay_subnet``,
    ``self_private``, ``self_overlay``, ``sizes``, ``pin_root``, ``overlay_device``,
    ``extra_routes``: the ``nat_overrides`` keys outside the overlay subnet; a backend ignores
    what it does not use)."""
    return DATAPATHS.lookup(name)(**kwargs)


def teardown_datapath(name: str, **kwargs: Any) -> None:
    """Remove what datapath backend ``name`` installed, without a running one: its classmethod
    ``remove(**kwargs)`` if it has one, else ``Backend(**kwargs).teardown()``."""
    cls = DATAPATHS.lookup(name)
    remove = getattr(cls, "remove", None)
    if callable(remove):
        remove(**kwargs)
    else:
        cls(**kwargs).teardown()
