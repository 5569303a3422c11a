"""Config contract (DESIGN §4.1a, §7.6): table-driven, through the real CLI.

Every INVALID row is written to a file and checked twice: in-process
(``load_config`` raises ``InvalidConfigError`` whose ``.path`` is exactly the
expected key path) and through ``overlay check-config`` in a subprocess (exit
2, ``overlay: invalid config: <path>: <reason>`` on stderr, no traceback).
The subprocesses all run at once in a module fixture, so the file stays fast.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import socket
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from overlay.config import Config, config_from_dict, load_config
from overlay.errors import InvalidConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
CLI_TIMEOUT_S = 60

BASE = "node_id: web-1\nnetwork: ec2\n"
ADDR = "addresses:\n  private: 10.0.0.11\n  public: 198.18.1.11\n"
PEER_A = "{node_id: a, network: vpc, private: 10.0.0.1, public: 198.19.0.1, overlay: 192.168.1.1}"
PEER_A2 = "{node_id: a, network: vpc, private: 10.0.0.2, public: 198.19.0.2, overlay: 192.168.1.2}"


class Bad(NamedTuple):
    id: str
    yaml: str
    path: str  # the exact key path; "" for errors about the file as a whole
    fragment: str  # a piece of the reason


def _cfg(body: str, base: str = BASE) -> str:
    return base + textwrap.dedent(body).lstrip("\n")


def _addr(**kw: str) -> str:
    lines = "".join(f"  {k}: {v}\n" for k, v in kw.items())
    return _cfg("addresses:\n" + lines)


INVALID: list[Bad] = [
    # structure
    Bad("unknown-top-level-key", _cfg("colour: blue\n"), "colour", "unknown key"),
    Bad("unknown-nested-key", _cfg("filter:\n  reject: true\n"), "filter.reject", "unknown key"),
    Bad("unknown-deep-key", _cfg("datapath:\n  sizes:\n    natt: 1024\n"), "datapath.sizes.natt", "unknown key"),
    Bad("top-level-list", "- node_id: web-1\n- network: ec2\n", "<top>", "must be a mapping, got list"),
    Bad("top-level-scalar", "just a string\n", "<top>", "must be a mapping, got str"),
    Bad("section-not-mapping", _cfg("filter: [80]\n"), "filter", "must be a mapping"),
    Bad("yaml-syntax-error", _cfg("filter:\n  open_ports: [80\n  reject_all: true\n"), "", "is not valid YAML at line 5"),
    Bad("yaml-tab-indent", _cfg("guard:\n\tmax_change: 3\n"), "", "is not valid YAML at line 4"),
    # names
    Bad("node-id-slash", _cfg("", base="node_id: web/1\nnetwork: ec2\n"), "node_id", "must be 1-253 characters"),
    Bad("node-id-dotdot", _cfg("", base="node_id: '..'\nnetwork: ec2\n"), "node_id", "must be 1-253 characters"),
    Bad("node-id-int", _cfg("", base="node_id: 17\nnetwork: ec2\n"), "node_id", "must be a string, got int"),
    Bad("node-id-trailing-newline", _cfg("", base='node_id: "web-1\\n"\nnetwork: ec2\n'), "node_id", "must be 1-253 characters"),
    Bad("network-space", _cfg("", base="node_id: web-1\nnetwork: my net\n"), "network", "must be 1-253 characters"),
    Bad("groups-not-list", _cfg("groups: web\n"), "groups", "must be a list, got str"),
    Bad("group-bad-name", _cfg("groups: [web, 'a b']\n"), "groups[1]", "must be 1-253 characters"),
    # overlay_subnet
    Bad("subnet-not-cidr", _cfg("overlay_subnet: banana\n"), "overlay_subnet", "is not an IPv4 network"),
    Bad("subnet-host-bits", _cfg("overlay_subnet: 192.168.0.1/18\n"), "overlay_subnet", "has host bits set"),
    Bad("subnet-too-small", _cfg("overlay_subnet: 192.168.0.0/31\n"), "overlay_subnet", "too small"),
    Bad("subnet-ipv6", _cfg("overlay_subnet: 'fd00::/64'\n"), "overlay_subnet", "is not an IPv4 network"),
    # addresses
    Bad("private-is-cidr", _addr(private="10.0.0.0/24", public="198.18.1.11"), "addresses.private", "is a network (CIDR)"),
    Bad("private-unspecified", _addr(private="0.0.0.0", public="198.18.1.11"), "addresses.private", "unspecified"),
    Bad("public-broadcast", _addr(private="10.0.0.11", public="255.255.255.255"), "addresses.public", "broadcast"),
    Bad("private-multicast", _addr(private="224.0.0.251", public="198.18.1.11"), "addresses.private", "multicast"),
    Bad("private-loopback", _addr(private="127.0.0.53", public="198.18.1.11"), "addresses.private", "loopback"),
    Bad("public-reserved", _addr(private="10.0.0.11", public="250.1.2.3"), "addresses.public", "reserved"),
    Bad("private-not-string", _addr(private="167772171", public="198.18.1.11"), "addresses.private", "expected an IPv4 address string, got int"),
    Bad("private-garbage", _addr(private="ten.0.0.1", public="198.18.1.11"), "addresses.private", "is not an IPv4 address"),
    Bad("private-non-canonical", _addr(private="'10.0.0.011'", public="198.18.1.11"), "addresses.private", "is not an IPv4 address"),
    Bad("public-missing", _cfg("addresses:\n  private: 10.0.0.11\n"), "addresses.public", "is required"),
    Bad("overlay-outside-subnet", _addr(private="10.0.0.11", public="198.18.1.11", overlay="192.168.64.1"), "addresses.overlay", "outside the overlay subnet"),
    Bad("overlay-network-address", _addr(private="10.0.0.11", public="198.18.1.11", overlay="192.168.0.0"), "addresses.overlay", "network or broadcast address"),
    Bad("overlay-broadcast-address", _addr(private="10.0.0.11", public="198.18.1.11", overlay="192.168.63.255"), "addresses.overlay", "network or broadcast address"),
    Bad("addresses-and-discovery", _cfg(ADDR + "discovery: {provider: static}\n"), "discovery", "not both"),
    Bad("discovery-unknown-provider", _cfg("discovery: {provider: gcp}\n"), "discovery.provider", "'gcp' is not one of the available address providers: aws-imds, netlink, static ("),
    Bad("discovery-netlink-no-interface", _cfg("discovery: {provider: netlink}\n"), "discovery.interface", "required for provider netlink"),
    Bad("private6-link-local", _cfg(ADDR + "  private6: 'fe80::1'\n"), "addresses.private6", "link-local"),
    Bad("public6-ipv4", _cfg(ADDR + "  public6: 198.18.1.11\n"), "addresses.public6", "is not an IPv6 address"),
    Bad("public6-loopback", _cfg(ADDR + "  public6: '::1'\n"), "addresses.public6", "loopback"),
    Bad("private6-cidr", _cfg(ADDR + "  private6: '2001:db8::/64'\n"), "addresses.private6", "is a network"),
    # filter
    Bad("open-port-zero", _cfg("filter:\n  open_ports: [0]\n"), "filter.open_ports[0]", "outside 1..65535"),
    Bad("open-port-65536", _cfg("filter:\n  open_ports: [80, 65536]\n"), "filter.open_ports[1]", "outside 1..65535"),
    Bad("open-port-range-reversed", _cfg("filter:\n  open_ports: [22, '9000-8000']\n"), "filter.open_ports[1]", "starts after it ends"),
    Bad("open-port-range-zero", _cfg("filter:\n  open_ports: ['0-10']\n"), "filter.open_ports[0]", "outside 1..65535"),
    Bad("open-port-garbage", _cfg("filter:\n  open_ports: [http]\n"), "filter.open_ports[0]", "is not a port or a port range"),
    Bad("open-port-half-range", _cfg("filter:\n  open_ports: ['8000-']\n"), "filter.open_ports[0]", "is not a port range"),
    Bad("open-port-bool", _cfg("filter:\n  open_ports: [true]\n"), "filter.open_ports[0]", "expected a port number, got True"),
    Bad("open-port-float", _cfg("filter:\n  open_ports: [80.5]\n"), "filter.open_ports[0]", "expected a port number"),
    Bad("open-ports-not-list", _cfg("filter:\n  open_ports: 80\n"), "filter.open_ports", "must be a list, got int"),
    Bad("reject-all-string", _cfg("filter:\n  reject_all: 'yes'\n"), "filter.reject_all", "must be true or false"),
    Bad("filter-mode-unknown", _cfg("filter:\n  mode: permissive\n"), "filter.mode", "is not one of"),
    Bad("ssh-whitelist-not-cidr", _cfg("filter:\n  ssh_whitelist: ['198.18.0.0/15', 'office']\n"), "filter.ssh_whitelist[1]", "is not an IPv4 network"),
    Bad("ssh-whitelist-ipv6-host-bits", _cfg("filter:\n  ssh_whitelist: ['2001:db8::1/32']\n"), "filter.ssh_whitelist[0]", "is not an IPv6 network"),
    Bad("ssh-whitelist-host-bits", _cfg("filter:\n  ssh_whitelist: ['198.18.0.1/15']\n"), "filter.ssh_whitelist[0]", "has host bits set"),
    # nat_overrides
    Bad("nat-override-key-subnet-broadcast", _cfg("nat_overrides: {'192.168.63.255': '10.0.0.250'}\n"), "nat_overrides.192.168.63.255", "network or broadcast address"),
    Bad("nat-override-key-loopback", _cfg("nat_overrides: {'127.0.0.1': '10.0.0.250'}\n"), "nat_overrides.127.0.0.1", "loopback"),
    Bad("nat-override-key-cidr", _cfg("nat_overrides: {'10.9.0.0/16': '10.0.0.250'}\n"), "nat_overrides.10.9.0.0/16", "is a network (CIDR)"),
    Bad("nat-override-to-itself", _cfg("nat_overrides: {'10.9.9.9': '10.9.9.9'}\n"), "nat_overrides.10.9.9.9", "translates 10.9.9.9 to itself"),
    Bad("nat-override-value-cidr", _cfg("nat_overrides: {'192.168.63.1': '10.0.0.0/24'}\n"), "nat_overrides.192.168.63.1", "is a network (CIDR)"),
    Bad("nat-override-value-multicast", _cfg("nat_overrides: {'192.168.63.1': '239.1.1.1'}\n"), "nat_overrides.192.168.63.1", "multicast"),
    Bad("nat-overrides-list", _cfg("nat_overrides: ['192.168.63.1']\n"), "nat_overrides", "must be a mapping"),
    # registry
    Bad("registry-backend-unknown", _cfg("registry:\n  backend: etcd\n"), "registry.backend", "'etcd' is not one of the available registry backends: grpc, static, zookeeper ("),
    Bad("registry-hosts-no-port", _cfg("registry:\n  hosts: ['198.18.0.2']\n"), "registry.hosts[0]", 'expected "host:port"'),
    Bad("registry-hosts-bad-port", _cfg("registry:\n  hosts: ['zk1:2181', 'zk2:99999']\n"), "registry.hosts[1]", "outside 1..65535"),
    Bad("registry-hosts-string", _cfg("registry:\n  hosts: 'zk1:2181'\n"), "registry.hosts", "must be a list, got str"),
    Bad("registry-hosts-empty", _cfg("registry:\n  hosts: []\n"), "registry.hosts", "at least one"),
    Bad("registry-prefix-relative", _cfg("registry:\n  prefix: overlay\n"), "registry.prefix", "absolute ZooKeeper path"),
    Bad("registry-prefix-trailing-slash", _cfg("registry:\n  prefix: /overlay/\n"), "registry.prefix", "absolute ZooKeeper path"),
    Bad("registry-timeout-negative", _cfg("registry:\n  timeout_s: -1\n"), "registry.timeout_s", "between 0 and 3600"),
    Bad("registry-auth-no-password", _cfg("registry:\n  auth: {user: u}\n"), "registry.auth.password", "is required"),
    Bad("registry-peers-with-zookeeper", _cfg(f"registry:\n  backend: zookeeper\n  peers: [{PEER_A}]\n"), "registry.peers", "only allowed with backend: static"),
    Bad("registry-static-duplicate-peer", _cfg(f"registry:\n  backend: static\n  peers: [{PEER_A}, {PEER_A2}]\n"), "registry.peers[1].node_id", "'a' is listed twice"),
    Bad("registry-static-peer-outside-subnet", _cfg("registry:\n  backend: static\n  peers: [{node_id: a, network: vpc, private: 10.0.0.1, public: 198.19.0.1, overlay: 10.1.0.1}]\n"), "registry.peers[0]", "outside the overlay subnet"),
    Bad("registry-static-peer-unknown-key", _cfg("registry:\n  backend: static\n  peers: [{node_id: a, network: vpc, private: 10.0.0.1, public: 198.19.0.1, overlay: 192.168.1.1, colour: red}]\n"), "registry.peers[0]", "unknown keys ['colour']"),
    # datapath
    Bad("datapath-backend-unknown", _cfg("datapath:\n  backend: xdp\n"), "datapath.backend", "'xdp' is not one of the available datapath backends: dryrun, ebpf, iptables ("),
    Bad("datapath-interface-too-long", _cfg("datapath:\n  interface: enp0s31f6abcdefgh\n"), "datapath.interface", "at most 15 characters"),
    Bad("datapath-interface-slash", _cfg("datapath:\n  interface: eth0/1\n"), "datapath.interface", "not a valid interface name"),
    Bad("datapath-mode-with-iptables", _cfg("datapath:\n  backend: iptables\n  mode: socket\n"), "datapath.mode", "socket mode needs backend: ebpf"),
    Bad("datapath-mode-unknown", _cfg("datapath:\n  mode: xdp\n"), "datapath.mode", "'xdp' is not one of: tc, socket"),
    Bad("datapath-cgroup-relative", _cfg("datapath:\n  mode: socket\n  cgroup: sys/fs/cgroup\n"), "datapath.cgroup", "must be an absolute path"),
    Bad("datapath-cgroup-number", _cfg("datapath:\n  cgroup: 3\n"), "datapath.cgroup", "must be a non-empty string"),
    Bad("datapath-size-too-small", _cfg("datapath:\n  sizes:\n    nat: 1\n"), "datapath.sizes.nat", "must be between"),
    # guard, throttle, status
    Bad("guard-max-change-negative", _cfg("guard:\n  max_change: -1\n"), "guard.max_change", "must be between 0 and"),
    Bad("guard-max-change-string", _cfg("guard:\n  max_change: '20'\n"), "guard.max_change", "must be an integer"),
    Bad("guard-settle-negative", _cfg("guard:\n  settle_s: -1\n"), "guard.settle_s", "must be between 0 and 3600"),
    Bad("throttle-max-below-min", _cfg("throttle:\n  min_s: 5\n  max_s: 1\n"), "throttle.max_s", "must be at least min_s"),
    Bad("throttle-nan", _cfg("throttle:\n  max_s: .nan\n"), "throttle.max_s", "between 0 and 3600"),
    Bad("status-listen-no-port", _cfg("status_listen: localhost\n"), "status_listen", 'expected "host:port"'),
    Bad("status-listen-port-range", _cfg("status_listen: 127.0.0.1:70000\n"), "status_listen", "outside 1..65535"),
    Bad("status-listen-int", _cfg("status_listen: 9464\n"), "status_listen", 'expected "host:port"'),
    # registry backend grpc and the controller section (docs/grpc.md)
    Bad("registry-grpc-no-controller", _cfg("registry:\n  backend: grpc\n  tls: {ca: a, cert: b, key: c}\n"), "registry.controller", "is required for backend: grpc"),
    Bad("registry-grpc-no-tls", _cfg("registry:\n  backend: grpc\n  controller: 'ctl:9470'\n"), "registry.tls", "is required for backend: grpc"),
    Bad("registry-grpc-controller-no-port", _cfg("registry:\n  backend: grpc\n  controller: ctl\n  tls: {ca: a, cert: b, key: c}\n"), "registry.controller", 'expected "host:port"'),
    Bad("registry-grpc-tls-no-key", _cfg("registry:\n  backend: grpc\n  controller: 'ctl:9470'\n  tls: {ca: a, cert: b}\n"), "registry.tls.key", "is required"),
    Bad("registry-grpc-tls-unknown-key", _cfg("registry:\n  backend: grpc\n  controller: 'ctl:9470'\n  tls: {ca: a, cert: b, key: c, pin: d}\n"), "registry.tls.pin", "unknown key"),
    Bad("registry-grpc-tls-empty-ca", _cfg("registry:\n  backend: grpc\n  controller: 'ctl:9470'\n  tls: {ca: '', cert: b, key: c}\n"), "registry.tls.ca", "non-empty string"),
    Bad("registry-controller-with-zookeeper", _cfg("registry:\n  controller: 'ctl:9470'\n"), "registry.controller", "only allowed with backend: grpc"),
    Bad("registry-controllers-empty", _cfg("registry:\n  backend: grpc\n  controller: []\n  tls: {ca: a, cert: b, key: c}\n"), "registry.controller", "at least one controller"),
    Bad("registry-controllers-bad-item", _cfg("registry:\n  backend: grpc\n  controller: ['a:1', b]\n  tls: {ca: a, cert: b, key: c}\n"), "registry.controller[1]", 'expected "host:port"'),
    Bad("registry-controllers-twice", _cfg("registry:\n  backend: grpc\n  controller: ['a:1', 'a:1']\n  tls: {ca: a, cert: b, key: c}\n"), "registry.controller[1]", "listed twice"),
    Bad("registry-controllers-not-list", _cfg("registry:\n  backend: grpc\n  controller: {a: 1}\n  tls: {ca: a, cert: b, key: c}\n"), "registry.controller", "must be a list"),
    Bad("registry-tls-with-static", _cfg("registry:\n  backend: static\n  tls: {ca: a, cert: b, key: c}\n"), "registry.tls", "only allowed with backend: grpc"),
    Bad("controller-no-tls", _cfg("controller:\n  listen: '0.0.0.0:9470'\n"), "controller.tls", "is required"),
    Bad("controller-listen-no-port", _cfg("controller:\n  listen: ctl\n  tls: {ca: a, cert: b, key: c}\n"), "controller.listen", 'expected "host:port"'),
    Bad("controller-unknown-key", _cfg("controller:\n  port: 9470\n  tls: {ca: a, cert: b, key: c}\n"), "controller.port", "unknown key"),
    Bad("controller-tls-server-name", _cfg("controller:\n  tls: {ca: a, cert: b, key: c, server_name: x}\n"), "controller.tls.server_name", "unknown key"),
    Bad("controller-window-too-small", _cfg("controller:\n  window: 3\n  tls: {ca: a, cert: b, key: c}\n"), "controller.window", "must be between 16"),
    Bad("controller-lease-negative", _cfg("controller:\n  lease_s: -1\n  tls: {ca: a, cert: b, key: c}\n"), "controller.lease_s", "between 0 and 3600"),
    Bad("controller-not-mapping", _cfg("controller: '0.0.0.0:9470'\n"), "controller", "must be a mapping"),
    # policy map sizes (docs/policies.md)
    Bad("datapath-size-policy-too-small", _cfg("datapath:\n  sizes:\n    policy: 8\n"), "datapath.sizes.policy", "must be between 16"),
    Bad("datapath-size-cidr-ident-string", _cfg("datapath:\n  sizes:\n    cidr_ident: many\n"), "datapath.sizes.cidr_ident", "must be an integer"),
    Bad("datapath-size-names-too-big", _cfg("datapath:\n  sizes:\n    names: 99999999\n"), "datapath.sizes.names", "must be between"),
    # network is required (no silent "default"), unless discovery supplies it (aws-imds)
    Bad("network-missing", "node_id: web-1\n" + ADDR, "network", "is required"),
    Bad("empty-file", "", "network", "is required"),
    Bad("only-comments", "# nothing here\n", "network", "is required"),
    Bad("network-missing-netlink-discovery", "discovery: {provider: netlink, interface: eth0}\n", "network", "is required"),
    Bad("network-missing-static-discovery", "discovery: {provider: static}\n", "network", "aws-imds can supply it"),
    Bad("network-null", "network:\n" + ADDR, "network", "must be a string, got NoneType"),
    # keys of the old system (Neti), each with its replacement or why it is not needed
    Bad("old-log-file", _cfg(ADDR + "log_file: /var/log/neti.log\n"), "log_file", "the journal"),
    Bad("old-zk-hosts", _cfg("zk_hosts: 'zk1:2181,zk2:2181'\n"), "zk_hosts", "use registry.hosts"),
    Bad("old-zk-hosts-in-registry", _cfg("registry:\n  zk_hosts: ['zk1:2181']\n"), "registry.zk_hosts", "use registry.hosts"),
    Bad("old-zk-prefix", _cfg("zk_prefix: /neti\n"), "zk_prefix", "use registry.prefix"),
    Bad("old-zk-iptoid-node", _cfg("zk_iptoid_node: ip_to_id\n"), "zk_iptoid_node", "layout under registry.prefix is fixed"),
    Bad("old-table-files-path", _cfg("table_files_path: /etc/neti/tables\n"), "table_files_path", "not needed"),
    Bad("old-reject-all-top-level", _cfg("reject_all: true\n"), "reject_all", "use filter.reject_all"),
    Bad("old-open-ports-top-level", _cfg("open_ports: [80]\n"), "open_ports", "use filter.open_ports"),
    Bad("old-ssh-whitelist-top-level", _cfg("ssh_whitelist: ['10.0.0.0/8']\n"), "ssh_whitelist", "use filter.ssh_whitelist"),
    Bad("old-max-change-top-level", _cfg("max_change: 20\n"), "max_change", "use guard.max_change"),
    Bad("old-vpc-section", _cfg("vpc: {zk_hosts: 'zk1:2181'}\n"), "vpc", "set network:"),
    Bad("old-aws-key", _cfg("aws_key: AKIA\n"), "aws_key", "aws-imds"),
    Bad("old-neti-section", _cfg("neti: {overlay_subnet: 192.168.0.0/18}\n"), "neti", "[neti] section"),
    # near misses: a "did you mean" from the section's own keys
    Bad("typo-top-level", _cfg("overlay_subnt: 192.168.0.0/18\n"), "overlay_subnt", "unknown key (did you mean overlay_subnet?)"),
    Bad("typo-filter", _cfg("filter:\n  open_port: [80]\n"), "filter.open_port", "unknown key (did you mean open_ports?)"),
    Bad("typo-registry", _cfg("registry:\n  prefx: /overlay\n"), "registry.prefx", "unknown key (did you mean prefix?)"),
    Bad("typo-datapath", _cfg("datapath:\n  interfce: eth1\n"), "datapath.interfce", "unknown key (did you mean interface?)"),
    Bad("typo-guard", _cfg("guard:\n  max_changes: 5\n"), "guard.max_changes", "unknown key (did you mean max_change?)"),
    Bad("typo-discovery", _cfg("discovery: {provider: netlink, interfaces: eth0}\n"), "discovery.interfaces", "unknown key (did you mean interface?)"),
    # conntrack lifetimes and the sizes of the conntrack, fragment and IPv6 maps (docs/config.md)
    Bad("conntrack-zero", _cfg("datapath:\n  conntrack:\n    udp_s: 0\n"), "datapath.conntrack.udp_s", "must be between 1"),
    Bad("conntrack-float", _cfg("datapath:\n  conntrack:\n    tcp_syn_s: 1.5\n"), "datapath.conntrack.tcp_syn_s", "must be an integer"),
    Bad("conntrack-frag-too-long", _cfg("datapath:\n  conntrack:\n    frag_s: 600\n"), "datapath.conntrack.frag_s", "between 1 and 120"),
    Bad("conntrack-unknown", _cfg("datapath:\n  conntrack:\n    tcp_time_wait_s: 5\n"), "datapath.conntrack.tcp_time_wait_s", "unknown key"),
    Bad("conntrack-not-mapping", _cfg("datapath:\n  conntrack: 30\n"), "datapath.conntrack", "must be a mapping"),
    Bad("size-conntrack-in-too-small", _cfg("datapath:\n  sizes:\n    conntrack_in: 10\n"), "datapath.sizes.conntrack_in", "must be between 64"),
    Bad("size-frag-string", _cfg("datapath:\n  sizes:\n    frag: lots\n"), "datapath.sizes.frag", "must be an integer"),
    Bad("size-peers6-too-small", _cfg("datapath:\n  sizes:\n    peers6: 1\n"), "datapath.sizes.peers6", "must be between 16"),
]

VALID_EXTRA = {
    # the old system's own example: an override outside the /18 overlay subnet
    "nat-override-outside-subnet": _cfg("nat_overrides: {'192.168.75.1': '10.8.1.1', '192.168.63.1': '10.0.0.250'}\n"),
    "network-from-aws-imds": "node_id: web-1\ndiscovery: {provider: aws-imds}\n",
    "discovery-netlink": _cfg("discovery: {provider: netlink, interface: eth0}\n"),
    "port-ranges": _cfg("filter:\n  open_ports: [443, '8000-8100', 80, 443]\n"),
    "registry-grpc": _cfg("registry:\n  backend: grpc\n  controller: 'ctl.example:9470'\n  tls: {ca: /etc/overlay/certs/ca.crt, cert: /etc/overlay/certs/web-1.crt, key: /etc/overlay/certs/web-1.key, server_name: ctl.example}\n"),
    "controller": "overlay_subnet: 192.168.0.0/18\nregistry:\n  hosts: ['127.0.0.1:2181']\ncontroller:\n  listen: '0.0.0.0:9470'\n  lease_s: 30\n  window: 10000\n  tls: {ca: ca.crt, cert: controller.crt, key: controller.key}\n",
    "policy-map-sizes": _cfg("datapath:\n  sizes:\n    policy: 131072\n    cidr_ident: 256\n    names: 1024\n"),
    "ipv6": _cfg(ADDR + "  private6: '2001:db8::11'\n  public6: '2001:db8:1::11'\nfilter:\n  ssh_whitelist: ['2001:db8::/32', '198.18.0.0/15']\n"),
    "conntrack": _cfg("datapath:\n  conntrack: {tcp_syn_s: 30, tcp_established_s: 86400, tcp_fin_s: 60, tcp_rst_s: 5, udp_s: 60, icmp_s: 10, frag_s: 3}\n  sizes: {conntrack: 64, conntrack6: 128, conntrack_in: 256, frag: 64, peers6: 16, failsafe6: 16, cidr_ident6: 16}\n"),
}


def _cli(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "overlay.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("configs")
    out = {}
    for case in INVALID:
        out[case.id] = d / f"{case.id}.yaml"
        out[case.id].write_text(case.yaml, encoding="utf-8")
    for name, text in VALID_EXTRA.items():
        out[name] = d / f"{name}.yaml"
        out[name].write_text(text, encoding="utf-8")
    for p in EXAMPLES:
        out[f"examples/{p.name}"] = p
    return out


def _cli_in_process(path: Path) -> subprocess.CompletedProcess:
    """``overlay check-config PATH`` through the CLI's ``main`` (exit code, stdout, stderr)."""
    from overlay.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["check-config", str(path)])
        except SystemExit as exc:
            code = exc.code
    return subprocess.CompletedProcess(["check-config", str(path)], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def cli(files) -> dict[str, subprocess.CompletedProcess]:
    """``check-config`` on every file, through the CLI's main in this process (one Python
    process per file cost minutes on a loaded machine); results by case id.
    ``test_cli_process_matches_in_process`` checks the real process on a sample.
    The parser is built once for all files (building its 50 sub-commands took 60 ms a file,
    ~9 s in all)."""
    import overlay.cli

    parser = overlay.cli.build_parser()
    with mock.patch.object(overlay.cli, "build_parser", return_value=parser):
        return {name: _cli_in_process(path) for name, path in files.items()}


def test_cli_process_matches_in_process(files, cli):
    sample = [INVALID[0].id, INVALID[len(INVALID) // 2].id, INVALID[-1].id, sorted(VALID_EXTRA)[0]]
    with ThreadPoolExecutor(max_workers=len(sample)) as pool:
        procs = dict(zip(sample, pool.map(_cli, [files[n] for n in sample]), strict=True))
    for name, proc in procs.items():
        assert (proc.returncode, proc.stdout, proc.stderr) == (cli[name].returncode, cli[name].stdout, cli[name].stderr)
        assert "Traceback" not in proc.stderr


def test_table_is_big_enough_and_ids_unique():
    assert len(INVALID) >= 25
    assert len({c.id for c in INVALID}) == len(INVALID)


@pytest.mark.parametrize("case", INVALID, ids=[c.id for c in INVALID])
def test_invalid_in_process(case: Bad, files):
    with pytest.raises(InvalidConfigError) as info:
        load_config(str(files[case.id]))
    assert info.value.path == case.path
    assert case.fragment in info.value.reason
    if case.path == "":
        assert str(files[case.id]) in info.value.reason


@pytest.mark.parametrize("case", INVALID, ids=[c.id for c in INVALID])
def test_invalid_via_cli(case: Bad, files, cli):
    res = cli[case.id]
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    line = lines[0]
    if case.path:
        assert line.startswith(f"overlay: invalid config: {case.path}: "), line
    else:
        assert line.startswith("overlay: invalid config: "), line
        assert str(files[case.id]) in line
    assert case.fragment in line


@pytest.mark.parametrize("name", sorted(VALID_EXTRA) + [f"examples/{p.name}" for p in EXAMPLES])
def test_valid_via_cli(name, cli):
    res = cli[name]
    assert res.returncode == 0, res.stderr
    assert " OK " in res.stdout
    assert res.stderr == ""


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"full.yaml", "static-peers.yaml", "minimal.yaml"} <= names


def test_minimal_example_takes_the_documented_defaults():
    cfg = load_config(str(REPO / "examples" / "minimal.yaml"))
    assert isinstance(cfg, Config)
    assert cfg.node_id == socket.gethostname().split(".")[0]
    assert cfg.network == "ec2"
    assert cfg.overlay_subnet == ipaddress.IPv4Network("192.168.0.0/18")
    assert cfg.addresses.overlay is None
    assert cfg.discovery is None
    assert cfg.groups == ()
    assert cfg.registry.backend == "zookeeper"
    assert cfg.registry.hosts == ("127.0.0.1:2181",)
    assert cfg.registry.prefix == "/overlay"
    assert cfg.registry.peers == ()
    assert cfg.datapath.backend == "ebpf"
    assert cfg.datapath.mode == "tc"
    assert cfg.datapath.cgroup == "/sys/fs/cgroup"
    assert cfg.datapath.interface == "eth0"
    assert cfg.filter.reject_all is False
    assert cfg.filter.mode == "enforce"
    assert cfg.filter.open_ports == ()
    assert cfg.filter.ssh_whitelist == ()
    assert cfg.nat_overrides == ()
    assert cfg.guard.max_change == 20
    assert (cfg.throttle.min_s, cfg.throttle.max_s) == (0.0, 0.0)
    assert cfg.status_listen == ("127.0.0.1", 9464)
    assert (cfg.addresses.private6, cfg.addresses.public6) == (None, None)
    ct = cfg.datapath.conntrack  # docs/config.md, in the spirit of the kernel's conntrack
    assert (ct.tcp_syn_s, ct.tcp_established_s, ct.tcp_fin_s, ct.tcp_rst_s) == (120, 432000, 120, 10)
    assert (ct.udp_s, ct.icmp_s, ct.frag_s) == (120, 30, 5)
    sizes = cfg.datapath.sizes
    assert (sizes.conntrack6, sizes.conntrack_in, sizes.frag) == (65536, 65536, 8192)
    assert (sizes.peers6, sizes.failsafe6, sizes.cidr_ident6) == (65536, 1024, 4096)


def test_config_defaults_are_the_abi_defaults():
    """The config's default lifetimes are the ones the programs use for 0 (ovl_cfg)."""
    from overlay import abi
    from overlay.config import ConntrackConfig

    d = ConntrackConfig()
    assert (d.tcp_syn_s, d.tcp_established_s, d.tcp_fin_s, d.tcp_rst_s, d.udp_s, d.icmp_s, d.frag_s) == (
        abi.CT_DEFAULT_TCP_SYN_S, abi.CT_DEFAULT_TCP_ESTABLISHED_S, abi.CT_DEFAULT_TCP_FIN_S,
        abi.CT_DEFAULT_TCP_RST_S, abi.CT_DEFAULT_UDP_S, abi.CT_DEFAULT_ICMP_S, abi.CT_DEFAULT_FRAG_S)


def test_full_example_matches_the_design():
    cfg = load_config(str(REPO / "examples" / "full.yaml"))
    assert cfg.node_id == "web-1"
    assert cfg.network == "ec2"
    assert str(cfg.overlay_subnet) == "192.168.0.0/18"
    assert (cfg.addresses.private, cfg.addresses.public) == ("10.0.0.11", "198.18.1.11")
    assert cfg.groups == ("web",)
    assert cfg.registry.hosts == ("198.18.0.2:2181",)
    assert cfg.registry.prefix == "/overlay"
    assert (cfg.datapath.backend, cfg.datapath.mode, cfg.datapath.interface) == ("ebpf", "tc", "eth0")
    assert cfg.filter.reject_all is False
    assert cfg.filter.open_ports == ((80, 80),)
    assert cfg.filter.ssh_whitelist == ("198.18.0.0/15",)
    assert dict(cfg.nat_overrides) == {"192.168.63.1": "10.0.0.250"}
    assert cfg.guard.max_change == 20
    assert cfg.status_listen == ("127.0.0.1", 9464)


def test_static_peers_example():
    cfg = load_config(str(REPO / "examples" / "static-peers.yaml"))
    assert cfg.registry.backend == "static"
    assert cfg.addresses.overlay == "192.168.0.11"
    assert [p.node_id for p in cfg.registry.peers] == ["ec2-b", "vpc-a", "vpc-b"]
    vpc_b = cfg.registry.peers[2]
    assert vpc_b.groups == ("batch", "db")
    assert vpc_b.open_ports == ((5432, 5432), (8000, 8100))
    assert cfg.filter.reject_all is True


def test_port_specs_are_normalised():
    cfg = config_from_dict({"node_id": "a", "network": "n", "filter": {"open_ports": [443, "8000-8100", 80, 443, " 22 "]}})
    assert cfg.filter.open_ports == ((22, 22), (80, 80), (443, 443), (8000, 8100))


def test_unknown_key_far_from_every_known_key_gets_no_guess():
    with pytest.raises(InvalidConfigError) as info:
        config_from_dict({"network": "n", "colour": "blue"})
    assert (info.value.path, info.value.reason) == ("colour", "unknown key")


def test_nat_overrides_outside_the_subnet_are_routed():
    cfg = config_from_dict({"network": "n", "nat_overrides": {
        "192.168.75.1": "10.8.1.1", "192.168.63.1": "10.0.0.250", "10.9.9.9": "10.0.0.251"}})
    assert dict(cfg.nat_overrides) == {"192.168.75.1": "10.8.1.1", "192.168.63.1": "10.0.0.250", "10.9.9.9": "10.0.0.251"}
    # 192.168.0.0/18 ends at 192.168.63.255: only the other two need a route of their own
    assert sorted(cfg.override_routes) == ["10.9.9.9", "192.168.75.1"]


def test_registry_controller_is_one_address_or_a_list():
    one = config_from_dict(yaml.safe_load(_cfg("registry:\n  backend: grpc\n  controller: 'ctl:9470'\n  tls: {ca: a, cert: b, key: c}\n")))
    assert one.registry.controller == ("ctl:9470",)
    two = config_from_dict(yaml.safe_load(_cfg("registry:\n  backend: grpc\n  controller: ['10.0.0.1:9470', 'ctl2:9471']\n  tls: {ca: a, cert: b, key: c}\n")))
    assert two.registry.controller == ("10.0.0.1:9470", "ctl2:9471")
    assert config_from_dict({"controller": {"tls": {"ca": "a", "cert": "b", "key": "c"}}}).controller.lease_s == 60.0


def test_network_left_to_aws_imds_and_controller_configs():
    assert config_from_dict({"discovery": {"provider": "aws-imds"}}).network is None
    ctl = config_from_dict({"controller": {"tls": {"ca": "a", "cert": "b", "key": "c"}}})
    assert ctl.network is None and ctl.controller is not None


def test_check_config_says_where_the_network_comes_from(files, cli):
    assert "network from aws-imds" in cli["network-from-aws-imds"].stdout
    assert "network ec2" in cli["examples/full.yaml"].stdout


def test_config_is_frozen():
    cfg = config_from_dict({"node_id": "a", "network": "n"})
    with pytest.raises(AttributeError):
        cfg.node_id = "b"  # type: ignore[misc]


def test_non_utf8_file_is_a_config_error(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"node_id: caf\xe9\n")
    with pytest.raises(InvalidConfigError) as info:
        load_config(str(p))
    assert str(p) in str(info.value)


def test_absurdly_nested_yaml_is_a_config_error(tmp_path):
    p = tmp_path / "deep.yaml"
    p.write_text("node_id: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(InvalidConfigError) as info:
        load_config(str(p))
    assert str(p) in str(info.value)


# --- property: config_from_dict rejects junk only with InvalidConfigError ----------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["10.0.0.1", "192.168.0.7", "0.0.0.0", "10.0.0.0/8", "a:1", "/x", "1-2", "tc", "static"]),
)
_junk = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4),
    ),
    max_leaves=12,
)
_KEYS = [
    "node_id", "network", "overlay_subnet", "addresses", "discovery", "groups", "registry",
    "datapath", "filter", "nat_overrides", "guard", "throttle", "status_listen", "state_dir",
]
_SUBKEYS = [
    "private", "public", "overlay", "provider", "interface", "backend", "hosts", "prefix",
    "peers", "auth", "mode", "sizes", "reject_all", "open_ports", "ssh_whitelist",
    "max_change", "min_s", "max_s", "timeout_s", "user", "password",
]
_shaped = st.dictionaries(
    st.sampled_from(_KEYS),
    st.one_of(_junk, st.dictionaries(st.sampled_from(_SUBKEYS), _junk, max_size=4)),
    max_size=6,
)


