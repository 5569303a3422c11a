"""The netlink address provider in a network namespace the test creates (root)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import uuid

import pytest

from overlay.config import Config, Discovery
from overlay.discovery import DiscoveryError, discover
from overlay.netns import Netns, in_netns

SUBNET = ipaddress.IPv4Network("192.168.0.0/18")


def config(discovery=None) -> Config:
    return Config(node_id="n1", network="ec2", overlay_subnet=SUBNET, discovery=discovery)


# --- netlink in a namespace the test creates -----------------------------------------------


def _run_in_netns(netns: str, fn):
    """Call ``fn()`` in a thread moved into ``netns`` (setns affects only that thread)."""
    result = in_netns(netns, fn)
    if isinstance(result, BaseException):
        raise result
    return result


@pytest.fixture
def netns():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    ns = Netns.add(f"ovltest-disc-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        for cmd in (("link", "add", "priv0", "type", "veth", "peer", "name", "pub0"),
                    ("addr", "add", "10.77.0.5/24", "dev", "priv0"),
                    ("addr", "add", "10.77.0.6/24", "dev", "priv0"),  # secondary
                    ("addr", "add", "198.18.77.5/24", "dev", "pub0"),
                    ("link", "add", "empty0", "type", "veth", "peer", "name", "empty1")):
            ns.run("ip", *cmd)
        yield ns.name
    finally:
        ns.delete()


def test_netlink_private_and_public_interfaces(netns):
    cfg = config(discovery=Discovery("netlink", interface="priv0", public_interface="pub0"))
    assert _run_in_netns(netns, lambda: discover(cfg)) == ("10.77.0.5", "198.18.77.5")


def test_netlink_public_defaults_to_private(netns):
    cfg = config(discovery=Discovery("netlink", interface="priv0"))
    assert _run_in_netns(netns, lambda: discover(cfg)) == ("10.77.0.5", "10.77.0.5")


@pytest.mark.parametrize("interface, error", [
    ("missing0", "interface 'missing0' does not exist"),
    ("empty0", "interface 'empty0' has no IPv4 address"),
    ("lo", "loopback"),
])
def test_netlink_errors(netns, interface, error):
    if interface == "lo":
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True, timeout=20)
    cfg = config(discovery=Discovery("netlink", interface=interface))
    with pytest.raises(DiscoveryError, match=error):
        _run_in_netns(netns, lambda: discover(cfg))
