"""The controller's bridge to the old system's layout (registry.neti in the controller's
config), against a real ZooKeeper and a daemon's gRPC backend: daemons behind the controller
see old hosts (source neti), allocate in the shared space, and appear in the old party."""

from __future__ import annotations

import dataclasses
import ipaddress
import json

import pytest

from overlay.config import RegistryConfig, TlsConfig
from overlay.config_neti import NetiConfig
from overlay.lab.neti_host import join_party, old_allocate, read_party
from overlay.registry.grpc import GrpcRegistry
from tests.support import grpc as gs
from tests.support.wait import wait_for

pytestmark = pytest.mark.zk
SUBNET = "192.168.0.0/24"


@pytest.fixture(scope="module")
def certs():
    with gs.made_certs() as made:
        yield made


def test_daemons_behind_the_controller_meet_old_hosts(zk_server, zk_prefix, zk_client, certs):
    neti = NetiConfig(f"{zk_prefix}/neti", vpcflag=(("ec2", 0), ("vpc", 1)))
    old_ip = old_allocate(zk_client, neti, ipaddress.IPv4Network(SUBNET), "i-old")
    join_party(zk_client, neti, "203.0.113.5", "10.1.0.5", old_ip, 1)
    cfg = gs.controller_config(zk_server.address, zk_prefix, certs[0], subnet=SUBNET,
                               registry={"neti": {"prefix": neti.prefix, "vpcflag": {"ec2": 0, "vpc": 1}}})
    with gs.controllers() as start:
        ctl = start(cfg)
        rc = RegistryConfig(backend="grpc", controller=(ctl.address,), timeout_s=5,
                            tls=TlsConfig(f"{certs[0]}/ca.crt", f"{certs[0]}/web-1.crt", f"{certs[0]}/web-1.key"))
        reg = GrpcRegistry(rc, ipaddress.IPv4Network(SUBNET), "web-1", backoff=(0.05, 0.5),
                           options=gs.FAST_CLIENT_OPTIONS)
        reg.start(lambda: None)
        try:
            ip = reg.allocate("web-1")
            assert ip != old_ip
            assert zk_client.get(f"{neti.prefix}/ip-to-id/{ip}")[0] == b"web-1"     # the shared space
            assert zk_client.get(f"{neti.prefix}/id-to-ip/web-1")[0].decode() == ip
            reg.register(dataclasses.replace(gs.node("web-1", ip, groups=()), agent_version="0.1.0"))
            # the record the controller writes keeps the daemon's version (overlay audit reads it)
            assert json.loads(zk_client.get(f"{zk_prefix}/nodes/web-1")[0])["agent_version"] == "0.1.0"
            v = wait_for(lambda: (lambda v: v if "i-old" in v.nodes else None)(reg.view()), timeout=15,
                         what="the old host behind the controller")
            assert v.source_of("i-old") == "neti"
            assert (v.nodes["i-old"].network, v.nodes["i-old"].private, v.nodes["i-old"].public) == \
                ("vpc", "10.1.0.5", "203.0.113.5")
            # the old hosts find web-1 in their party, in the old format (web-1 is in ec2: flag 0)
            wait_for(lambda: ip in read_party(zk_client, neti, 1), timeout=15, what="web-1 in the old party")
            assert read_party(zk_client, neti, 1)[ip] == gs.node("web-1", ip).public
            assert read_party(zk_client, neti, 0)[ip] == gs.node("web-1", ip).private
            with gs.client(ctl.address, certs[0]) as op:
                nodes, _, _, _, sources = op.list_nodes_sources()
                assert sorted(n.node_id for n in nodes) == ["i-old", "web-1"] and sources == {"i-old": "neti"}
            for c in zk_client.get_children(f"{neti.prefix}/ip-map"):
                if f"|{old_ip}|" in c:
                    zk_client.delete(f"{neti.prefix}/ip-map/{c}")
            wait_for(lambda: "i-old" not in reg.view().nodes, timeout=15, what="the old host gone")
        finally:
            reg.close()
