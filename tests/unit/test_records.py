"""Registry records (DESIGN §4.2): hostile input never crashes, valid ones round-trip.

The parsers' contract: given anything, return a valid ``Node``/``Policy`` or
raise ``InvalidRecord`` -- never another exception. Valid records built from
strategies of valid field values survive ``parse(serialise(x)) == x``.
"""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from overlay import addr
from overlay.errors import InvalidRecord
from overlay.model import (
    MAX_GROUPS,
    MAX_PORTS,
    MAX_RECORD_BYTES,
    Endpoint,
    Node,
    Policy,
    parse_node_record,
    parse_policy_record,
    serialise_node,
    serialise_policy,
)

SUBNET = ipaddress.IPv4Network("192.168.0.0/18")

# --- strategies of valid field values -------------------------------------------------


def _is_host(ip: ipaddress.IPv4Address) -> bool:
    try:
        addr.host_ipv4(str(ip))
    except ValueError:
        return False
    return True


_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
names = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(_ALNUM),
    st.text(alphabet=_ALNUM + "._-", max_size=40),
)
# Long but cheap to generate: a random name padded towards the 253-character limit.
long_names = st.builds(lambda n, pad: (n + "." + "x" * pad)[:253], names, st.integers(150, 252))
hosts = st.ip_addresses(v=4).filter(_is_host).map(str)
overlays = st.integers(1, SUBNET.num_addresses - 2).map(lambda i: str(SUBNET.network_address + i))
cidrs = st.builds(
    lambda ip, plen: str(ipaddress.IPv4Network((int(ip), plen), strict=False)),
    st.ip_addresses(v=4),
    st.integers(0, 32),
)
ports = st.integers(1, 65535)
port_specs = st.one_of(
    ports.map(lambda p: (p, p)),
    st.tuples(ports, ports).map(lambda t: (min(t), max(t))),
)


def _norm_specs(specs) -> tuple[tuple[int, int], ...]:
    return tuple(sorted(set(specs)))


def _is_host6(ip: ipaddress.IPv6Address) -> bool:
    try:
        addr.host_ipv6(str(ip))
    except ValueError:
        return False
    return True


hosts6 = st.ip_addresses(v=6).filter(_is_host6).map(str)
nodes = st.builds(
    Node,
    node_id=names,
    network=names,
    private=hosts,
    public=hosts,
    overlay=overlays,
    groups=st.lists(names, max_size=8).map(lambda g: tuple(sorted(set(g)))),
    open_ports=st.lists(port_specs, max_size=12).map(_norm_specs),
    private6=st.one_of(st.none(), hosts6),
    public6=st.one_of(st.none(), hosts6),
)
group_endpoints = names.map(lambda g: Endpoint(group=g))
cidr_endpoints = cidrs.map(lambda c: Endpoint(cidr=c))


@st.composite
def policies(draw, name_st=names, max_ports=16):
    proto = draw(st.sampled_from(["tcp", "udp", "icmp"]))
    specs = () if proto == "icmp" else _norm_specs(draw(st.lists(port_specs, max_size=max_ports)))
    return Policy(
        src=draw(st.one_of(name_st.map(lambda g: Endpoint(group=g)), cidr_endpoints)),
        dst=draw(name_st.map(lambda g: Endpoint(group=g))),
        proto=proto,
        ports=specs,
        policy_id=draw(st.one_of(st.just(""), names)),
    )


