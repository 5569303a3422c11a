"""Address providers: static, netlink (in a namespace the test makes), aws-imds (a local fake IMDS)."""

from __future__ import annotations

import ipaddress
import time

import pytest

import overlay.discovery as disc
from overlay import backends
from overlay.config import Addresses, Config, Discovery
from overlay.discovery import DiscoveryError, aws_imds, discover, netlink
from overlay.errors import OverlayError
from tests.support.imds import FakeIMDS

SUBNET = ipaddress.IPv4Network("192.168.0.0/18")


def config(addresses=None, discovery=None) -> Config:
    return Config(node_id="n1", network="ec2", overlay_subnet=SUBNET, addresses=addresses, discovery=discovery)


# --- static and dispatch -------------------------------------------------------------------


def test_static_addresses():
    assert discover(config(addresses=Addresses("10.0.0.11", "198.18.1.11"))) == ("10.0.0.11", "198.18.1.11")


def test_static_provider_without_addresses():
    with pytest.raises(DiscoveryError, match="addresses.private"):
        discover(config(discovery=Discovery("static")))


def test_neither_addresses_nor_discovery():
    with pytest.raises(DiscoveryError, match="neither addresses nor discovery"):
        discover(config())


def test_discovery_error_is_an_overlay_error():
    assert issubclass(DiscoveryError, OverlayError)


class _EP:
    def __init__(self, name, obj, value="plugin:provider"):
        self.name, self._obj, self.value = name, obj, value

    def load(self):
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


@pytest.mark.parametrize("name, plugin, error", [
    ("fake", lambda cfg: ("10.1.2.3", "198.18.2.3"), None),
    ("fake", lambda cfg: ("10.1.2.3", "127.0.0.1"), "public address: 127.0.0.1 is a loopback address"),
    ("fake", lambda cfg: ("10.1.2.0/24", "198.18.2.3"), "private address: .*network \\(CIDR\\)"),
    ("fake", lambda cfg: "10.1.2.3", "expected \\(private, public\\)"),
    ("fake", lambda cfg: 1 / 0, "failed: ZeroDivisionError"),
    ("fake", ImportError("no module plugin"), "failed to load"),
    ("fake", "not callable", "not callable"),
    ("nope", None, "unknown address provider 'nope'; known: aws-imds, fake, netlink, static"),
])
def test_entry_point_providers(monkeypatch, name, plugin, error):
    monkeypatch.setattr(backends, "entry_points", lambda group: [_EP("fake", plugin)] if group == "overlay.providers" else [])
    cfg = config(discovery=Discovery(name))
    if error is None:
        assert discover(cfg) == ("10.1.2.3", "198.18.2.3")
    else:
        with pytest.raises(DiscoveryError, match=error):
            discover(cfg)


def test_builtin_names_cannot_be_overridden(monkeypatch):
    monkeypatch.setattr(backends, "entry_points",
                        lambda group: [_EP("static", lambda cfg: ("10.9.9.9", "10.9.9.9"))])
    assert discover(config(addresses=Addresses("10.0.0.1", "198.18.0.1"))) == ("10.0.0.1", "198.18.0.1")


# --- aws-imds against a local fake ---------------------------------------------------------



def imds_config(endpoint: str, timeout: float = 2.0) -> Config:
    return config(discovery=Discovery("aws-imds", endpoint=endpoint, timeout_s=timeout))


def test_imds_public_ipv4():
    meta = {aws_imds.LOCAL_IPV4: "10.0.0.11", aws_imds.PUBLIC_IPV4: "198.18.1.11"}
    with FakeIMDS(meta) as fake:
        assert discover(imds_config(fake.endpoint)) == ("10.0.0.11", "198.18.1.11")
    methods = [(m, p) for m, p, _ in fake.requests]
    assert methods[0] == ("PUT", aws_imds.TOKEN_PATH)
    assert fake.requests[0][2]["x-aws-ec2-metadata-token-ttl-seconds"].isdigit()
    assert all(h.get("x-aws-ec2-metadata-token") == fake.token for m, _, h in fake.requests if m == "GET")
    assert sum(1 for m, _ in methods if m == "PUT") == 1  # one token for the whole run


def test_imds_vpc_public_ipv4s_when_public_ipv4_is_absent():
    mac = "0e:49:61:0f:c3:11"
    meta = {
        aws_imds.LOCAL_IPV4: "10.0.0.12",
        aws_imds.MAC: mac,
        f"/latest/meta-data/network/interfaces/macs/{mac}/public-ipv4s": "198.18.1.12\n198.18.1.99",
    }
    with FakeIMDS(meta) as fake:
        assert discover(imds_config(fake.endpoint)) == ("10.0.0.12", "198.18.1.12")


