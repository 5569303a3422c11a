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

    from overlay import sdnotify
    from overlay.config import load_config
    from overlay.controller.server import Controller
    from overlay.logs import setup_logging

    config = load_config(args.config)
    if config.controller is None:
        from overlay.errors import InvalidConfigError

        raise InvalidConfigError("controller", "is required to run the controller ({listen, tls: {ca, cert, key}})")
    setup_logging(config.node_id, args.log_level, args.log_format)
    controller = Controller(config)
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    controller.start()
    out(f"controller serving on {controller.address}")
    sdnotify.notify("READY=1", f"STATUS=serving on {controller.address}")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        sdnotify.notify("STOPPING=1")
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


def _write(args, call, done: str) -> int:
    """One write over gRPC (``call(client) -> revision``); prints ``done (revision N)``."""
    with _client(args) as c:
        rev = call(c)
    out(f"{done} (revision {rev})")
    return EXIT_OK


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
        nodes, rejected, conflicts, rev = c.list_nodes_detail()
    if args.json:
        out(json.dumps({"revision": rev, "nodes": [n.to_dict() for n in nodes], "rejected": rejected,
                        "conflicts": conflicts}, indent=2, sort_keys=True))
        return EXIT_OK
    rows = [("NODE_ID", "NETWORK", "PRIVATE", "PUBLIC", "OVERLAY", "GROUPS", "OPEN_PORTS", "CONFLICT")]
    for n in nodes:
        ports = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in n.open_ports]
        rows.append((n.node_id, n.network, n.private, n.public, n.overlay, ",".join(n.groups) or "-", _ports(ports),
                     conflicts.get(n.node_id, "-")))
    _listing(rows, rejected, f"# {len(nodes)} nodes at revision {rev}"
                             f"{f', {len(conflicts)} excluded by an address conflict' if conflicts else ''}")
    return EXIT_OK


@_invalid_is_usage
def cmd_nodes_deregister(args) -> int:
    return _write(args, lambda c: c.deregister(args.node_id),
                  f"node {args.node_id} deregistered (its record is removed; a daemon still running registers again)")


@_invalid_is_usage
def cmd_nodes_groups(args) -> int:
    """``nodes groups``: list the assignments; ``NODE``: show one; ``NODE G...`` / ``--none``: grant."""
    if args.node is None:
        if args.groups or args.none:
            raise _usage("give the NODE whose groups to set")
        with _client(args) as c:
            assigned, rejected, rev = c.list_node_groups()
        if args.json:
            out(json.dumps({"revision": rev, "assignments": {k: list(v) for k, v in assigned.items()},
                            "rejected": rejected}, indent=2, sort_keys=True))
            return EXIT_OK
        _listing([("NODE_ID", "GRANTED GROUPS"), *((k, ",".join(v) or "-") for k, v in sorted(assigned.items()))],
                 rejected, f"# {len(assigned)} assignments at revision {rev}")
        return EXIT_OK
    if args.groups and args.none:
        raise _usage("give GROUPs or --none, not both")
    if args.groups or args.none:
        from overlay.rpc import convert

        groups = convert.groups_arg(args.groups)   # the controller's checks, before connecting
        return _write(args, lambda c: c.set_node_groups(args.node, groups),
                      f"{args.node} may hold {', '.join(groups) or 'no group'}")
    with _client(args) as c:
        groups, rev = c.get_node_groups(args.node)
    if args.json:
        out(json.dumps({"node_id": args.node, "groups": None if groups is None else list(groups), "revision": rev},
                       indent=2, sort_keys=True))
    elif groups is None:
        out(f"{args.node}: no assignment (it holds no group)")
    else:
        out(f"{args.node}: {', '.join(groups) or 'no group'}")
    return EXIT_OK


def _usage(reason: str):
    from overlay.errors import InvalidArgument

    return InvalidArgument("nodes groups", reason)


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
    return _write(args, lambda c: c.put_group(name, description, create_only=args.create_only),
                  f"group {name} written")


