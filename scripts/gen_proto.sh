#!/usr/bin/env bash
# Generate the gRPC code of proto/overlay.proto into overlay/_gen/ (never committed).
# Idempotent: skips when overlay/_gen/STAMP (proto digest + grpc_tools version) matches.
# Run by scripts/setup.sh. The one generator is overlay/rpc/proto.py (which also runs on
# the fly when overlay/_gen is missing at run time); this script only calls it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
cd "$ROOT"
exec "$PY" -m overlay.rpc.proto
