"""Commands about this node: ``check-config``, ``daemon``, ``status``, ``maps``, ``drops``,
``why``, ``datapath teardown``, ``guard release``. Heavy imports happen inside the commands.

``maps``, ``drops`` and ``why`` read the live datapath from its pinned maps (no daemon
needed; root), found by :func:`pinned_datapath`. ``drops`` prints the drop counters by
reason, or with ``--follow`` streams the drop events of the ring buffer
(:mod:`overlay.datapath.ebpf.events`); ``why SRC DST PROTO PORT`` explains the verdict the
ingress filter would give a new flow now (:mod:`overlay.datapath.ebpf.why`).
docs/policies.md shows both in use."""

from __future__ import annotations

import argparse
import ipaddress
import os

from overlay.cli.output import EXIT_OK, EXIT_USAGE, Parser, add_command, err, out, out_json
from overlay.errors import DatapathError, UnsupportedError


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


def pinned_datapath(args) -> tuple[str, str]:
    """(interface, pin root) of the live datapath, from ``--interface``/``--pin-root`` or the
    config (``config.datapath_location``); these commands read pinned maps and need root."""
    from overlay.config import datapath_location

    _, iface, root = datapath_location(args.config, args.interface, args.pin_root)
    if os.geteuid() != 0:
        raise UnsupportedError(f"overlay {args.command} reads pinned BPF maps and needs root")
    return iface, root


def _open_pinned_maps(args):
    """The MapSet of the live datapath's pin directory, and that directory."""
    from overlay.datapath.ebpf.datapath import pin_dir_for
    from overlay.datapath.ebpf.maps import MapSet

    pin_dir = pin_dir_for(*pinned_datapath(args))
    if not os.path.isdir(pin_dir):
        raise DatapathError(f"nothing pinned at {pin_dir} (is the datapath loaded? see --interface, --pin-root)")
    return MapSet.from_pinned(pin_dir), pin_dir


def cmd_maps(args) -> int:
    iface, root = pinned_datapath(args)
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


def cmd_drops(args) -> int:
    maps, pin_dir = _open_pinned_maps(args)
    try:
        if not args.follow:
            counts = {k[len("drop_"):]: v for k, v in maps.counters().items() if k.startswith("drop_")}
            if args.json:
                out_json(counts, indent=None)
            else:
                for reason, n in sorted(counts.items()):
                    out(f"{reason:<12} {n}")
            return EXIT_OK
        from overlay.datapath.ebpf.events import follow, format_event

        def show(record: dict) -> None:
            if args.json:
                out_json(record, indent=None)
            else:
                out(format_event(record))

        follow(pin_dir, maps, show, backlog=args.backlog, count=args.count, timeout=args.timeout,
               on_start=lambda: err(f"following drop events of {pin_dir} (Ctrl-C to stop)"))
        return EXIT_OK
    finally:
        maps.close()


def cmd_why(args) -> int:
    if ipaddress.ip_address(args.src).version != ipaddress.ip_address(args.dst).version:
        err(f"why: DST {args.dst} is not of the IP version of SRC {args.src}")
        return EXIT_USAGE
    from overlay.datapath.ebpf.why import LiveMaps, explain

    maps, _ = _open_pinned_maps(args)
    try:
        v = explain(args.src, args.dst, args.proto, args.port, LiveMaps(maps))
    finally:
        maps.close()
    if args.json:
        out_json(v.to_dict(), indent=None)
    else:
        out(v.line())
        for note in v.notes:
            out(f"  note: {note}")
    return EXIT_OK


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.split("%", 1)[0]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 or IPv6 address") from None


def _proto(text: str) -> int:
    from overlay.abi import PROTO_NUMBERS

    t = text.lower()
    if t in PROTO_NUMBERS:
        return PROTO_NUMBERS[t]
    if t.isdigit() and 0 <= int(t) <= 255:
        return int(t)
    raise argparse.ArgumentTypeError(f"{text!r} is not tcp, udp, icmp, icmpv6 or a protocol number")


def _port(text: str) -> int:
    if text == "-":
        return 0
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535, or - for icmp)")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: between 0 and 86400 seconds")
    return value


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


def register_drops(sub) -> None:
    """``drops`` and ``why`` (registered after ``zk``: their place in ``overlay --help``)."""
    sp = add_command(sub, "drops", cmd_drops,
                     "drop counters by reason; --follow streams drop events (reason, policy, flow)")
    datapath_options(sp)
    sp.add_argument("-f", "--follow", action="store_true", help="stream drop events from the ring buffer")
    sp.add_argument("--json", action="store_true", help="JSON (one object per line with --follow)")
    sp.add_argument("--count", type=_positive, help="with --follow: stop after N events")
    sp.add_argument("--timeout", type=_seconds, help="with --follow: stop after S seconds")
    sp.add_argument("--backlog", action="store_true",
                    help="with --follow: also print the events already in the buffer")

    sp = add_command(sub, "why", cmd_why,
                     "explain the verdict this node would give a new flow SRC -> DST PROTO/PORT, from the live maps")
    sp.add_argument("src", type=_ip, metavar="SRC",
                    help="source address, IPv4 or IPv6 (as it arrives: a peer's real address)")
    sp.add_argument("dst", type=_ip, metavar="DST", help="destination address (this node)")
    sp.add_argument("proto", type=_proto, metavar="PROTO", help="tcp, udp, icmp, icmpv6 or a protocol number")
    sp.add_argument("port", type=_port, metavar="PORT", help="destination port (0 or - for icmp)")
    datapath_options(sp)
    sp.add_argument("--json", action="store_true", help="print JSON")
