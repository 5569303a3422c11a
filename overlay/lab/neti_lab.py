"""The lab's old-format (Neti) hosts, pure: ``--with-neti``, a host moved to Overlay, and
each old host's emulator config (docs/lab.md, "Old-format hosts").

- :func:`with_neti` adds, to a topology's text, the ``neti`` section (when it has none:
  prefix ``/neti``, flags 0, 1 to the networks in order) and one old-format host
  ``<network>-old`` per network that has none, at the first free private address from
  ``.21`` and the public address of the same offset.
- :func:`moved` is the topology with some old-format hosts turned into members (the
  lab's record of ``Lab.move_to_overlay``): same name, network and addresses.
- :func:`agent_config` is what :mod:`overlay.lab.neti_agent` reads.
"""

from __future__ import annotations

import dataclasses
import ipaddress

import yaml

from overlay.lab.topology import Host, Topology, TopologyError, parse_topology

NETI_PREFIX = "/neti"
OLD_OFFSET = 21          # <network>-old's address: the first free one from .21


def with_neti(text: str, source: str = "<topology>") -> str:
    """The topology text with the old-format hosts of ``--with-neti`` added (see the module)."""
    topo = parse_topology(text, source)          # validates what we start from
    obj = yaml.safe_load(text)
    if not topo.neti:
        if len(topo.networks) > 2:
            raise TopologyError(f"{source}: neti", "--with-neti picks flags 0 and 1 for two networks; "
                                "with more, give the neti section (prefix, vpcflag) yourself")
        obj["neti"] = {"prefix": NETI_PREFIX, "vpcflag": {n.name: i for i, n in enumerate(topo.networks)}}
    taken = {h.name for h in topo.hosts}
    for raw, net in zip(obj["networks"], topo.networks, strict=True):
        if any(h.neti for h in net.hosts):
            continue
        name = f"{net.name}-old"
        if name in taken:
            raise TopologyError(f"{source}: networks", f"--with-neti adds host {name!r}, which is already a host")
        used_private = {net.edge_private, *(h.private for h in net.hosts)}
        used_public = {h.public for h in topo.hosts}
        for offset in range(OLD_OFFSET, net.subnet.num_addresses - 1):
            private = str(net.subnet.network_address + offset)
            public = net.public_subnet.network_address + offset
            if (private not in used_private and str(public) not in used_public
                    and public in net.public_subnet and public != net.public_subnet.broadcast_address):
                break
        else:
            raise TopologyError(f"{source}: networks", f"no free address for an old-format host in network {net.name}")
        raw["hosts"].append({"name": name, "private": private, "public": str(public), "neti": True})
    head = (f"# {source} with old-format (Neti) hosts added by `overlay lab up --with-neti`\n"
            "# (docs/lab.md, \"Old-format hosts\").\n")
    return head + yaml.safe_dump(obj, sort_keys=False, default_flow_style=None)


def moved(topo: Topology, names) -> Topology:
    """``topo`` with the old-format hosts ``names`` made members (moved to Overlay)."""
    names = set(names)
    if not names:
        return topo
    unknown = names - {h.name for h in topo.hosts}
    if unknown:
        raise TopologyError(topo.source, f"moved hosts {sorted(unknown)} are not in the topology")

    def host(h: Host) -> Host:
        return dataclasses.replace(h, neti=False, member=True) if h.name in names else h

    nets = tuple(dataclasses.replace(n, hosts=tuple(host(h) for h in n.hosts)) for n in topo.networks)
    return dataclasses.replace(topo, networks=nets)


def agent_config(topo: Topology, host: Host | str, *, run_dir: str) -> dict:
    """The config of the old-format host's emulator (:mod:`overlay.lab.neti_agent`)."""
    from overlay.lab.render import deep_merge, neti_config

    if isinstance(host, str):
        host = topo.host(host)
    if not host.neti:
        raise TopologyError(topo.source, f"host {host.name} is not an old-format host (neti: true)")
    neti = neti_config(topo)
    filt = deep_merge({"reject_all": True, "open_ports": [], "ssh_whitelist": []}, topo.daemon.get("filter") or {})
    return {
        "instance_id": host.name,
        "zookeeper": topo.zookeeper,
        "overlay_subnet": str(topo.overlay_subnet),
        "neti": {"prefix": neti.prefix, "ip_map": neti.ip_map, "id_to_ip": neti.id_to_ip,
                 "ip_to_id": neti.ip_to_id, "max_change": neti.max_change, "vpcflag": dict(neti.vpcflag)},
        "private": host.private,
        "public": host.public,
        "flag": neti.flag_of(host.network),
        "reject_all": bool(filt.get("reject_all")),
        "open_ports": [str(p) for p in filt.get("open_ports") or []],
        "ssh_whitelist": [str(ipaddress.IPv4Network(c)) for c in filt.get("ssh_whitelist") or []],
        "state_file": f"{run_dir}/hosts/{host.name}/neti-state.json",
    }
