"""``overlay lab ...``: the netns lab's commands (:mod:`overlay.lab`; docs/lab.md).

    overlay lab up [--no-daemons]       build it (idempotent), step by step with timings
    overlay lab down                    remove everything it made
    overlay lab status [--json]         hosts, addresses, processes, logs
    overlay lab check [--json] [-v]     the connectivity matrix; exit 1 on any mismatch
    overlay lab config HOST [--vagrant] a member's daemon config (also used by vagrant/)
    overlay lab script NODE [--vagrant] a lab machine's network set-up script (also used by vagrant/)
    overlay lab exec NODE [CMD ...]     run a command (default: a shell) inside a lab machine
    overlay lab daemon stop|kill|start HOST, overlay lab zookeeper stop|kill|start [--server N],
    overlay lab controller stop|kill|start [--replica N]
    every command: --name NAME (which lab), --topology FILE
"""

from __future__ import annotations

import json
import os
import sys

from overlay.cli.output import EXIT_FAILURE, EXIT_OK, Parser, add_command, emit, table


def _color() -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    return bool(os.environ.get("FORCE_COLOR")) or sys.stdout.isatty()


def _lab(args, quiet: bool = False):
    import logging

    from overlay.lab.lab import Lab

    # the steps say what happens; the ZooKeeper wrapper's own lines would interleave
    logging.getLogger("overlay.zk.server").setLevel(logging.WARNING)

    return Lab(getattr(args, "topology", None), name=getattr(args, "name", None), emit=None if quiet else emit,
               with_neti=getattr(args, "with_neti", False))


def cmd_up(args) -> int:
    _lab(args).up(daemons=not args.no_daemons, ready_timeout=args.ready_timeout)
    return EXIT_OK


def cmd_move(args) -> int:
    res = _lab(args).move_to_overlay(args.host, ready_timeout=args.ready_timeout)
    emit(f"{res['host']} moved to Overlay in {res['seconds']} s: overlay address {res['overlay_before']} -> "
         f"{res['overlay_after']}", True)
    return EXIT_OK


def cmd_down(args) -> int:
    _lab(args).down()
    return EXIT_OK


def cmd_status(args) -> int:
    status = _lab(args, quiet=True).status()
    if args.json:
        emit(json.dumps(status, indent=2, sort_keys=False))
    else:
        emit(format_status(status))
    return EXIT_OK


def cmd_check(args) -> int:
    from overlay.lab.check import format_matrix

    lab = _lab(args, quiet=True)
    results, ok = lab.check(timeout=args.timeout)
    if args.json:
        emit(json.dumps({"ok": ok, "probes": [r.as_dict() for r in results]}, indent=2))
    else:
        emit(format_matrix(lab.topology(), results, color=_color(), verbose=args.verbose))
    return EXIT_OK if ok else EXIT_FAILURE


def cmd_config(args) -> int:
    from overlay.lab.render import render_config, render_controller_config
    from overlay.lab.topology import lab_place, load_topology

    topo = load_topology(args.topology)
    kwargs = {"target": "vagrant" if args.vagrant else "netns"}
    if not args.vagrant:
        place = lab_place(args.name)
        kwargs["run_dir"] = place.run_dir
    if args.host == topo.zk_name:
        sys.stdout.write(render_controller_config(topo, replica=args.replica or 1, **kwargs))
        return EXIT_OK
    interface = args.interface
    if interface == "auto":
        interface = _interface_with(topo.host(args.host).private)
    if interface:
        kwargs["interface"] = interface
    if not args.vagrant:
        kwargs["pin_dir"] = place.pin_dir
    sys.stdout.write(render_config(topo, args.host, **kwargs))
    return EXIT_OK


def _interface_with(address: str) -> str:
    from overlay.errors import OverlayError
    from overlay.netns import run

    out = run(["ip", "-j", "-4", "addr", "show"]).stdout
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info", []):
            if a.get("local") == address:
                return link["ifname"]
    raise OverlayError(f"--interface auto: no interface on this machine has {address}")


def cmd_grant(args) -> int:
    """The operator's step of ``lab up``: grant each member the groups its topology gives it."""
    if args.vagrant:
        from overlay.config import RegistryConfig
        from overlay.lab.render import registry_prefix
        from overlay.lab.topology import load_topology
        from overlay.zk.layout import grant_groups

        topo = load_topology(args.topology)
        grant_groups(RegistryConfig(hosts=tuple(topo.zookeeper.split(",")), prefix=registry_prefix(topo), timeout_s=10.0),
                     {h.name: tuple(h.groups) for h in topo.members})
        n = len(topo.members)
    else:
        lab = _lab(args, quiet=True)
        topo = lab.topology()
        lab.grant_groups()
        n = len(topo.members)
    emit(f"granted the topology's groups to {n} members")
    return EXIT_OK


