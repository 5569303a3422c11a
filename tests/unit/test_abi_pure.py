"""overlay/abi.py as the core uses it: pure (no datapath import), its codecs against hand
tables, and the config's map-size defaults equal to the one home of the defaults."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from overlay import abi
from overlay.config import MapSizes


def test_importing_abi_loads_nothing_of_the_datapath():
    code = ("import sys; import overlay.abi; "
            "print(sorted(m for m in sys.modules if m.startswith(('overlay.datapath', 'bcc', 'pyroute2'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_config_map_size_defaults_are_the_abis():
    """config.MapSizes keeps its own field defaults (issue 19 splits config.py); they must
    equal abi.MAP_SIZES, the defaults the loader passes to the C side."""
    defaults = {f.name: f.default for f in dataclasses.fields(MapSizes)}
    expected = {k: v for k, v in abi.MAP_SIZES.items() if k not in {"events_pages", "sock", "nat_slots"}}
    assert defaults == expected


# (port, proto number) -> ((slot, word), mask), by hand: word = port // 64, bit = port % 64
PORT_BITS = [
    (22, 6, ((0, 0), 1 << 22)),
    (80, 6, ((0, 1), 1 << 16)),
    (53, 17, ((1, 0), 1 << 53)),
    (65535, 17, ((1, 1023), 1 << 63)),
    (0, 6, ((0, 0), 1)),
    (64, 17, ((1, 1), 1)),
    (7, 1, None),     # icmp: no open ports
    (7, 58, None),
    (7, 132, None),   # sctp
]


@pytest.mark.parametrize("port,proto,expected", PORT_BITS)
def test_port_bit(port, proto, expected):
    assert abi.port_bit(proto, port) == expected


def test_ports_bitmap_table():
    words = abi.ports_bitmap([(22, 22), (80, 81), (127, 128)], ("tcp",))
    assert words == {(0, 0): 1 << 22, (0, 1): (1 << 16) | (1 << 17) | (1 << 63), (0, 2): 1}
    assert abi.ports_bitmap([(53, 53)]) == {(0, 0): 1 << 53, (1, 0): 1 << 53}
    assert abi.ports_bitmap([]) == {}


def test_ports_by_proto_table():
    words = {(0, 0): 1 << 22, (0, 1): 1 << 16, (1, 0): 1 << 53, (1, 1023): 1 << 63}
    assert abi.ports_by_proto(words) == {"tcp": [22, 80], "udp": [53, 65535]}
    assert abi.ports_by_proto({}) == {"tcp": [], "udp": []}
    assert abi.bitmap_ports(words, 1) == [53, 65535]


def test_proto_name():
    assert [abi.proto_name(n) for n in (1, 6, 17, 58, 132)] == ["icmp", "tcp", "udp", "icmpv6", "132"]
