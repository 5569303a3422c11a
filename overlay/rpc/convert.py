"""Between protobuf messages, model records and journal values.

Request fields are validated here, field by field, so that an INVALID_ARGUMENT
names the field (``node.private``, ``policy.ports[1]``). Journal values are the
JSON-able dicts the controller stores per item (see docs/grpc.md):

    ("node", id)       {"node": <node record, granted groups only>, "order": int} | {"rejected": reason}
    ("policy", id)     {"policy": <policy record>} | {"rejected": reason}
    ("group", name)    {"group": {"description": str}}
    ("config", "max_change")  {"max_change": int}
    ("assignment", id) {"assignment": {"groups": [str]}} | {"rejected": reason}
"""

from __future__ import annotations

import ipaddress
from typing import Any

from overlay import addr
from overlay.errors import InvalidArgument, InvalidRecord
from overlay.model import (
    MAX_GROUPS,
    MAX_PORTS,
    PROTOS,
    Endpoint,
    Node,
    Policy,
    node_from_dict,
    policy_from_dict,
    valid_name,
)

Key = tuple[str, str]
KINDS = ("node", "policy", "group", "config", "assignment")
MAX_DESCRIPTION = 1024


def _check(field: str, conv, value):
    try:
        return conv(value)
    except (ValueError, InvalidRecord) as exc:
        raise InvalidArgument(field, str(exc)) from None


def name_arg(value: str, field: str, what: str = "") -> str:
    """``value`` checked as a name; ``what`` names it in the reason (default: the field's last part)."""
    if not value:
        raise InvalidArgument(field, "is required")
    return _check(field, lambda v: valid_name(v, what or field.rsplit(".", 1)[-1]), value)


def _ports(values, field: str) -> list[str]:
    if len(values) > MAX_PORTS:
        raise InvalidArgument(field, f"has more than {MAX_PORTS} entries")
    out = []
    for i, p in enumerate(values):
        lo, hi = _check(f"{field}[{i}]", addr.port_spec, p)
        out.append(str(lo) if lo == hi else f"{lo}-{hi}")
    return out


def _port_strings(specs: tuple[tuple[int, int], ...]) -> list[str]:
    return [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in specs]


# --- nodes --------------------------------------------------------------------------------


def node_to_pb(pb2, node: Node):
    return pb2.Node(node_id=node.node_id, network=node.network, private=node.private,
                    public=node.public, overlay=node.overlay, groups=list(node.groups),
                    open_ports=_port_strings(node.open_ports), private6=node.private6 or "",
                    public6=node.public6 or "")


def node_from_pb(msg, subnet: ipaddress.IPv4Network, field: str = "node") -> Node:
    """A request's Node, validated field by field (InvalidArgument names the field)."""
    node_id = name_arg(msg.node_id, f"{field}.node_id")
    network = name_arg(msg.network, f"{field}.network")
    for name in ("private", "public"):
        if not getattr(msg, name):
            raise InvalidArgument(f"{field}.{name}", "is required")
        _check(f"{field}.{name}", addr.host_ipv4, getattr(msg, name))
    if not msg.overlay:
        raise InvalidArgument(f"{field}.overlay", "is required (from Allocate)")
    _check(f"{field}.overlay", lambda v: addr.in_subnet_host(v, subnet), msg.overlay)
    if len(msg.groups) > MAX_GROUPS:
        raise InvalidArgument(f"{field}.groups", f"has more than {MAX_GROUPS} groups")
    for i, g in enumerate(msg.groups):
        name_arg(g, f"{field}.groups[{i}]")
    ports = _ports(msg.open_ports, f"{field}.open_ports")
    record = {"v": 1, "node_id": node_id, "network": network, "private": msg.private,
              "public": msg.public, "overlay": msg.overlay, "groups": list(msg.groups),
              "open_ports": ports}
    for name in ("private6", "public6"):
        if getattr(msg, name):
            record[name] = _check(f"{field}.{name}", addr.host_ipv6, getattr(msg, name))
            record["v"] = 2
    return _check(field, lambda r: node_from_dict(r, subnet), record)


def node_record_from_pb(msg) -> dict:
    """A ``Node`` message as a node record (DESIGN §4.2), not validated."""
    return {"v": 1, "node_id": msg.node_id, "network": msg.network, "private": msg.private,
            "public": msg.public, "overlay": msg.overlay, "groups": list(msg.groups),
            "open_ports": [_port_json(p) for p in msg.open_ports]}


def node_from_record(record: dict, subnet: ipaddress.IPv4Network | None = None) -> Node:
    """A journal node record (raises InvalidRecord)."""
    return node_from_dict(record, subnet)


# --- policies and groups --------------------------------------------------------------------


def policy_to_pb(pb2, policy: Policy, policy_id: str | None = None):
    msg = pb2.Policy(policy_id=policy_id if policy_id is not None else policy.policy_id,
                     to_group=policy.dst.group or "", proto=policy.proto,
                     ports=_port_strings(policy.ports))
    if policy.src.group is not None:
        msg.from_group = policy.src.group
    else:
        msg.from_cidr = policy.src.cidr or ""
    return msg


