"""Commands about this node: ``check-config``, ``daemon``, ``status``, ``maps``,
``datapath teardown``, ``guard release`` (``drops`` and ``why`` are
:mod:`overlay.drops_cli`'s). Heavy imports happen inside the commands."""

from __future__ import annotations

import os

from overlay.cli.output import EXIT_OK, Parser, add_command, out, out_json
from overlay.errors import UnsupportedError


def cmd_check_config(args) -> int:
    from overlay.config import load_config

    cfg = load_config(args.file)
    network = cfg.network or (f"from {cfg.discovery.provider}" if cfg.discovery else "-")
    out(f"{args.file}: OK (node {cfg.node_id}, network {network}, "
        f"registry {cfg.registry.backend}, datapath {cfg.datapath.backend})")
    return EXIT_OK


def cmd_daemon(args) -> int:
    from overlay.daemon import run_daemon

    return run_daemon(args.config, dry_run=args.dry_run, log_level=args.log_level, log_format=args.log_format)


def cmd_deregister(args) -> int:
    from overlay.daemon import deregister_node

    node_id = deregister_node(args.config)
    out(f"deregistered {node_id}: its record is removed (stop its daemon first, or it registers again)")
    return EXIT_OK


def cmd_status(args) -> int:
    from overlay.status import fetch_status, format_status

    status = fetch_status(listen=args.listen, config=args.config)
    if args.json:
        out_json(status)
    else:
        out(format_status(status))
    return EXIT_OK


def cmd_maps(args) -> int:
    from overlay.config import datapath_location

    _, iface, root = datapath_location(args.config, args.interface, args.pin_root)
    if os.geteuid() != 0:
        raise UnsupportedError("overlay maps reads pinned BPF maps and needs root")
    from overlay.datapath.ebpf.datapath import read_pinned

    maps = read_pinned(iface, root)
    if args.json:
        out_json(maps)
    else:
        out(format_maps(maps))
    return EXIT_OK


def format_maps(maps: dict) -> str:
    lines = []
    for name, body in maps.items():
        if isinstance(body, dict) and "entries" in body:
            entries = body["entries"]
            lines.append(f"{name} ({len(entries)} entries{', max ' + str(body['max_entries']) if 'max_entries' in body else ''})")
            items = entries.items() if isinstance(entries, dict) else enumerate(entries)
            for i, (k, v) in enumerate(items):
                if i >= 50:
                    lines.append(f"  ... {len(entries) - 50} more (use --json)")
                    break
                lines.append(f"  {k} -> {v}" if isinstance(entries, dict) else f"  {v}")
        else:
            lines.append(f"{name}: {body}")
    return "\n".join(lines)


def cmd_datapath_teardown(args) -> int:
    from overlay.daemon import teardown_datapath

    teardown_datapath(args.config, interface=args.interface, pin_root=args.pin_root)
    out("datapath removed")
    return EXIT_OK


def cmd_guard_release(args) -> int:
    from overlay.status import post_action

    result = post_action("guard/release", socket_path=args.socket, config=args.config)
    out(result.get("message", "released"))
    return EXIT_OK


def datapath_options(sp) -> None:
    """``-c/--interface/--pin-root``: where the datapath lives (``config.datapath_location``)."""
    sp.add_argument("-c", "--config", help="take interface and pin_root from this config file")
    sp.add_argument("--interface", help="uplink interface (default eth0)")
    sp.add_argument("--pin-root", help="bpffs directory (default /sys/fs/bpf/overlay)")


def register(sub) -> None:
    sp = add_command(sub, "check-config", cmd_check_config, "validate a config file and exit (0 valid, 2 invalid)")
    sp.add_argument("file", help="the YAML config file")

    sp = add_command(sub, "daemon", cmd_daemon, "run the per-host daemon")
    sp.add_argument("-c", "--config", required=True, help="the YAML config file")
    sp.add_argument("--dry-run", action="store_true", help="plan and print the ops, change nothing, exit")

    sp = add_command(sub, "deregister", cmd_deregister,
                     "remove this node's record from the registry for good (stopping the daemon does not)")
    sp.add_argument("-c", "--config", required=True, help="the daemon's YAML config file")

    def status_opts(sp):
        sp.add_argument("-c", "--config", help="read status_listen from this config file")
        sp.add_argument("--listen", help="host:port of the status endpoint (default 127.0.0.1:9464)")

    sp = add_command(sub, "status", cmd_status, "show this node's registration, peers, guard and counters")
    status_opts(sp)
    sp.add_argument("--json", action="store_true", help="print the /status JSON")

    sp = add_command(sub, "maps", cmd_maps, "print the live datapath maps, read from the kernel")
    datapath_options(sp)
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add_command(sub, "datapath", None, "datapath maintenance")
    dsub = sp.add_subparsers(dest="datapath_command", metavar="ACTION", parser_class=Parser)
    td = dsub.add_parser("teardown", help="remove the programs, maps and devices the daemon installed")
    td.set_defaults(func=cmd_datapath_teardown)
    datapath_options(td)

    sp = add_command(sub, "guard", None, "churn guard")
    gsub = sp.add_subparsers(dest="guard_command", metavar="ACTION", parser_class=Parser)
    gr = gsub.add_parser("release", help="let the change the churn guard holds through (root, over the "
                                          "daemon's control socket)")
    gr.set_defaults(func=cmd_guard_release)
    gr.add_argument("-c", "--config", help="read control_socket from this config file")
    gr.add_argument("--socket", help="the daemon's control socket (default /run/overlay/control.sock)")
