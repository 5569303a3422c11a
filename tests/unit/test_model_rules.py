"""overlay/model.py rule by rule, from hand tables (DESIGN §4.2 and docs/registry.md).

Every limit at its edge and one step past, the key each error names, and the exact bytes
a record serialises to (compact JSON, sorted keys), written out here by hand. The fuzzers
of test_records.py check that nothing else than InvalidRecord escapes; these rows check
which records are refused and what the message says.
"""

from __future__ import annotations

import json

import pytest

from overlay.errors import InvalidRecord
from overlay.model import (
    MAX_GROUPS,
    MAX_PORTS,
    MAX_RECORD_BYTES,
    NODE_RECORD_V6,
    RECORD_VERSION,
    Endpoint,
    Node,
    Policy,
    node_from_dict,
    parse_node_record,
    parse_policy_record,
    policy_from_dict,
    serialise_node,
    serialise_policy,
    valid_name,
    valid_version,
)

GOOD = {"v": 1, "node_id": "web-1", "network": "ec2", "private": "10.0.1.5", "public": "198.18.1.5",
        "overlay": "192.168.0.17"}
POLICY = {"v": 1, "from": {"group": "web"}, "to": {"group": "db"}, "proto": "tcp", "ports": [5432]}


def node(**changes) -> Node:
    return node_from_dict({**GOOD, **changes})


def refused_node(message: str, **changes) -> None:
    with pytest.raises(InvalidRecord, match=message):
        node_from_dict({**GOOD, **changes})


def refused_policy(message: str, policy_id: str = "", **changes) -> None:
    with pytest.raises(InvalidRecord, match=message):
        policy_from_dict({**POLICY, **changes}, policy_id)


def test_the_documented_limits():
    assert (MAX_RECORD_BYTES, MAX_GROUPS, MAX_PORTS) == (4096, 64, 256)
    assert (RECORD_VERSION, NODE_RECORD_V6) == (1, 2)


# -- names and versions ------------------------------------------------------------

@pytest.mark.parametrize("name", ["a", "0", "web-1", "a.b_c-d", "A" * 253, "x" + "." * 252, "9" + "-" * 252])
def test_valid_names(name):
    assert valid_name(name, "group") == name


@pytest.mark.parametrize(("name", "message"), [
    ("", "^group '' must be 1-253 characters of letters, digits, '.', '_' or '-', starting with a letter or digit$"),
    ("A" * 254, "must be 1-253 characters"),
    (".", "group '.' must be"), ("..", "group '..' must be"), ("-a", "must be"), ("_a", "must be"),
    (".a", "must be"), ("a b", "must be"), ("a/b", "must be"), ("a\n", "must be"), ("é", "must be"),
    ("a:b", "must be"), ("a+b", "must be"),
    (5, "^group must be a string, got int$"), (None, "group must be a string, got NoneType"),
    (b"web", "group must be a string, got bytes"),
])
def test_invalid_names(name, message):
    with pytest.raises(ValueError, match=message):
        valid_name(name, "group")


@pytest.mark.parametrize("version", ["0", "1.2.3", "2.0.0+g1a2b", "1_2-rc.3", "9" * 64, "1" + "a" * 63])
def test_valid_versions(version):
    assert valid_version(version) == version


@pytest.mark.parametrize("version", ["", "v1.2", ".1", "1" * 65, "1 2", "1/2", "1:2", "1\n", 1, None, 1.5])
def test_invalid_versions(version):
    with pytest.raises(ValueError, match=r"is not a version \(a digit, then up to 63 of letters, digits, '\.', '\+', '_', '-'\)$"):
        valid_version(version)


# -- node records ------------------------------------------------------------------

def test_a_minimal_node_and_its_defaults():
    n = node()
    assert n == Node("web-1", "ec2", "10.0.1.5", "198.18.1.5", "192.168.0.17")
    assert (n.groups, n.open_ports, n.private6, n.public6, n.agent_version) == ((), (), None, None, None)


def test_the_agent_version_is_read_and_written_but_not_part_of_equality():
    n = node(agent_version="1.4.0")
    assert n.agent_version == "1.4.0"
    assert n == node()
    assert serialise_node(n) == (
        b'{"agent_version":"1.4.0","groups":[],"network":"ec2","node_id":"web-1","open_ports":[],'
        b'"overlay":"192.168.0.17","private":"10.0.1.5","public":"198.18.1.5","v":1}')
    assert node(agent_version=None).agent_version is None


