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
error naming it, never with a traceback.

The config accepts any name of the table (:meth:`Backends.names`). The section of a
plugin (``registry``, ``datapath`` or ``discovery``, less the keys the core reads for
every backend) is validated by the plugin: the object the name resolves to may have a
callable attribute ``validate_config(section: dict) -> object`` that raises
:class:`~overlay.errors.InvalidConfigError` with key paths relative to the section
(:meth:`Backends.validate_section` prefixes them); what it returns is kept in the
config as ``options``. :meth:`Backends.describe` is what ``overlay plugins`` shows
(docs/plugins.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from overlay import __version__
from overlay.errors import DiscoveryError, InvalidConfigError, OverlayError, UnsupportedError

CONFIG_HOOK = "validate_config"


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def join_path(path: str, rel: str) -> str:
    """``rel``, a key path relative to the section at ``path``, as a full key path."""
    if not rel:
        return path
    return f"{path}{rel}" if rel.startswith("[") or not path else f"{path}.{rel}"


class Backends:
    """The ``kind`` table: ``builtins`` maps a name to ``"module:attribute"``; entry points of
    ``group`` add more. Unknown names and broken plugins raise ``error``. ``requires`` names a
    callable attribute a plugin's object must have (registries: ``from_config``)."""

    def __init__(self, kind: str, group: str, builtins: dict[str, str], error: type[OverlayError],
                 unknown: str = "{kind} {name!r} is not available (known: {known})",
                 requires: str | None = None):
        self.kind = kind
        self.group = group
        self.builtins = dict(builtins)
        self._error = error
        self._unknown = unknown
        self.requires = requires

    def _entry_points(self) -> list:
        return list(entry_points(group=self.group))

    def names(self) -> list[str]:
        return sorted(set(self.builtins) | {ep.name for ep in self._entry_points()})

    def _load(self, ep: Any) -> Any:
        """The object entry point ``ep`` names, checked to be usable as a backend of this kind."""
        try:
            obj = ep.load()
        except (Exception, SystemExit) as exc:  # a broken plugin must not crash with a traceback
            raise self._error(f"{self.kind} {ep.name!r} ({ep.value}) failed to load: {_reason(exc)}") from None
        if not callable(obj):
            raise self._error(f"{self.kind} {ep.name!r} ({ep.value}) is not callable")
        if self.requires and not callable(getattr(obj, self.requires, None)):
            raise self._error(f"{self.kind} {ep.name!r} ({ep.value}) has no {self.requires}()")
        return obj

    def lookup(self, name: str) -> Any:
        """What ``name`` resolves to (see the module docstring)."""
        if name in self.builtins:
            module, _, attr = self.builtins[name].partition(":")
            return getattr(importlib.import_module(module), attr)
        found = [ep for ep in self._entry_points() if ep.name == name]
        if not found:
            raise self._error(self._unknown.format(kind=self.kind, name=name, known=", ".join(self.names())))
        return self._load(found[0])

    # --- config: names and plugin sections (overlay.config) ------------------------------------

    def config_name(self, value: Any) -> str:
        """``value`` if it is a name of this table (built in, or installed as an entry point of
        its group), else ValueError listing the available ones (the config names the key)."""
        if isinstance(value, str) and value in self.builtins:
            return value  # without reading the installed distributions' metadata
        names = self.names()
        if not isinstance(value, str) or value not in names:
            raise ValueError(f"{value!r} is not one of the available {self.kind}s: {', '.join(names)} "
                             f"(built in, or installed as an {self.group} entry point; see overlay plugins)")
        return value

    def config_hook(self, name: str, path: str) -> Callable[[dict], Any] | None:
        """The ``validate_config`` of plugin ``name`` (None for a built-in, or a plugin without
        one); a plugin that cannot be loaded is an :class:`InvalidConfigError` at ``path``."""
        if name in self.builtins:
            return None
        try:
            obj = self.lookup(name)
        except OverlayError as exc:
            raise InvalidConfigError(path, str(exc)) from None
        hook = getattr(obj, CONFIG_HOOK, None)
        return hook if callable(hook) else None

    def validate_section(self, name: str, hook: Callable[[dict], Any], section: dict, path: str) -> Any:
        """``hook(section)``: the options of plugin ``name``; its errors' key paths are made
        full (prefixed with ``path``), anything else it raises is one error at ``path``."""
        try:
            return hook(dict(section))
        except InvalidConfigError as exc:
            raise InvalidConfigError(join_path(path, exc.path), exc.reason) from None
        except (Exception, SystemExit) as exc:
            raise InvalidConfigError(path, f"{self.kind} {name!r} could not validate this section: "
                                           f"{type(exc).__name__}: {_reason(exc)}") from None

    # --- overlay plugins -------------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """What ``overlay plugins`` shows for this group: every built-in, then every entry point
        (in the order Python finds them), each with its provider distribution and version, its
        ``module:attribute``, whether it loads (``error`` says why not), whether it validates its
        own config section (``config_hook``; None for a built-in, whose section the core types),
        and what shadows it (a built-in, or an earlier entry point of the same name)."""
        rows = []
        for name in sorted(self.builtins):
            rows.append(self._row(name, True, "overlay", __version__, self.builtins[name], None,
                                  lambda n=name: self.lookup(n)))
        owner = {name: "built-in" for name in self.builtins}
        for ep in self._entry_points():
            dist = getattr(ep, "dist", None)
            dist_name = getattr(dist, "name", None) if dist is not None else None
            rows.append(self._row(ep.name, False, dist_name, getattr(dist, "version", None), ep.value,
                                  owner.get(ep.name), lambda ep=ep: self._load(ep)))
            owner.setdefault(ep.name, f"{dist_name or ep.value}")
        return rows

    def _row(self, name: str, builtin: bool, dist: str | None, version: str | None, module: str,
             shadowed_by: str | None, load: Callable[[], Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"name": name, "builtin": builtin, "distribution": dist, "version": version,
                               "module": module, "shadowed_by": shadowed_by, "loads": None, "error": None,
                               "config_hook": None}
        if shadowed_by is not None:
            return row  # never loaded: the name resolves to what shadows it
        try:
            obj = load()
        except (Exception, SystemExit) as exc:  # built-ins too: a missing dependency is shown, not raised
            row["loads"], row["error"] = False, _reason(exc)
            return row
        row["loads"] = True
        row["config_hook"] = None if builtin else callable(getattr(obj, CONFIG_HOOK, None))
        return row


REGISTRIES = Backends("registry backend", "overlay.registries", {
    "zookeeper": "overlay.registry.zookeeper:ZooKeeperRegistry",
    "grpc": "overlay.registry.grpc:GrpcRegistry",
    "static": "overlay.registry.static:StaticRegistry",
}, UnsupportedError, requires="from_config")

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

TABLES = (REGISTRIES, DATAPATHS, PROVIDERS)  # the order ``overlay plugins`` lists them in


def create_registry(config: Any) -> Any:
    """The registry ``config.registry.backend`` names, for this node's ``config``."""
    return REGISTRIES.lookup(config.registry.backend).from_config(config)


def create_datapath(name: str, **kwargs: Any) -> Any:
    """Build the datapath backend ``name`` with ``kwargs`` (``interface``, ``overlay_subnet``,
    ``self_private``, ``self_overlay``, ``sizes``, ``pin_root``, ``overlay_device``,
    ``extra_routes``: the ``nat_overrides`` keys outside the overlay subnet, ``options``: what a
    plugin's ``validate_config`` returned, else None; ``mode`` and ``cgroup``: ``datapath.mode``
    and ``datapath.cgroup``; a backend ignores what it does not use)."""
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