# --- strategies of hostile input --------------------------------------------------------

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(max_size=10), inner, max_size=5),
    ),
    max_leaves=25,
)
# Plausible-but-wrong values for one field: the valid ones mixed with near misses.
field_junk = st.one_of(
    json_values,
    names,
    hosts,
    overlays,
    st.sampled_from([
        "", ".", "..", "a/b", "web 1", "web-1\n", "-web", "x" * 254, "10.0.0.0/8", "0.0.0.0",
        "255.255.255.255", "224.0.0.1", "127.0.0.1", "240.0.0.1", "10.0.0.011", " 10.0.0.1",
        "192.168.0.0", "192.168.63.255", "192.168.64.1", "::1", "80", "0", "65536", "1-2",
        "2-1", "80-", "-80", "a-b", "²", "١٢", "1e3", 1.0, True, False, -1, 0, 65536, 2**64,
    ]),
    st.lists(st.one_of(names, ports, port_specs.map(lambda s: f"{s[0]}-{s[1]}"), json_values), max_size=6),
)
versions = st.one_of(st.just(1), st.sampled_from([0, 2, 1.0, True, "1", None, [1]]))
node_shaped = st.fixed_dictionaries(
    {"v": versions},
    optional={
        k: field_junk
        for k in ("node_id", "network", "private", "public", "overlay", "groups", "open_ports")
    }
    | {"extra": json_values},
)
endpoint_junk = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={"group": field_junk, "cidr": st.one_of(field_junk, cidrs)}),
)
policy_shaped = st.fixed_dictionaries(
    {"v": versions},
    optional={
        "from": endpoint_junk,
        "to": endpoint_junk,
        "proto": st.one_of(st.sampled_from(["tcp", "udp", "icmp", "TCP", "sctp"]), json_values),
        "ports": field_junk,
        "extra": json_values,
    },
)


def _node_valid_dicts():
    return nodes.map(lambda n: n.to_dict())


def _mutate(d: dict, key: str, value) -> dict:
    out = dict(d)
    out[key] = value
    return out


# One field wrong in an otherwise valid record: values each field must refuse (a hand table,
# not derived from overlay.model). Surrounding spaces in an address are tolerated on purpose
# (addr.host_ipv4 strips them; the record is canonical after parsing), so none is listed.
NAME_BAD = ["", ".", "..", "a/b", "web 1", "web-1\n", "-web", "x" * 254, "²", "١٢", 5, None, [], {}, True]
ADDR_BAD = ["0.0.0.0", "255.255.255.255", "224.0.0.1", "127.0.0.1", "240.0.0.1", "10.0.0.011", "::1",
            "10.0.0.0/8", "", "1e3", 167772161, None, True, ["10.0.0.1"]]
NODE_BAD = {
    "v": [0, 3, 1.0, True, "1", None, [1]],
    "node_id": NAME_BAD, "network": NAME_BAD, "private": ADDR_BAD, "public": ADDR_BAD,
    "overlay": [*ADDR_BAD, "192.168.0.0", "192.168.63.255", "192.168.64.1", "10.0.0.1"],   # SUBNET's ends, outside
    "groups": ["web", [""], ["a/b"], [1], [None], [f"g{i}" for i in range(MAX_GROUPS + 1)], {"web": 1}, None],
    "open_ports": [[0], [65536], ["2-1"], ["80-"], ["-80"], ["a-b"], [True], [1.5], "80", [None], 80, None,
                   ["80-65536"]],
}
POLICY_BAD = {
    "v": [0, 2, 1.0, True, "1", None],
    "from": [{"group": ""}, {"group": "a/b"}, {"cidr": "10.0.0.1/8"}, {"cidr": "10.0.0.0/33"},
             {"group": "web", "cidr": "10.0.0.0/8"}, {}, {"host": "x"}, "web", None, []],
    "to": [{"cidr": "10.0.0.0/8"}, {"group": ""}, {}, "db", None],
    "proto": ["TCP", "sctp", "", None, 6, True],
    "ports": [[0], [65536], ["2-1"], "5432", None, [True], [1.5]],
}
node_one_field_wrong = st.sampled_from(sorted(NODE_BAD)).flatmap(
    lambda k: st.builds(_mutate, _node_valid_dicts(), st.just(k), st.sampled_from(NODE_BAD[k])))
