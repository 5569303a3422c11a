"""Errors of the controller's store, one per gRPC status code the servicer maps them to.

All derive from :class:`~overlay.errors.OverlayError` (DESIGN §7.7); the servicer
translates them at the boundary (``servicer.STATUS_OF``), and the gRPC clients
translate status codes back (``client.raise_for``).
"""

from __future__ import annotations

from overlay.errors import OverlayError, RegistryError


class InvalidArgument(OverlayError):
    """A request field is wrong; ``field`` is its path (``node.private``, ``policy.ports[1]``)."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class NotFound(RegistryError):
    """The node, group or policy does not exist."""


class AlreadyExists(RegistryError):
    """The item exists (create_only), or an address is held by another node."""


class FailedPrecondition(RegistryError):
    """The registry is not in a state that allows the call (an address not allocated)."""


class PermissionDenied(OverlayError):
    """The caller's certificate does not allow the call."""


class Unavailable(RegistryError):
    """ZooKeeper (or, for a client, the controller) cannot be reached now; retry later."""