@given(st.one_of(_junk, _shaped))
def test_config_from_dict_raises_only_invalid_config_error(obj):
    try:
        cfg = config_from_dict(obj)
    except InvalidConfigError as exc:
        assert isinstance(exc.path, str) and exc.reason
        return
    except Exception as exc:  # noqa: BLE001 - the property under test
        pytest.fail(f"config_from_dict({obj!r}) raised {type(exc).__name__}: {exc}")
    assert isinstance(cfg, Config)


@given(st.text(max_size=200))
def test_load_config_on_arbitrary_text(tmp_path_factory, text):
    p = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(str(p))
    except InvalidConfigError:
        pass
    except Exception as exc:  # noqa: BLE001 - the property under test
        pytest.fail(f"load_config on {text!r} raised {type(exc).__name__}: {exc}")


def test_yaml_is_parsed_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("node_id: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(InvalidConfigError) as info:
        load_config(str(p))
    assert "python/object" in str(info.value)


def test_datapath_location_flags_then_config_then_defaults(tmp_path):
    from overlay.config import datapath_location

    assert datapath_location(None) == (None, "eth0", "/sys/fs/bpf/overlay")
    assert datapath_location(None, "ens5", "/x") == (None, "ens5", "/x")
    p = tmp_path / "c.yaml"
    p.write_text("node_id: a\nnetwork: n\ndatapath: {interface: ens6, pin_root: /sys/fs/bpf/mine}\n")
    cfg, iface, root = datapath_location(str(p))
    assert (cfg.node_id, iface, root) == ("a", "ens6", "/sys/fs/bpf/mine")
    assert datapath_location(str(p), "ens7", None)[1:] == ("ens7", "/sys/fs/bpf/mine")
    assert datapath_location(str(p), None, "/y")[1:] == ("ens6", "/y")


def test_socket_mode_and_its_cgroup():
    cfg = config_from_dict({"network": "n", "datapath": {"mode": "socket", "cgroup": "/sys/fs/cgroup/ovl//x/"}})
    assert (cfg.datapath.mode, cfg.datapath.cgroup) == ("socket", "/sys/fs/cgroup/ovl/x")
    assert config_from_dict({"network": "n"}).datapath.cgroup == "/sys/fs/cgroup"
