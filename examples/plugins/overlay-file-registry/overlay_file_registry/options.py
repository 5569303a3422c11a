"""The plugin's part of the ``registry`` section, and the hook that validates it.

``overlay`` reads ``registry.backend`` (and ``registry.timeout_s``, common to every
registry) and hands the rest of the section to :func:`validate_config`. Errors name key
paths relative to the section (``directory``); overlay prefixes ``registry.``, so the
user reads ``registry.directory: is required``, like the errors of the built-in backends.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from overlay.errors import InvalidConfigError

WATCH_MODES = ("auto", "inotify", "poll")


@dataclass(frozen=True)
class FileRegistryOptions:
    """``registry.directory``, ``registry.watch``, ``registry.poll_s`` (README.md)."""

    directory: str
    watch: str = "auto"
    poll_s: float = 1.0


def _directory(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidConfigError("directory", f"must be a non-empty string, got {type(value).__name__}")
    if not os.path.isabs(value):
        raise InvalidConfigError("directory", f"must be an absolute path, got {value!r}")
    return os.path.normpath(value)


def _watch(value: Any) -> str:
    if value not in WATCH_MODES:
        raise InvalidConfigError("watch", f"{value!r} is not one of: {', '.join(WATCH_MODES)}")
    return value


def _poll_s(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidConfigError("poll_s", f"must be a number of seconds, got {value!r}")
    if not 0.05 <= value <= 3600:
        raise InvalidConfigError("poll_s", f"must be between 0.05 and 3600 seconds, got {value}")
    return float(value)


_KEYS = {"directory": _directory, "watch": _watch, "poll_s": _poll_s}


def validate_config(section: dict) -> FileRegistryOptions:
    """The hook overlay calls with the plugin's keys of ``registry`` (a plain dict)."""
    for key in section:
        if key not in _KEYS:
            raise InvalidConfigError(str(key), f"unknown key for registry.backend file (known: {', '.join(_KEYS)})")
    if "directory" not in section:
        raise InvalidConfigError("directory", "is required: the directory shared by the nodes of this registry")
    values = {key: conv(section[key]) for key, conv in _KEYS.items() if key in section}
    return FileRegistryOptions(**values)
