"""overlay/abi.py mirrors bpf/include/overlay_abi.h exactly.

Constants and enum values are compared with the header's text; struct sizes
and field offsets with what the compiler laid out (a probe program compiled
by bcc writes sizeof/offsetof into a map, run once with BPF_PROG_TEST_RUN),
and with the key/value types bcc derived for the datapath's maps.
"""

from __future__ import annotations

import ctypes
import re

import pytest

from overlay import abi
from overlay.datapath.ebpf import build, testrun

# enum name in the header -> (Python class, prefixes to strip, tried in order)
ENUMS = {
    "ovl_cfg_index": (abi.CfgIndex, ["OVL_CFG_"]),
    "ovl_filter_mode": (abi.FilterMode, ["OVL_MODE_"]),
    "ovl_reason": (abi.Reason, ["OVL_"]),
    "ovl_port_slot": (abi.PortSlot, ["OVL_PORT_SLOT_", "OVL_PORT_"]),
    "ovl_name_kind": (abi.NameKind, ["OVL_NAME_"]),
    "ovl_ct_state": (abi.CtState, ["OVL_CT_"]),
}
# maps whose key or value is one of the ABI structs: (map, "Key"|"Leaf", struct)
MAP_TYPES = [
    ("ovl_nat", "Leaf", "ovl_nat_val"),
    ("ovl_peers", "Leaf", "ovl_peer_val"),
    ("ovl_failsafe", "Key", "ovl_lpm_key"),
    ("ovl_ct", "Key", "ovl_ct_key"),
    ("ovl_ct", "Leaf", "ovl_ct_val"),
    ("ovl_cidr_ident", "Key", "ovl_lpm_key"),
    ("ovl_policy", "Key", "ovl_policy_key"),
    ("ovl_names", "Key", "ovl_name_key"),
    ("ovl_names", "Leaf", "ovl_name"),
    ("ovl_peers6", "Key", "ovl_addr6"),
    ("ovl_peers6", "Leaf", "ovl_peer_val"),
    ("ovl_failsafe6", "Key", "ovl_lpm6_key"),
    ("ovl_cidr_ident6", "Key", "ovl_lpm6_key"),
    ("ovl_self", "Key", "ovl_addr6"),
    ("ovl_ct6", "Key", "ovl_ct6_key"),
    ("ovl_ct6", "Leaf", "ovl_ct_val"),
    ("ovl_ct_in", "Key", "ovl_ct6_key"),
    ("ovl_ct_in", "Leaf", "ovl_ct_in_val"),
    ("ovl_frag", "Key", "ovl_frag_key"),
    ("ovl_frag", "Leaf", "ovl_frag_val"),
    ("ovl_sock", "Key", "ovl_sock_key"),
]


def header() -> str:
    text = (build.bpf_dir() / "include" / "overlay_abi.h").read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def header_defines() -> dict[str, int]:
    return {
        m.group(1): int(m.group(2), 0)
        for m in re.finditer(r"^\s*#define\s+(OVL_\w+)\s+(0x[0-9a-fA-F]+|\d+)\s*$", header(), re.M)
    }


def header_enums() -> dict[str, dict[str, int]]:
    out = {}
    for m in re.finditer(r"enum\s+(\w+)\s*\{(.*?)\}", header(), re.S):
        members = {}
        for item in m.group(2).split(","):
            item = item.strip()
            if not item:
                continue
            name, _, value = (part.strip() for part in item.partition("="))
            assert value, f"{m.group(1)}.{name}: every ABI enum member has an explicit value"
            members[name] = int(value, 0)
        out[m.group(1)] = members
    return out


def header_structs() -> dict[str, list[str]]:
    out = {}
    for m in re.finditer(r"struct\s+(\w+)\s*\{(.*?)\};", header(), re.S):
        fields = []
        for decl in m.group(2).split(";"):
            decl = decl.strip()
            if decl:
                fields.append(re.match(r".*?(\w+)\s*(\[\s*\d+\s*\])?$", decl).group(1))
        out[m.group(1)] = fields
    return out


def test_defines_match():
    defines = header_defines()
    assert defines, "no #define found in the header"
    for name, value in defines.items():
        py = name.removeprefix("OVL_")
        assert hasattr(abi, py), f"abi.py lacks {py} (header {name})"
        assert getattr(abi, py) == value, f"{py}: abi.py {getattr(abi, py)} != header {value}"