policy_one_field_wrong = st.sampled_from(sorted(POLICY_BAD)).flatmap(
    lambda k: st.builds(_mutate, policies().map(lambda p: p.to_dict()), st.just(k), st.sampled_from(POLICY_BAD[k])))
# near misses: one field replaced by junk that may be valid (never a crash, either answer)
node_one_field_junk = st.builds(
    _mutate,
    _node_valid_dicts(),
    st.sampled_from(["v", "node_id", "network", "private", "public", "overlay", "groups", "open_ports"]),
    field_junk,
)


# --- the property: a Node/Policy or InvalidRecord, nothing else ------------------------


def _check_node(data, subnet=None) -> Node | None:
    try:
        node = parse_node_record(data, subnet)
    except InvalidRecord:
        return None
    except Exception as exc:  # noqa: BLE001 - the property under test
        pytest.fail(f"parse_node_record({data!r}) raised {type(exc).__name__}: {exc}")
    assert isinstance(node, Node)
    # What was accepted is valid and canonical: it survives its own serialisation.
    for a in (node.private, node.public, node.overlay):
        assert addr.host_ipv4(a) == a
    if subnet is not None:
        assert ipaddress.IPv4Address(node.overlay) in subnet
    assert parse_node_record(serialise_node(node), subnet) == node
    return node


def _check_policy(data, policy_id: str = "") -> Policy | None:
    try:
        policy = parse_policy_record(data, policy_id)
    except InvalidRecord:
        return None
    except Exception as exc:  # noqa: BLE001 - the property under test
        pytest.fail(f"parse_policy_record({data!r}) raised {type(exc).__name__}: {exc}")
    assert isinstance(policy, Policy)
    assert policy.proto in ("tcp", "udp", "icmp")
    assert policy.dst.group is not None
    assert parse_policy_record(serialise_policy(policy), policy_id) == policy
    return policy


def _dumps(obj) -> bytes:
    return json.dumps(obj).encode()


@given(st.binary(max_size=5000))
@example(b"")
@example(b"\xff\xfe{}")
@example(b"[" * 3000 + b"]" * 3000)
@example(b'{"v": 1e999}')
@example(b'{"v": NaN}')
def test_node_record_from_arbitrary_bytes(data):
    _check_node(data)
    _check_node(data, SUBNET)


@given(st.binary(max_size=5000))
def test_policy_record_from_arbitrary_bytes(data):
    _check_policy(data)


@given(st.text(max_size=2000))
@example("\ud800")  # a lone surrogate cannot be UTF-8
@example("null")
def test_records_from_arbitrary_text(text):
    _check_node(text)
    _check_policy(text)


@given(json_values)
def test_records_from_arbitrary_json(obj):
    data = _dumps(obj)
    _check_node(data, SUBNET)
    _check_policy(data)


@given(node_shaped)
def test_node_record_shaped_junk(obj):
    _check_node(_dumps(obj))
    _check_node(_dumps(obj), SUBNET)


@given(node_one_field_wrong)
def test_node_record_one_field_wrong(obj):
    assert _check_node(_dumps(obj), SUBNET) is None, obj


@given(node_one_field_junk)
def test_node_record_one_field_junk(obj):
    _check_node(_dumps(obj), SUBNET)


@pytest.mark.parametrize("field, value", [(k, v) for k, vs in NODE_BAD.items() for v in vs])
def test_node_record_every_bad_field_row_is_refused(field, value):
    record = {"v": 1, "node_id": "n1", "network": "ec2", "private": "10.0.0.5", "public": "198.18.0.5",
              "overlay": "192.168.0.5", "groups": ["web"], "open_ports": [80]}
    assert _check_node(_dumps(record), SUBNET) is not None     # the base row is valid
    assert _check_node(_dumps({**record, field: value}), SUBNET) is None


