"""What every command of the ``overlay`` CLI shares: exit codes, output, the argument parser.

Exit status (DESIGN §4.1): 0 on success, 2 on bad usage or invalid configuration
(the message names the key and the reason), 1 on a runtime failure. Output goes to
stdout, flushed at once (commands are piped and followed); messages to stderr,
prefixed ``overlay:``. No ``print`` elsewhere in the package (DESIGN §7.8).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors as exit 2 and no traceback."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        print(f"overlay: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def out(text: str = "") -> None:
    print(text, flush=True)


def emit(text: str, newline: bool = True) -> None:
    """``text`` on stdout, with or without the newline (progress lines that a result completes)."""
    sys.stdout.write(text + ("\n" if newline else ""))
    sys.stdout.flush()


def err(text: str) -> None:
    print(f"overlay: {text}", file=sys.stderr, flush=True)


def out_json(obj: object, *, indent: int | None = 2, sort_keys: bool = True) -> None:
    out(json.dumps(obj, indent=indent, sort_keys=sort_keys))


def table(rows: Sequence[Sequence[object]]) -> list[str]:
    """Left-aligned columns, two spaces apart; the first row is the header."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def add_command(parent, name: str, func, help: str) -> Parser:
    """A subcommand of ``parent`` (a subparsers action) whose help is also its description;
    ``func(args) -> exit status`` runs it (None: a command that only groups actions)."""
    sp = parent.add_parser(name, help=help, description=help)
    if func is not None:
        sp.set_defaults(func=func)
    return sp
