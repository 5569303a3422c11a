"""The lab's topology file: load, validate, and derive everything from it.

One YAML file (``default-topology.yaml`` is the default; docs/lab.md
documents every key) drives the netns lab and ``vagrant/``. This module is
pure: it reads the file and computes names, daemon configs and the per-node
network scripts; it never touches the system. The same functions serve both
labs (``target="netns"`` or ``target="vagrant"``), so a VM's daemon config
and network set-up are written by the code that writes the netns lab's.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from overlay.abi import SSH_PORT
from overlay.errors import InvalidConfigError

DEFAULT_TOPOLOGY_NAME = "default-topology.yaml"
TOPOLOGY_ENV = "OVERLAY_LAB_TOPOLOGY"

LAB_NAME_ENV = "OVERLAY_LAB_NAME"     # the lab's name when --name is not given
DEFAULT_LAB_NAME = "lab"
LAB_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
NS_PREFIX = "ovl-lab-"                # every namespace the default lab makes starts with this
RUN_DIR = "/run/overlay-lab"          # state, configs, logs, ZooKeeper data
PIN_DIR = "/sys/fs/bpf/overlay/lab"   # one pin_root per member below it
STATUS_LISTEN = "127.0.0.1:9464"      # each namespace has its own loopback
TARGETS = ("netns", "vagrant")
REGISTRIES = ("zookeeper", "grpc")    # a network's daemons use ZooKeeper directly, or the controller
CONTROLLER_PORT = 9470                # the controller listens at the ZooKeeper machine's address
VAGRANT_CERTS_DIR = "/etc/overlay/certs"

HOST_RE = re.compile(r"^[a-z][a-z0-9-]{0,14}$")     # also an interface name on the switch
NETWORK_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")     # "e-<network>" is an interface name
RESERVED_HOST_NAMES = ("edge", "sw", "inet", "lo")

class TopologyError(InvalidConfigError):
    """The topology file is invalid; ``path`` names the file and the key."""


@dataclass(frozen=True)
class LabPlace:
    """Where one lab instance lives: its namespace prefix, run directory and pin directory.
    Two labs with different names can be up at once on one machine."""

    name: str
    prefix: str
    run_dir: str
    pin_dir: str


def lab_place(name: str | None = None) -> LabPlace:
    """The place of lab ``name`` (default: ``$OVERLAY_LAB_NAME``, else ``lab``): namespaces
    ``ovl-<name>-*``, ``/run/overlay-<name>``, ``/sys/fs/bpf/overlay/<name>``. The default
    lab is ``ovl-lab-*``, ``/run/overlay-lab``, ``/sys/fs/bpf/overlay/lab``."""
    name = name or os.environ.get(LAB_NAME_ENV) or DEFAULT_LAB_NAME
    if not LAB_NAME_RE.match(name):
        where = "--name" if name != os.environ.get(LAB_NAME_ENV) else LAB_NAME_ENV
        raise TopologyError(where, f"lab name {name!r} must match {LAB_NAME_RE.pattern} "
                                   "(it names namespaces and directories)")
    return LabPlace(name, f"ovl-{name}-", f"/run/overlay-{name}", f"/sys/fs/bpf/overlay/{name}")


@dataclass(frozen=True)
class Host:
    name: str
    network: str
    private: str
    public: str
    member: bool = True
    groups: tuple[str, ...] = ()
    overlay: str | None = None                               # fixed overlay address, if any
    daemon: dict = field(default_factory=dict, compare=False)  # per-host daemon config overrides
    neti: bool = False           # an old-format host: runs the old system's emulator, not the daemon

    @property
    def joins(self) -> bool:
        """A member or an old-format host: it has an overlay address and admits the others."""
        return self.member or self.neti


@dataclass(frozen=True)
class Network:
    name: str
    subnet: ipaddress.IPv4Network
    public_subnet: ipaddress.IPv4Network
    edge_private: str
    edge_public: str
    hosts: tuple[Host, ...]
    registry: str = "zookeeper"   # how its daemons reach the registry: zookeeper | grpc (the controller)

    @property
    def edge_name(self) -> str:
        return f"{self.name}-edge"


@dataclass(frozen=True)
class Topology:
    source: str
    overlay_subnet: ipaddress.IPv4Network
    test_port: int
    public_range: ipaddress.IPv4Network
    internet_subnet: ipaddress.IPv4Network
    zk_name: str
    zk_address: str
    zk_port: int
    networks: tuple[Network, ...]
    daemon: dict = field(default_factory=dict, compare=False)
    vagrant: dict = field(default_factory=dict, compare=False)
    text: str = field(default="", compare=False, repr=False)
    controller_port: int = CONTROLLER_PORT
    ensemble: int = 1                          # ZooKeeper servers: zk, zk2, zk3 ... at consecutive addresses
    controller_addresses: tuple[str, ...] = ()  # one per controller replica (default: the ZooKeeper address)
    lease_s: float | None = None               # the controllers' lease_s (None: the product's default)
    neti: dict = field(default_factory=dict, compare=False)  # registry.neti of daemons and controllers ({}: none)

    @property
    def hosts(self) -> tuple[Host, ...]:
        return tuple(h for n in self.networks for h in n.hosts)

    @property
    def members(self) -> tuple[Host, ...]:
        return tuple(h for h in self.hosts if h.member)

    @property
    def neti_hosts(self) -> tuple[Host, ...]:
        """The old-format hosts (``neti: true``): each runs :mod:`overlay.lab.neti_agent`."""
        return tuple(h for h in self.hosts if h.neti)

    @property
    def joined(self) -> tuple[Host, ...]:
        """Members and old-format hosts: every host with an overlay address."""
        return tuple(h for h in self.hosts if h.joins)

    @property
    def zk_servers(self) -> tuple[tuple[str, str], ...]:
        """``(machine name, address)`` of each ZooKeeper server: ``zk`` at ``zookeeper.address``,
        then (``ensemble: 3``) ``zk2``, ``zk3`` at the next addresses, each in its own namespace."""
        base = ipaddress.IPv4Address(self.zk_address)
        return tuple((self.zk_name if i == 0 else f"{self.zk_name}{i + 1}", str(base + i))
                     for i in range(self.ensemble))

    @property
    def zookeeper(self) -> str:
        """The ZooKeeper connection string: ``host:port`` (an ensemble: every server's, comma-separated)."""
        return ",".join(f"{a}:{self.zk_port}" for _, a in self.zk_servers)

    @property
    def controllers(self) -> tuple[str, ...]:
        """``host:port`` of each replica of the gRPC controller (all on the first ZooKeeper
        machine, one address each), or () when every network uses ZooKeeper directly."""
        if not any(n.registry == "grpc" for n in self.networks):
            return ()
        return tuple(f"{a}:{self.controller_port}" for a in (self.controller_addresses or (self.zk_address,)))

    @property
    def controller(self) -> str | None:
        """The first replica's ``host:port``, or None when the lab runs no controller."""
        return self.controllers[0] if self.controllers else None

    @property
    def grpc_members(self) -> tuple[Host, ...]:
        """The members whose daemons use the controller (``registry: grpc`` networks)."""
        return tuple(h for h in self.members if self.registry_of(h) == "grpc")

    def registry_of(self, host: Host | str) -> str:
        """``zookeeper`` or ``grpc``: how the daemon of ``host`` reaches the registry."""
        if isinstance(host, str):
            host = self.host(host)
        return self.network(host.network).registry

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise TopologyError(self.source, f"no host named {name!r} (hosts: {', '.join(h.name for h in self.hosts)})")

    def network(self, name: str) -> Network:
        for n in self.networks:
            if n.name == name:
                return n
        raise TopologyError(self.source, f"no network named {name!r}")

    def node_names(self) -> list[str]:
        """Every machine of the lab: ZooKeeper's, the edges, then the hosts (the VM names)."""
        return [*(z for z, _ in self.zk_servers), *(n.edge_name for n in self.networks), *(h.name for h in self.hosts)]


# --- namespace names -----------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    """Namespace names of one lab; all start with ``prefix`` (``ovl-lab-``)."""

    prefix: str = NS_PREFIX

    def host(self, host: Host | str) -> str:
        return self.prefix + (host if isinstance(host, str) else host.name)

    def switch(self, network: Network | str) -> str:
        return f"{self.prefix}{network if isinstance(network, str) else network.name}-sw"

    def edge(self, network: Network | str) -> str:
        return f"{self.prefix}{network if isinstance(network, str) else network.name}-edge"

    @property
    def internet(self) -> str:
        return f"{self.prefix}inet"

    def zookeeper(self, topo: Topology, server: int = 1) -> str:
        """The namespace of ZooKeeper server ``server`` (1: the first, where the controllers run)."""
        return self.prefix + topo.zk_servers[server - 1][0]

    def all(self, topo: Topology) -> list[str]:
        out = [self.internet, *(self.prefix + z for z, _ in topo.zk_servers)]
        for net in topo.networks:
            out += [self.switch(net), self.edge(net), *(self.host(h) for h in net.hosts)]
        return out


# --- loading and validation ------------------------------------------------------------


def default_topology_path() -> str:
    env = os.environ.get(TOPOLOGY_ENV)
    if env:
        return env
    return str(resources.files("overlay.lab").joinpath(DEFAULT_TOPOLOGY_NAME))


def load_topology(path: str | None = None) -> Topology:
    """Read and validate a topology file (default: the packaged one, or $OVERLAY_LAB_TOPOLOGY)."""
    path = path or default_topology_path()
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise TopologyError(path, f"cannot read the topology file: {exc.strerror}") from None
    return parse_topology(text, path)


def parse_topology(text: str, source: str = "<topology>") -> Topology:
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise TopologyError(source, f"not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return dataclasses.replace(topology_from_dict(obj, source), text=text)


class _Obj:
    """Pops keys from a mapping; errors name ``<file>: <key path>``."""

    def __init__(self, obj: Any, path: str, source: str):
        self.path, self.source = path, source
        if not isinstance(obj, dict):
            self.fail(f"must be a mapping, got {_kind(obj)}")
        self.obj = dict(obj)

    def fail(self, reason: str, key: str | None = None):
        raise TopologyError(f"{self.source}: {self.sub(key) if key else self.path or '<top>'}", reason)

    def sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, conv, default: Any = None, required: bool = False):
        if key not in self.obj:
            if required:
                self.fail("is required", key)
            return default
        value = self.obj.pop(key)
        try:
            return conv(value)
        except (ValueError, TypeError) as exc:
            self.fail(str(exc), key)

    def address(self, key: str, net: ipaddress.IPv4Network, what: str, seen: dict[str, str] | None = None,
                where: str = "") -> str:
        """The required IPv4 address ``key``, inside ``net`` (``what`` names it) and, with
        ``seen``, not used before (then recorded there, by key path)."""
        value = self.get(key, _ip, required=True)
        try:
            _in(value, net, what)
        except ValueError as exc:
            self.fail(str(exc), key)
        if seen is not None:
            if value in seen:
                self.fail(f"{value} is already used{where} by {seen[value]}", key)
            seen[value] = self.sub(key)
        return value

    def child(self, key: str, required: bool = True) -> _Obj:
        if key not in self.obj:
            if required:
                self.fail("is required", key)
            return _Obj({}, self.sub(key), self.source)
        return _Obj(self.obj.pop(key), self.sub(key), self.source)

    def done(self) -> None:
        for key in self.obj:
            self.fail("unknown key", str(key))


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _ip(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected an IPv4 address, got {_kind(v)}")
    try:
        return str(ipaddress.IPv4Address(v))
    except ValueError:
        raise ValueError(f"{v!r} is not an IPv4 address") from None


def _net(v: Any) -> ipaddress.IPv4Network:
    if not isinstance(v, str):
        raise ValueError(f"expected a CIDR like 10.0.0.0/24, got {_kind(v)}")
    try:
        return ipaddress.IPv4Network(v)
    except ValueError as exc:
        raise ValueError(f"{v!r} is not an IPv4 network: {exc}") from None


def _port(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise ValueError(f"expected a port number 1..65535, got {v!r}")
    return v


def _ensemble(v: Any) -> int:
    if v not in (1, 3, 5) or isinstance(v, bool):
        raise ValueError(f"expected 1, 3 or 5 servers, got {v!r}")
    return v


def _lease(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 3600:
        raise ValueError(f"expected seconds between 0 and 3600, got {v!r}")
    return float(v)


def _addresses(v: Any, subnet: ipaddress.IPv4Network) -> tuple[str, ...]:
    if not isinstance(v, list) or not v:
        raise ValueError("expected a non-empty list of addresses on the internet segment (one per replica)")
    out = tuple(_in(_ip(a), subnet, "internet.subnet") for a in v)
    if len(set(out)) != len(out):
        raise ValueError("an address is listed twice")
    return out


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {v!r}")
    return v


def _mapping(v: Any) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"must be a mapping, got {_kind(v)}")
    return v


def _matching(regex: re.Pattern, what: str):
    def conv(v: Any) -> str:
        if not isinstance(v, str) or not regex.match(v):
            raise ValueError(f"{what} {v!r} must match {regex.pattern}")
        return v

    return conv


def _choice(choices: tuple[str, ...], what: str):
    def conv(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"{what} {v!r} is not one of: {', '.join(choices)}")
        return v

    return conv


def _groups(v: Any) -> tuple[str, ...]:
    from overlay.model import valid_name

    if not isinstance(v, list):
        raise ValueError(f"must be a list of group names, got {_kind(v)}")
    return tuple(valid_name(g, "group") for g in v)


def _in(ip: str, net: ipaddress.IPv4Network, what: str) -> str:
    a = ipaddress.IPv4Address(ip)
    if a not in net:
        raise ValueError(f"{ip} is outside {what} {net}")
    if net.prefixlen < 31 and a in (net.network_address, net.broadcast_address):
        raise ValueError(f"{ip} is the network or broadcast address of {net}")
    return ip


def topology_from_dict(obj: Any, source: str = "<topology>") -> Topology:
    top = _Obj(obj, "", source)
    version = top.get("version", _port, 1)
    if version != 1:
        top.fail(f"version {version} is not supported (only 1)", "version")
    overlay_subnet = top.get("overlay_subnet", _net, ipaddress.IPv4Network("192.168.0.0/18"))
    test_port = top.get("test_port", _port, 7000)
    if test_port in (SSH_PORT, int(STATUS_LISTEN.rsplit(":", 1)[1])):
        top.fail(f"{test_port} is reserved ({SSH_PORT} is the SSH failsafe, 9464 the status endpoint)", "test_port")
    public_range = top.get("public_range", _net, required=True)
    inet = top.child("internet")
    internet_subnet = inet.get("subnet", _net, required=True)
    inet.done()
    if not internet_subnet.subnet_of(public_range):
        top.fail(f"{internet_subnet} is not inside public_range {public_range}", "internet.subnet")
    zk = top.child("zookeeper")
    zk_name = zk.get("name", _matching(HOST_RE, "name"), "zk")
    if zk_name in RESERVED_HOST_NAMES or zk_name.startswith("e-") or zk_name.endswith(("-sw", "-edge")):
        zk.fail(f"{zk_name!r} is reserved for the lab's own devices", "name")
    zk_address = zk.get("address", _ip, required=True)
    zk_port = zk.get("port", _port, 2181)
    ensemble = zk.get("ensemble", _ensemble, 1)
    if ensemble > 1 and len(zk_name) > 14:
        zk.fail(f"{zk_name!r} is too long for an ensemble (at most 14 characters: {zk_name}2 names a device)", "name")
    for i in range(ensemble):
        try:
            _in(str(ipaddress.IPv4Address(zk_address) + i), internet_subnet, "internet.subnet")
        except (ValueError, ipaddress.AddressValueError) as exc:
            zk.fail(f"server {i + 1} of the ensemble: {exc}", "address")
    zk.done()
    ctl = top.child("controller", required=False)
    controller_port = ctl.get("port", _port, CONTROLLER_PORT)
    if controller_port in (zk_port, 2888, 3888):
        ctl.fail(f"{controller_port} is one of ZooKeeper's ports (the controllers run on the ZooKeeper machine)",
                 "port")
    ctl_addresses = ctl.get("addresses", lambda v: _addresses(v, internet_subnet), ())
    lease_s = ctl.get("lease_s", _lease, None)
    ctl.done()
    zk_ips = {str(ipaddress.IPv4Address(zk_address) + i): i + 1 for i in range(ensemble)}
    for i, a in enumerate(ctl_addresses):
        if zk_ips.get(a, 1) != 1:
            ctl.fail(f"{a} is ZooKeeper server {zk_ips[a]}'s address; the controllers run on the first "
                     f"ZooKeeper machine ({zk_address}, or addresses of their own)", f"addresses[{i}]")
    daemon = top.get("daemon", _mapping, {})
    neti = top.get("neti", _mapping, {})
    vagrant = top.get("vagrant", _mapping, {})
    nets_raw = top.get("networks", lambda v: v, required=True)
    if not isinstance(nets_raw, list) or not nets_raw:
        top.fail("must be a non-empty list of networks", "networks")

    networks: list[Network] = []
    seen_hosts: dict[str, str] = {}
    seen_public: dict[str, str] = {a: f"zookeeper server {i}" for a, i in zk_ips.items()}
    for i, a in enumerate(ctl_addresses):
        seen_public.setdefault(a, f"controller.addresses[{i}]")
    for i, raw in enumerate(nets_raw):
        n = _Obj(raw, f"networks[{i}]", source)
        name = n.get("name", _matching(NETWORK_RE, "network name"), required=True)
        if any(x.name == name for x in networks):
            n.fail(f"network {name!r} is listed twice", "name")
        subnet = n.get("subnet", _net, required=True)
        if subnet.prefixlen > 29:
            n.fail(f"{subnet} is too small for a lab network", "subnet")
        registry = n.get("registry", _choice(REGISTRIES, "registry"), "zookeeper")
        public_subnet = n.get("public_subnet", _net, required=True)
        if not public_subnet.subnet_of(public_range):
            n.fail(f"{public_subnet} is not inside public_range {public_range}", "public_subnet")
        if public_subnet.overlaps(internet_subnet):
            n.fail(f"{public_subnet} overlaps internet.subnet {internet_subnet}", "public_subnet")
        for other in networks:
            if public_subnet.overlaps(other.public_subnet):
                n.fail(f"{public_subnet} overlaps network {other.name}'s {other.public_subnet}", "public_subnet")
        for label, cidr in (("overlay_subnet", overlay_subnet), ("public_range", public_range)):
            if subnet.overlaps(cidr):
                n.fail(f"{subnet} overlaps {label} {cidr}", "subnet")
        edge = n.child("edge")
        edge_private = edge.address("private", subnet, "the network's subnet")
        edge_public = edge.address("public", internet_subnet, "internet.subnet", seen_public)
        edge.done()
        hosts_raw = n.get("hosts", lambda v: v, required=True)
        if not isinstance(hosts_raw, list) or not hosts_raw:
            n.fail("must be a non-empty list of hosts", "hosts")
        seen_private = {edge_private: edge.sub("private")}
        hosts: list[Host] = []
        for j, hraw in enumerate(hosts_raw):
            h = _Obj(hraw, f"networks[{i}].hosts[{j}]", source)
            hname = h.get("name", _matching(HOST_RE, "host name"), required=True)
            if hname in (*RESERVED_HOST_NAMES, zk_name) or hname.endswith(("-sw", "-edge")):
                h.fail(f"host name {hname!r} is reserved for the lab's own machines", "name")
            if hname in seen_hosts:
                h.fail(f"host {hname!r} is already defined at {seen_hosts[hname]}", "name")
            seen_hosts[hname] = h.path
            private = h.address("private", subnet, "the network's subnet", seen_private, f" in network {name}")
            public = h.address("public", public_subnet, "the network's public_subnet", seen_public)
            old = h.get("neti", _bool, False)
            if old and not neti:
                h.fail("an old-format host needs the top-level neti section (prefix, vpcflag)", "neti")
            member = h.get("member", _bool, not old)
            if old and member:
                h.fail("an old-format host (neti: true) runs the old system's agent, not the daemon", "member")
            groups = h.get("groups", _groups, ())
            overlay = h.get("overlay", _ip)
            if overlay is not None:
                try:
                    _in(overlay, overlay_subnet, "overlay_subnet")
                except ValueError as exc:
                    h.fail(str(exc), "overlay")
            hdaemon = h.get("daemon", _mapping, {})
            h.done()
            if not member and (groups or overlay or hdaemon):
                h.fail("an outsider (member: false) or old-format host runs no daemon: it has no groups, "
                       "overlay or daemon settings")
            hosts.append(Host(hname, name, private, public, member, groups, overlay, hdaemon, old))
        n.done()
        networks.append(Network(name, subnet, public_subnet, edge_private, edge_public, tuple(hosts), registry))
    top.done()
    zk_names = [zk_name, *(f"{zk_name}{i + 1}" for i in range(1, ensemble))]
    for name in zk_names:
        if name in seen_hosts or name in {f"{n.name}-edge" for n in networks}:
            raise TopologyError(f"{source}: zookeeper.name", f"{name!r} (a ZooKeeper server) is also a host or edge name")
    fixed = [h.overlay for n in networks for h in n.hosts if h.overlay]
    if len(fixed) != len(set(fixed)):
        raise TopologyError(f"{source}: networks", "two hosts have the same fixed overlay address")

    topo = Topology(
        source=source, overlay_subnet=overlay_subnet, test_port=test_port, public_range=public_range,
        internet_subnet=internet_subnet, zk_name=zk_name, zk_address=zk_address, zk_port=zk_port,
        networks=tuple(networks), daemon=daemon, vagrant=vagrant, controller_port=controller_port,
        ensemble=ensemble, controller_addresses=ctl_addresses, lease_s=lease_s, neti=neti,
    )
    from overlay.lab.render import check_daemon_configs  # the configs derive from the topology

    check_daemon_configs(topo)
    return topo