@pytest.mark.parametrize("value", ["", "v1", 1, ["1.0"]])
def test_a_bad_agent_version_names_the_key(value):
    refused_node("^node record: agent_version: .* is not a version", agent_version=value)


def test_groups_are_sorted_and_deduplicated_and_the_limit_is_64():
    assert node(groups=["b", "a", "b"]).groups == ("a", "b")
    sixty_four = [f"g{i:02}" for i in range(64)]
    assert node(groups=sixty_four).groups == tuple(sixty_four)
    assert node(groups=sixty_four + ["g00"] * 0).groups == tuple(sixty_four)
    refused_node("^node record: groups: more than 64 groups", groups=[f"g{i:02}" for i in range(65)])
    refused_node("^node record: groups: must be a list of group names", groups="web")
    refused_node("^node record: groups: must be a list of group names", groups={"web": 1})
    refused_node("^node record: groups: group 'a b' must be", groups=["web", "a b"])


def test_ports_are_sorted_and_deduplicated_and_the_limit_is_256():
    assert node(open_ports=[443, 80, "8000-8100", 80, "22"]).open_ports == ((22, 22), (80, 80), (443, 443),
                                                                            (8000, 8100))
    assert len(node(open_ports=list(range(1, 257))).open_ports) == 256
    refused_node("^node record: open_ports: open_ports has more than 256 entries", open_ports=list(range(1, 258)))
    refused_node("^node record: open_ports: open_ports must be a list", open_ports=80)
    refused_node(r"^node record: open_ports: open_ports\[2\]: ", open_ports=[1, 2, 0])
    refused_node(r"^node record: open_ports: open_ports\[0\]: ", open_ports=["9-8"])


@pytest.mark.parametrize(("key", "value"), [
    ("node_id", "a/b"), ("node_id", None), ("network", ".."), ("network", 7),
    ("private", "10.0.1.0/24"), ("private", None), ("public", "0.0.0.0"), ("public", "fd00::1"),
    ("overlay", "224.0.0.1"), ("overlay", None),
])
def test_a_bad_field_names_its_key(key, value):
    refused_node(f"^node record: {key}: ", **{key: value})


@pytest.mark.parametrize("key", ["node_id", "network", "private", "public", "overlay"])
def test_every_required_field_is_required(key):
    obj = dict(GOOD)
    del obj[key]
    with pytest.raises(InvalidRecord, match=f"^node record: {key}: "):
        node_from_dict(obj)


def test_the_overlay_subnet_is_checked_only_when_given():
    import ipaddress

    subnet = ipaddress.IPv4Network("192.168.0.0/18")
    assert node_from_dict({**GOOD, "overlay": "10.9.9.9"}).overlay == "10.9.9.9"
    with pytest.raises(InvalidRecord, match="^node record: overlay: 10.9.9.9 is outside the overlay subnet"):
        node_from_dict({**GOOD, "overlay": "10.9.9.9"}, subnet)
    assert node_from_dict(GOOD, subnet).overlay == "192.168.0.17"


@pytest.mark.parametrize(("obj", "message"), [
    ({**GOOD, "v": 0}, r"^node record: unsupported version v=0 \(expected 1 or 2\)"),
    ({**GOOD, "v": 3}, r"unsupported version v=3 \(expected 1 or 2\)"),
    ({**GOOD, "v": 1.0}, r"unsupported version v=1\.0"),
    ({**GOOD, "v": True}, "unsupported version v=True"),
    ({**GOOD, "v": "1"}, "unsupported version v='1'"),
    ({k: v for k, v in GOOD.items() if k != "v"}, "unsupported version v=None"),
    ({**GOOD, "colour": 1, "age": 2}, r"^node record: unknown keys \['age', 'colour'\]$"),
    ({**GOOD, "private6": "fd00::1"}, r"unknown keys \['private6'\] \(private6/public6 need version 2\)"),
    ({**GOOD, "public6": "fd00::1"}, r"\(private6/public6 need version 2\)"),
    ({**GOOD, "v": 2, "colour": 1}, r"unknown keys \['colour'\]$"),
    ([GOOD], "^node record must be a JSON object"),
])
def test_node_record_shape(obj, message):
    with pytest.raises(InvalidRecord, match=message):
        node_from_dict(obj)


