"""Records of the registry (DESIGN §4.2): nodes and policies.

Parsing is strict: anything that does not validate raises
:class:`~overlay.errors.InvalidRecord` and nothing else, so a hostile
record can never crash a daemon or widen what is allowed.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any

from overlay import addr
from overlay.errors import InvalidRecord, shown

RECORD_VERSION = 1          # policies; nodes without IPv6 addresses
NODE_RECORD_V6 = 2          # nodes with private6/public6 (older daemons keep reading v1)
MAX_RECORD_BYTES = 4096
MAX_GROUPS = 64
MAX_PORTS = 256
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}\Z")
VERSION_RE = re.compile(r"^[0-9][A-Za-z0-9.+_-]{0,63}\Z")   # a record's optional agent_version
PROTOS = ("tcp", "udp", "icmp")

_NODE_KEYS = {"v", "node_id", "network", "private", "public", "overlay", "groups", "open_ports", "agent_version"}
_NODE_KEYS_V6 = _NODE_KEYS | {"private6", "public6"}
_POLICY_KEYS = {"v", "from", "to", "proto", "ports"}


def valid_name(value: object, what: str) -> str:
    """A node id, network, group or policy id: safe as a ZooKeeper path element."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not NAME_RE.match(value) or value in (".", ".."):
        raise ValueError(
            f"{what} {shown(value)} must be 1-253 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def valid_version(value: object) -> str:
    """A record's ``agent_version``: a digit, then up to 63 of letters, digits, '.', '+', '_', '-'."""
    if not isinstance(value, str) or not VERSION_RE.match(value):
        raise ValueError(f"{shown(value)} is not a version (a digit, then up to 63 of letters, digits, "
                         "'.', '+', '_', '-')")
    return value


def _port_list(value: object, what: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list")
    if len(value) > MAX_PORTS:
        raise ValueError(f"{what} has more than {MAX_PORTS} entries")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(addr.port_spec(item))
        except ValueError as exc:
            raise ValueError(f"{what}[{i}]: {exc}") from None
    return tuple(sorted(set(out)))


def _spec_to_json(spec: tuple[int, int]) -> int | str:
    lo, hi = spec
    return lo if lo == hi else f"{lo}-{hi}"


@dataclass(frozen=True, slots=True)
class Node:
    node_id: str
    network: str
    private: str
    public: str
    overlay: str
    groups: tuple[str, ...] = ()
    open_ports: tuple[tuple[int, int], ...] = ()
    private6: str | None = None
    public6: str | None = None
    # the daemon's version that wrote the record (optional, for `overlay audit`; not part of
    # what a peer is: equal nodes of two versions compare equal)
    agent_version: str | None = field(default=None, compare=False)

    def real_address_from(self, network: str) -> str:
        """The address a node in ``network`` uses to reach this one."""
        return self.private if network == self.network else self.public

    def real6_from(self, network: str) -> str | None:
        """The IPv6 address a node in ``network`` sees this one's packets come
        from (private6 in the same network, else public6), if it has one."""
        return self.private6 if network == self.network else self.public6

    def to_dict(self) -> dict[str, Any]:
        """The record: version 1 unless an IPv6 address is set (then 2, with them)."""
        out: dict[str, Any] = {
            "v": NODE_RECORD_V6 if self.private6 or self.public6 else RECORD_VERSION,
            "node_id": self.node_id,
            "network": self.network,
            "private": self.private,
            "public": self.public,
            "overlay": self.overlay,
            "groups": list(self.groups),
            "open_ports": [_spec_to_json(s) for s in self.open_ports],
        }
        for key in ("private6", "public6", "agent_version"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class Endpoint:
    group: str | None = None
    cidr: str | None = None

    def to_dict(self) -> dict[str, str]:
        return {"group": self.group} if self.group is not None else {"cidr": self.cidr}


@dataclass(frozen=True)
class Policy:
    src: Endpoint
    dst: Endpoint
    proto: str
    ports: tuple[tuple[int, int], ...] = ()
    policy_id: str = field(default="", compare=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": RECORD_VERSION,
            "from": self.src.to_dict(),
            "to": self.dst.to_dict(),
            "proto": self.proto,
            "ports": [_spec_to_json(s) for s in self.ports],
        }


def _load_json_object(data: bytes | str, what: str) -> dict:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidRecord(f"{what} must be bytes, got {type(data).__name__}")
    if len(data) > MAX_RECORD_BYTES:
        raise InvalidRecord(f"{what} is {len(data)} bytes, over the {MAX_RECORD_BYTES}-byte limit")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRecord(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidRecord(f"{what} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidRecord(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _check_version(obj: dict, what: str, versions: tuple[int, ...] = (RECORD_VERSION,)) -> int:
    v = obj.get("v")
    if type(v) is not int or v not in versions:   # not True, not 1.0: an integer
        want = " or ".join(map(str, versions))
        raise InvalidRecord(f"{what}: unsupported version v={v!r} (expected {want})")
    return v


def node_from_dict(obj: Any, subnet: ipaddress.IPv4Network | None = None) -> Node:
    """Validate a decoded node record. ``subnet``, when given, must hold ``overlay``."""
    if not isinstance(obj, dict):
        raise InvalidRecord("node record must be a JSON object")
    version = _check_version(obj, "node record", (RECORD_VERSION, NODE_RECORD_V6))
    unknown = set(obj) - (_NODE_KEYS_V6 if version == NODE_RECORD_V6 else _NODE_KEYS)
    if unknown:
        more = " (private6/public6 need version 2)" if unknown & {"private6", "public6"} else ""
        raise InvalidRecord(f"node record: unknown keys {sorted(map(str, unknown))}{more}")
    key = "node_id"
    try:
        node_id = valid_name(obj.get("node_id"), "node_id")
        key = "network"
        network = valid_name(obj.get("network"), "network")
        key = "private"
        private = addr.host_ipv4(obj.get("private"))
        key = "public"
        public = addr.host_ipv4(obj.get("public"))
        key = "overlay"
        if subnet is not None:
            overlay = addr.in_subnet_host(obj.get("overlay"), subnet)
        else:
            overlay = addr.host_ipv4(obj.get("overlay"))
        key = "groups"
        groups_raw = obj.get("groups", [])
        if not isinstance(groups_raw, list):
            raise ValueError("must be a list of group names")
        if len(groups_raw) > MAX_GROUPS:
            raise ValueError(f"more than {MAX_GROUPS} groups")
        groups = tuple(sorted({valid_name(g, "group") for g in groups_raw}))
        key = "open_ports"
        open_ports = _port_list(obj.get("open_ports", []), "open_ports")
        v6 = {}
        for key in ("private6", "public6"):
            if obj.get(key) is not None:
                v6[key] = addr.host_ipv6(obj[key])
        key = "agent_version"
        if obj.get(key) is not None:
            v6[key] = valid_version(obj[key])
    except ValueError as exc:
        raise InvalidRecord(f"node record: {key}: {exc}") from None
    return Node(node_id, network, private, public, overlay, groups, open_ports, **v6)


def parse_node_record(data: bytes | str, subnet: ipaddress.IPv4Network | None = None) -> Node:
    """Parse a node record from the registry (UTF-8 JSON, at most 4 KiB)."""
    return node_from_dict(_load_json_object(data, "node record"), subnet)


def _serialise(record: dict, what: str) -> bytes:
    """A record as compact UTF-8 JSON (sorted keys), at most MAX_RECORD_BYTES."""
    data = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
    if len(data) > MAX_RECORD_BYTES:
        raise InvalidRecord(f"{what} is {len(data)} bytes, over {MAX_RECORD_BYTES}")
    return data


def serialise_node(node: Node) -> bytes:
    return _serialise(node.to_dict(), "node record")


def _endpoint(obj: Any, what: str, allow_cidr: bool) -> Endpoint:
    if not isinstance(obj, dict) or len(obj) != 1:
        raise ValueError(f"{what} must be an object with exactly one of 'group'" + (" or 'cidr'" if allow_cidr else ""))
    if "group" in obj:
        return Endpoint(group=valid_name(obj["group"], "group"))
    if allow_cidr and "cidr" in obj:
        return Endpoint(cidr=addr.cidr_ip(obj["cidr"]))
    raise ValueError(f"{what} has unknown key {next(iter(obj))!r}")


def policy_from_dict(obj: Any, policy_id: str = "") -> Policy:
    if not isinstance(obj, dict):
        raise InvalidRecord("policy record must be a JSON object")
    _check_version(obj, "policy record")
    unknown = set(obj) - _POLICY_KEYS
    if unknown:
        raise InvalidRecord(f"policy record: unknown keys {sorted(map(str, unknown))}")
    key = "id"
    try:
        if policy_id:
            valid_name(policy_id, "policy id")
        key = "from"
        src = _endpoint(obj.get("from"), "from", allow_cidr=True)
        key = "to"
        dst = _endpoint(obj.get("to"), "to", allow_cidr=False)
        key = "proto"
        proto = obj.get("proto")
        if proto not in PROTOS:
            raise ValueError(f"{proto!r} is not one of {', '.join(PROTOS)}")
        key = "ports"
        ports = _port_list(obj.get("ports", []), "ports")
        if proto == "icmp" and ports:
            raise ValueError("icmp policies take no ports")
    except ValueError as exc:
        raise InvalidRecord(f"policy record: {key}: {exc}") from None
    return Policy(src, dst, proto, ports, policy_id)


def parse_policy_record(data: bytes | str, policy_id: str = "") -> Policy:
    return policy_from_dict(_load_json_object(data, "policy record"), policy_id)


def serialise_policy(policy: Policy) -> bytes:
    return _serialise(policy.to_dict(), "policy record")
