"""Typed, frozen configuration (DESIGN §4.1a).

``load_config(path)`` reads YAML; ``config_from_dict(obj)`` validates a
decoded mapping. Unknown keys are rejected and every error is one
:class:`~overlay.errors.InvalidConfigError` whose message names the key path
(``filter.open_ports[0]``) and the reason.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any

from overlay import addr
from overlay import config_check as cc
from overlay.backends import DATAPATHS, PROVIDERS, REGISTRIES, Backends
from overlay.config_neti import NetiConfig, check_neti, check_neti_network, neti_section
from overlay.config_yaml import load_yaml, read_text
from overlay.errors import InvalidConfigError, shown
from overlay.model import Node, node_from_dict, valid_name

DEFAULT_SUBNET = "192.168.0.0/18"
# address providers that also tell this node's network, so that `network` may be left out
NETWORK_PROVIDERS = ("aws-imds",)


@dataclass(frozen=True)
class Addresses:
    private: str
    public: str
    overlay: str | None = None
    private6: str | None = None   # optional single IPv6 addresses (records v2)
    public6: str | None = None


@dataclass(frozen=True)
class Discovery:
    provider: str
    interface: str | None = None          # netlink: the interface whose address is private
    public_interface: str | None = None   # netlink: where the public address lives (default: same)
    endpoint: str = "http://169.254.169.254"  # aws-imds
    timeout_s: float = 2.0
    options: Any = None  # a plugin provider: what its validate_config returned (docs/plugins.md)


@dataclass(frozen=True)
class Auth:
    scheme: str
    user: str
    password: str


@dataclass(frozen=True)
class TlsConfig:
    """PEM files for mutual TLS with the controller (see docs/grpc.md)."""

    ca: str
    cert: str
    key: str
    server_name: str | None = None  # client side: the name the controller's certificate must carry


@dataclass(frozen=True)
class RegistryConfig:
    backend: str = "zookeeper"
    hosts: tuple[str, ...] = ("127.0.0.1:2181",)
    prefix: str = "/overlay"
    timeout_s: float = 10.0
    auth: Auth | None = None
    operator: Auth | None = None
    peers: tuple[Node, ...] = ()  # backend: static
    controller: tuple[str, ...] | None = None  # backend: grpc, "host:port" of each replica, in order
    tls: TlsConfig | None = None   # backend: grpc
    options: Any = None            # a plugin backend: what its validate_config returned
    node_identities: tuple[str, ...] = ()  # with operator: ZooKeeper digest ids that may create records
    neti: NetiConfig | None = None  # backend: zookeeper: the old system's layout, read and joined


@dataclass(frozen=True)
class ControllerLimits:
    """``controller.limits`` (docs/grpc.md, "Limits")."""

    max_concurrent_rpcs: int = 20000   # Watch streams included: above the fleet's size
    watch_streams: int = 4             # concurrent Watch streams per identity
    register_rate: float = 1.0         # RegisterNode calls per second per node identity ...
    register_burst: int = 10           # ... with bursts of this many


@dataclass(frozen=True)
class ControllerConfig:
    """``overlay controller``: where it listens and its mutual-TLS files (docs/grpc.md)."""

    tls: TlsConfig
    listen: str = "127.0.0.1:9470"
    lease_s: float = 60.0       # a node's record outlives its last contact with every replica by this much
    window: int = 10000         # journal revisions a Watch can resume from
    attest_public: tuple[str, ...] = ()   # networks whose nodes' public address = their peer address
    limits: ControllerLimits = field(default_factory=ControllerLimits)


@dataclass(frozen=True)
class MapSizes:
    nat: int = 65536
    peers: int = 65536
    conntrack: int = 262144
    failsafe: int = 1024
    policy: int = 65536       # ovl_policy entries: (identity, proto, port prefix) -> policy
    cidr_ident: int = 4096    # ovl_cidr_ident: the distinct CIDR sources of policies
    names: int = 65536        # ovl_names: policy ids and rules, identities' groups, CIDRs
    conntrack6: int = 65536   # ovl_ct6: IPv6 flows this host initiated
    conntrack_in: int = 65536  # ovl_ct_in: inbound markers (both families)
    frag: int = 8192          # ovl_frag: remembered verdicts of fragmented datagrams
    peers6: int = 65536       # ovl_peers6: peers' IPv6 real addresses
    failsafe6: int = 1024     # ovl_failsafe6: IPv6 failsafe prefixes
    cidr_ident6: int = 4096   # ovl_cidr_ident6: IPv6 policy CIDRs


@dataclass(frozen=True)
class ConntrackConfig:
    """Lifetimes (seconds) of the eBPF datapath's conntrack entries per state,
    and of a fragment's remembered verdict (docs/datapath.md)."""

    tcp_syn_s: int = 120
    tcp_established_s: int = 432000
    tcp_fin_s: int = 120
    tcp_rst_s: int = 10
    udp_s: int = 120
    icmp_s: int = 30
    frag_s: int = 5


