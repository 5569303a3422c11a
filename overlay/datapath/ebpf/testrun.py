"""Run a loaded tc (SCHED_CLS) program on one packet with BPF_PROG_TEST_RUN.

bcc 0.26's Python has no wrapper, so this calls ``bpf_prog_test_run_opts``
from libbpf.so.1 through ctypes. For tc programs the kernel wants an L2
(Ethernet) frame of at least 14 bytes; the program sees it as an skb on the
loopback device (or on ``ifindex`` when given), and the frame it leaves
behind is returned. Redirect helpers only record the target: the verdict
comes back (e.g. TC_ACT_REDIRECT) and nothing is transmitted.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
from typing import Any

from overlay.errors import DatapathError, UnsupportedError

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7

_HEADROOM_OUT = 1024  # programs may grow a packet; the kernel answers ENOSPC past this


class BpfTestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf/bpf.h, 1.x)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class SkBuffCtx(ctypes.Structure):
    """The head of struct __sk_buff (uapi/linux/bpf.h), up to cb[].

    The kernel takes a prefix and zero-fills the rest. For tc test runs only
    mark, priority, ingress_ifindex, ifindex and cb may be non-zero here.
    """

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32),
        ("cb", ctypes.c_uint32 * 5),
    ]


@dataclasses.dataclass(frozen=True)
class TestRun:
    retval: int
    data: bytes
    duration_ns: int

    __test__ = False  # not a pytest class


@functools.cache
def libbpf() -> Any:
    """libbpf.so.1, with the prototypes this package uses."""
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as e:
        raise UnsupportedError(f"libbpf.so.1 is not available (install libbpf1): {e}") from e
    lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(BpfTestRunOpts)]
    lib.bpf_prog_test_run_opts.restype = ctypes.c_int
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    lib.bpf_obj_get.restype = ctypes.c_int
    lib.bpf_obj_get_info_by_fd.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_uint32),
    ]
    lib.bpf_obj_get_info_by_fd.restype = ctypes.c_int
    return lib


def run_ex(
    prog_fd: int,
    packet: bytes,
    repeat: int = 1,
    ctx: SkBuffCtx | None = None,
) -> TestRun:
    """Run ``prog_fd`` on ``packet`` (an Ethernet frame) ``repeat`` times."""
    packet = bytes(packet)
    if len(packet) < 14:
        raise ValueError("a tc test run needs an Ethernet frame of at least 14 bytes")
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    data_in = ctypes.create_string_buffer(packet, len(packet))
    out_size = len(packet) + _HEADROOM_OUT
    data_out = ctypes.create_string_buffer(out_size)
    opts = BpfTestRunOpts()
    opts.sz = ctypes.sizeof(opts)
    opts.data_in = ctypes.cast(data_in, ctypes.c_void_p)
    opts.data_size_in = len(packet)
    opts.data_out = ctypes.cast(data_out, ctypes.c_void_p)
    opts.data_size_out = out_size
    opts.repeat = repeat
    if ctx is not None:
        opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(ctx)
    rc = libbpf().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if rc < 0:
        err = -rc if rc < -1 else ctypes.get_errno()
        raise DatapathError(f"BPF_PROG_TEST_RUN failed: {os.strerror(err)} (errno {err})")
    return TestRun(opts.retval, data_out.raw[: opts.data_size_out], opts.duration)


def run(prog_fd: int, packet: bytes, repeat: int = 1, ctx: SkBuffCtx | None = None) -> tuple[int, bytes]:
    """(retval, frame after the program) for one test run of ``prog_fd``."""
    result = run_ex(prog_fd, packet, repeat=repeat, ctx=ctx)
    return result.retval, result.data
