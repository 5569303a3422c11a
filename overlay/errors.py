"""The one exception tree of the project (DESIGN §7.7).

Backends translate their own errors into these at the boundary; nothing
returns False to mean failure.
"""


class OverlayError(Exception):
    """Root of every error this package raises on purpose."""


class InvalidConfigError(OverlayError):
    """A configuration value is wrong. ``path`` names the key (``filter.open_ports[0]``)."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path else reason)


class InvalidRecord(OverlayError):
    """A registry record (node or policy) that does not validate."""


class DatapathError(OverlayError):
    """The datapath could not do what was asked (kernel, bcc, netlink)."""


class UnsupportedError(DatapathError):
    """The host cannot honour the configuration (no bcc, not root, no interface)."""


class CapacityError(DatapathError):
    """An update would not fit the datapath's maps; nothing was applied."""


class RegistryError(OverlayError):
    """The registry failed or refused an operation."""


class AllocationExhausted(RegistryError):
    """No free overlay address is left in the subnet."""
