"""Commands of the controller: ``controller`` (run one), and the operator's ``nodes``,
``groups`` and ``policies`` (over gRPC; ``--controller``, ``--certs``). Heavy imports
happen inside the commands.

Exit status: 0 done; 2 bad usage, invalid config or an argument the controller
refused as invalid; 1 anything else (unreachable, not found, refused).
"""

from __future__ import annotations

import json
import os

from overlay.cli.output import EXIT_OK, EXIT_USAGE, Parser, add_command, err, out, table

DEFAULT_CONTROLLER = "127.0.0.1:9470"
DEFAULT_CERTS = "/etc/overlay/certs"


# --- the controller ---------------------------------------------------------------------------


def cmd_controller(args) -> int:
    import signal
    import threading

    from overlay.config import load_config
    from overlay.controller.server import Controller

    config = load_config(args.config)
    if config.controller is None:
        from overlay.errors import InvalidConfigError

        raise InvalidConfigError("controller", "is required to run the controller ({listen, tls: {ca, cert, key}})")
    controller = Controller(config)
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    controller.start()
    out(f"controller serving on {controller.address}")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        controller.stop()
    return EXIT_OK


# --- operator commands ----------------------------------------------------------------------


def _client(args):
    from overlay.errors import InvalidConfigError
    from overlay.rpc.client import Client
    from overlay.rpc.tls import tls_from_dir

    tls = tls_from_dir(args.certs, args.as_name)
    for f in (tls.ca, tls.cert, tls.key):
        if not os.path.exists(f):
            raise InvalidConfigError("--certs", f"{f} is missing (make it with `overlay certs init --dir {args.certs}`)")
    return Client(args.controller, tls, timeout=args.timeout, path="--certs")


def _invalid_is_usage(func):
    def wrapper(args) -> int:
        from overlay.errors import InvalidArgument

        try:
            return func(args)
        except InvalidArgument as exc:
            err(f"invalid argument: {exc}")
            return EXIT_USAGE

    return wrapper


def _ports(values) -> str:
    return ",".join(values) or "-"


@_invalid_is_usage
def cmd_nodes_list(args) -> int:
    with _client(args) as c:
        nodes, rejected, rev = c.list_nodes()
    if args.json:
        out(json.dumps({"revision": rev, "nodes": [n.to_dict() for n in nodes], "rejected": rejected},
                        indent=2, sort_keys=True))
        return EXIT_OK
    rows = [("NODE_ID", "NETWORK", "PRIVATE", "PUBLIC", "OVERLAY", "GROUPS", "OPEN_PORTS")]
    for n in nodes:
        ports = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in n.open_ports]
        rows.append((n.node_id, n.network, n.private, n.public, n.overlay, ",".join(n.groups) or "-", _ports(ports)))
    _table(rows)
    for node_id, reason in sorted(rejected.items()):
        out(f"# rejected {node_id}: {reason}")
    out(f"# {len(nodes)} nodes at revision {rev}")
    return EXIT_OK


@_invalid_is_usage
def cmd_groups_list(args) -> int:
    with _client(args) as c:
        groups, rev = c.list_groups()
    if args.json:
        out(json.dumps({"revision": rev, "groups": groups}, indent=2, sort_keys=True))
        return EXIT_OK
    _table([("GROUP", "DESCRIPTION"), *sorted(groups.items())])
    out(f"# {len(groups)} groups at revision {rev}")
    return EXIT_OK


@_invalid_is_usage
def cmd_groups_put(args) -> int:
    from overlay.rpc import convert
    from overlay.rpc.proto import modules

    pb2, _ = modules()
    name, description = convert.group_from_pb(pb2.Group(name=args.name, description=args.description or ""))
    with _client(args) as c:
        rev = c.put_group(name, description, create_only=args.create_only)
    out(f"group {name} written (revision {rev})")
    return EXIT_OK


@_invalid_is_usage
def cmd_groups_delete(args) -> int:
    with _client(args) as c:
        rev = c.delete_group(args.name)
    out(f"group {args.name} deleted (revision {rev})")
    return EXIT_OK


@_invalid_is_usage
def cmd_policies_list(args) -> int:
    with _client(args) as c:
        policies, rejected, rev = c.list_policies()
    rows = []
    for p in policies:
        src = f"group:{p.from_group}" if p.WhichOneof("src") == "from_group" else f"cidr:{p.from_cidr}"
        rows.append((p.policy_id, src, f"group:{p.to_group}", p.proto, list(p.ports)))
    if args.json:
        items = [{"policy_id": r[0], "from": r[1], "to": r[2], "proto": r[3], "ports": r[4]} for r in rows]
        out(json.dumps({"revision": rev, "policies": items, "rejected": rejected}, indent=2, sort_keys=True))
        return EXIT_OK
    _table([("POLICY", "FROM", "TO", "PROTO", "PORTS"), *((a, b, c_, d, _ports(e)) for a, b, c_, d, e in rows)])
    for pid, reason in sorted(rejected.items()):
        out(f"# rejected {pid}: {reason}")
    out(f"# {len(policies)} policies at revision {rev}")
    return EXIT_OK


