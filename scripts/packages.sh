# Sourced by scripts/setup.sh and scripts/bench-setup.sh.
# ensure_packages PKG...: install the Debian packages that are missing (apt-get update
# only when something is), and say which, or that all are present.
ensure_packages() {
  local p missing=()
  for p in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  if ((${#missing[@]})); then
    echo "    installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    echo "    all $# present"
  fi
}
