"""An emulated host of the old system (Neti), written from its ZooKeeper layout
(docs/migration.md): its ZooKeeper side, which the interop tests use as the old host,
and on which the lab's old-format hosts (:mod:`overlay.lab.neti_agent`) are built.

It does what an old host does in ZooKeeper, and nothing of Overlay's:

- allocation (:func:`old_allocate`): keep ``id-to-ip/<id>`` if it exists; else list
  ``ip-to-id``, pick a random free address of the subnet, create ``id-to-ip/<id>``, then
  create ``ip-to-id/<ip>``; if that address was taken meanwhile, delete ``id-to-ip/<id>``
  and pick again. (We emulate the second step as a create, which fails on an address
  someone else holds; an allocator that overwrote it could collide with anyone, Overlay
  or old, and no reader could tell.)
- membership (:func:`join_party`): one ephemeral child of ``ip-map`` named
  ``<uuid4 hex>-<public>|<private>|<overlay>|<vpcflag>`` with empty data;
- peers (:func:`read_party`): the party's children split by the old rules (first ``-``,
  then ``|`` into four fields), each reached at its private address when its flag equals
  ours, else at its public one.

Runs on a plain kazoo client: it has no part of :mod:`overlay.registry`.
"""

from __future__ import annotations

import ipaddress
import random
import uuid

from kazoo.client import KazooClient
from kazoo.exceptions import NodeExistsError, NoNodeError

from overlay.config_neti import NetiConfig

MAX_TRIES = 200


def old_allocate(client: KazooClient, cfg: NetiConfig, subnet: ipaddress.IPv4Network, instance_id: str,
                 rng: random.Random | None = None) -> str:
    rng = rng or random.SystemRandom()
    id_path = f"{cfg.path(cfg.id_to_ip)}/{instance_id}"
    ip_parent = cfg.path(cfg.ip_to_id)
    client.ensure_path(cfg.path(cfg.id_to_ip))
    client.ensure_path(ip_parent)
    hosts = [str(h) for h in ipaddress.IPv4Network(subnet).hosts()]
    for _ in range(MAX_TRIES):
        try:
            return client.get(id_path)[0].decode()
        except NoNodeError:
            pass
        taken = set(client.get_children(ip_parent))
        free = [h for h in hosts if h not in taken]
        if not free:
            raise RuntimeError(f"subnet {subnet} is full")
        ip = rng.choice(free)
        try:
            client.create(id_path, ip.encode())
        except NodeExistsError:
            continue          # another process of this id: read what it got
        try:
            client.create(f"{ip_parent}/{ip}", instance_id.encode())
            return ip
        except NodeExistsError:
            client.delete(id_path)
    raise RuntimeError(f"allocating for {instance_id}: too many collisions")


def join_party(client: KazooClient, cfg: NetiConfig, public: str, private: str, overlay: str, flag: int) -> str:
    """Add this host to the party (ephemeral, under ``client``'s session); returns the child's path."""
    parent = cfg.path(cfg.ip_map)
    client.ensure_path(parent)
    return client.create(f"{parent}/{uuid.uuid4().hex}-{public}|{private}|{overlay}|{flag}", b"", ephemeral=True)


def read_party(client: KazooClient, cfg: NetiConfig, my_flag: int) -> dict[str, str]:
    """overlay -> the address an old host with ``my_flag`` sends to (entries it cannot split are
    skipped, as an old host's reader would fail on them)."""
    out: dict[str, str] = {}
    for child in client.get_children(cfg.path(cfg.ip_map)):
        _, sep, rest = child.partition("-")
        fields = rest.split("|")
        if not sep or len(fields) != 4 or fields[3] not in ("0", "1"):
            continue
        public, private, overlay, flag = fields
        out[overlay] = private if int(flag) == my_flag else public
    return out
