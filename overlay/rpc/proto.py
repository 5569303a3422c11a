"""The generated gRPC modules of ``proto/overlay.proto`` (``overlay/_gen``, not committed).

A wheel carries them (generated at build time); in a checkout ``scripts/gen_proto.sh``
(run by ``scripts/setup.sh``) generates them.
:func:`modules` imports them; when they are missing (a fresh checkout that skipped
the set-up) it generates them on the fly with ``grpc_tools`` the same way, or
raises one clear :class:`~overlay.errors.OverlayError` saying what to run.
"""

from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType

from overlay.errors import OverlayError
from overlay.resources import data_file

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../overlay
GEN_DIR = os.path.join(_PKG_DIR, "_gen")
SERVICE = "overlay.v1.Registry"

_lock = threading.Lock()
_cache: tuple[ModuleType, ModuleType] | None = None


def modules() -> tuple[ModuleType, ModuleType]:
    """``(overlay_pb2, overlay_pb2_grpc)``, generating them first if they are missing."""
    global _cache
    if _cache is not None:
        return _cache
    with _lock:
        if _cache is None:
            try:
                pb2 = importlib.import_module("overlay._gen.overlay_pb2")
                pb2_grpc = importlib.import_module("overlay._gen.overlay_pb2_grpc")
            except ImportError:
                generate()
                importlib.invalidate_caches()
                pb2 = importlib.import_module("overlay._gen.overlay_pb2")
                pb2_grpc = importlib.import_module("overlay._gen.overlay_pb2_grpc")
            _cache = (pb2, pb2_grpc)
    return _cache


def generate() -> None:
    """What scripts/gen_proto.sh does (:func:`overlay.protogen.generate`), into ``overlay/_gen``."""
    from overlay import protogen

    hint = "run `make test` or scripts/setup.sh (it runs scripts/gen_proto.sh)"
    proto = data_file("proto", "overlay.proto")  # the packaged copy, else the repository's
    if proto is None:
        raise OverlayError(f"the generated gRPC code (overlay/_gen) is missing and overlay.proto is not there; {hint}")
    try:
        protogen.generate(str(proto), GEN_DIR, force=True)
    except protogen.GenerateError as exc:
        raise OverlayError(f"the generated gRPC code (overlay/_gen) is missing and cannot be made: {exc}; {hint}") from None
