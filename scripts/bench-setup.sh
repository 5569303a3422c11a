#!/usr/bin/env bash
# Idempotent set-up for `make bench` and `make bench-quick` (Debian 12, as root):
# the project's own set-up (packages, kernel headers for bcc, bpffs, .venv), then
# what only the benchmarks need. Kept apart from scripts/setup.sh so that
# `make test` stays lean.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/packages.sh
. "$ROOT/scripts/packages.sh"
PACKAGES=(python3-matplotlib gcc util-linux iproute2 iptables ipset zookeeper sockperf iperf3)

"$ROOT/scripts/setup.sh"

printf '==> bench packages\n'
ensure_packages "${PACKAGES[@]}"
# .venv is made with --system-site-packages: Debian's matplotlib is visible in it
"$ROOT/.venv/bin/python" -c "import matplotlib" \
  || { echo "bench-setup: matplotlib is not importable from .venv" >&2; exit 1; }
