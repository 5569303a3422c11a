"""Commands of the controller: ``controller``, ``certs``, and the operator's ``nodes``,
``groups`` and ``policies`` (over gRPC). Registered by overlay/cli.py; heavy imports
happen inside the commands.

Exit status: 0 done; 2 bad usage, invalid config or an argument the controller
refused as invalid; 1 anything else (unreachable, not found, refused).
"""

from __future__ import annotations

import json
import os
import sys

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEFAULT_CONTROLLER = "127.0.0.1:9470"
DEFAULT_CERTS = "/etc/overlay/certs"


def _out(text: str = "") -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(f"overlay: {text}", file=sys.stderr, flush=True)


# --- controller and certs -------------------------------------------------------------------


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
    _out(f"controller serving on {controller.address}")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        controller.stop()
    return EXIT_OK


def cmd_certs_init(args) -> int:
    from overlay.controller import certs

    written = certs.init(args.dir, tuple(args.name or ()), force=args.force)
    if written:
        _out(f"{args.dir}: wrote {', '.join(written)}")
    else:
        _out(f"{args.dir}: CA, controller and operator certificates already present (use --force to replace)")
    return EXIT_OK


def cmd_certs_issue(args) -> int:
    from overlay.controller import certs

    written = certs.issue(args.dir, args.node, force=args.force)
    _out(f"{args.dir}: wrote {', '.join(written)}")
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
            _err(f"invalid argument: {exc}")
            return EXIT_USAGE

    return wrapper


def _ports(values) -> str:
    return ",".join(values) or "-"


@_invalid_is_usage
def cmd_nodes_list(args) -> int:
    with _client(args) as c:
        nodes, rejected, rev = c.list_nodes()
    if args.json:
        _out(json.dumps({"revision": rev, "nodes": [n.to_dict() for n in nodes], "rejected": rejected},
                        indent=2, sort_keys=True))
        return EXIT_OK
    rows = [("NODE_ID", "NETWORK", "PRIVATE", "PUBLIC", "OVERLAY", "GROUPS", "OPEN_PORTS")]
    for n in nodes:
        ports = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in n.open_ports]
        rows.append((n.node_id, n.network, n.private, n.public, n.overlay, ",".join(n.groups) or "-", _ports(ports)))
    _table(rows)
    for node_id, reason in sorted(rejected.items()):
        _out(f"# rejected {node_id}: {reason}")
    _out(f"# {len(nodes)} nodes at revision {rev}")
    return EXIT_OK


@_invalid_is_usage
def cmd_groups_list(args) -> int:
    with _client(args) as c:
        groups, rev = c.list_groups()
    if args.json:
        _out(json.dumps({"revision": rev, "groups": groups}, indent=2, sort_keys=True))
        return EXIT_OK
    _table([("GROUP", "DESCRIPTION"), *sorted(groups.items())])
    _out(f"# {len(groups)} groups at revision {rev}")
    return EXIT_OK


@_invalid_is_usage
def cmd_groups_put(args) -> int:
    from overlay.rpc import convert
    from overlay.rpc.proto import modules

    pb2, _ = modules()
    name, description = convert.group_from_pb(pb2.Group(name=args.name, description=args.description or ""))
    with _client(args) as c:
        rev = c.put_group(name, description, create_only=args.create_only)
    _out(f"group {name} written (revision {rev})")
    return EXIT_OK


@_invalid_is_usage
def cmd_groups_delete(args) -> int:
    with _client(args) as c:
        rev = c.delete_group(args.name)
    _out(f"group {args.name} deleted (revision {rev})")
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
        out = [{"policy_id": r[0], "from": r[1], "to": r[2], "proto": r[3], "ports": r[4]} for r in rows]
        _out(json.dumps({"revision": rev, "policies": out, "rejected": rejected}, indent=2, sort_keys=True))
        return EXIT_OK
    _table([("POLICY", "FROM", "TO", "PROTO", "PORTS"), *((a, b, c_, d, _ports(e)) for a, b, c_, d, e in rows)])
    for pid, reason in sorted(rejected.items()):
        _out(f"# rejected {pid}: {reason}")
    _out(f"# {len(policies)} policies at revision {rev}")
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
    _out(f"policy {policy.policy_id} written (revision {rev})")
    return EXIT_OK


@_invalid_is_usage
def cmd_policies_delete(args) -> int:
    with _client(args) as c:
        rev = c.delete_policy(args.policy_id)
    _out(f"policy {args.policy_id} deleted (revision {rev})")
    return EXIT_OK