@pytest.mark.parametrize("field, value", [(k, v) for k, vs in POLICY_BAD.items() for v in vs])
def test_policy_record_every_bad_field_row_is_refused(field, value):
    record = {"v": 1, "from": {"group": "web"}, "to": {"group": "db"}, "proto": "tcp", "ports": [5432]}
    assert _check_policy(_dumps(record)) is not None
    assert _check_policy(_dumps({**record, field: value})) is None


@given(policy_shaped, st.one_of(st.just(""), names, st.sampled_from(["a/b", "..", "x\n"])))
def test_policy_record_shaped_junk(obj, policy_id):
    _check_policy(_dumps(obj), policy_id)


@given(policy_one_field_wrong)
def test_policy_record_one_field_wrong(obj):
    assert _check_policy(_dumps(obj)) is None, obj


# --- round trip ------------------------------------------------------------------------


@given(nodes)
def test_node_round_trip(node):
    data = serialise_node(node)
    assert len(data) <= MAX_RECORD_BYTES
    assert parse_node_record(data) == node
    assert parse_node_record(data, SUBNET) == node
    assert parse_node_record(data.decode()) == node


@given(policies())
def test_policy_round_trip(policy):
    data = serialise_policy(policy)
    assert parse_policy_record(data, policy.policy_id) == policy
    assert parse_policy_record(data.decode(), policy.policy_id) == policy


@given(
    st.builds(
        Node,
        node_id=long_names,
        network=long_names,
        private=hosts,
        public=hosts,
        overlay=overlays,
        groups=st.lists(long_names, max_size=MAX_GROUPS).map(lambda g: tuple(sorted(set(g)))),
        open_ports=st.lists(port_specs, max_size=MAX_PORTS).map(_norm_specs),
    )
)
def test_big_nodes_either_round_trip_or_refuse_to_serialise(node):
    try:
        data = serialise_node(node)
    except InvalidRecord:
        big = json.dumps(node.to_dict(), separators=(",", ":")).encode()
        assert len(big) > MAX_RECORD_BYTES
        return
    assert parse_node_record(data) == node


@given(policies(name_st=long_names, max_ports=MAX_PORTS))
def test_big_policies_either_round_trip_or_refuse_to_serialise(policy):
    try:
        data = serialise_policy(policy)
    except InvalidRecord:
        big = json.dumps(policy.to_dict(), separators=(",", ":")).encode()
        assert len(big) > MAX_RECORD_BYTES
        return
    assert parse_policy_record(data, policy.policy_id) == policy


def test_a_policy_too_big_to_parse_is_refused_by_serialise():
    # 256 ranges and two 253-character group names: 4159 bytes of JSON.
    specs = tuple((10000 + 2 * i, 10001 + 2 * i) for i in range(MAX_PORTS))
    policy = Policy(Endpoint(group="g" * 253), Endpoint(group="d" * 253), "tcp", specs)
    with pytest.raises(InvalidRecord, match="over 4096"):
        serialise_policy(policy)
    smaller = Policy(policy.src, policy.dst, "tcp", specs[:200])
    assert parse_policy_record(serialise_policy(smaller)) == smaller


def test_record_exactly_at_the_limit_parses_and_one_byte_more_does_not():
    node = Node("web-1", "ec2", "10.0.1.5", "198.18.1.5", "192.168.0.17", ("web",), ((80, 80),))
    data = serialise_node(node)
    at_limit = data + b" " * (MAX_RECORD_BYTES - len(data))
    assert len(at_limit) == MAX_RECORD_BYTES
    assert parse_node_record(at_limit) == node
    with pytest.raises(InvalidRecord, match="4096"):
        parse_node_record(at_limit + b" ")
    policy = Policy(Endpoint(group="web"), Endpoint(group="db"), "tcp", ((5432, 5432),))
    pdata = serialise_policy(policy)
    with pytest.raises(InvalidRecord, match="4096"):
        parse_policy_record(pdata + b" " * (MAX_RECORD_BYTES + 1 - len(pdata)))


