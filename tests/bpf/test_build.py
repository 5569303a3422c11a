"""build.py: sources, sizes, digest, map geometry, pinned-map reuse, errors."""

from __future__ import annotations

import ctypes
import os
import re
import sys
import uuid

import pytest

from overlay import abi
from overlay.datapath.ebpf import build
from overlay.errors import DatapathError, InvalidConfigError, UnsupportedError

SMALL = {"OVL_NAT_MAX": 64, "OVL_PEERS_MAX": 64, "OVL_CT_MAX": 256, "OVL_FAILSAFE_MAX": 16,
         "OVL_EVENTS_PAGES": 1}


def test_exports():
    assert build.PROGRAMS == {
        "ingress": "ovl_ingress",
        "egress": "ovl_egress",
        "overlay_egress": "ovl_overlay_egress",
    }
    # socket mode: the functions and their enum bpf_attach_type values (uapi/linux/bpf.h)
    assert build.SOCK_PROGRAMS == {
        "connect4": ("ovl_connect4", 10), "sendmsg4": ("ovl_sendmsg4", 14),
        "recvmsg4": ("ovl_recvmsg4", 19), "getpeername4": ("ovl_getpeername4", 29),
    }
    assert build.MAPS == ("ovl_nat", "ovl_nat_ext", "ovl_peers", "ovl_ports", "ovl_failsafe",
                          "ovl_ct", "ovl_cfg", "ovl_counters", "ovl_events", "ovl_cidr_ident",
                          "ovl_policy", "ovl_names", "ovl_peers6", "ovl_failsafe6", "ovl_cidr_ident6",
                          "ovl_self", "ovl_ct6", "ovl_ct_in", "ovl_frag", "ovl_sock")
    assert set(build.map_specs()) == set(build.MAPS)


def test_compiled_maps_have_the_declared_geometry(compiled):
    specs = build.map_specs()
    for name in build.MAPS:
        table = compiled.bpf[name.encode()]
        assert build.map_spec_of_fd(table.map_fd) == specs[name], name
    assert specs["ovl_ct"].max_entries == 262144
    assert specs["ovl_ports"].max_entries == abi.PortSlot.SLOTS * abi.PORT_WORDS
    assert specs["ovl_events"].max_entries == 16 * 4096
    assert specs["ovl_frag"].max_entries == 8192 and specs["ovl_self"].max_entries == abi.SELF_MAX


def test_programs_loaded(compiled):
    assert set(compiled.progs) == set(build.PROGRAMS) | set(build.SOCK_PROGRAMS)
    assert all(fn.fd > 0 for fn in compiled.progs.values())


def test_sizes_normalized():
    assert build.normalize_sizes(None) == build.DEFAULT_SIZES
    got = build.normalize_sizes({"ct_max": 1024, "OVL_NAT_MAX": 10, "ovl_events_pages": 4})
    assert got["OVL_CT_MAX"] == 1024 and got["OVL_NAT_MAX"] == 10 and got["OVL_EVENTS_PAGES"] == 4
    assert got["OVL_PEERS_MAX"] == 65536


@pytest.mark.parametrize(
    "sizes,key",
    [
        ({"OVL_BOGUS_MAX": 1}, "OVL_BOGUS_MAX"),
        ({"ct_max": 0}, "ct_max"),
        ({"ct_max": -5}, "ct_max"),
        ({"ct_max": "10"}, "ct_max"),
        ({"ct_max": True}, "ct_max"),
        ({"ct_max": 1 << 40}, "ct_max"),
        ({"events_pages": 3}, "OVL_EVENTS_PAGES"),
    ],
)
def test_bad_sizes_rejected(sizes, key):
    with pytest.raises(InvalidConfigError) as exc:
        build.normalize_sizes(sizes)
    assert key in exc.value.path


def test_cflags():
    flags = build.cflags({"ct_max": 1024}, pin_dir="/sys/fs/bpf/x")
    root = build.bpf_dir()
    assert f"-I{root / 'include'}" in flags and f"-I{root / 'lib'}" in flags
    assert "-DOVL_CT_MAX=1024" in flags and "-DOVL_NAT_MAX=65536" in flags
    assert '-DOVL_PIN_DIR="/sys/fs/bpf/x"' in flags


def test_source_digest():
    d = build.source_digest(None)
    assert re.fullmatch(r"[0-9a-f]{64}", d)
    assert build.source_digest(None) == d
    assert build.source_digest(dict(build.DEFAULT_SIZES)) == d
    assert build.source_digest({"ct_max": 1024}) != d