# abi.py constants that are not #defines of the header, and what each is checked against
NOT_HEADER_DEFINES = {
    "DROP_REASONS": "test_reason_tables_follow_the_enum",
    "PASS_REASONS": "test_reason_tables_follow_the_enum",
    "IPPROTO_ICMP": "test_protocol_numbers_are_the_kernels",
    "IPPROTO_TCP": "test_protocol_numbers_are_the_kernels",
    "IPPROTO_UDP": "test_protocol_numbers_are_the_kernels",
    "IPPROTO_ICMPV6": "test_protocol_numbers_are_the_kernels",
    "PROTO_NUMBERS": "test_protocol_numbers_are_the_kernels",
    "PROTO_NAMES": "test_protocol_numbers_are_the_kernels",
    "PORT_SLOTS": "test_port_slots_follow_the_enum",
    "PROTO_SLOT": "test_port_slots_follow_the_enum",
    "NAME_MAX_BYTES": "test_name_max_bytes",
    "MAP_SIZES": "test_map_sizes_have_one_home",
    "SIZE_DEFINES": "test_map_sizes_have_one_home",
    "STRUCTS": "test_struct_fields_match_header",
}


def test_every_constant_is_checked():
    """A public constant of abi.py is a header #define (test_defines_match) or one of
    NOT_HEADER_DEFINES, each checked by the test it names."""
    defines = header_defines()
    unchecked = [
        name for name in dir(abi)
        if name.isupper() and not name.startswith("_")
        and f"OVL_{name}" not in defines and name not in NOT_HEADER_DEFINES
    ]
    assert not unchecked, f"abi.py constants no test compares with the header: {unchecked}"
    assert all(name in globals() for name in NOT_HEADER_DEFINES.values())


