"""Reading a config mapping (DESIGN §4.1a): the key-path-tracking reader and the value
converters of :mod:`overlay.config`. Pure: no I/O. Each converter raises ``ValueError``
(or :class:`~overlay.errors.InvalidConfigError` with its path), which the reader turns
into one ``InvalidConfigError`` naming the key path and the reason."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from overlay import addr
from overlay.config_hints import unknown_key_reason
from overlay.errors import InvalidConfigError, InvalidRecord, shown
from overlay.model import valid_name

MAX_SECONDS = 3600   # every `*_s` duration key of the config: 0..MAX_SECONDS
IFNAME_MAX = 15      # Linux IFNAMSIZ (16) less the terminating NUL


class Section:
    """Pops keys from a mapping, converting errors to InvalidConfigError with a path."""

    def __init__(self, obj: Any, path: str):
        if obj is None:
            obj = {}
        if not isinstance(obj, dict):
            raise InvalidConfigError(path or "<top>", f"must be a mapping, got {kind(obj)}")
        self._obj = dict(obj)
        self._path = path
        self._known: set[str] = set()  # the keys this section was asked for: the valid ones

    @property
    def path(self) -> str:
        return self._path

    def sub(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def has(self, key: str) -> bool:
        self._known.add(key)
        return key in self._obj

    def get(self, key: str, conv: Callable[[Any], Any], default: Any = None, required: bool = False):
        self._known.add(key)
        if key not in self._obj:
            if required:
                raise InvalidConfigError(self.sub(key), "is required")
            return default
        value = self._obj.pop(key)
        return convert(self.sub(key), value, conv)

    def section(self, key: str) -> Section:
        self._known.add(key)
        return Section(self._obj.pop(key, None), self.sub(key))

    def rest(self) -> dict:
        """Take every key not read yet (a plugin's part of the section)."""
        rest, self._obj = self._obj, {}
        return rest

    def done(self) -> None:
        """Reject what is left: an old-system key with its replacement, else a near miss."""
        for key in self._obj:
            raise InvalidConfigError(self.sub(str(key)), unknown_key_reason(str(key), self._known))


def kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def convert(path: str, value: Any, conv: Callable[[Any], Any]) -> Any:
    try:
        return conv(value)
    except InvalidConfigError:
        raise
    except (ValueError, TypeError, InvalidRecord) as exc:
        raise InvalidConfigError(path, str(exc)) from None


def list_of(path: str, value: Any, conv: Callable[[Any], Any]) -> tuple:
    if not isinstance(value, list):
        raise InvalidConfigError(path, f"must be a list, got {kind(value)}")
    return tuple(convert(f"{path}[{i}]", item, conv) for i, item in enumerate(value))


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {kind(value)}")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {shown(value)}")
    return value


def int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def conv(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {shown(value)}")
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return value

    return conv


def seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number of seconds, got {shown(value)}")
    if not 0 <= value <= MAX_SECONDS:
        raise ValueError(f"must be between 0 and {MAX_SECONDS} seconds, got {value}")
    return float(value)


def choice(*choices: str) -> Callable[[Any], str]:
    def conv(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{shown(value)} is not one of: {', '.join(choices)}")
        return value

    return conv


def host_port(value: Any) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"expected \"host:port\", got {shown(value)}")
    host, _, port_s = value.rpartition(":")
    if not host or not port_s.isdigit():
        raise ValueError(f"expected \"host:port\", got {shown(value)}")
    return host, addr.port(int(port_s))


def hosts_port(value: Any) -> str:
    host_port(value)
    return value


def controllers(path: str, value: Any) -> tuple[str, ...]:
    """One ``"host:port"`` or a non-empty list of them, without repeats."""
    if isinstance(value, str):
        return (convert(path, value, hosts_port),)
    out = list_of(path, value, hosts_port)
    if not out:
        raise InvalidConfigError(path, "must name at least one controller (\"host:port\")")
    for i, hp in enumerate(out):
        if hp in out[:i]:
            raise InvalidConfigError(f"{path}[{i}]", f"{hp!r} is listed twice")
    return out


def zk_prefix(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or value.endswith("/") or "//" in value:
        raise ValueError(f"must be an absolute ZooKeeper path like /overlay, got {shown(value)}")
    for part in value.strip("/").split("/"):
        valid_name(part, "path element")
    return value


def digest_id(value: Any) -> str:
    """A ZooKeeper digest id, ``user:base64(sha1(user:password))`` (``overlay zk digest``)."""
    user, sep, digest = text(value).partition(":")
    if not (sep and user and len(digest) == 28 and digest.endswith("=")
            and all(c.isalnum() or c in "+/=" for c in digest)):
        raise ValueError(f"expected a ZooKeeper digest id \"user:<28 base64 characters>\" "
                         f"(`overlay zk digest USER` prints one), got {shown(value)}")
    return value


def listen(value: Any) -> str:
    """host:port to listen on; port 0 picks a free one (the log says which)."""
    if isinstance(value, str) and value.endswith(":0") and value[:-2]:
        return value
    return hosts_port(value)


def rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100_000:
        raise ValueError(f"must be a number of calls per second in (0, 100000], got {shown(value)}")
    return float(value)


def ifname(value: Any) -> str:
    value = text(value)
    if len(value) > IFNAME_MAX or "/" in value or any(c.isspace() for c in value):
        raise ValueError(f"{shown(value)} is not a valid interface name (at most {IFNAME_MAX} characters, no '/' or spaces)")
    return value


def socket_path(value: Any) -> str:
    value = text(value)
    if not value.startswith("/") or len(value.encode()) > 107:
        raise ValueError(f"must be an absolute path of at most 107 bytes (a unix socket), got {shown(value)}")
    return value


def abs_path(value: Any) -> str:
    value = text(value)
    if not value.startswith("/") or "\0" in value:
        raise ValueError(f"must be an absolute path, got {shown(value)}")
    return os.path.normpath(value)
