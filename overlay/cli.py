"""The ``overlay`` command line.

Exit status (DESIGN §4.1): 0 on success, 2 on bad usage or invalid
configuration (the message names the key and the reason), 1 on a runtime
failure. User errors never show a Python traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable

from overlay import __version__
from overlay.errors import InvalidConfigError, OverlayError, UnsupportedError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger(__name__)

# Modules that add their own subcommands (lab, controller, certs, operator commands, drops).
PLUGIN_COMMANDS = (
    "overlay.lab.cli",
    "overlay.controller.cli",
    "overlay.drops_cli",
    "overlay.install_unit",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: exit 2, no traceback
        self.print_usage(sys.stderr)
        print(f"overlay: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _out(text: str = "") -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(f"overlay: {text}", file=sys.stderr, flush=True)


# --- commands -----------------------------------------------------------------------------


def cmd_check_config(args) -> int:
    from overlay.config import load_config

    cfg = load_config(args.file)
    network = cfg.network or (f"from {cfg.discovery.provider}" if cfg.discovery else "-")
    _out(f"{args.file}: OK (node {cfg.node_id}, network {network}, "
         f"registry {cfg.registry.backend}, datapath {cfg.datapath.backend})")
    return EXIT_OK


def cmd_daemon(args) -> int:
    from overlay.daemon import run_daemon

    return run_daemon(args.config, dry_run=args.dry_run, log_level=args.log_level, log_format=args.log_format)


def _fetch_status(listen: str | None, config: str | None) -> dict:
    from overlay.status import fetch_status

    return fetch_status(listen=listen, config=config)


def cmd_status(args) -> int:
    from overlay.status import format_status

    status = _fetch_status(args.listen, args.config)
    _out(json.dumps(status, indent=2, sort_keys=True) if args.json else format_status(status))
    return EXIT_OK


def cmd_maps(args) -> int:
    from overlay.maps_view import format_maps, read_maps

    maps = read_maps(args.config, interface=args.interface, pin_root=args.pin_root)
    _out(json.dumps(maps, indent=2, sort_keys=True) if args.json else format_maps(maps))
    return EXIT_OK


def cmd_datapath_teardown(args) -> int:
    from overlay.daemon import teardown_datapath

    teardown_datapath(args.config, interface=args.interface, pin_root=args.pin_root)
    _out("datapath removed")
    return EXIT_OK


def cmd_guard_release(args) -> int:
    from overlay.status import post_action

    result = post_action("guard/release", listen=args.listen, config=args.config)
    _out(result.get("message", "released"))
    return EXIT_OK


# --- parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="overlay", description="Overlay: an overlay network with an eBPF datapath.")
    p.add_argument("--version", action="version", version=f"overlay {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="log lines as text (default) or one JSON object per line (docs/daemon.md)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    sp = add("check-config", cmd_check_config, "validate a config file and exit (0 valid, 2 invalid)")
    sp.add_argument("file", help="the YAML config file")

    sp = add("daemon", cmd_daemon, "run the per-host daemon")
    sp.add_argument("-c", "--config", required=True, help="the YAML config file")
    sp.add_argument("--dry-run", action="store_true", help="plan and print the ops, change nothing, exit")

    def status_opts(sp):
        sp.add_argument("-c", "--config", help="read status_listen from this config file")
        sp.add_argument("--listen", help="host:port of the status endpoint (default 127.0.0.1:9464)")

    sp = add("status", cmd_status, "show this node's registration, peers, guard and counters")
    status_opts(sp)
    sp.add_argument("--json", action="store_true", help="print the /status JSON")

    def dp_opts(sp):
        sp.add_argument("-c", "--config", help="take interface and pin_root from this config file")
        sp.add_argument("--interface", help="uplink interface (default eth0)")
        sp.add_argument("--pin-root", help="bpffs directory (default /sys/fs/bpf/overlay)")

    sp = add("maps", cmd_maps, "print the live datapath maps, read from the kernel")
    dp_opts(sp)
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add("datapath", None, "datapath maintenance")
    dsub = sp.add_subparsers(dest="datapath_command", metavar="ACTION", parser_class=_Parser)
    td = dsub.add_parser("teardown", help="remove the programs, maps and devices the daemon installed")
    td.set_defaults(func=cmd_datapath_teardown)
    dp_opts(td)

    sp = add("guard", None, "churn guard")
    gsub = sp.add_subparsers(dest="guard_command", metavar="ACTION", parser_class=_Parser)
    gr = gsub.add_parser("release", help="let the change the churn guard holds through")
    gr.set_defaults(func=cmd_guard_release)
    status_opts(gr)

    # Command groups owned by other modules: each exposes register(subparsers, parser_class).
    for modname in PLUGIN_COMMANDS:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue
            raise
        mod.register(sub, _Parser)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from overlay.logs import setup_logging

    setup_logging(None, args.log_level, args.log_format)
    # with --log-format json the final error is a JSON log line too, for the same pipeline
    err = _err if args.log_format == "text" else log.error
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return func(args)
    except InvalidConfigError as exc:
        err(f"invalid config: {exc}")
        return EXIT_USAGE
    except UnsupportedError as exc:
        err(str(exc))
        return EXIT_FAILURE
    except OverlayError as exc:
        err(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