def test_source_digest_follows_sources(tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "bpf"
    shutil.copytree(build.bpf_dir(), copy)
    monkeypatch.setenv(build.BPF_DIR_ENV, str(copy))
    assert build.bpf_dir() == copy
    before = build.source_digest()
    with open(copy / "lib" / "filter.h", "a") as f:
        f.write("/* changed */\n")
    assert build.source_digest() != before


def test_assembled_source_inlines_lib_headers_once():
    text = build.assemble_source()
    assert not re.search(r'#\s*include\s+"(maps|parse|nat|conntrack|filter|counters|frag)\.h"', text)
    assert not re.search(r'#\s*include\s+"tc_\w+\.c"', text)
    assert '#include "overlay_abi.h"' in text
    assert text.count("#ifndef OVL_MAPS_H") == 1
    for prog in build.PROGRAMS.values():
        assert re.search(rf"^int {prog}\(struct __sk_buff \*skb\)$", text, re.M)
    for prog, _attach in build.SOCK_PROGRAMS.values():
        assert re.search(rf"^int {prog}\(struct bpf_sock_addr \*ctx\)$", text, re.M)
    assert '#line 1 "bpf/lib/nat.h"' in text


def test_programs_are_defined_in_the_entry_file():
    """datapath.c is the one entry file of the unit (docs/datapath.md): it defines every
    program of PROGRAMS (tc) and SOCK_PROGRAMS (cgroup sock_addr); bpf/lib holds logic
    only, never an entry function; no other .c file is in bpf/."""
    root = build.bpf_dir()
    entry = (root / build.MAIN_SOURCE).read_text()
    for prog in build.PROGRAMS.values():
        assert re.search(rf"^int {prog}\(struct __sk_buff \*skb\)$", entry, re.M), prog
    for prog, _attach in build.SOCK_PROGRAMS.values():
        assert re.search(rf"^int {prog}\(struct bpf_sock_addr \*ctx\)$", entry, re.M), prog
    entry_fn = r"^int \w+\(struct (__sk_buff \*skb|bpf_sock_addr \*ctx)\)$"
    for header in (root / "lib").glob("*.h"):
        assert not re.search(entry_fn, header.read_text(), re.M), header
    assert sorted(p.name for p in root.glob("*.c")) == [build.MAIN_SOURCE]


def test_sources_not_found(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "_candidate_dirs", lambda: [tmp_path / "nowhere"])
    with pytest.raises(UnsupportedError, match="datapath.c"):
        build.bpf_dir()


def test_bcc_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "bcc", None)
    with pytest.raises(UnsupportedError, match="python3-bpfcc"):
        build.compile_programs()


def test_compile_error_is_a_datapath_error_with_the_diagnostic(monkeypatch):
    monkeypatch.setattr(build, "assemble_source", lambda: "int broken(struct __sk_buff *skb) { return nope; }\n")
    with pytest.raises(DatapathError) as exc:
        build.compile_programs()
    assert "nope" in str(exc.value)


@pytest.fixture
def pin_dir():
    path = f"/sys/fs/bpf/overlay-test-{uuid.uuid4().hex[:12]}"
    yield path
    if os.path.isdir(path):
        for entry in os.listdir(path):
            os.unlink(os.path.join(path, entry))
        os.rmdir(path)


def test_pinned_maps_created_reused_and_checked(pin_dir):
    """First build: bcc creates and pins every map. Second build: the pins are
    adopted (same map ids, contents kept) and a missing pin is created again.
    A build asking other sizes is refused before compiling."""
    b1 = build.compile_programs(SMALL, pin_dir=pin_dir)
    try:
        assert sorted(os.listdir(pin_dir)) == sorted(build.MAPS)
        ids = {n: _map_id(b1[n.encode()].map_fd) for n in build.MAPS}
        b1[b"ovl_nat"][ctypes.c_uint32(9)] = abi.OvlNatVal(
            abi.ip_to_be32("10.0.0.9"), 0
        )
    finally:
        b1.cleanup()
    assert build.check_pinned_maps(pin_dir, SMALL) == []
    os.unlink(os.path.join(pin_dir, "ovl_ct"))

    b2 = build.compile_programs(SMALL, pin_dir=pin_dir)
    try:
        assert sorted(os.listdir(pin_dir)) == sorted(build.MAPS)
        got = {n: _map_id(b2[n.encode()].map_fd) for n in build.MAPS}
        assert got["ovl_ct"] != ids.pop("ovl_ct")
        assert {n: got[n] for n in ids} == ids
        val = b2[b"ovl_nat"][ctypes.c_uint32(9)]
        assert abi.be32_to_ip(val.real) == "10.0.0.9"
        assert set(build.load_programs(b2)) == set(build.PROGRAMS) | set(build.SOCK_PROGRAMS)
    finally:
        b2.cleanup()

    bigger = {**SMALL, "OVL_NAT_MAX": 128}
    problems = build.check_pinned_maps(pin_dir, bigger)
    assert problems == ["ovl_nat_ext: max_entries 64 != 128"]
    with pytest.raises(DatapathError, match="ovl_nat_ext: max_entries 64 != 128"):
        build.compile_programs(bigger, pin_dir=pin_dir)


def test_pin_dir_must_be_on_bpffs(tmp_path):
    with pytest.raises(UnsupportedError, match="bpffs"):
        build.compile_programs(SMALL, pin_dir=str(tmp_path / "pins"))


@pytest.mark.parametrize("bad", ["relative/dir", '/sys/fs/bpf/qu"ote', "/sys/fs/bpf/new\nline"])
def test_pin_dir_must_be_a_plain_absolute_path(bad):
    with pytest.raises(InvalidConfigError):
        build.compile_programs(SMALL, pin_dir=bad)


def _map_id(fd: int) -> int:
    from overlay.datapath.ebpf import bpfsys

    return bpfsys.map_info(fd).id
