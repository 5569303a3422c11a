"""The old system's party entry and registry.neti config: pure, table-driven.

Expected values are written by hand from the old format's description (split on the first
'-', then '|' into public, private, overlay, vpcflag)."""

from __future__ import annotations

import ipaddress

import pytest

from overlay.config import config_from_dict
from overlay.errors import InvalidConfigError
from overlay.neti import PartyEntry, format_entry, parse_entry

SUBNET = ipaddress.IPv4Network("192.168.0.0/18")
U = "0123456789abcdef0123456789abcdef"


def test_format_is_the_old_one():
    name = format_entry("203.0.113.5", "10.1.0.5", "192.168.0.9", 1, uid=U)
    assert name == f"{U}-203.0.113.5|10.1.0.5|192.168.0.9|1"
    fresh = format_entry("203.0.113.5", "10.1.0.5", "192.168.0.9", 0)
    uid, rest = fresh.split("-", 1)
    assert len(uid) == 32 and int(uid, 16) >= 0 and rest == "203.0.113.5|10.1.0.5|192.168.0.9|0"
    with pytest.raises(ValueError):
        format_entry("203.0.113.5", "10.1.0.5", "192.168.0.9", 2)


def test_parse_good():
    e = parse_entry(f"{U}-203.0.113.5|10.1.0.5|192.168.0.9|0", SUBNET)
    assert e == PartyEntry(U, "203.0.113.5", "10.1.0.5", "192.168.0.9", 0)
    assert e.name == f"{U}-203.0.113.5|10.1.0.5|192.168.0.9|0"


@pytest.mark.parametrize("name, why", [
    ("no-dash-at-all".replace("-", ""), "no '-'"),
    (f"{U[:-1]}-203.0.113.5|10.1.0.5|192.168.0.9|0", "uuid4"),
    (f"{U.upper()}-203.0.113.5|10.1.0.5|192.168.0.9|0", "uuid4"),
    (f"{U}-203.0.113.5|10.1.0.5|192.168.0.9", "3 '|'-separated fields"),
    (f"{U}-203.0.113.5|10.1.0.5|192.168.0.9|0|x", "5 '|'-separated fields"),
    (f"{U}-203.0.113.500|10.1.0.5|192.168.0.9|0", "public address"),
    (f"{U}-203.0.113.5|010.1.0.5|192.168.0.9|0", "private address"),
    (f"{U}-203.0.113.5|10.1.0.5|10.0.0.9|0", "outside the overlay subnet"),
    (f"{U}-203.0.113.5|10.1.0.5|192.168.0.0|0", "network or broadcast"),
    (f"{U}-203.0.113.5|10.1.0.5|192.168.0.9|2", "not 0 or 1"),
    (f"{U}-203.0.113.5|10.1.0.5|192.168.0.9|", "not 0 or 1"),
])
def test_parse_bad(name, why):
    with pytest.raises(ValueError, match=why.replace("|", r"\|")):
        parse_entry(name, SUBNET)


BASE = {"node_id": "a", "network": "vpc", "addresses": {"private": "10.0.0.1", "public": "198.18.0.1"}}


def neti(section: dict, **registry) -> dict:
    return {**BASE, "registry": {**registry, "neti": section}}


def test_config_defaults_and_map():
    c = config_from_dict(neti({"prefix": "/neti", "vpcflag": {"vpc": 1, "ec2": 0}}))
    n = c.registry.neti
    assert (n.prefix, n.ip_map, n.id_to_ip, n.ip_to_id, n.max_change) == ("/neti", "ip-map", "id-to-ip",
                                                                          "ip-to-id", "maxchange")
    assert n.flag_of("vpc") == 1 and n.network_of(0) == "ec2" and n.network_of(1) == "vpc"
    assert config_from_dict(BASE).registry.neti is None


@pytest.mark.parametrize("section, registry, path", [
    ({"vpcflag": {"vpc": 1}}, {}, "registry.neti.prefix"),
    ({"prefix": "neti", "vpcflag": {"vpc": 1}}, {}, "registry.neti.prefix"),
    ({"prefix": "/neti"}, {}, "registry.neti.vpcflag"),
    ({"prefix": "/neti", "vpcflag": {"vpc": 1, "ec2": 1}}, {}, "registry.neti.vpcflag.ec2"),
    ({"prefix": "/neti", "vpcflag": {"vpc": True}}, {}, "registry.neti.vpcflag.vpc"),
    ({"prefix": "/neti", "vpcflag": {"ec2": 0}}, {}, "registry.neti.vpcflag"),
    ({"prefix": "/neti", "vpcflag": {"vpc": 1}, "ip_map": "a/b"}, {}, "registry.neti.ip_map"),
    ({"prefix": "/neti", "vpcflag": {"vpc": 1}, "ip_map": "x", "id_to_ip": "x"}, {}, "registry.neti.id_to_ip"),
    ({"prefix": "/neti", "vpcflag": {"vpc": 1}, "zk_prefix": "/x"}, {}, "registry.neti.zk_prefix"),
    ({"prefix": "/overlay", "vpcflag": {"vpc": 1}}, {}, "registry.neti.prefix"),
    ({"prefix": "/neti", "vpcflag": {"vpc": 1}}, {"backend": "static"}, "registry.neti"),
])
def test_config_errors_name_the_key(section, registry, path):
    with pytest.raises(InvalidConfigError) as err:
        config_from_dict(neti(section, **registry))
    assert str(err.value).split(":")[0] == path, str(err.value)


def test_agent_version_is_optional_validated_and_not_identity():
    from overlay.errors import InvalidRecord
    from overlay.model import node_from_dict, parse_node_record, serialise_node

    rec = {"v": 1, "node_id": "a", "network": "ec2", "private": "10.0.0.1", "public": "198.18.0.1",
           "overlay": "192.168.0.5", "groups": [], "open_ports": []}
    plain = node_from_dict(rec)
    assert plain.agent_version is None and "agent_version" not in plain.to_dict()
    tagged = node_from_dict({**rec, "agent_version": "0.1.0"})
    assert tagged.agent_version == "0.1.0" and tagged == plain
    assert parse_node_record(serialise_node(tagged)).agent_version == "0.1.0"
    for bad in ("", "v1", "1 2", "1" * 65, 1, ["1"]):
        with pytest.raises(InvalidRecord, match="agent_version"):
            node_from_dict({**rec, "agent_version": bad})