def test_protocol_numbers_are_the_kernels():
    import socket

    kernel = {"icmp": socket.IPPROTO_ICMP, "tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP,
              "icmpv6": socket.IPPROTO_ICMPV6}
    assert abi.PROTO_NUMBERS == kernel
    assert (abi.IPPROTO_ICMP, abi.IPPROTO_TCP, abi.IPPROTO_UDP, abi.IPPROTO_ICMPV6) == (1, 6, 17, 58)
    assert abi.PROTO_NAMES == {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
    # the programs compare with the kernel's IPPROTO_* (bpf/lib/*.h), never a literal
    lib = "".join(p.read_text() for p in (build.bpf_dir() / "lib").glob("*.h"))
    assert "IPPROTO_TCP" in lib and "IPPROTO_UDP" in lib and "IPPROTO_ICMPV6" in lib


def test_port_slots_follow_the_enum():
    assert abi.PORT_SLOTS == {"tcp": abi.PortSlot.TCP, "udp": abi.PortSlot.UDP}
    assert abi.PROTO_SLOT == {6: abi.PortSlot.TCP, 17: abi.PortSlot.UDP}
    assert len(abi.PORT_SLOTS) == abi.PortSlot.SLOTS
    assert abi.PORT_WORDS * 64 == 65536


def test_name_max_bytes():
    # ovl_name.text is NUL-terminated: one byte fewer than its size
    assert abi.NAME_MAX_BYTES == abi.NAME_LEN - 1
    assert ctypes.sizeof(abi.OvlName) == abi.NAME_LEN


def test_reason_tables_follow_the_enum():
    drops = {r for r in abi.Reason if r.name.startswith("DROP_") and 0 < r < abi.Reason.DROP_MAX}
    assert set(abi.DROP_REASONS) == {int(r) for r in drops}
    for r in drops:
        assert abi.DROP_REASONS[r] == r.name.removeprefix("DROP_").lower()
    assert all(abi.Reason.PASS_BASE <= r < abi.Reason.COUNTER_MAX for r in abi.PASS_REASONS)


def test_map_sizes_have_one_home():
    """abi.MAP_SIZES holds the only defaults: maps.h defines none (a size missing from the
    -D flags is a build error), every size macro the C side uses has a datapath.sizes name,
    and the build passes every one of them."""
    maps_h = (build.bpf_dir() / "lib" / "maps.h").read_text()
    fixed = set(header_defines()) | {m for members in header_enums().values() for m in members}
    used = set(re.findall(r"\b(OVL_\w+_MAX|OVL_EVENTS_PAGES|OVL_NAT_SLOTS)\b", maps_h)) - fixed
    assert used == set(abi.SIZE_DEFINES.values())
    assert set(abi.SIZE_DEFINES) == set(abi.MAP_SIZES)
    assert not re.search(r"#define\s+OVL_\w+_MAX\s+\d", maps_h), "maps.h has a default of its own"
    for name in used:
        assert f"#ifndef {name}\n#error" in maps_h, f"maps.h: {name} undefined is not an error"
    flags = build.cflags()
    for key, define in abi.SIZE_DEFINES.items():
        assert f"-D{define}={abi.MAP_SIZES[key]}" in flags


def test_maps_h_without_sizes_does_not_compile():
    bcc = pytest.importorskip("bcc", reason="bcc (python3-bpfcc) is not installed")
    root = build.bpf_dir()
    with pytest.raises(Exception, match="."):
        bcc.BPF(text=b'#include "maps.h"\n', cflags=[f"-I{root / 'include'}", f"-I{root / 'lib'}"])


def test_enums_match():
    enums = header_enums()
    assert set(enums) == set(ENUMS), "an enum was added or removed: extend ENUMS and abi.py"
    for enum_name, members in enums.items():
        cls, prefixes = ENUMS[enum_name]
        seen = {}
        for name, value in members.items():
            py = next(name.removeprefix(p) for p in prefixes if name.startswith(p))
            assert py in cls.__members__, f"{cls.__name__} lacks {py} (header {name})"
            assert cls[py] == value, f"{cls.__name__}.{py}: {cls[py].value} != header {value}"
            seen[py] = value
        assert set(cls.__members__) == set(seen), f"{cls.__name__} has members the header lacks"


def test_struct_fields_match_header():
    structs = header_structs()
    assert set(structs) == set(abi.STRUCTS)
    for name, fields in structs.items():
        assert [f[0] for f in abi.STRUCTS[name]._fields_] == fields, name


def _probe_source(items: list[str]) -> str:
    body = "\n".join(
        f"    i = {i}; slot = abi_probe.lookup(&i); if (slot) *slot = {expr};"
        for i, expr in enumerate(items)
    )
    return (
        '#include "overlay_abi.h"\n'
        f"BPF_ARRAY(abi_probe, u64, {len(items)});\n"
        "int abi_probe_run(struct __sk_buff *skb)\n{\n    int i;\n    u64 *slot;\n"
        f"{body}\n    return 0;\n}}\n"
    )


@pytest.fixture(scope="module")
def compiled_layout() -> dict[str, int]:
    """{"sizeof ovl_ct_key": 16, "ovl_ct_key.sport": 8, ...} as the compiler laid them out."""
    import bcc

    labels, exprs = [], []
    for name, cls in abi.STRUCTS.items():
        labels.append(f"sizeof {name}")
        exprs.append(f"sizeof(struct {name})")
        for field, *_ in cls._fields_:
            labels.append(f"{name}.{field}")
            exprs.append(f"__builtin_offsetof(struct {name}, {field})")
    b = bcc.BPF(text=_probe_source(exprs).encode(), cflags=[f"-I{build.bpf_dir() / 'include'}"])
    try:
        fn = b.load_func(b"abi_probe_run", bcc.BPF.SCHED_CLS)
        frame = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + b"\0" * 28  # an ARP frame
        assert testrun.run(fn.fd, frame)[0] == 0
        table = b[b"abi_probe"]
        yield {label: table[ctypes.c_int(i)].value for i, label in enumerate(labels)}
    finally:
        b.cleanup()


@pytest.mark.parametrize("name", sorted(abi.STRUCTS))
def test_struct_layout_matches_compiler(compiled_layout, name):
    cls = abi.STRUCTS[name]
    assert ctypes.sizeof(cls) == compiled_layout[f"sizeof {name}"], f"sizeof {name}"
    for field, *_ in cls._fields_:
        assert getattr(cls, field).offset == compiled_layout[f"{name}.{field}"], f"{name}.{field}"


@pytest.mark.parametrize("map_name,side,struct", MAP_TYPES)
def test_map_types_bcc_derived_match(compiled, map_name, side, struct):
    bcc_type = getattr(compiled.bpf[map_name.encode()], side)
    ours = abi.STRUCTS[struct]
    assert ctypes.sizeof(bcc_type) == ctypes.sizeof(ours)
    for field, *_ in ours._fields_:
        assert getattr(bcc_type, field).offset == getattr(ours, field).offset, field


def test_scalar_map_types(compiled):
    for name in ("ovl_nat", "ovl_nat_ext", "ovl_peers"):
        assert ctypes.sizeof(compiled.bpf[name.encode()].Key) == 4
    assert ctypes.sizeof(compiled.bpf[b"ovl_nat_ext"].Leaf) == ctypes.sizeof(abi.OvlNatVal)
    for name in ("ovl_ports", "ovl_cfg"):
        assert ctypes.sizeof(compiled.bpf[name.encode()].Leaf) == 8


def test_helpers_roundtrip():
    assert abi.be32_to_ip(abi.ip_to_be32("10.1.2.3")) == "10.1.2.3"
    assert abi.be16_to_port(abi.port_to_be16(8080)) == 8080
    key = abi.lpm_key("198.18.0.0/15")
    assert (key.prefixlen, abi.be32_to_ip(key.addr)) == (15, "198.18.0.0")
    key6 = abi.lpm6_key("2001:db8::/32")
    assert key6.prefixlen == 32 and bytes(key6)[4:8] == bytes.fromhex("20010db8")
    assert abi.words_to_ip(abi.ip_to_words("fe80::1"), 6) == "fe80::1"
    assert bytes(abi.addr6("10.1.2.3")) == bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])
    assert abi.words_to_ip(abi.ip_to_words("10.1.2.3")) == "10.1.2.3"
