#!/usr/bin/env bash
# Generate the gRPC code of proto/overlay.proto into overlay/_gen/ (never committed), for
# development checkouts and editable installs (a wheel build generates its own copy).
# Idempotent: skips when overlay/_gen/STAMP (proto digest + grpc_tools version) matches.
# Run by scripts/setup.sh. The work is overlay/protogen.py's, which the wheel build and
# overlay/rpc/proto.py (on the fly, when overlay/_gen is missing) use too.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
exec "$PY" "$ROOT/overlay/protogen.py" "$ROOT/proto/overlay.proto" "$ROOT/overlay/_gen"