def policy_from_pb(msg, field: str = "policy") -> Policy:
    policy_id = name_arg(msg.policy_id, f"{field}.policy_id")
    which = msg.WhichOneof("src")
    if which is None:
        raise InvalidArgument(f"{field}.from_group", "one of from_group or from_cidr is required")
    if which == "from_group":
        src = Endpoint(group=name_arg(msg.from_group, f"{field}.from_group"))
    else:
        src = Endpoint(cidr=_check(f"{field}.from_cidr", addr.cidr_ipv4, msg.from_cidr))
    dst = Endpoint(group=name_arg(msg.to_group, f"{field}.to_group"))
    if msg.proto not in PROTOS:
        raise InvalidArgument(f"{field}.proto", f"{msg.proto!r} is not one of {', '.join(PROTOS)}")
    ports = _ports(msg.ports, f"{field}.ports")
    if msg.proto == "icmp" and ports:
        raise InvalidArgument(f"{field}.ports", "icmp policies take no ports")
    record = {"v": 1, "from": src.to_dict(), "to": dst.to_dict(), "proto": msg.proto, "ports": ports}
    return _check(field, lambda r: policy_from_dict(r, policy_id), record)


def groups_arg(values, field: str = "groups") -> tuple[str, ...]:
    """Group names of a request (sorted, unique)."""
    if len(values) > MAX_GROUPS:
        raise InvalidArgument(field, f"has more than {MAX_GROUPS} groups")
    return tuple(sorted({name_arg(g, f"{field}[{i}]", "group") for i, g in enumerate(values)}))


def group_from_pb(msg, field: str = "group") -> tuple[str, str]:
    name = name_arg(msg.name, f"{field}.name")
    if len(msg.description) > MAX_DESCRIPTION:
        raise InvalidArgument(f"{field}.description", f"is longer than {MAX_DESCRIPTION} characters")
    return name, msg.description


# --- journal values <-> Change --------------------------------------------------------------


def key_text(key: Key) -> str:
    return f"{key[0]}/{key[1]}"


def key_parse(text: str) -> Key:
    kind, sep, ident = text.partition("/")
    if not sep or kind not in KINDS or not ident:
        raise ValueError(f"bad journal key {text!r}")
    return kind, ident


_KIND_PB = {"node": 1, "policy": 2, "group": 3, "config": 4, "assignment": 5}
_PB_KIND = {v: k for k, v in _KIND_PB.items()}


def change_to_pb(pb2, revision: int, key: Key, value: dict | None):
    """One journal item as a ``Change`` (value None: deleted)."""
    kind, ident = key
    ch = pb2.Change(revision=revision, kind=_KIND_PB[kind], id=ident)
    if value is None:
        ch.deleted = True
    elif "rejected" in value:
        ch.rejected = str(value["rejected"])
    elif kind == "node":
        ch.node.CopyFrom(node_to_pb(pb2, node_from_dict(value["node"])))
        ch.order = int(value.get("order") or 0)
    elif kind == "assignment":
        ch.assignment.CopyFrom(pb2.Assignment(node_id=ident, groups=value["assignment"]["groups"]))
    elif kind == "policy":
        ch.policy.CopyFrom(policy_to_pb(pb2, policy_from_dict(value["policy"], ident), ident))
    elif kind == "group":
        ch.group.CopyFrom(pb2.Group(name=ident, description=value["group"].get("description", "")))
    else:
        ch.max_change = int(value["max_change"])
    return ch


def change_from_pb(ch) -> tuple[Key, dict | None]:
    """A ``Change`` back to (key, journal value); raises ValueError on a malformed one."""
    kind = _PB_KIND.get(ch.kind)
    if kind is None or not ch.id:
        raise ValueError(f"change of unknown kind {ch.kind} or without id")
    key = (kind, ch.id)
    if ch.deleted:
        return key, None
    which = ch.WhichOneof("value")
    if which == "rejected":
        return key, {"rejected": ch.rejected}
    if which == "node" and kind == "node":
        return key, {"node": node_record_from_pb(ch.node), "order": ch.order}
    if which == "assignment" and kind == "assignment":
        return key, {"assignment": {"groups": list(ch.assignment.groups)}}
    if which == "policy" and kind == "policy":
        p = ch.policy
        src: dict[str, Any] = {"group": p.from_group} if p.WhichOneof("src") == "from_group" else {"cidr": p.from_cidr}
        return key, {"policy": {"v": 1, "from": src, "to": {"group": p.to_group}, "proto": p.proto,
                                "ports": [_port_json(x) for x in p.ports]}}
    if which == "group" and kind == "group":
        return key, {"group": {"description": ch.group.description}}
    if which == "max_change" and kind == "config":
        return key, {"max_change": ch.max_change}
    raise ValueError(f"change {kind}/{ch.id} carries {which!r}")


def _port_json(text: str) -> int | str:
    return int(text) if text.isdigit() else text