@_invalid_is_usage
def cmd_groups_delete(args) -> int:
    return _write(args, lambda c: c.delete_group(args.name), f"group {args.name} deleted")


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
    _listing([("POLICY", "FROM", "TO", "PROTO", "PORTS"), *((a, b, c_, d, _ports(e)) for a, b, c_, d, e in rows)],
             rejected, f"# {len(policies)} policies at revision {rev}")
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
    return _write(args, lambda c: c.put_policy(policy, create_only=args.create_only),
                  f"policy {policy.policy_id} written")


@_invalid_is_usage
def cmd_policies_delete(args) -> int:
    return _write(args, lambda c: c.delete_policy(args.policy_id), f"policy {args.policy_id} deleted")


def _table(rows) -> None:
    for line in table(rows):
        out(line)


def _listing(rows, rejected: dict[str, str], summary: str) -> None:
    """A table, then the ignored records with their reasons, then ``summary``."""
    _table(rows)
    for key, reason in sorted(rejected.items()):
        out(f"# rejected {key}: {reason}")
    out(summary)


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

    def family(name: str, help: str, list_func, list_help: str):
        """``overlay NAME list [--json]`` and the parser of NAME's other actions."""
        sp = add_command(sub, name, None, help)
        actions = sp.add_subparsers(dest=f"{name}_command", metavar="ACTION", parser_class=Parser)
        action(actions, "list", list_func, list_help).add_argument("--json", action="store_true", help="print JSON")
        return actions

    def action(actions, name: str, func, help: str):
        sp = add_command(actions, name, func, help)
        conn(sp)
        return sp

    nsub = family("nodes", "registered nodes and the groups they may hold (operator, over gRPC)", cmd_nodes_list,
                  "list registered nodes, ignored records and address conflicts")
    ng = action(nsub, "groups", cmd_nodes_groups,
                "the groups a node may hold: list all, show one (NODE), or grant exactly GROUP... (or --none)")
    ng.add_argument("node", nargs="?", metavar="NODE", help="the node id (none: list every assignment)")
    ng.add_argument("groups", nargs="*", metavar="GROUP", help="grant exactly these groups (replaces the assignment)")
    ng.add_argument("--none", action="store_true", help="grant no group")
    ng.add_argument("--json", action="store_true", help="print JSON")
    action(nsub, "deregister", cmd_nodes_deregister,
           "remove a node's record for good (a stopped daemon's record otherwise stays for controller.lease_s)"
           ).add_argument("node_id", help="the node to remove")

    gsub = family("groups", "groups (operator, over gRPC)", cmd_groups_list, "list groups")
    gp = action(gsub, "put", cmd_groups_put, "create or update a group")
    gp.add_argument("name", help="group name")
    gp.add_argument("--description", default="", help="free text")
    gp.add_argument("--create-only", action="store_true", help="fail if the group exists")
    action(gsub, "delete", cmd_groups_delete, "delete a group").add_argument("name", help="group name")

    psub = family("policies", "policies (operator, over gRPC)", cmd_policies_list, "list policies and ignored records")
    pp = action(psub, "put", cmd_policies_put, "create or update a policy")
    pp.add_argument("policy_id", help="policy id")
    src = pp.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-group", help="allow from members of this group")
    src.add_argument("--from-cidr", help="allow from this IPv4 network")
    pp.add_argument("--to-group", required=True, help="to members of this group")
    pp.add_argument("--proto", required=True, choices=["tcp", "udp", "icmp"])
    pp.add_argument("--ports", nargs="*", metavar="PORT", help="ports or ranges (80 8000-8100); none for icmp")
    pp.add_argument("--create-only", action="store_true", help="fail if the policy exists")
    action(psub, "delete", cmd_policies_delete, "delete a policy").add_argument("policy_id", help="policy id")
