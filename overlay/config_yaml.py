"""Reading operator YAML (config files, lab topologies) with limits that hostile input cannot pass.

``yaml.safe_load`` builds no objects of arbitrary classes, but it still follows every
alias (an "alias bomb" of a few hundred bytes names millions of strings, and an error
message that quotes the value grows with it), recurses once per nesting level, and turns
any run of digits into an integer. :func:`load_yaml` refuses, with one line naming the
problem:

- a file larger than :data:`MAX_BYTES` (1 MiB; a real config is a few KiB);
- more than :data:`MAX_ALIASES` aliases (``*name``);
- nesting deeper than :data:`MAX_DEPTH` levels;
- an integer of more than :data:`MAX_INT_DIGITS` digits.

Each refusal is a :class:`~overlay.errors.InvalidConfigError` (exit status 2).
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent

from overlay.errors import InvalidConfigError

MAX_BYTES = 1024 * 1024
MAX_ALIASES = 100
MAX_DEPTH = 32
MAX_INT_DIGITS = 32


class _Limited(yaml.SafeLoader):
    """A SafeLoader that counts aliases and nesting, and refuses huge integers."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                event = self.peek_event()
                raise ComposerError(None, None, f"more than {MAX_ALIASES} aliases (an alias bomb?)",
                                    event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                event = self.peek_event()
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node):
        digits = sum(c.isdigit() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise ConstructorError(None, None, f"an integer of {digits} digits (at most {MAX_INT_DIGITS})",
                                   node.start_mark)
        return SafeConstructor.construct_yaml_int(self, node)


_Limited.add_constructor("tag:yaml.org,2002:int", _Limited.construct_yaml_int)


def read_text(path: str, what: str = "config file") -> str:
    """The UTF-8 text of ``path``, refusing more than :data:`MAX_BYTES`."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise InvalidConfigError("", f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > MAX_BYTES:
        raise InvalidConfigError("", f"{path} is larger than {MAX_BYTES // 1024} KiB; "
                                     f"a {what} is a few KiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidConfigError("", f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None


def load_yaml(text: str, path: str) -> Any:
    """Parse ``text`` (from ``path``, for messages) within the limits above."""
    if len(text) > MAX_BYTES:
        raise InvalidConfigError("", f"{path} is larger than {MAX_BYTES // 1024} KiB")
    loader = None
    try:
        loader = _Limited(text)
        return loader.get_single_data()
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidConfigError("", f"{path} is not valid YAML{where}: {problem[:200]}") from None
    finally:
        if loader is not None:
            loader.dispose()
