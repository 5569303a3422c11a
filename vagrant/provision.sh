#!/bin/bash
# Provision one VM of the Vagrant lab: provision.sh ROLE NAME
#   ROLE: zookeeper | edge | member | outsider
# Installs the project into /opt/overlay/venv, then lets the project write
# the machine's set-up from the topology (the netns lab's code path):
#   overlay lab script NAME --vagrant   -> /etc/overlay/lab-net.sh (addresses, routes, NAT)
#   overlay lab config NAME --vagrant   -> /etc/overlay/overlay.yaml (members' daemon config)
#                                          /etc/overlay/controller.yaml (the ZooKeeper VM, when
#                                          a network has registry: grpc)
# and starts systemd units: overlay-lab-net, overlay-lab-echo (test port),
# overlay (members), overlay-zookeeper (ZooKeeper) and overlay-controller (the
# gRPC controller, beside ZooKeeper). overlay and overlay-controller are the
# packaged units (`overlay install-unit`, packaging/systemd/), ordered after the lab's
# own units by drop-ins. The Vagrantfile uploads this VM's
# certificates to /tmp/overlay-certs; they go to /etc/overlay/certs. Idempotent.
set -euo pipefail

ROLE="$1"
NAME="$2"
TEST_PORT="${TEST_PORT:-7000}"
ZK_ADDRESS="${ZK_ADDRESS:?}"
ZK_PORT="${ZK_PORT:-2181}"
CONTROLLER="${CONTROLLER:-}"   # host:port of the gRPC controller, empty when no network uses it
SRC=/opt/overlay-src
VENV=/opt/overlay/venv
OVERLAY="$VENV/bin/overlay"
TOPO=/etc/overlay/topology.yaml
export DEBIAN_FRONTEND=noninteractive

say() { printf '==> [%s] %s\n' "$NAME" "$*"; }

say "packages"
pkgs=(python3 python3-venv python3-pip iproute2 iptables ethtool)
case "$ROLE" in
  member) pkgs+=(python3-bpfcc bpfcc-tools) ;;
  zookeeper) pkgs+=(zookeeper) ;;
esac
apt-get update -q
apt-get install -y -q --no-install-recommends "${pkgs[@]}"
if [[ "$ROLE" == member ]]; then
  # bcc compiles against the running kernel's headers
  apt-get install -y -q --no-install-recommends "linux-headers-$(uname -r)" \
    || apt-get install -y -q --no-install-recommends linux-headers-amd64
  mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
fi

say "project into $VENV"
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv --system-site-packages "$VENV"
fi
# a wheel built from the source: it carries the eBPF sources, the proto's generated code
# and the systemd units (docs/install.md)
"$VENV/bin/pip" install -q --disable-pip-version-check "$SRC"

install -d -m 0755 /etc/overlay /var/lib/overlay
install -m 0644 /tmp/overlay-lab-topology.yaml "$TOPO"

if [[ -d /tmp/overlay-certs ]]; then
  say "certificates into /etc/overlay/certs"
  install -d -m 0700 /etc/overlay/certs
  for f in /tmp/overlay-certs/*; do
    case "$f" in
      *.key) install -m 0600 "$f" /etc/overlay/certs/ ;;
      *) install -m 0644 "$f" /etc/overlay/certs/ ;;
    esac
  done
  rm -rf /tmp/overlay-certs
fi

unit() {  # unit NAME CONTENT
  printf '%s\n' "$2" > "/etc/systemd/system/$1.service"
}
dropin() {  # dropin UNIT CONTENT: lab ordering added to a packaged unit
  mkdir -p "/etc/systemd/system/$1.service.d"
  printf '%s\n' "$2" > "/etc/systemd/system/$1.service.d/lab.conf"
}

say "network set-up (overlay lab script $NAME --vagrant)"
"$OVERLAY" lab script "$NAME" --vagrant --topology "$TOPO" > /etc/overlay/lab-net.sh
chmod 0755 /etc/overlay/lab-net.sh
unit overlay-lab-net "[Unit]
Description=Overlay lab: addresses, routes and NAT of $NAME
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/etc/overlay/lab-net.sh

[Install]
WantedBy=multi-user.target"
systemctl daemon-reload
systemctl enable overlay-lab-net.service
systemctl restart overlay-lab-net.service

case "$ROLE" in
  zookeeper)
    say "ZooKeeper on $ZK_ADDRESS:$ZK_PORT"
    unit overlay-zookeeper "[Unit]
Description=Overlay lab: ZooKeeper
After=overlay-lab-net.service
Requires=overlay-lab-net.service

[Service]
ExecStart=$VENV/bin/python -m overlay.zk.server --data-dir /var/lib/overlay-zk --host $ZK_ADDRESS --port $ZK_PORT
Restart=on-failure

[Install]
WantedBy=multi-user.target"
    systemctl daemon-reload
    systemctl enable --now overlay-zookeeper.service
    say "operator: grant the members' groups (overlay lab grant --vagrant)"
    for _ in $(seq 1 30); do   # ZooKeeper takes a few seconds to answer
      "$OVERLAY" lab grant --vagrant --topology "$TOPO" && break
      sleep 2
    done
    if [[ -n "$CONTROLLER" ]]; then
      say "gRPC controller on $CONTROLLER (overlay lab config $NAME --vagrant)"
      "$OVERLAY" lab config "$NAME" --vagrant --topology "$TOPO" > /etc/overlay/controller.yaml.new
      "$OVERLAY" check-config /etc/overlay/controller.yaml.new
      mv /etc/overlay/controller.yaml.new /etc/overlay/controller.yaml
      "$OVERLAY" install-unit --no-config   # the packaged units (overlay-controller.service)
      dropin overlay-controller "[Unit]
After=overlay-zookeeper.service
Wants=overlay-zookeeper.service"
      systemctl daemon-reload
      systemctl enable overlay-controller.service
      systemctl restart overlay-controller.service
    fi
    ;;
  member|outsider)
    say "test-port server on :$TEST_PORT"
    unit overlay-lab-echo "[Unit]
Description=Overlay lab: test-port server
After=overlay-lab-net.service

[Service]
ExecStart=$VENV/bin/python -m overlay.lab.echo --port $TEST_PORT --name $NAME
Restart=on-failure

[Install]
WantedBy=multi-user.target"
    systemctl daemon-reload
    systemctl enable --now overlay-lab-echo.service
    ;;
esac

if [[ "$ROLE" == member ]]; then
  say "daemon config (overlay lab config $NAME --vagrant)"
  "$OVERLAY" lab config "$NAME" --vagrant --interface auto --topology "$TOPO" > /etc/overlay/overlay.yaml.new
  "$OVERLAY" check-config /etc/overlay/overlay.yaml.new
  mv /etc/overlay/overlay.yaml.new /etc/overlay/overlay.yaml
  "$OVERLAY" install-unit --no-config   # the packaged units (overlay.service)
  dropin overlay "[Unit]
After=overlay-lab-net.service"
  systemctl daemon-reload
  systemctl enable overlay.service
  systemctl restart overlay.service
fi
say "done"