def test_v2_takes_either_ipv6_address_alone_and_none_as_absent():
    n = node(v=2, private6="fd00::5")
    assert (n.private6, n.public6) == ("fd00::5", None)
    n = node(v=2, public6="2001:db8::5", private6=None)
    assert (n.private6, n.public6) == (None, "2001:db8::5")
    refused_node("^node record: private6: ", v=2, private6="10.0.0.1")
    refused_node("^node record: public6: ", v=2, public6="fe80::1")


@pytest.mark.parametrize(("n", "network", "real", "real6"), [
    (Node("a", "ec2", "10.0.0.1", "198.18.0.1", "192.168.0.1", private6="fd00::1", public6="2001:db8::1"),
     "ec2", "10.0.0.1", "fd00::1"),
    (Node("a", "ec2", "10.0.0.1", "198.18.0.1", "192.168.0.1", private6="fd00::1", public6="2001:db8::1"),
     "gcp", "198.18.0.1", "2001:db8::1"),
    (Node("a", "ec2", "10.0.0.1", "198.18.0.1", "192.168.0.1"), "ec2", "10.0.0.1", None),
])
def test_real_addresses_by_network(n, network, real, real6):
    assert n.real_address_from(network) == real
    assert n.real6_from(network) == real6


@pytest.mark.parametrize(("n", "raw"), [
    (Node("a", "n", "10.0.0.1", "198.18.0.1", "192.168.0.1"),
     b'{"groups":[],"network":"n","node_id":"a","open_ports":[],"overlay":"192.168.0.1",'
     b'"private":"10.0.0.1","public":"198.18.0.1","v":1}'),
    (Node("a", "n", "10.0.0.1", "198.18.0.1", "192.168.0.1", ("db", "web"), ((22, 22), (8000, 8100))),
     b'{"groups":["db","web"],"network":"n","node_id":"a","open_ports":[22,"8000-8100"],'
     b'"overlay":"192.168.0.1","private":"10.0.0.1","public":"198.18.0.1","v":1}'),
    (Node("a", "n", "10.0.0.1", "198.18.0.1", "192.168.0.1", private6="fd00::1"),
     b'{"groups":[],"network":"n","node_id":"a","open_ports":[],"overlay":"192.168.0.1",'
     b'"private":"10.0.0.1","private6":"fd00::1","public":"198.18.0.1","v":2}'),
    (Node("a", "n", "10.0.0.1", "198.18.0.1", "192.168.0.1", public6="2001:db8::1"),
     b'{"groups":[],"network":"n","node_id":"a","open_ports":[],"overlay":"192.168.0.1",'
     b'"private":"10.0.0.1","public":"198.18.0.1","public6":"2001:db8::1","v":2}'),
])
def test_node_records_serialise_to_these_bytes(n, raw):
    assert serialise_node(n) == raw
    assert parse_node_record(raw) == n


def test_a_node_record_over_4096_bytes_does_not_serialise():
    groups = tuple(sorted(f"{i:02}" + "g" * 60 for i in range(64)))   # 64 groups of 65 bytes
    with pytest.raises(InvalidRecord, match=r"^node record is \d+ bytes, over 4096"):
        serialise_node(Node("a", "n", "10.0.0.1", "198.18.0.1", "192.168.0.1", groups))


# -- the bytes of a record ---------------------------------------------------------

def _padded(size: int) -> bytes:
    """GOOD as JSON, padded with spaces to exactly ``size`` bytes."""
    raw = json.dumps(GOOD).encode()
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def test_the_size_limit_is_4096_bytes():
    assert parse_node_record(_padded(4096)) == node()
    with pytest.raises(InvalidRecord, match="^node record is 4097 bytes, over the 4096-byte limit"):
        parse_node_record(_padded(4097))
    with pytest.raises(InvalidRecord, match="^policy record is 4097 bytes, over the 4096-byte limit"):
        parse_policy_record(b" " * 4097)


