"""The one exception tree of the project (DESIGN §7.7).

Backends translate their own errors into these at the boundary; nothing
returns False to mean failure. An error's kind is its class, never its
message: the registry kinds below (``NotFound``, ``AlreadyExists``,
``FailedPrecondition``, ``Unavailable``, ``Contended``) and ``InvalidArgument`` /
``PermissionDenied`` are what the gRPC layer maps to status codes
(``overlay.rpc.status``), both ways.
"""


import reprlib

SHOWN_CHARS = 200   # at most this much of an offending value appears in a message
_REPR = reprlib.Repr()
_REPR.maxstring = SHOWN_CHARS
_REPR.maxother = SHOWN_CHARS
_REPR.maxlevel = 2
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8


def shown(value: object) -> str:
    """``repr(value)`` cut to about :data:`SHOWN_CHARS` characters (reprlib-style: nested
    containers and long strings elided), for error messages that quote what was wrong."""
    return clip(_REPR.repr(value), SHOWN_CHARS)


def clip(text: str, limit: int = 2 * SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class OverlayError(Exception):
    """Root of every error this package raises on purpose.

    ``internal`` is set (:func:`internal`) on errors whose message describes the backend
    (ZooKeeper hosts, paths): a server tells its client only the kind and a request id."""

    internal = False


def internal(exc: OverlayError) -> OverlayError:
    """Mark ``exc`` as describing the backend (see :class:`OverlayError`); returns it."""
    exc.internal = True
    return exc


class InvalidConfigError(OverlayError):
    """A configuration value is wrong. ``path`` names the key (``filter.open_ports[0]``)."""

    def __init__(self, path: str, reason: str):
        self.path = clip(path, SHOWN_CHARS)
        self.reason = clip(reason)
        super().__init__(f"{self.path}: {self.reason}" if path else self.reason)


class InvalidRecord(OverlayError):
    """A registry record (node or policy) that does not validate."""


class DatapathError(OverlayError):
    """The datapath could not do what was asked (kernel, bcc, netlink)."""


class UnsupportedError(DatapathError):
    """The host cannot honour the configuration (no bcc, not root, no interface)."""


class CapacityError(DatapathError):
    """An update would not fit the datapath's maps; nothing was applied."""


class DiscoveryError(OverlayError):
    """This node's addresses could not be discovered (an address provider failed)."""


class RegistryError(OverlayError):
    """The registry failed or refused an operation."""


class AllocationExhausted(RegistryError):
    """No free overlay address is left in the subnet."""


class NotFound(RegistryError):
    """The node, group or policy does not exist."""


class AlreadyExists(RegistryError):
    """The item exists (create_only), or an address is held by another node."""


class FailedPrecondition(RegistryError):
    """The registry is not in a state that allows the call (an address not allocated)."""


class Unavailable(RegistryError):
    """The registry (ZooKeeper, or for a client the controller) cannot be reached now; retry later."""


class Contended(Unavailable):
    """Concurrent writers kept changing the same item and the call gave up (ABORTED); the
    store is fine: retry."""


class Throttled(Unavailable):
    """A limit of the caller's identity was reached (RESOURCE_EXHAUSTED with a retry hint);
    retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float):
        self.retry_after_s = retry_after_s
        super().__init__(message)


class InvalidArgument(OverlayError):
    """A request field is wrong; ``field`` is its path (``node.private``, ``policy.ports[1]``)."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class PermissionDenied(OverlayError):
    """The caller's certificate does not allow the call."""
