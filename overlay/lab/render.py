"""What the lab derives from a topology: daemon and controller configs, network scripts.

Pure, like :mod:`overlay.lab.topology`: the same functions serve both labs
(``target="netns"`` or ``target="vagrant"``), so a VM's daemon config and network
set-up are written by the code that writes the netns lab's.
"""

from __future__ import annotations

import copy
import shlex
from collections.abc import Iterator
from typing import Any

import yaml

from overlay.errors import InvalidConfigError
from overlay.lab.topology import (
    PIN_DIR,
    RUN_DIR,
    STATUS_LISTEN,
    TARGETS,
    VAGRANT_CERTS_DIR,
    Host,
    Names,
    Network,
    Topology,
    TopologyError,
)

# Keys of a member's daemon config that the lab owns (a topology may not set them).
LAB_OWNED = (
    ("node_id",), ("network",), ("addresses",), ("discovery",), ("state_dir",),
    ("status_listen",), ("control_socket",), ("registry", "backend"), ("registry", "hosts"),
    ("registry", "controller"), ("registry", "tls"),
    ("datapath", "interface"), ("datapath", "pin_root"),
)

_MISSING = object()


def _dig(obj: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --- daemon configs ------------------------------------------------------------------


def member_config(
    topo: Topology,
    host: Host | str,
    *,
    target: str = "netns",
    interface: str | None = None,
    run_dir: str = RUN_DIR,
    pin_dir: str = PIN_DIR,
) -> dict:
    """The daemon config (DESIGN §4.1a) of member ``host``, as a mapping.

    ``target="netns"``: uplink ``eth0``, pin_root ``<pin_dir>/<host>`` (bpffs is
    shared by every namespace), state under ``<run_dir>/hosts/<host>/state``.
    ``target="vagrant"``: the VM's lab interface (``interface``), the product's
    default pin_root and state_dir.

    A member of a ``registry: grpc`` network uses the controller's replicas
    (:attr:`Topology.controllers`, in order) with its own node certificate from
    :func:`certs_dir` (``<run_dir>/certs``; Vagrant: ``/etc/overlay/certs``);
    the others use ZooKeeper directly.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}")
    if isinstance(host, str):
        host = topo.host(host)
    if not host.member:
        raise TopologyError(f"{topo.source}: host {host.name}", "is an outsider (member: false): it runs no daemon")
    addresses = {"private": host.private, "public": host.public}
    if host.overlay:
        addresses["overlay"] = host.overlay
    if target == "netns":
        datapath = {"interface": interface or "eth0", "pin_root": f"{pin_dir}/{host.name}"}
        state_dir = f"{run_dir}/hosts/{host.name}/state"
        control = {"control_socket": f"{run_dir}/hosts/{host.name}/run/control.sock"}  # one filesystem for all
    else:
        datapath = {"interface": interface or "eth1", "pin_root": "/sys/fs/bpf/overlay"}
        state_dir = "/var/lib/overlay"
        control = {}
    base = {
        "node_id": host.name,
        "network": host.network,
        "overlay_subnet": str(topo.overlay_subnet),
        "addresses": addresses,
        "groups": list(host.groups),
        "registry": _member_registry(topo, host, certs_dir(target, run_dir)),
        "datapath": {"backend": "ebpf", **datapath},
        "filter": {"reject_all": True, "open_ports": [], "ssh_whitelist": []},
        "status_listen": STATUS_LISTEN,
        "state_dir": state_dir,
        **control,
    }
    return deep_merge(deep_merge(base, topo.daemon), host.daemon)


def certs_dir(target: str = "netns", run_dir: str = RUN_DIR) -> str:
    """Where the lab's certificates are (CA, controller, one per ``registry: grpc`` member)."""
    return f"{run_dir}/certs" if target == "netns" else VAGRANT_CERTS_DIR


def _member_registry(topo: Topology, host: Host, certs: str) -> dict:
    if topo.registry_of(host) == "grpc":
        tls = {"ca": f"{certs}/ca.crt", "cert": f"{certs}/{host.name}.crt", "key": f"{certs}/{host.name}.key"}
        return {"backend": "grpc", "controller": list(topo.controllers), "prefix": "/overlay", "tls": tls}
    return {"backend": "zookeeper", "hosts": topo.zookeeper.split(","), "prefix": "/overlay", **_neti(topo)}


def _neti(topo: Topology) -> dict:
    """``registry.neti`` of the topology's ``neti`` section, for a config on the ZooKeeper backend."""
    return {"neti": copy.deepcopy(topo.neti)} if topo.neti else {}


def neti_config(topo: Topology):
    """The topology's ``neti`` section as the :class:`~overlay.config_neti.NetiConfig` every
    daemon, controller and old-format host of the lab uses (TopologyError naming the key)."""
    from overlay.config import config_from_dict

    flags = topo.neti.get("vpcflag")
    network = next(iter(flags)) if isinstance(flags, dict) and flags else topo.networks[0].name
    cfg = {"node_id": "lab", "network": network, "overlay_subnet": str(topo.overlay_subnet),
           "registry": {"backend": "zookeeper", "hosts": topo.zookeeper.split(","),
                        "prefix": registry_prefix(topo), **_neti(topo)}}
    try:
        return config_from_dict(cfg).registry.neti
    except InvalidConfigError as exc:
        raise TopologyError(f"{topo.source}: {exc.path.replace('registry.neti', 'neti', 1)}", exc.reason) from None


def registry_prefix(topo: Topology) -> str:
    """The members' registry prefix (``daemon.registry.prefix`` of the topology, default ``/overlay``)."""
    prefix = _dig(topo.daemon, ("registry", "prefix"))
    return "/overlay" if prefix is _MISSING else prefix


def controller_config(topo: Topology, *, target: str = "netns", run_dir: str = RUN_DIR, replica: int = 1) -> dict:
    """The config of replica ``replica`` (1, 2, ...) of ``overlay controller`` on the ZooKeeper
    machine (docs/grpc.md), as a mapping.

    It listens at its own address (:attr:`Topology.controllers`) and stores under the members'
    prefix (``daemon.registry.prefix`` of the topology, default ``/overlay``).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}")
    if topo.controller is None:
        raise TopologyError(f"{topo.source}: networks", "no network has registry: grpc, so the lab runs no controller")
    if not 1 <= replica <= len(topo.controllers):
        raise TopologyError(f"{topo.source}: controller.addresses", f"there is no replica {replica}")
    certs = certs_dir(target, run_dir)
    ctl: dict[str, Any] = {
        "listen": topo.controllers[replica - 1],
        "tls": {"ca": f"{certs}/ca.crt", "cert": f"{certs}/controller.crt", "key": f"{certs}/controller.key"},
    }
    if topo.lease_s is not None:
        ctl["lease_s"] = topo.lease_s
    return {
        "node_id": topo.zk_name if replica == 1 else f"{topo.zk_name}-ctl{replica}",
        "overlay_subnet": str(topo.overlay_subnet),
        "registry": {"backend": "zookeeper", "hosts": topo.zookeeper.split(","),
                     "prefix": registry_prefix(topo), **_neti(topo)},
        "controller": ctl,
    }


def render_controller_config(topo: Topology, **kwargs) -> str:
    """``controller_config`` as the YAML file ``overlay controller -c`` reads."""
    head = (
        f"# Controller config of lab machine {topo.zk_name}, written by `overlay lab config {topo.zk_name}`\n"
        f"# from {topo.source}. Keys: docs/grpc.md.\n"
    )
    return head + yaml.safe_dump(controller_config(topo, **kwargs), sort_keys=False, default_flow_style=False)


def validate_member_config(topo: Topology, host: Host) -> None:
    from overlay.config import config_from_dict

    try:
        config_from_dict(member_config(topo, host))
    except InvalidConfigError as exc:
        raise TopologyError(f"{topo.source}: host {host.name}: daemon config {exc.path}", exc.reason) from None


def render_config(topo: Topology, host: Host | str, **kwargs) -> str:
    """``member_config`` as the YAML file the daemon reads (what ``overlay lab config`` prints)."""
    if isinstance(host, str):
        host = topo.host(host)
    cfg = member_config(topo, host, **kwargs)
    head = (
        f"# Daemon config of lab host {host.name} (network {host.network}), written by\n"
        f"# `overlay lab config` from {topo.source}. Keys: DESIGN.md §4.1a, docs/config.md.\n"
    )
    return head + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


# --- per-node network scripts -----------------------------------------------------------
#
# Each lab machine (host, edge, ZooKeeper) gets a POSIX shell script that
# configures its addresses, routes, forwarding, checksum offload and (edges)
# the 1:1 NAT. In the netns lab the interfaces already exist with fixed names
# and the script runs inside the machine's namespace; in a Vagrant VM the
# hypervisor made the interfaces, so the script first finds each one by the
# address Vagrant gave it. Every command is idempotent (replace, not add).

_VAGRANT_PRELUDE = """\
dev_of() { ip -o -4 addr show to "$1/32" | awk '{print $2; exit}'; }
need_dev() {
  d="$(dev_of "$1")"
  if [ -z "$d" ]; then echo "no interface has address $1 (check the Vagrant private networks)" >&2; exit 1; fi
  echo "$d"
}
"""


def _q(s: object) -> str:
    return shlex.quote(str(s))


def edge_nat_rules(topo: Topology, network: Network | str, lan: str, wan: str) -> str:
    """The edge's 1:1 NAT as an ``iptables-restore`` file (the whole nat table)."""
    if isinstance(network, str):
        network = topo.network(network)
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":POSTROUTING ACCEPT [0:0]"]
    for h in network.hosts:
        lines.append(f"-A PREROUTING -i {wan} -d {h.public}/32 -j DNAT --to-destination {h.private}")
    for h in network.hosts:
        lines.append(f"-A POSTROUTING -o {wan} -s {h.private}/32 -j SNAT --to-source {h.public}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def node_script(topo: Topology, node: str, target: str = "netns") -> str:
    """The network set-up script of lab machine ``node`` (a host, ``<network>-edge`` or ZooKeeper)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}")
    vagrant = target == "vagrant"
    out = ["#!/bin/sh", f"# lab machine {node}: network set-up ({target}); written by `overlay lab script`",
           "set -eu"]
    if vagrant:
        out.append(_VAGRANT_PRELUDE.rstrip("\n"))
    else:
        out += ["ip link set lo up",
                "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1"]

    def dev(var: str, name: str, address: str) -> None:
        out.append(f'{var}="$(need_dev {address})"' if vagrant else f"{var}={name}")

    def iface(var: str, address: str, prefixlen: int) -> None:
        out.append(f'ip link set "${var}" up')
        out.append(f'ethtool -K "${var}" tx off rx off >/dev/null')
        out.append(f'ip addr replace {address}/{prefixlen} dev "${var}"')

    servers = dict(topo.zk_servers)
    if node in servers:
        address = servers[node]
        dev("wan", "eth0", address)
        iface("wan", address, topo.internet_subnet.prefixlen)
        if node == topo.zk_name:   # the controllers' own addresses, on the first ZooKeeper machine
            for hp in topo.controllers:
                extra = hp.rpartition(":")[0]
                if extra != address:
                    out.append(f'ip addr replace {extra}/{topo.internet_subnet.prefixlen} dev "$wan"')
        for n in topo.networks:
            out.append(f'ip route replace {n.public_subnet} via {n.edge_public} dev "$wan"')
        return "\n".join(out) + "\n"

    for net in topo.networks:
        if node == net.edge_name:
            dev("lan", "lan", net.edge_private)
            dev("wan", "wan", net.edge_public)
            iface("lan", net.edge_private, net.subnet.prefixlen)
            iface("wan", net.edge_public, topo.internet_subnet.prefixlen)
            out.append("sysctl -qw net.ipv4.ip_forward=1")
            for other in topo.networks:
                if other.name != net.name:
                    out.append(f'ip route replace {other.public_subnet} via {other.edge_public} dev "$wan"')
            rules = edge_nat_rules(topo, net, "$lan", "$wan")
            # unquoted here-doc: $lan and $wan expand to the interface names
            out += ["iptables-restore <<EOF", rules.rstrip("\n"), "EOF"]
            return "\n".join(out) + "\n"

    host = topo.host(node)
    net = topo.network(host.network)
    dev("lan", "eth0", host.private)
    iface("lan", host.private, net.subnet.prefixlen)
    # netns: everything not on the segment goes to the edge (as in a cloud VPC);
    # vagrant: only the public range, the default route stays on the management NIC.
    dst = "default" if not vagrant else str(topo.public_range)
    out.append(f'ip route replace {dst} via {net.edge_private} dev "$lan"')
    return "\n".join(out) + "\n"


def iter_links(topo: Topology, names: Names) -> Iterator[tuple[str, str, str, str]]:
    """The netns lab's veth pairs: (namespace A, device A, namespace B, device B).

    Device A is the switch (or internet) side, enslaved to that namespace's bridge.
    """
    for net in topo.networks:
        for h in net.hosts:
            yield names.switch(net), h.name, names.host(h), "eth0"
        yield names.switch(net), "edge", names.edge(net), "lan"
        yield names.internet, f"e-{net.name}", names.edge(net), "wan"
    for i, (server, _address) in enumerate(topo.zk_servers, start=1):
        yield names.internet, server, names.zookeeper(topo, i), "eth0"


def check_daemon_configs(topo: Topology) -> None:
    """Every config the lab would write from ``topo`` validates (TopologyError naming the
    file and the key otherwise); the keys the lab owns are not set in the topology."""
    for key_path in LAB_OWNED:
        if _dig(topo.daemon, key_path) is not _MISSING:
            raise TopologyError(f"{topo.source}: daemon.{'.'.join(key_path)}", "is set by the lab, per host")
    for host in topo.members:
        for key_path in LAB_OWNED:
            if _dig(host.daemon, key_path) is not _MISSING:
                raise TopologyError(f"{topo.source}: host {host.name}: daemon.{'.'.join(key_path)}",
                                    "is set by the lab, per host")
        validate_member_config(topo, host)
    if topo.neti:
        neti = neti_config(topo)
        for host in topo.neti_hosts:
            if neti.flag_of(host.network) is None:
                raise TopologyError(f"{topo.source}: neti.vpcflag", f"has no flag for network {host.network!r} "
                                    f"of old-format host {host.name}")
    if topo.controller is not None:
        from overlay.config import config_from_dict

        for replica in range(1, len(topo.controllers) + 1):
            try:
                config_from_dict(controller_config(topo, replica=replica))
            except InvalidConfigError as exc:
                raise TopologyError(f"{topo.source}: controller config {exc.path}", exc.reason) from None
