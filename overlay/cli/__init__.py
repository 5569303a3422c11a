"""The ``overlay`` command line (console script ``overlay = overlay.cli:main``).

One module per command family: :mod:`~overlay.cli.node` (``check-config``, ``daemon``,
``status``, ``maps``, ``drops``, ``why``, ``datapath``, ``guard``), :mod:`~overlay.cli.lab` (``lab``),
:mod:`~overlay.cli.controller` (``controller`` and the operator's ``nodes``,
``groups``, ``policies``), :mod:`~overlay.cli.certs` (``certs``), :mod:`~overlay.cli.plugins` (``plugins``),
:mod:`~overlay.cli.zk` (``zk``), :mod:`~overlay.cli.audit` (``audit``), and
:mod:`overlay.install_unit` (``install-unit``). :mod:`~overlay.cli.output` holds what
they share. Each family module imports its heavy dependencies inside its commands.

Exit status (DESIGN §4.1): 0 on success, 2 on bad usage or invalid
configuration (the message names the key and the reason), 1 on a runtime
failure. User errors never show a Python traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from overlay import __version__, install_unit
from overlay.cli import audit, certs, controller, lab, node, plugins, zk
from overlay.cli.output import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Parser, err
from overlay.errors import InvalidConfigError, OverlayError

log = logging.getLogger(__name__)

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="overlay", description="Overlay: an overlay network with an eBPF datapath.")
    p.add_argument("--version", action="version", version=f"overlay {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="log lines as text (default) or one JSON object per line (docs/daemon.md)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    node.register(sub)
    lab.register(sub)
    controller.register_server(sub)
    certs.register(sub)
    controller.register_operator(sub)
    zk.register(sub)
    audit.register(sub)
    node.register_drops(sub)
    install_unit.register(sub, Parser)
    plugins.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from overlay.logs import setup_logging

    setup_logging(None, args.log_level, args.log_format)
    # with --log-format json the final error is a JSON log line too, for the same pipeline
    report = err if args.log_format == "text" else log.error
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return func(args)
    except InvalidConfigError as exc:
        report(f"invalid config: {exc}")
        return EXIT_USAGE
    except OverlayError as exc:
        report(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except BrokenPipeError:
        return EXIT_OK
