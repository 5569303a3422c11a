#!/usr/bin/env bash
# Generate the gRPC code of proto/overlay.proto into overlay/_gen/ (never committed).
# Idempotent: skips when overlay/_gen/STAMP (proto digest + grpc_tools version) matches.
# Run by scripts/setup.sh. overlay/controller/proto.py does the same on the fly when
# overlay/_gen is missing at run time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
PROTO="$ROOT/proto/overlay.proto"
OUT="$ROOT/overlay/_gen"

tools="$("$PY" -c 'import grpc_tools, importlib.metadata as m; print(m.version("grpcio-tools"))')"
want="$( (cat "$PROTO"; echo "grpcio-tools $tools") | sha256sum | cut -d' ' -f1)"
if [[ -f "$OUT/STAMP" && "$(cat "$OUT/STAMP")" == "$want" && -f "$OUT/overlay_pb2.py" && -f "$OUT/overlay_pb2_grpc.py" ]]; then
  echo "    overlay/_gen up to date"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m grpc_tools.protoc -I "$ROOT/proto" --python_out="$tmp" --pyi_out="$tmp" \
  --grpc_python_out="$tmp" "$PROTO"
# grpc_tools writes an absolute import of the sibling module; make it package-relative.
sed -i 's/^import overlay_pb2 as overlay__pb2$/from . import overlay_pb2 as overlay__pb2/' "$tmp/overlay_pb2_grpc.py"
grep -q '^from . import overlay_pb2 as overlay__pb2$' "$tmp/overlay_pb2_grpc.py"
echo '"""Generated from proto/overlay.proto by scripts/gen_proto.sh; not committed."""' > "$tmp/__init__.py"
echo "$want" > "$tmp/STAMP"
mkdir -p "$OUT"
for f in __init__.py overlay_pb2.py overlay_pb2.pyi overlay_pb2_grpc.py STAMP; do
  mv -f "$tmp/$f" "$OUT/$f"   # STAMP last: an interrupted run regenerates next time
done
echo "    generated overlay/_gen from proto/overlay.proto (grpcio-tools $tools)"