def cmd_script(args) -> int:
    from overlay.lab.render import node_script
    from overlay.lab.topology import load_topology

    topo = load_topology(args.topology)
    if args.node not in topo.node_names():
        from overlay.errors import OverlayError

        raise OverlayError(f"no lab machine {args.node!r} (one of: {', '.join(topo.node_names())})")
    sys.stdout.write(node_script(topo, args.node, "vagrant" if args.vagrant else "netns"))
    return EXIT_OK


def cmd_exec(args) -> int:
    from overlay.netns import nsenter

    ns = _lab(args, quiet=True).namespace_of(args.node)
    argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    argv = argv or [os.environ.get("SHELL", "/bin/sh")]
    full = nsenter(ns, argv)
    os.execvp(full[0], full)
    return EXIT_FAILURE  # not reached


def cmd_daemon(args) -> int:
    import signal

    lab = _lab(args, quiet=True)
    if args.action == "start":
        emit(f"started the daemon of {args.host} (pid {lab.start_daemon(args.host)})")
    else:
        sig = signal.SIGKILL if args.action == "kill" else signal.SIGTERM
        emit(f"{'killed' if args.action == 'kill' else 'stopped'} the daemon of {args.host} "
              f"(pid {lab.kill_daemon(args.host, sig)})")
    return EXIT_OK


def cmd_server(args) -> int:
    """``overlay lab zookeeper|controller stop|kill|start [--server N | --replica N]``."""
    import signal

    lab = _lab(args, quiet=True)
    zookeeper = args.lab_command == "zookeeper"
    which = args.server if zookeeper else args.replica
    start, stop = (lab.zookeeper_start, lab.zookeeper_stop) if zookeeper else (lab.controller_start, lab.controller_stop)
    what = f"{'ZooKeeper' if zookeeper else 'controller'}{f' {which}' if which else ''}"
    if args.action == "start":
        start(which)
        where = lab.topology().zookeeper if zookeeper else ", ".join(lab.topology().controllers)
        emit(f"{what} running ({where})")
        return EXIT_OK
    stop(which, signal.SIGKILL if args.action == "kill" else signal.SIGTERM)
    after = ("its data is kept" if zookeeper else
             "its daemons fail over to another replica, or fail static")
    emit(f"{what} {'killed' if args.action == 'kill' else 'stopped'} ({after}; "
         f"`overlay lab {args.lab_command} start` brings it back)")
    return EXIT_OK


