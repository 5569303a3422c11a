#!/usr/bin/env bash
# Idempotent set-up for `make test` and `make lab` on Debian 12, as root.
# Installs missing Debian packages, links kernel headers for bcc when the
# running kernel has none, mounts bpffs, and creates .venv/ with the package
# and its test extras. A second run changes nothing and takes seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/packages.sh
. "$ROOT/scripts/packages.sh"
VENV="$ROOT/.venv"
PACKAGES=(
  python3 python3-venv python3-dev python3-bpfcc bpfcc-tools linux-headers-amd64
  zookeeper iproute2 iptables ipset ethtool gcc make procps psmisc kmod vagrant nmap
  systemd util-linux python3-matplotlib
)

step() { printf '==> %s\n' "$*"; }
t0=$(date +%s)

if [[ $(id -u) -ne 0 ]]; then
  echo "setup: must run as root (it installs packages, mounts bpffs, loads eBPF programs)" >&2
  exit 1
fi

step "Debian packages"
ensure_packages "${PACKAGES[@]}"

step "kernel headers for bcc"
KVER="$(uname -r)"
MODDIR="/lib/modules/$KVER"
if [[ -e "$MODDIR/build/include/linux/kconfig.h" ]]; then
  echo "    $MODDIR/build present"
else
  build="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)"
  common="$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)"
  if [[ -z "$build" || -z "$common" ]]; then
    echo "setup: no linux headers under /usr/src (install linux-headers-amd64)" >&2
    exit 1
  fi
  mkdir -p "$MODDIR"
  ln -sfn "$build" "$MODDIR/build"
  ln -sfn "$common" "$MODDIR/source"
  echo "    linked $MODDIR/build -> $build and source -> $common (running kernel has no headers of its own)"
fi

step "bpffs"
if mountpoint -q /sys/fs/bpf; then
  echo "    mounted"
else
  mount -t bpf bpf /sys/fs/bpf
  echo "    mounted bpf at /sys/fs/bpf"
fi

step "virtualenv $VENV"
if [[ ! -x "$VENV/bin/python" ]]; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
  echo "    created from /usr/bin/python3 with system site packages (for bcc)"
fi
stamp="$VENV/.overlay-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$VENV/bin/python" -c "import overlay, bcc" 2>/dev/null; then
  echo "    package and test extras up to date"
else
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test]"
  echo "$want" > "$stamp"
  echo "    installed overlay (editable) with test extras"
fi
if [[ -f "$ROOT/overlay/_gen/__init__.py" || -d "$ROOT/proto" ]] && [[ -x "$ROOT/scripts/gen_proto.sh" ]]; then
  step "generated gRPC code"
  "$ROOT/scripts/gen_proto.sh"
fi

echo "==> set-up done in $(( $(date +%s) - t0 )) s"
