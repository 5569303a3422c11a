"""Generate the gRPC modules of ``overlay.proto`` (``overlay/_gen``): stdlib and grpc_tools only.

One implementation for its three callers:

- the wheel build (``setup.py``): it loads this file by path, without importing the
  package, and writes ``overlay/_gen`` into the build directory, so an installed wheel
  needs no generation step;
- ``scripts/gen_proto.sh`` (development checkouts; run by ``scripts/setup.sh``):
  ``python overlay/protogen.py PROTO OUT_DIR``;
- :mod:`overlay.rpc.proto`, on the fly in a checkout that skipped the set-up.

The output is skipped when ``OUT_DIR/STAMP`` (the proto's digest and the grpcio-tools
version) matches. grpc_tools writes an absolute import of the sibling module
(``import overlay_pb2``); it is made package-relative.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile

FILES = ("__init__.py", "overlay_pb2.py", "overlay_pb2.pyi", "overlay_pb2_grpc.py", "STAMP")
_ABSOLUTE = "\nimport overlay_pb2 as overlay__pb2\n"
_RELATIVE = "\nfrom . import overlay_pb2 as overlay__pb2\n"


class GenerateError(Exception):
    """The gRPC code could not be generated (the message says why)."""


def _tools_version() -> str:
    try:
        from importlib.metadata import version

        import grpc_tools  # noqa: F401
    except ImportError:
        raise GenerateError("grpcio-tools is not installed") from None
    return version("grpcio-tools")


def stamp(proto: bytes, tools_version: str) -> str:
    return hashlib.sha256(proto + f"grpcio-tools {tools_version}\n".encode()).hexdigest()


def up_to_date(proto_path: str, out_dir: str) -> bool:
    try:
        with open(proto_path, "rb") as fh:
            want = stamp(fh.read(), _tools_version())
        with open(os.path.join(out_dir, "STAMP"), encoding="utf-8") as fh:
            have = fh.read().strip()
    except (OSError, GenerateError):
        return False
    return have == want and all(os.path.exists(os.path.join(out_dir, f)) for f in FILES)


def generate(proto_path: str, out_dir: str, force: bool = False) -> bool:
    """Write the modules of ``proto_path`` into ``out_dir``; False when already up to date."""
    if not force and up_to_date(proto_path, out_dir):
        return False
    try:
        with open(proto_path, "rb") as fh:
            proto = fh.read()
    except OSError as exc:
        raise GenerateError(f"cannot read {proto_path}: {exc.strerror}") from None
    tools = _tools_version()
    from grpc_tools import protoc

    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    src_dir = os.path.dirname(os.path.abspath(proto_path))
    with tempfile.TemporaryDirectory(prefix="overlay-gen-") as tmp:
        rc = protoc.main([
            "grpc_tools.protoc", f"-I{src_dir}", f"-I{include}",
            f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
            os.path.abspath(proto_path),
        ])
        if rc != 0:
            raise GenerateError(f"grpc_tools.protoc failed on {proto_path} (exit {rc})")
        grpc_py = os.path.join(tmp, "overlay_pb2_grpc.py")
        with open(grpc_py, encoding="utf-8") as fh:
            text = fh.read()
        fixed = text.replace(_ABSOLUTE, _RELATIVE)
        if fixed == text:
            raise GenerateError(f"unexpected import in the generated {os.path.basename(grpc_py)}")
        with open(grpc_py, "w", encoding="utf-8") as fh:
            fh.write(fixed)
        with open(os.path.join(tmp, "__init__.py"), "w", encoding="utf-8") as fh:
            fh.write(f'"""Generated from overlay.proto by overlay/protogen.py (grpcio-tools {tools}); not committed."""\n')
        with open(os.path.join(tmp, "STAMP"), "w", encoding="utf-8") as fh:
            fh.write(stamp(proto, tools) + "\n")
        try:
            os.makedirs(out_dir, exist_ok=True)
            for name in FILES:  # STAMP last: an interrupted run regenerates next time
                shutil.move(os.path.join(tmp, name), os.path.join(out_dir, name))
        except OSError as exc:
            raise GenerateError(f"cannot write the generated gRPC code into {out_dir} ({exc.strerror})") from None
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: protogen.py PROTO OUT_DIR", file=sys.stderr)
        return 2
    try:
        made = generate(argv[0], argv[1])
    except GenerateError as exc:
        print(f"protogen: {exc}", file=sys.stderr)
        return 1
    print(f"    generated {argv[1]} from {argv[0]} (grpcio-tools {_tools_version()})" if made
          else f"    {argv[1]} up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