@pytest.mark.parametrize(("data", "message"), [
    (b"\xff{}", "^node record is not UTF-8: invalid start byte at byte 0"),
    (b'{"a": "\xc3"}', "^node record is not UTF-8: .* at byte 7"),
    (b"{", "^node record is not JSON: "),
    (b"[" * 2040 + b"]" * 2040, "^node record is not JSON"),   # nested past the recursion limit
    (b"", "^node record is not JSON"),
    (b"[1]", "^node record must be a JSON object, got list"),
    (b'"x"', "^node record must be a JSON object, got str"),
    (b"null", "^node record must be a JSON object, got NoneType"),
    (7, "^node record must be bytes, got int"),
    (None, "^node record must be bytes, got NoneType"),
    ("\ud800", "^node record is not UTF-8"),
])
def test_what_is_not_a_json_object_is_refused(data, message):
    with pytest.raises(InvalidRecord, match=message):
        parse_node_record(data)


def test_text_and_bytearray_records_are_read():
    text = json.dumps(GOOD)
    assert parse_node_record(text) == node()
    assert parse_node_record(bytearray(text.encode())) == node()
    assert parse_policy_record(json.dumps(POLICY)).proto == "tcp"


# -- policy records ----------------------------------------------------------------

def test_a_policy_and_its_defaults():
    p = policy_from_dict({k: v for k, v in POLICY.items() if k != "ports"})
    assert p == Policy(Endpoint(group="web"), Endpoint(group="db"), "tcp", (), "")
    assert policy_from_dict(POLICY, "db-access").policy_id == "db-access"
    assert policy_from_dict(POLICY, "") == Policy(Endpoint(group="web"), Endpoint(group="db"), "tcp", ((5432, 5432),))


@pytest.mark.parametrize(("changes", "policy_id", "message"), [
    ({"v": 2}, "", r"^policy record: unsupported version v=2 \(expected 1\)$"),
    ({"v": 1.0}, "", r"unsupported version v=1\.0"),
    ({"v": True}, "", "unsupported version v=True"),
    ({"colour": 1, "age": 2}, "", r"^policy record: unknown keys \['age', 'colour'\]$"),
    ({}, "a/b", "^policy record: id: policy id 'a/b' must be"),
    ({}, "..", "^policy record: id: policy id '..' must be"),
    ({"from": {"group": "web", "cidr": "10.0.0.0/8"}}, "",
     "^policy record: from: from must be an object with exactly one of 'group' or 'cidr'$"),
    ({"from": {}}, "", "^policy record: from: from must be an object with exactly one of 'group' or 'cidr'"),
    ({"from": "web"}, "", "^policy record: from: from must be an object"),
    ({"from": {"host": "x"}}, "", "^policy record: from: from has unknown key 'host'"),
    ({"from": {"group": "a b"}}, "", "^policy record: from: group 'a b' must be"),
    ({"from": {"cidr": "10.0.0.1/8"}}, "", "^policy record: from: '10.0.0.1/8' is not an IPv4 network"),
    ({"to": {"cidr": "10.0.0.0/8"}}, "", "^policy record: to: to has unknown key 'cidr'$"),
    ({"to": {"group": "db", "cidr": "10.0.0.0/8"}}, "",
     "^policy record: to: to must be an object with exactly one of 'group'$"),
    ({"to": None}, "", "^policy record: to: to must be an object with exactly one of 'group'$"),
    ({"proto": "TCP"}, "", "^policy record: proto: 'TCP' is not one of tcp, udp, icmp$"),
    ({"proto": None}, "", "^policy record: proto: None is not one of tcp, udp, icmp"),
    ({"proto": "icmp"}, "", "^policy record: ports: icmp policies take no ports$"),
    ({"ports": list(range(1, 258))}, "", "^policy record: ports: ports has more than 256 entries"),
    ({"ports": [1, 0]}, "", r"^policy record: ports: ports\[1\]: "),
    ({"ports": "80"}, "", "^policy record: ports: ports must be a list"),
])
def test_bad_policies_name_the_key(changes, policy_id, message):
    refused_policy(message, policy_id, **changes)


def test_the_policy_record_must_be_an_object():
    with pytest.raises(InvalidRecord, match="^policy record must be a JSON object"):
        policy_from_dict([POLICY])
    with pytest.raises(InvalidRecord, match="^policy record must be a JSON object, got list"):
        parse_policy_record(b"[]")


