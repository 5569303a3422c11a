"""``registry.neti``: the old system's ZooKeeper layout, read and joined (docs/config.md,
docs/migration.md). Off unless the section is given.

Pure: :func:`neti_section` reads the section with the same key-path errors as the rest of
:mod:`overlay.config` (which passes its section reader in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from overlay.errors import InvalidConfigError
from overlay.model import valid_name


@dataclass(frozen=True)
class NetiConfig:
    """Where the old system keeps its state, and which old ``vpcflag`` each network is."""

    prefix: str                                   # the old zk_prefix, e.g. /neti
    ip_map: str = "ip-map"                        # its party: one ephemeral child per live host
    id_to_ip: str = "id-to-ip"
    ip_to_id: str = "ip-to-id"
    max_change: str = "maxchange"
    vpcflag: tuple[tuple[str, int], ...] = ()     # (network, 0|1), sorted by network

    def flag_of(self, network: str) -> int | None:
        return dict(self.vpcflag).get(network)

    def network_of(self, flag: int) -> str | None:
        for network, f in self.vpcflag:
            if f == flag:
                return network
        return None

    def path(self, name: str) -> str:
        return f"{self.prefix}/{name}"


def _node_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a ZooKeeper node name, got {type(value).__name__}")
    return valid_name(value, "ZooKeeper node name")


def _vpcflag(path: str, value: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, dict) or not value:
        raise InvalidConfigError(path, "must be a mapping of network name to its old vpcflag (0 or 1), "
                                 "e.g. {ec2: 0, vpc: 1}")
    seen: dict[int, str] = {}
    out = []
    for network, flag in value.items():
        key = f"{path}.{network}"
        try:
            valid_name(network, "network")
        except ValueError as exc:
            raise InvalidConfigError(key, str(exc)) from None
        if isinstance(flag, bool) or flag not in (0, 1):
            raise InvalidConfigError(key, f"must be 0 or 1, got {flag!r}")
        if flag in seen:
            raise InvalidConfigError(key, f"flag {flag} is already the flag of network {seen[flag]!r}: each "
                                     "flag names one network (a peer's network is found from its flag)")
        seen[flag] = network
        out.append((network, flag))
    return tuple(sorted(out))


def neti_section(sec: Any, prefix_conv: Any) -> NetiConfig:
    """``registry.neti`` from the section reader ``sec`` (``prefix_conv`` validates a
    ZooKeeper path)."""
    prefix = sec.get("prefix", prefix_conv, required=True)
    names = {k: sec.get(k, _node_name, d) for k, d in
             (("ip_map", "ip-map"), ("id_to_ip", "id-to-ip"), ("ip_to_id", "ip-to-id"), ("max_change", "maxchange"))}
    vpcflag = _vpcflag(sec.sub("vpcflag"), sec.get("vpcflag", lambda v: v, required=True))
    sec.done()
    used: dict[str, str] = {}
    for key, name in names.items():
        if name in used:
            raise InvalidConfigError(sec.sub(key), f"{name!r} is also {sec.sub(used[name])}")
        used[name] = key
    return NetiConfig(prefix, vpcflag=vpcflag, **names)


def check_neti(neti: NetiConfig | None, path: str, backend: str, prefix: str) -> None:
    """``registry.neti`` against the rest of ``registry`` (``path``: its key path)."""
    if neti is None:
        return
    if backend != "zookeeper":
        raise InvalidConfigError(path, "is only allowed with backend: zookeeper (daemons behind a controller get "
                                 "the old system's hosts through it: give the controller's config registry.neti)")
    if neti.prefix == prefix:
        raise InvalidConfigError(f"{path}.prefix", f"must differ from registry.prefix ({prefix})")


def check_neti_network(neti: NetiConfig | None, network: str | None) -> None:
    """This node's network needs a flag (its entry in the old party carries it)."""
    if neti is not None and network is not None and neti.flag_of(network) is None:
        raise InvalidConfigError("registry.neti.vpcflag", f"has no flag for this node's network {network!r} "
                                 "(its entry in the old party needs one)")