@dataclass(frozen=True)
class DatapathConfig:
    backend: str = "ebpf"
    mode: str = "tc"
    interface: str = "eth0"
    overlay_device: str = "ovl0"
    pin_root: str = "/sys/fs/bpf/overlay"
    cgroup: str = "/sys/fs/cgroup"   # socket mode: the cgroup-v2 directory whose sockets are translated
    sizes: MapSizes = field(default_factory=MapSizes)
    conntrack: ConntrackConfig = field(default_factory=ConntrackConfig)
    options: Any = None  # a plugin backend: what its validate_config returned


@dataclass(frozen=True)
class FilterConfig:
    reject_all: bool = False
    mode: str = "enforce"
    open_ports: tuple[tuple[int, int], ...] = ()
    ssh_whitelist: tuple[str, ...] = ()


@dataclass(frozen=True)
class GuardConfig:
    max_change: int = 20
    settle_s: float = 2.0


@dataclass(frozen=True)
class ThrottleConfig:
    min_s: float = 0.0
    max_s: float = 0.0


@dataclass(frozen=True)
class Config:
    node_id: str
    network: str | None  # None: a controller's config, or discovery supplies it (NETWORK_PROVIDERS)
    overlay_subnet: ipaddress.IPv4Network
    addresses: Addresses | None = None
    discovery: Discovery | None = None
    groups: tuple[str, ...] = ()
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    datapath: DatapathConfig = field(default_factory=DatapathConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    nat_overrides: tuple[tuple[str, str], ...] = ()
    guard: GuardConfig = field(default_factory=GuardConfig)
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    status_listen: tuple[str, int] = ("127.0.0.1", 9464)
    state_dir: str = "/var/lib/overlay"
    controller: ControllerConfig | None = None
    control_socket: str = "/run/overlay/control.sock"   # actions (guard release): root only
    metrics_listen: tuple[str, int] | None = None       # /metrics alone

    @property
    def override_routes(self) -> tuple[str, ...]:
        """``nat_overrides`` keys outside the overlay subnet: routed to the overlay device too."""
        return tuple(k for k, _ in self.nat_overrides if ipaddress.IPv4Address(k) not in self.overlay_subnet)


def _auth(path: str, value: Any) -> Auth | None:
    if value is None:
        return None
    sec = cc.Section(value, path)
    scheme = sec.get("scheme", cc.choice("digest"), "digest")
    user = sec.get("user", cc.text, required=True)
    if ":" in user:
        raise InvalidConfigError(sec.sub("user"), "must not contain ':'")
    password = sec.get("password", cc.text, required=True)
    sec.done()
    return Auth(scheme, user, password)


# --- sections ----------------------------------------------------------------------------


def _addresses(sec: cc.Section, subnet: ipaddress.IPv4Network) -> Addresses:
    private = sec.get("private", addr.host_ipv4, required=True)
    public = sec.get("public", addr.host_ipv4, required=True)
    overlay = sec.get("overlay", lambda v: addr.in_subnet_host(v, subnet))
    private6 = sec.get("private6", addr.host_ipv6)
    public6 = sec.get("public6", addr.host_ipv6)
    sec.done()
    return Addresses(private, public, overlay, private6, public6)


def _plugin_options(sec: cc.Section, table: Backends, name: str, key: str) -> Any:
    """For a plugin ``name`` of ``table``: the keys of ``sec`` not read yet, validated by the
    plugin's ``validate_config`` hook (errors at key paths under ``sec``); None for a built-in,
    or a plugin without the hook (then ``sec.done()`` rejects what is left)."""
    hook = table.config_hook(name, sec.sub(key))
    if hook is None:
        return None
    return table.validate_section(name, hook, sec.rest(), sec.path)


def _discovery(sec: cc.Section) -> Discovery:
    provider = sec.get("provider", PROVIDERS.config_name, required=True)
    if provider not in PROVIDERS.builtins:
        options = _plugin_options(sec, PROVIDERS, provider, "provider")
        sec.done()
        return Discovery(provider, options=options)
    interface = sec.get("interface", cc.text)
    public_interface = sec.get("public_interface", cc.text)
    endpoint = sec.get("endpoint", cc.text, Discovery.endpoint)
    timeout_s = sec.get("timeout_s", cc.seconds, Discovery.timeout_s)
    sec.done()
    if provider == "netlink" and interface is None:
        raise InvalidConfigError(sec.sub("interface"), "is required for provider netlink")
    return Discovery(provider, interface, public_interface, endpoint, timeout_s)


def _registry(sec: cc.Section, subnet: ipaddress.IPv4Network) -> RegistryConfig:
    backend = sec.get("backend", REGISTRIES.config_name, RegistryConfig.backend)
    if backend not in REGISTRIES.builtins:  # a plugin: timeout_s is the core's, the rest its own
        timeout_s = sec.get("timeout_s", cc.seconds, RegistryConfig.timeout_s)
        options = _plugin_options(sec, REGISTRIES, backend, "backend")
        sec.done()
        return RegistryConfig(backend, hosts=(), timeout_s=timeout_s, options=options)
    hosts = sec.get("hosts", lambda v: cc.list_of(sec.sub("hosts"), v, cc.hosts_port), RegistryConfig.hosts)
    if not hosts:
        raise InvalidConfigError(sec.sub("hosts"), "must list at least one host:port")
    prefix = sec.get("prefix", cc.zk_prefix, RegistryConfig.prefix)
    timeout_s = sec.get("timeout_s", cc.seconds, RegistryConfig.timeout_s)
    auth = _auth(sec.sub("auth"), sec.get("auth", lambda v: v))
    operator = _auth(sec.sub("operator"), sec.get("operator", lambda v: v))
    controller = sec.get("controller", lambda v: cc.controllers(sec.sub("controller"), v))
    tls = _tls(sec.sub("tls"), sec.get("tls", lambda v: v), client=True)
    node_identities = sec.get("node_identities", lambda v: cc.list_of(sec.sub("node_identities"), v, cc.digest_id), ())
    neti = neti_section(sec.section("neti"), cc.zk_prefix) if sec.has("neti") else None
    peers = sec.get(
        "peers",
        lambda v: cc.list_of(sec.sub("peers"), v, lambda p: node_from_dict({"v": 2, **p} if isinstance(p, dict) else p, subnet)),
        (),
    )
    sec.done()
    if backend == "static" and peers:
        seen: set[str] = set()
        for i, node in enumerate(peers):
            if node.node_id in seen:
                raise InvalidConfigError(f"{sec.sub('peers')}[{i}].node_id", f"{node.node_id!r} is listed twice")
            seen.add(node.node_id)
    elif peers:
        raise InvalidConfigError(sec.sub("peers"), "is only allowed with backend: static")
    if backend == "grpc":
        if controller is None:
            raise InvalidConfigError(sec.sub("controller"), "is required for backend: grpc (\"host:port\" of the "
                                     "controller, or a list of its replicas)")
        if tls is None:
            raise InvalidConfigError(sec.sub("tls"), "is required for backend: grpc ({ca, cert, key})")
    else:
        if controller is not None:
            raise InvalidConfigError(sec.sub("controller"), "is only allowed with backend: grpc")
        if tls is not None:
            raise InvalidConfigError(sec.sub("tls"), "is only allowed with backend: grpc")
    if node_identities and operator is None:
        raise InvalidConfigError(sec.sub("node_identities"), "needs registry.operator (it sets the layout's ACLs)")
    check_neti(neti, sec.sub("neti"), backend, prefix)
    return RegistryConfig(backend, hosts, prefix, timeout_s, auth, operator, peers, controller, tls,
                          node_identities=tuple(dict.fromkeys(node_identities)), neti=neti)


def _tls(path: str, value: Any, client: bool) -> TlsConfig | None:
    if value is None:
        return None
    sec = cc.Section(value, path)
    ca = sec.get("ca", cc.text, required=True)
    cert = sec.get("cert", cc.text, required=True)
    key = sec.get("key", cc.text, required=True)
    server_name = sec.get("server_name", cc.text) if client else None
    sec.done()
    return TlsConfig(ca, cert, key, server_name)


def _controller(sec: cc.Section) -> ControllerConfig:
    listen = sec.get("listen", cc.listen, ControllerConfig.listen)
    tls = _tls(sec.sub("tls"), sec.get("tls", lambda v: v), client=False)
    lease_s = sec.get("lease_s", cc.seconds, ControllerConfig.lease_s)
    window = sec.get("window", cc.int_range(16, 1_000_000), ControllerConfig.window)
    attest = sec.get("attest_public", lambda v: cc.list_of(sec.sub("attest_public"), v,
                                                         lambda n: valid_name(n, "network")), ())
    lim = sec.section("limits")
    limits = ControllerLimits(
        lim.get("max_concurrent_rpcs", cc.int_range(16, 1_000_000), ControllerLimits.max_concurrent_rpcs),
        lim.get("watch_streams", cc.int_range(1, 10_000), ControllerLimits.watch_streams),
        lim.get("register_rate", cc.rate, ControllerLimits.register_rate),
        lim.get("register_burst", cc.int_range(1, 100_000), ControllerLimits.register_burst))
    lim.done()
    sec.done()
    if tls is None:
        raise InvalidConfigError(sec.sub("tls"), "is required: the controller serves mutual TLS only ({ca, cert, key})")
    return ControllerConfig(tls, listen, lease_s, window, tuple(dict.fromkeys(attest)), limits)


# datapath.sizes.<key>: (lowest, highest) accepted
_SIZE_RANGES = {
    "nat": (16, 1 << 22), "peers": (16, 1 << 22), "conntrack": (64, 1 << 24), "failsafe": (16, 1 << 16),
    "policy": (16, 1 << 22), "cidr_ident": (16, 1 << 20), "names": (16, 1 << 22),
    "conntrack6": (64, 1 << 24), "conntrack_in": (64, 1 << 24), "frag": (64, 1 << 20),
    "peers6": (16, 1 << 22), "failsafe6": (16, 1 << 16), "cidr_ident6": (16, 1 << 20),
}


def _typed_section(sec: cc.Section, cls, ranges: dict[str, tuple[int, int]]):
    """``cls`` (a frozen dataclass of integers) from ``sec``: each field in its range,
    its dataclass default when absent."""
    default = cls()
    values = {name: sec.get(name, cc.int_range(*ranges[name]), getattr(default, name)) for name in ranges}
    sec.done()
    return cls(**values)


def _sizes(sec: cc.Section) -> MapSizes:
    return _typed_section(sec, MapSizes, _SIZE_RANGES)


_LIFETIME_RANGES = {name: (1, 10_000_000) for name in (
    "tcp_syn_s", "tcp_established_s", "tcp_fin_s", "tcp_rst_s", "udp_s", "icmp_s")} | {"frag_s": (1, 120)}


def _conntrack(sec: cc.Section) -> ConntrackConfig:
    return _typed_section(sec, ConntrackConfig, _LIFETIME_RANGES)


def _datapath(sec: cc.Section) -> DatapathConfig:
    backend = sec.get("backend", DATAPATHS.config_name, DatapathConfig.backend)
    mode = sec.get("mode", cc.choice("tc", "socket"), DatapathConfig.mode)
    interface = sec.get("interface", cc.ifname, DatapathConfig.interface)
    overlay_device = sec.get("overlay_device", cc.ifname, DatapathConfig.overlay_device)
    pin_root = sec.get("pin_root", cc.text, DatapathConfig.pin_root)
    cgroup = sec.get("cgroup", cc.abs_path, DatapathConfig.cgroup)
    sizes = _sizes(sec.section("sizes"))
    conntrack = _conntrack(sec.section("conntrack"))
    options = _plugin_options(sec, DATAPATHS, backend, "backend")  # a plugin: the keys left are its own
    sec.done()
    if mode != "tc" and backend != "ebpf":
        raise InvalidConfigError(sec.sub("mode"), "socket mode needs backend: ebpf")
    return DatapathConfig(backend, mode, interface, overlay_device, pin_root, cgroup, sizes, conntrack, options)


def _filter(sec: cc.Section) -> FilterConfig:
    reject_all = sec.get("reject_all", cc.boolean, FilterConfig.reject_all)
    mode = sec.get("mode", cc.choice("enforce", "audit"), FilterConfig.mode)
    open_ports = sec.get("open_ports", lambda v: cc.list_of(sec.sub("open_ports"), v, addr.port_spec), ())
    whitelist = sec.get("ssh_whitelist", lambda v: cc.list_of(sec.sub("ssh_whitelist"), v, addr.cidr_ip), ())
    sec.done()
    return FilterConfig(reject_all, mode, tuple(sorted(set(open_ports))), tuple(dict.fromkeys(whitelist)))


def _override_key(value: Any, subnet: ipaddress.IPv4Network) -> str:
    """Any host address (the old system's overrides were not limited to the subnet);
    inside the subnet, not its network or broadcast address."""
    key = addr.host_ipv4(value)
    return addr.in_subnet_host(key, subnet) if ipaddress.IPv4Address(key) in subnet else key


def _nat_overrides(path: str, value: Any, subnet: ipaddress.IPv4Network) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidConfigError(path, f"must be a mapping of overlay address to real address, got {cc.kind(value)}")
    out = []
    for key, target in value.items():
        kpath = f"{path}[{shown(key)}]" if not isinstance(key, str) else f"{path}.{key}"
        overlay = cc.convert(kpath, key, lambda v: _override_key(v, subnet))
        real = cc.convert(kpath, target, addr.host_ipv4)
        if real == overlay:
            raise InvalidConfigError(kpath, f"translates {overlay} to itself")
        out.append((overlay, real))
    return tuple(sorted(out))


def _guard(sec: cc.Section) -> GuardConfig:
    g = GuardConfig(
        sec.get("max_change", cc.int_range(0, 1_000_000), GuardConfig.max_change),
        sec.get("settle_s", cc.seconds, GuardConfig.settle_s),
    )
    sec.done()
    return g


def _throttle(sec: cc.Section) -> ThrottleConfig:
    lo = sec.get("min_s", cc.seconds, ThrottleConfig.min_s)
    hi = sec.get("max_s", cc.seconds, ThrottleConfig.max_s)
    sec.done()
    if hi < lo:
        raise InvalidConfigError(sec.sub("max_s"), f"must be at least min_s ({lo}), got {hi}")
    return ThrottleConfig(lo, hi)


def config_from_dict(obj: Any) -> Config:
    top = cc.Section(obj, "")
    subnet = top.get("overlay_subnet", addr.subnet_ipv4, ipaddress.IPv4Network(DEFAULT_SUBNET))
    node_id = top.get("node_id", lambda v: valid_name(v, "node_id"), None)
    if node_id is None:
        node_id = cc.convert("node_id", socket.gethostname().split(".")[0] or "localhost", lambda v: valid_name(v, "node_id (from the hostname)"))
    network = top.get("network", lambda v: valid_name(v, "network"), None)
    addresses = _addresses(top.section("addresses"), subnet) if top.has("addresses") else None
    discovery = _discovery(top.section("discovery")) if top.has("discovery") else None
    if addresses is not None and discovery is not None:
        raise InvalidConfigError("discovery", "give either addresses or discovery, not both")
    groups = top.get("groups", lambda v: cc.list_of("groups", v, lambda g: valid_name(g, "group")), ())
    registry = _registry(top.section("registry"), subnet)
    datapath = _datapath(top.section("datapath"))
    filt = _filter(top.section("filter"))
    overrides = _nat_overrides("nat_overrides", top.get("nat_overrides", lambda v: v), subnet)
    guard = _guard(top.section("guard"))
    throttle = _throttle(top.section("throttle"))
    status_listen = top.get("status_listen", cc.host_port, Config.status_listen)
    state_dir = top.get("state_dir", cc.text, Config.state_dir)
    controller = _controller(top.section("controller")) if top.has("controller") else None
    control_socket = top.get("control_socket", cc.socket_path, Config.control_socket)
    metrics_listen = top.get("metrics_listen", cc.host_port, None)
    top.done()
    check_neti_network(registry.neti, network)
    if network is None and controller is None and (discovery is None or discovery.provider not in NETWORK_PROVIDERS):
        raise InvalidConfigError("network", "is required: the address domain of this node (ec2, vpc, dc1...); "
                                 "peers in the same network are reached at their private address, others at "
                                 f"their public one (discovery provider {', '.join(NETWORK_PROVIDERS)} can supply it)")
    return Config(
        node_id=node_id,
        network=network,
        overlay_subnet=subnet,
        addresses=addresses,
        discovery=discovery,
        groups=tuple(sorted(set(groups))),
        registry=registry,
        datapath=datapath,
        filter=filt,
        nat_overrides=overrides,
        guard=guard,
        throttle=throttle,
        status_listen=status_listen,
        state_dir=state_dir,
        controller=controller,
        control_socket=control_socket,
        metrics_listen=metrics_listen,
    )


def load_config(path: str) -> Config:
    """Read and validate a YAML config file (size, aliases, nesting and integers are
    bounded: :mod:`overlay.config_yaml`)."""
    obj = load_yaml(read_text(path), path)
    if obj is None:
        obj = {}
    return config_from_dict(obj)


def datapath_location(config_path: str | None, interface: str | None = None,
                      pin_root: str | None = None) -> tuple[Config | None, str, str]:
    """Where a datapath lives, for the commands that act on one without the daemon (``maps``,
    ``drops``, ``why``, ``datapath teardown``): ``--interface`` / ``--pin-root`` first, then
    the config file's ``datapath`` section, then its defaults. Returns
    ``(config or None, interface, pin_root)``."""
    config = load_config(config_path) if config_path else None
    dp = config.datapath if config is not None else DatapathConfig()
    return config, interface or dp.interface, pin_root or dp.pin_root
