"""What ``overlay audit`` reads from ZooKeeper: live hosts and allocations of the Overlay
layout and, with ``registry.neti``, of the old one (:class:`overlay.audit.Snapshot`).

Read once with pipelined gets; records that do not validate are left out (as every
daemon leaves them out) and counted in ``invalid``.
"""

from __future__ import annotations

import ipaddress

from overlay.audit import Allocation, Host, Snapshot
from overlay.config import RegistryConfig
from overlay.errors import InvalidRecord
from overlay.model import parse_node_record
from overlay.neti import parse_entry
from overlay.zk import client as zkc
from overlay.zk.layout import Layout
from overlay.zk.neti import NetiPaths


def _allocations(s: zkc.Session, parent: str, layout: str, subnet) -> list[Allocation]:
    names = s.children(parent)
    got = s.get_many([f"{parent}/{n}" for n in names])
    out = []
    for n in names:
        res = got[f"{parent}/{n}"]
        if isinstance(res, tuple):
            ip = res[0].decode("utf-8", "replace").strip()
            try:
                ipaddress.IPv4Address(ip)
            except ValueError:
                continue
            out.append(Allocation(n, ip, layout, res[1].mtime / 1000.0))
    return out


def read_snapshot(reg: RegistryConfig, subnet: ipaddress.IPv4Network) -> tuple[Snapshot, int]:
    """``(snapshot, invalid records left out)``."""
    layout = Layout(reg.prefix)
    client = zkc.new_client(reg)
    s = zkc.Session(max(5.0, 2.0 * reg.timeout_s))
    invalid = 0
    with zkc.translate(f"reading the registry under {reg.prefix} for the audit", ",".join(reg.hosts)):
        client.start(timeout=max(reg.timeout_s, 1.0))
        s.client = client
        try:
            snap = Snapshot(ipaddress.IPv4Network(subnet))
            names = s.children(layout.nodes)
            got = s.get_many([f"{layout.nodes}/{n}" for n in names])
            for n in names:
                res = got[f"{layout.nodes}/{n}"]
                try:
                    if not isinstance(res, tuple):
                        raise InvalidRecord("unreadable")
                    node = parse_node_record(res[0], snap.subnet)
                except InvalidRecord:
                    invalid += 1
                    continue
                snap.hosts.append(Host(node.node_id, "native", node.overlay, node.private, node.public,
                                       node.agent_version))
            snap.allocations += _allocations(s, layout.id_to_ip, "native", subnet)
            if reg.neti is not None:
                paths = NetiPaths(reg.neti)
                entries = []
                for child in s.children(paths.party):
                    try:
                        entries.append(parse_entry(child, snap.subnet))
                    except ValueError:
                        invalid += 1
                owners = s.get_many([f"{paths.ip_to_id}/{e.overlay}" for e in entries])
                for e in entries:
                    res = owners[f"{paths.ip_to_id}/{e.overlay}"]
                    owner = res[0].decode("utf-8", "replace").strip() if isinstance(res, tuple) else None
                    snap.hosts.append(Host(owner or None, "neti", e.overlay, e.private, e.public))
                snap.allocations += _allocations(s, paths.id_to_ip, "neti", subnet)
            return snap, invalid
        finally:
            zkc.close(client)