@pytest.mark.parametrize(("obj", "want"), [
    ({**POLICY, "from": {"cidr": "10.0.0.0/8"}, "ports": list(range(1, 257))},
     Policy(Endpoint(cidr="10.0.0.0/8"), Endpoint(group="db"), "tcp", tuple((p, p) for p in range(1, 257)))),
    ({**POLICY, "proto": "icmp", "ports": []}, Policy(Endpoint(group="web"), Endpoint(group="db"), "icmp")),
    ({**POLICY, "proto": "udp", "ports": ["53", 53, "1000-2000"]},
     Policy(Endpoint(group="web"), Endpoint(group="db"), "udp", ((53, 53), (1000, 2000)))),
])
def test_good_policies(obj, want):
    assert policy_from_dict(obj) == want


@pytest.mark.parametrize(("p", "raw"), [
    (Policy(Endpoint(group="web"), Endpoint(group="db"), "tcp", ((80, 80), (8000, 8100)), "x"),
     b'{"from":{"group":"web"},"ports":[80,"8000-8100"],"proto":"tcp","to":{"group":"db"},"v":1}'),
    (Policy(Endpoint(cidr="198.18.0.0/15"), Endpoint(group="db"), "icmp"),
     b'{"from":{"cidr":"198.18.0.0/15"},"ports":[],"proto":"icmp","to":{"group":"db"},"v":1}'),
])
def test_policy_records_serialise_to_these_bytes(p, raw):
    assert serialise_policy(p) == raw
    assert parse_policy_record(raw, p.policy_id) == p


def test_endpoint_records():
    assert Endpoint(group="web").to_dict() == {"group": "web"}
    assert Endpoint(cidr="10.0.0.0/8").to_dict() == {"cidr": "10.0.0.0/8"}
    assert Endpoint(group="").to_dict() == {"group": ""}
    assert Endpoint().to_dict() == {"cidr": None}


def test_policy_ids_take_part_in_equality():
    assert policy_from_dict(POLICY, "a") != policy_from_dict(POLICY, "b")


def test_records_are_frozen_and_nodes_have_slots():
    import dataclasses

    n = node()
    with pytest.raises(dataclasses.FrozenInstanceError):
        n.private = "10.0.0.9"
    assert not hasattr(n, "__dict__")   # slots: a Node is small (fleets hold 10,000 of them)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Endpoint(group="web").group = "db"
    p = policy_from_dict(POLICY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.proto = "udp"


@pytest.mark.parametrize("key", ["node_id", "network"])
def test_a_bad_name_is_named_twice_by_its_key(key):
    refused_node(f"^node record: {key}: {key} 'a/b' must be 1-253 characters", **{key: "a/b"})


def test_a_record_of_exactly_4096_bytes_serialises():
    empty = (b'{"groups":[],"network":"n","node_id":"a","open_ports":[],"overlay":"192.168.0.1",'
             b'"private":"10.0.0.1","public":"198.18.0.1","v":1}')
    # 17 groups (of at most 253 characters): their names, two quotes each and 16 commas fill
    # the rest of the 4096 bytes
    total = 4096 - len(empty) - 17 * 2 - 16
    sizes = [total // 17] * 16 + [total - 16 * (total // 17)]
    groups = tuple(f"g{i:02}" + "x" * (size - 3) for i, size in enumerate(sizes))

    def with_groups(gs):
        return Node("a", "n", "10.0.0.1", "198.18.0.1", "192.168.0.1", gs)

    assert len(serialise_node(with_groups(groups))) == 4096
    assert parse_node_record(serialise_node(with_groups(groups))) == with_groups(groups)
    with pytest.raises(InvalidRecord, match="^node record is 4097 bytes, over 4096$"):
        serialise_node(with_groups((*groups[:-1], groups[-1] + "x")))


def test_a_policy_read_without_an_id_has_none():
    assert parse_policy_record(json.dumps(POLICY)).policy_id == ""
    assert parse_policy_record(json.dumps(POLICY).encode()).policy_id == ""


def test_a_policy_record_over_4096_bytes_does_not_serialise():
    ranges = tuple((10000 + 2 * i, 10001 + 2 * i) for i in range(256))   # '"10000-10001",' each
    big = Policy(Endpoint(group="w" * 253), Endpoint(group="d" * 253), "tcp", ranges)
    with pytest.raises(InvalidRecord, match=r"^policy record is \d{4} bytes, over 4096$"):
        serialise_policy(big)