@given(nodes, st.integers(1, 4 * MAX_RECORD_BYTES))
def test_records_over_4096_bytes_are_invalid(node, extra):
    data = serialise_node(node)
    padded = data + b" " * (MAX_RECORD_BYTES - len(data) + extra)
    assert len(padded) > MAX_RECORD_BYTES
    with pytest.raises(InvalidRecord):
        parse_node_record(padded)
    with pytest.raises(InvalidRecord):
        parse_node_record(padded.decode())


def test_design_example_record():
    data = (
        b'{"v": 1, "node_id": "web-1", "network": "ec2", "private": "10.0.1.5",'
        b' "public": "198.18.1.5", "overlay": "192.168.0.17", "groups": ["web"],'
        b' "open_ports": [80]}'
    )
    node = parse_node_record(data, SUBNET)
    assert node == Node("web-1", "ec2", "10.0.1.5", "198.18.1.5", "192.168.0.17", ("web",), ((80, 80),))
    assert node.real_address_from("ec2") == "10.0.1.5"
    assert node.real_address_from("vpc") == "198.18.1.5"


def test_design_example_policy():
    data = b'{"v": 1, "from": {"cidr": "198.18.0.0/15"}, "to": {"group": "db"}, "proto": "tcp", "ports": [5432, "8000-8100"]}'
    policy = parse_policy_record(data, "db-access")
    assert policy == Policy(
        Endpoint(cidr="198.18.0.0/15"), Endpoint(group="db"), "tcp", ((5432, 5432), (8000, 8100)), "db-access"
    )


_GOOD = {
    "v": 1, "node_id": "web-1", "network": "ec2", "private": "10.0.1.5", "public": "198.18.1.5",
    "overlay": "192.168.0.17", "groups": ["web"], "open_ports": [80],
}


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("v", 3, "unsupported version"),
        ("v", True, "unsupported version"),
        ("node_id", "web/1", "node_id"),
        ("node_id", "web-1\n", "node_id"),
        ("network", "", "network"),
        ("private", "10.0.1.0/24", "private"),
        ("private", "0.0.0.0", "private"),
        ("public", "224.0.0.1", "public"),
        ("public", 3232235537, "public"),
        ("overlay", "192.168.64.1", "outside the overlay subnet"),
        ("overlay", "192.168.0.0", "network or broadcast"),
        ("groups", "web", "groups"),
        ("groups", ["web", "a b"], "groups"),
        ("groups", [f"g{i}" for i in range(MAX_GROUPS + 1)], "groups"),
        ("open_ports", [0], "open_ports"),
        ("open_ports", ["90-80"], "open_ports"),
        ("open_ports", [True], "open_ports"),
        ("open_ports", list(range(1, MAX_PORTS + 2)), "open_ports"),
        ("colour", "red", "unknown keys"),
    ],
)
def test_invalid_node_records(key, value, fragment):
    with pytest.raises(InvalidRecord, match=fragment):
        parse_node_record(_dumps(_mutate(_GOOD, key, value)), SUBNET)


_GOOD6 = {**_GOOD, "v": 2, "private6": "2001:db8::5", "public6": "2001:db8:1::5"}


def test_record_v2_with_ipv6_addresses():
    node = parse_node_record(_dumps(_GOOD6), SUBNET)
    assert (node.private6, node.public6) == ("2001:db8::5", "2001:db8:1::5")
    assert node.real6_from("ec2") == "2001:db8::5" and node.real6_from("vpc") == "2001:db8:1::5"
    assert json.loads(serialise_node(node))["v"] == 2
    assert parse_node_record(serialise_node(node), SUBNET) == node