def test_imds_without_any_public_address():
    meta = {aws_imds.LOCAL_IPV4: "10.0.0.13", aws_imds.MAC: "0e:00:00:00:00:01"}
    with FakeIMDS(meta) as fake, pytest.raises(DiscoveryError, match="no public IPv4 address"):
        discover(imds_config(fake.endpoint))


def test_imds_token_required_and_refused():
    meta = {aws_imds.LOCAL_IPV4: "10.0.0.11", aws_imds.PUBLIC_IPV4: "198.18.1.11"}
    with FakeIMDS(meta, token_status=403) as fake, pytest.raises(DiscoveryError, match="HTTP 403.*token"):
        discover(imds_config(fake.endpoint))
    # and the fake really insists on the token (IMDSv1-style GET is refused)
    with FakeIMDS(meta) as fake:
        client = aws_imds.Client(fake.endpoint, 2.0)
        with pytest.raises(DiscoveryError, match="HTTP 401"):
            client._request("GET", aws_imds.LOCAL_IPV4, {})


def test_imds_bad_address_is_rejected():
    meta = {aws_imds.LOCAL_IPV4: "10.0.0.11", aws_imds.PUBLIC_IPV4: "not-an-address"}
    with FakeIMDS(meta) as fake, pytest.raises(DiscoveryError, match="public address: 'not-an-address'"):
        discover(imds_config(fake.endpoint))


def test_imds_unreachable():
    with FakeIMDS({}) as fake:
        endpoint = fake.endpoint
    with pytest.raises(DiscoveryError, match="unreachable"):
        discover(imds_config(endpoint, timeout=1.0))


def test_imds_timeout_is_bounded():
    with FakeIMDS({}, delay=2.0) as fake:
        t0 = time.monotonic()
        with pytest.raises(DiscoveryError, match="unreachable"):
            discover(imds_config(fake.endpoint, timeout=0.3))
        assert time.monotonic() - t0 < 1.5


def test_imds_ignores_proxy_environment(monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    meta = {aws_imds.LOCAL_IPV4: "10.0.0.11", aws_imds.PUBLIC_IPV4: "198.18.1.11"}
    with FakeIMDS(meta) as fake:
        assert discover(imds_config(fake.endpoint)) == ("10.0.0.11", "198.18.1.11")


def _no_network(cfg: Config) -> Config:
    import dataclasses

    return dataclasses.replace(cfg, network=None)


def test_imds_network_is_the_vpc_id():
    mac = "0e:49:61:0f:c3:11"
    meta = {aws_imds.MAC: mac, f"/latest/meta-data/network/interfaces/macs/{mac}/vpc-id": "vpc-0a1b2c3d"}
    with FakeIMDS(meta) as fake:
        assert disc.network(_no_network(imds_config(fake.endpoint))) == "vpc-0a1b2c3d"


def test_imds_network_is_ec2_outside_any_vpc():
    with FakeIMDS({aws_imds.MAC: "0e:00:00:00:00:02"}) as fake:
        assert disc.network(_no_network(imds_config(fake.endpoint))) == "ec2"


def test_imds_network_that_is_not_a_name_is_refused():
    mac = "0e:00:00:00:00:03"
    meta = {aws_imds.MAC: mac, f"/latest/meta-data/network/interfaces/macs/{mac}/vpc-id": "vpc 1/2"}
    with FakeIMDS(meta) as fake, pytest.raises(DiscoveryError, match="network"):
        disc.network(_no_network(imds_config(fake.endpoint)))


def test_configured_network_wins_without_asking_imds():
    with FakeIMDS({aws_imds.MAC: "0e:00:00:00:00:04"}) as fake:
        assert disc.network(imds_config(fake.endpoint)) == "ec2"  # config(): network "ec2"
    assert fake.requests == []


def test_network_from_a_provider_that_has_none():
    with pytest.raises(DiscoveryError, match="does not supply one"):
        disc.network(_no_network(config(discovery=Discovery("netlink", interface="eth0"))))


def test_imds_endpoint_must_be_http():
    with pytest.raises(DiscoveryError, match="http"):
        discover(imds_config("file:///etc/passwd"))


def test_netlink_reads_the_root_namespace_lo():
    # no root needed: reading addresses over netlink is unprivileged
    with __import__("pyroute2").IPRoute() as ipr:
        assert netlink.first_ipv4(ipr, "lo") == "127.0.0.1"