@_invalid_is_usage
def cmd_policies_put(args) -> int:
    from overlay.rpc import convert
    from overlay.rpc.proto import modules

    pb2, _ = modules()
    msg = pb2.Policy(policy_id=args.policy_id, to_group=args.to_group, proto=args.proto, ports=args.ports or [])
    if args.from_group is not None:
        msg.from_group = args.from_group
    else:
        msg.from_cidr = args.from_cidr
    policy = convert.policy_from_pb(msg)  # the same checks as the controller, before connecting
    with _client(args) as c:
        rev = c.put_policy(policy, create_only=args.create_only)
    out(f"policy {policy.policy_id} written (revision {rev})")
    return EXIT_OK


@_invalid_is_usage
def cmd_policies_delete(args) -> int:
    with _client(args) as c:
        rev = c.delete_policy(args.policy_id)
    out(f"policy {args.policy_id} deleted (revision {rev})")
    return EXIT_OK


def _table(rows) -> None:
    for line in table(rows):
        out(line)


# --- registration ---------------------------------------------------------------------------


def register_server(sub) -> None:
    sp = add_command(sub, "controller", cmd_controller, "run the gRPC controller (stores in ZooKeeper)")
    sp.add_argument("-c", "--config", required=True, help="YAML with overlay_subnet, registry and controller")


def register_operator(sub) -> None:
    def conn(p):
        p.add_argument("--controller", default=os.environ.get("OVERLAY_CONTROLLER", DEFAULT_CONTROLLER),
                       help=f"host:port of the controller (default $OVERLAY_CONTROLLER or {DEFAULT_CONTROLLER})")
        p.add_argument("--certs", default=os.environ.get("OVERLAY_CERTS", DEFAULT_CERTS),
                       help=f"directory with ca.crt and the client certificate (default $OVERLAY_CERTS or {DEFAULT_CERTS})")
        p.add_argument("--as", dest="as_name", default="operator", metavar="NAME",
                       help="use NAME.crt/NAME.key from --certs (default operator)")
        p.add_argument("--timeout", type=float, default=10.0, help="deadline of the call in seconds (default 10)")

    sp = add_command(sub, "nodes", None, "registered nodes (operator, over gRPC)")
    nsub = sp.add_subparsers(dest="nodes_command", metavar="ACTION", parser_class=Parser)
    nl = add_command(nsub, "list", cmd_nodes_list, "list registered nodes and ignored records")
    conn(nl)
    nl.add_argument("--json", action="store_true", help="print JSON")

    sp = add_command(sub, "groups", None, "groups (operator, over gRPC)")
    gsub = sp.add_subparsers(dest="groups_command", metavar="ACTION", parser_class=Parser)
    gl = add_command(gsub, "list", cmd_groups_list, "list groups")
    conn(gl)
    gl.add_argument("--json", action="store_true", help="print JSON")
    gp = add_command(gsub, "put", cmd_groups_put, "create or update a group")
    conn(gp)
    gp.add_argument("name", help="group name")
    gp.add_argument("--description", default="", help="free text")
    gp.add_argument("--create-only", action="store_true", help="fail if the group exists")
    gd = add_command(gsub, "delete", cmd_groups_delete, "delete a group")
    conn(gd)
    gd.add_argument("name", help="group name")

    sp = add_command(sub, "policies", None, "policies (operator, over gRPC)")
    psub = sp.add_subparsers(dest="policies_command", metavar="ACTION", parser_class=Parser)
    pl = add_command(psub, "list", cmd_policies_list, "list policies and ignored records")
    conn(pl)
    pl.add_argument("--json", action="store_true", help="print JSON")
    pp = add_command(psub, "put", cmd_policies_put, "create or update a policy")
    conn(pp)
    pp.add_argument("policy_id", help="policy id")
    src = pp.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-group", help="allow from members of this group")
    src.add_argument("--from-cidr", help="allow from this IPv4 network")
    pp.add_argument("--to-group", required=True, help="to members of this group")
    pp.add_argument("--proto", required=True, choices=["tcp", "udp", "icmp"])
    pp.add_argument("--ports", nargs="*", metavar="PORT", help="ports or ranges (80 8000-8100); none for icmp")
    pp.add_argument("--create-only", action="store_true", help="fail if the policy exists")
    pd = add_command(psub, "delete", cmd_policies_delete, "delete a policy")
    conn(pd)
    pd.add_argument("policy_id", help="policy id")