def _table(rows) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        _out("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


# --- registration ---------------------------------------------------------------------------


def register(sub, parser_class) -> None:
    def add(parent, name: str, func, help: str):
        sp = parent.add_parser(name, help=help, description=help)
        if func is not None:
            sp.set_defaults(func=func)
        return sp

    sp = add(sub, "controller", cmd_controller, "run the gRPC controller (stores in ZooKeeper)")
    sp.add_argument("-c", "--config", required=True, help="YAML with overlay_subnet, registry and controller")

    sp = add(sub, "certs", None, "mutual-TLS certificates for the controller")
    csub = sp.add_subparsers(dest="certs_command", metavar="ACTION", parser_class=parser_class)
    ci = add(csub, "init", cmd_certs_init, "create ca, controller and operator certificates in a directory")
    ci.add_argument("--dir", required=True, help="where to write ca.crt/.key, controller.crt/.key, operator.crt/.key")
    ci.add_argument("--name", action="append", metavar="NAME",
                    help="another DNS name or IP address of the controller (repeatable; localhost and 127.0.0.1 always)")
    ci.add_argument("--force", action="store_true", help="replace existing files (a new CA invalidates all certificates)")
    cs = add(csub, "issue", cmd_certs_issue, "create a node certificate NODE_ID.crt/.key signed by the CA")
    cs.add_argument("--dir", required=True, help="the directory of `overlay certs init`")
    cs.add_argument("--node", required=True, metavar="NODE_ID", help="the node id the certificate names")
    cs.add_argument("--force", action="store_true", help="replace an existing certificate")

    def conn(p):
        p.add_argument("--controller", default=os.environ.get("OVERLAY_CONTROLLER", DEFAULT_CONTROLLER),
                       help=f"host:port of the controller (default $OVERLAY_CONTROLLER or {DEFAULT_CONTROLLER})")
        p.add_argument("--certs", default=os.environ.get("OVERLAY_CERTS", DEFAULT_CERTS),
                       help=f"directory with ca.crt and the client certificate (default $OVERLAY_CERTS or {DEFAULT_CERTS})")
        p.add_argument("--as", dest="as_name", default="operator", metavar="NAME",
                       help="use NAME.crt/NAME.key from --certs (default operator)")
        p.add_argument("--timeout", type=float, default=10.0, help="deadline of the call in seconds (default 10)")

    sp = add(sub, "nodes", None, "registered nodes (operator, over gRPC)")
    nsub = sp.add_subparsers(dest="nodes_command", metavar="ACTION", parser_class=parser_class)
    nl = add(nsub, "list", cmd_nodes_list, "list registered nodes and ignored records")
    conn(nl)
    nl.add_argument("--json", action="store_true", help="print JSON")

    sp = add(sub, "groups", None, "groups (operator, over gRPC)")
    gsub = sp.add_subparsers(dest="groups_command", metavar="ACTION", parser_class=parser_class)
    gl = add(gsub, "list", cmd_groups_list, "list groups")
    conn(gl)
    gl.add_argument("--json", action="store_true", help="print JSON")
    gp = add(gsub, "put", cmd_groups_put, "create or update a group")
    conn(gp)
    gp.add_argument("name", help="group name")
    gp.add_argument("--description", default="", help="free text")
    gp.add_argument("--create-only", action="store_true", help="fail if the group exists")
    gd = add(gsub, "delete", cmd_groups_delete, "delete a group")
    conn(gd)
    gd.add_argument("name", help="group name")

    sp = add(sub, "policies", None, "policies (operator, over gRPC)")
    psub = sp.add_subparsers(dest="policies_command", metavar="ACTION", parser_class=parser_class)
    pl = add(psub, "list", cmd_policies_list, "list policies and ignored records")
    conn(pl)
    pl.add_argument("--json", action="store_true", help="print JSON")
    pp = add(psub, "put", cmd_policies_put, "create or update a policy")
    conn(pp)
    pp.add_argument("policy_id", help="policy id")
    src = pp.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-group", help="allow from members of this group")
    src.add_argument("--from-cidr", help="allow from this IPv4 network")
    pp.add_argument("--to-group", required=True, help="to members of this group")
    pp.add_argument("--proto", required=True, choices=["tcp", "udp", "icmp"])
    pp.add_argument("--ports", nargs="*", metavar="PORT", help="ports or ranges (80 8000-8100); none for icmp")
    pp.add_argument("--create-only", action="store_true", help="fail if the policy exists")
    pd = add(psub, "delete", cmd_policies_delete, "delete a policy")
    conn(pd)
    pd.add_argument("policy_id", help="policy id")