def test_v1_records_stay_v1_and_valid():
    """A node without IPv6 addresses is still written as version 1, which older daemons read."""
    node = parse_node_record(_dumps(_GOOD), SUBNET)
    assert node.private6 is None and node.real6_from("ec2") is None
    assert json.loads(serialise_node(node)) == _GOOD | {"open_ports": [80]}
    assert parse_node_record(_dumps({**_GOOD, "v": 2}), SUBNET) == node  # v2 without IPv6 is fine
    only_public6 = parse_node_record(_dumps({**_GOOD, "v": 2, "public6": "2001:db8::7"}), SUBNET)
    assert (only_public6.private6, only_public6.real6_from("vpc")) == (None, "2001:db8::7")


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("private6", "fe80::5", "link-local"),
    ("private6", "::1", "loopback"),
    ("private6", "::", "unspecified"),
    ("public6", "ff02::1", "multicast"),
    ("public6", "2001:db8::/64", "network"),
    ("public6", "::ffff:10.0.0.1", "IPv4-mapped"),
    ("public6", "10.0.0.1", "not an IPv6 address"),
    ("private6", 7, "IPv6 address string"),
])
def test_invalid_ipv6_fields(key, value, fragment):
    with pytest.raises(InvalidRecord, match=fragment):
        parse_node_record(_dumps({**_GOOD6, key: value}), SUBNET)


def test_ipv6_fields_need_version_2():
    with pytest.raises(InvalidRecord, match="need version 2"):
        parse_node_record(_dumps({**_GOOD, "private6": "2001:db8::5"}), SUBNET)


def test_ipv6_policy_cidr():
    data = b'{"v": 1, "from": {"cidr": "2001:db8::/32"}, "to": {"group": "db"}, "proto": "udp", "ports": [53]}'
    assert parse_policy_record(data).src == Endpoint(cidr="2001:db8::/32")
    with pytest.raises(InvalidRecord, match="IPv6 network"):
        parse_policy_record(data.replace(b"2001:db8::/32", b"2001:db8::1/32"))


def test_missing_overlay_without_subnet_is_invalid():
    obj = dict(_GOOD)
    del obj["overlay"]
    with pytest.raises(InvalidRecord, match="overlay"):
        parse_node_record(_dumps(obj))


@pytest.mark.parametrize(
    "obj",
    [
        {"v": 1, "from": {"group": "web"}, "to": {"cidr": "10.0.0.0/8"}, "proto": "tcp"},
        {"v": 1, "from": {"group": "web", "cidr": "10.0.0.0/8"}, "to": {"group": "db"}, "proto": "tcp"},
        {"v": 1, "from": {}, "to": {"group": "db"}, "proto": "tcp"},
        {"v": 1, "from": {"group": "web"}, "to": {"group": "db"}, "proto": "sctp"},
        {"v": 1, "from": {"group": "web"}, "to": {"group": "db"}, "proto": "icmp", "ports": [1]},
        {"v": 1, "from": {"cidr": "10.0.0.1/8"}, "to": {"group": "db"}, "proto": "tcp"},
        {"v": 1, "from": {"group": "web"}, "to": {"group": "db"}, "proto": "tcp", "ports": [0]},
        {"from": {"group": "web"}, "to": {"group": "db"}, "proto": "tcp"},
    ],
)
def test_invalid_policy_records(obj):
    with pytest.raises(InvalidRecord):
        parse_policy_record(_dumps(obj))


def test_invalid_policy_id():
    data = b'{"v": 1, "from": {"group": "web"}, "to": {"group": "db"}, "proto": "udp"}'
    with pytest.raises(InvalidRecord, match="policy id"):
        parse_policy_record(data, "a/b")


@given(st.data())
def test_groups_and_ports_are_normalised(data):
    groups = data.draw(st.lists(names, min_size=1, max_size=6))
    specs = data.draw(st.lists(port_specs, min_size=1, max_size=6))
    as_json = [f"{lo}-{hi}" if lo != hi else lo for lo, hi in specs]
    obj = _mutate(_mutate(_GOOD, "groups", groups + groups[::-1]), "open_ports", as_json + as_json)
    node = parse_node_record(_dumps(obj))
    assert node.groups == tuple(sorted(set(groups)))
    assert node.open_ports == _norm_specs(specs)