def format_status(s: dict) -> str:
    lines = [f"lab: {s['state']}  (topology {s['topology']}; run dir {s['run_dir']})"]
    z = s["zookeeper_info"]
    zs = f"pid {z['pid']}, running" if z["running"] else "not running"
    lines.append(f"zookeeper {s['zookeeper']} in {z['netns']}: {zs}; log {z['log']}")
    for z in s.get("zookeepers", [])[1:]:
        zs = f"pid {z['pid']}, running" if z["running"] else "not running"
        lines.append(f"zookeeper server {z['server']} {z['address']} in {z['netns']}: {zs}; log {z['log']}")
    c = s.get("controller_info")
    if c is not None:
        for r in s["controllers"]:
            cs = f"pid {r['pid']}, running" if r["running"] else "not running"
            lines.append(f"controller {r['address']} (replica {r['replica']}) in {r['netns']} "
                         f"(for {', '.join(c['networks'])}): {cs}; log {r['log']}")
    rows = [("HOST", "NETWORK", "NETNS", "PRIVATE", "PUBLIC", "OVERLAY", "GROUPS", "DAEMON", "LOG")]
    for h in s["hosts"]:
        d = h.get("daemon")
        n = h.get("neti_agent")
        if n is not None:
            dstate = "old format: " + (f"pid {n['pid']}, running" if n["running"] else "not running")
            logp = n["log"]
        elif d is None:
            dstate, logp = "outsider (no daemon)", h["test_server"]["log"]
        elif not s["daemons"]:
            dstate, logp = "no daemon (--no-daemons)", h["test_server"]["log"]
        else:
            if not d["running"]:
                dstate = "not running"
            else:
                dstate = f"pid {d['pid']} " + ("ready" if d["ready"] else "not ready")
                if d["peers"] is not None:
                    dstate += f", {d['peers']} peers"
                dstate += f" (via {'controller' if h.get('registry') == 'grpc' else 'zookeeper'})"
            logp = d["log"]
        rows.append((h["name"], h["network"], h["netns"], h["private"], h["public"], h["overlay"] or "-",
                     ",".join(h["groups"]) or "-", dstate, logp))
    lines += table(rows)
    lines.append("test-port servers' logs: <run dir>/logs/echo-<host>.log; "
                 "`overlay lab exec HOST` opens a shell in a host")
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("lab", help="the two-network lab in network namespaces (docs/lab.md)",
                       description="The two-network lab in network namespaces (docs/lab.md).")
    lsub = p.add_subparsers(dest="lab_command", metavar="ACTION", parser_class=Parser)

    def add(name: str, func, help: str):
        sp = add_command(lsub, name, func, help)
        sp.add_argument("--topology", metavar="FILE",
                        help="topology file (default: $OVERLAY_LAB_TOPOLOGY or the packaged default; "
                             "a lab that is up keeps the one it was built from)")
        sp.add_argument("--name", metavar="NAME",
                        help="which lab (default: $OVERLAY_LAB_NAME or 'lab'): namespaces ovl-NAME-*, "
                             "/run/overlay-NAME, /sys/fs/bpf/overlay/NAME; labs of different names "
                             "can be up at once")
        return sp

    sp = add("up", cmd_up, "build the lab and start ZooKeeper and the daemons (idempotent)")
    sp.add_argument("--no-daemons", action="store_true",
                    help="build the networks, ZooKeeper and test servers only (no daemons, no overlay)")
    sp.add_argument("--ready-timeout", type=float, default=120.0, metavar="S",
                    help="seconds to wait for the daemons to be ready and converged (default 120)")
    sp.add_argument("--with-neti", action="store_true",
                    help="add old-format (Neti) hosts, <network>-old, that run an emulator of the old system's "
                         "agent; daemons and controllers get registry.neti (docs/lab.md)")
    sp = add("move", cmd_move, "move an old-format host to Overlay: stop its emulator, start a daemon with "
                               "the same id (it keeps its overlay address)")
    sp.add_argument("host")
    sp.add_argument("--ready-timeout", type=float, default=120.0, metavar="S",
                    help="seconds to wait for the daemons to be ready and converged (default 120)")
    add("down", cmd_down, "remove every namespace, process, pinned object and file of the lab")
    sp = add("status", cmd_status, "show the lab's hosts, addresses, processes and log files")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp = add("check", cmd_check, "probe the connectivity matrix against the expected one (exit 1 on a mismatch)")
    sp.add_argument("--json", action="store_true", help="print every probe as JSON")
    sp.add_argument("-v", "--verbose", action="store_true", help="list every probe")
    sp.add_argument("--timeout", type=float, default=3.0, metavar="S", help="connect timeout per probe (default 3)")
    sp = add("config", cmd_config, "print a member's daemon config, or on the ZooKeeper machine the "
                                   "controller's (what the lab and vagrant/ install)")
    sp.add_argument("host", help="a member, or the ZooKeeper machine (zk) for the controller's config")
    sp.add_argument("--vagrant", action="store_true", help="for a Vagrant VM (default pin_root and state_dir)")
    sp.add_argument("--interface", help="the uplink interface; 'auto': the one holding the host's private address")
    sp.add_argument("--replica", type=int, metavar="N", help="on the ZooKeeper machine: replica N's config (default 1)")
    sp = add("grant", cmd_grant, "operator: grant every member the groups of the topology (assignments; "
                                 "`lab up` does it)")
    sp.add_argument("--vagrant", action="store_true", help="from the ZooKeeper VM of the Vagrant lab")
    sp = add("script", cmd_script, "print a lab machine's network set-up script (hosts, <network>-edge, zk)")
    sp.add_argument("node")
    sp.add_argument("--vagrant", action="store_true", help="for a Vagrant VM (finds interfaces by address)")
    sp = add("exec", cmd_exec, "run a command inside a lab machine's namespace (default: a shell)")
    sp.add_argument("node", help="a host, <network>-edge, <network>-sw, inet or the ZooKeeper machine")
    sp.add_argument("cmd", nargs="...", help="the command and its arguments")
    sp = add("daemon", cmd_daemon, "stop (SIGTERM), kill (SIGKILL) or start one lab daemon")
    sp.add_argument("action", choices=["stop", "kill", "start"])
    sp.add_argument("host")
    sp = add("zookeeper", cmd_server, "stop (SIGTERM), kill (SIGKILL) or start the lab's ZooKeeper (its data is kept)")
    sp.add_argument("action", choices=["stop", "kill", "start"])
    sp.add_argument("--server", type=int, metavar="N", help="only server N of the ensemble (default: all)")
    sp = add("controller", cmd_server, "stop (SIGTERM), kill (SIGKILL) or start the lab's gRPC controller "
                                       "(networks with registry: grpc)")
    sp.add_argument("action", choices=["stop", "kill", "start"])
    sp.add_argument("--replica", type=int, metavar="N", help="only replica N (default: all)")
