"""The project's error kinds <-> gRPC status codes, both ways (DESIGN §7.7).

The servicer leaves every error as a status code (:func:`status_of`); a client turns
a failed call back into the error kind (:func:`raise_for`). Kinds are classes of
:mod:`overlay.errors`; nothing here looks at a message's text except to split an
INVALID_ARGUMENT's ``field: reason``.
"""

from __future__ import annotations

import grpc

from overlay.errors import (
    AllocationExhausted,
    AlreadyExists,
    Contended,
    FailedPrecondition,
    InvalidArgument,
    InvalidRecord,
    NotFound,
    OverlayError,
    PermissionDenied,
    RegistryError,
    Throttled,
    Unavailable,
)

RETRY_PUSHBACK = "grpc-retry-pushback-ms"   # trailing metadata of a Throttled call: when to retry
REQUEST_ID = "overlay-request-id"           # trailing metadata of an internal failure: its log line

# Server side, first match wins (subclasses before their bases).
STATUS_OF: tuple[tuple[type, grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (AllocationExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Throttled, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Contended, grpc.StatusCode.ABORTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (InvalidRecord, grpc.StatusCode.INVALID_ARGUMENT),
    (RegistryError, grpc.StatusCode.UNAVAILABLE),
    (OverlayError, grpc.StatusCode.INTERNAL),
)

# Client side: the kind of a failed call (INVALID_ARGUMENT is split into field and reason;
# RESOURCE_EXHAUSTED with a retry hint is Throttled; any other code is a RegistryError).
ERROR_OF: dict[grpc.StatusCode, type[OverlayError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: AllocationExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.ABORTED: Contended,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def status_of(exc: BaseException) -> grpc.StatusCode | None:
    """The status code an error leaves the servicer with; None for one that is not ours."""
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            return code
    return None


def raise_for(exc: grpc.RpcError, what: str = "") -> OverlayError:
    """The project's error for a failed call (to be raised by the caller)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or str(code)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, sep, reason = details.partition(": ")
        return InvalidArgument(field, reason) if sep else InvalidArgument("", details)
    cls = ERROR_OF.get(code, RegistryError)
    prefix = f"{what}: " if what and not details.startswith(what) else ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return cls(f"{prefix}the controller did not answer in time")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        pushback = trailing(exc, RETRY_PUSHBACK)
        if pushback is not None and pushback.isdigit():
            return Throttled(f"{prefix}{details}", int(pushback) / 1000.0)
    return cls(f"{prefix}{details}")


def trailing(exc: grpc.RpcError, key: str) -> str | None:
    """A trailing metadata value of a failed call, if it has one."""
    try:
        items = exc.trailing_metadata() or ()
    except Exception:  # not a call (a test double), or no metadata
        return None
    for k, v in items:
        if k == key:
            return v if isinstance(v, str) else v.decode("ascii", "replace")
    return None
