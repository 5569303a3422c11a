"""The generated gRPC modules of ``proto/overlay.proto`` (``overlay/_gen``, not committed).

:func:`generate` is the one generator: ``scripts/gen_proto.sh`` (run by
``scripts/setup.sh`` at install) calls it as ``python -m overlay.rpc.proto``, which
skips the work when ``overlay/_gen/STAMP`` (the proto's digest and the grpcio-tools
version) matches. :func:`modules` imports the modules; when they are missing (a fresh
checkout that skipped the set-up) it generates them on the fly, or raises one clear
:class:`~overlay.errors.OverlayError` saying what to run.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
import threading
from types import ModuleType

from overlay.errors import OverlayError

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../overlay
_ROOT = os.path.dirname(_PKG_DIR)
PROTO = os.path.join(_ROOT, "proto", "overlay.proto")
GEN_DIR = os.path.join(_PKG_DIR, "_gen")
SERVICE = "overlay.v1.Registry"

_FILES = ("__init__.py", "overlay_pb2.py", "overlay_pb2.pyi", "overlay_pb2_grpc.py", "STAMP")

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


def _stamp(tools_version: str) -> str:
    with open(PROTO, "rb") as fh:
        proto = fh.read()
    return hashlib.sha256(proto + f"grpcio-tools {tools_version}\n".encode()).hexdigest()


def up_to_date() -> bool:
    """True when ``overlay/_gen`` was generated from this proto by this grpcio-tools."""
    try:
        from importlib.metadata import version

        want = _stamp(version("grpcio-tools"))
        with open(os.path.join(GEN_DIR, "STAMP"), encoding="utf-8") as fh:
            have = fh.read().strip()
    except (OSError, ImportError):
        return False
    return have == want and all(os.path.exists(os.path.join(GEN_DIR, f)) for f in _FILES)


def generate() -> None:
    """protoc into a temporary directory, fix the import to be package-relative, move
    the files into ``overlay/_gen`` (``STAMP`` last: an interrupted run regenerates)."""
    hint = "run `make test` or scripts/setup.sh (it runs scripts/gen_proto.sh)"
    if not os.path.exists(PROTO):
        raise OverlayError(f"the generated gRPC code (overlay/_gen) is missing and {PROTO} is not there; {hint}")
    try:
        from importlib.metadata import version

        from grpc_tools import protoc
    except ImportError:
        raise OverlayError(f"the generated gRPC code (overlay/_gen) is missing and grpcio-tools is not installed; {hint}") from None
    tools = version("grpcio-tools")
    stamp = _stamp(tools)
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    with tempfile.TemporaryDirectory(prefix="overlay-gen-") as tmp:
        rc = protoc.main([
            "grpc_tools.protoc", f"-I{os.path.dirname(PROTO)}", f"-I{include}",
            f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", PROTO,
        ])
        if rc != 0:
            raise OverlayError(f"grpc_tools.protoc failed on {PROTO} (exit {rc}); {hint}")
        grpc_py = os.path.join(tmp, "overlay_pb2_grpc.py")
        with open(grpc_py, encoding="utf-8") as fh:
            text = fh.read()
        fixed = text.replace("\nimport overlay_pb2 as overlay__pb2\n", "\nfrom . import overlay_pb2 as overlay__pb2\n")
        if fixed == text:
            raise OverlayError(f"unexpected import in the generated {grpc_py}; {hint}")
        with open(grpc_py, "w", encoding="utf-8") as fh:
            fh.write(fixed)
        with open(os.path.join(tmp, "__init__.py"), "w", encoding="utf-8") as fh:
            fh.write('"""Generated from proto/overlay.proto by scripts/gen_proto.sh; not committed."""\n')
        with open(os.path.join(tmp, "STAMP"), "w", encoding="utf-8") as fh:
            fh.write(stamp + "\n")
        try:
            os.makedirs(GEN_DIR, exist_ok=True)
            for name in _FILES:
                shutil.move(os.path.join(tmp, name), os.path.join(GEN_DIR, name))
        except OSError as exc:
            raise OverlayError(f"cannot write the generated gRPC code into {GEN_DIR} ({exc.strerror}); {hint}") from None


def main() -> int:
    """``python -m overlay.rpc.proto``: generate ``overlay/_gen`` unless it is up to date."""
    if up_to_date():
        print("    overlay/_gen up to date")
        return 0
    try:
        generate()
    except OverlayError as exc:
        print(f"gen_proto: {exc}", file=sys.stderr)
        return 1
    from importlib.metadata import version

    print(f"    generated overlay/_gen from proto/overlay.proto (grpcio-tools {version('grpcio-tools')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
