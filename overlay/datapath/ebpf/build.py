"""Compile the tc datapath (bpf/datapath.c) with bcc: the only place that compiles C.

``compile_programs()`` returns a ``bcc.BPF`` whose maps exist (created, or
adopted from pins) and whose programs are compiled but not yet loaded;
``load_programs()`` loads the three SCHED_CLS programs of :data:`PROGRAMS` and the
four cgroup sock_addr programs of socket mode (:data:`SOCK_PROGRAMS`), each with its
expected attach type.

Pinning (``pin_dir``)
---------------------
With ``pin_dir`` every map is declared pinned at ``<pin_dir>/<map name>``
(bcc's pinned-table support, the same encoding as ``BPF_TABLE_PINNED``).
bcc 0.26 then does, for each map, when the BPF object is created:

* a map is pinned at that path: bcc REUSES it (same kernel map, contents
  kept). bcc does not compare its geometry with the declaration, so
  :func:`compile_programs` first checks every existing pin against
  :func:`map_specs` and raises :class:`~overlay.errors.DatapathError` naming
  each mismatch (e.g. a changed size); the caller decides whether to unpin
  (losing that state) and retry.
* nothing is pinned there: bcc CREATES the map and PINS it at that path
  itself. The caller must not ``bpf_obj_pin`` maps again (EEXIST); after the
  first load the pins already exist and a reload adopts them.

``pin_dir`` is created (mode 0700) when missing and must be on a bpffs mount.
Programs are never pinned here.

Sources
-------
bcc rewrites map method calls (``ovl_nat.lookup(&k)``) only in its main
file, so the quoted includes that live in ``bpf/lib`` or ``bpf/`` are inlined
into one text (each file once, with ``#line`` markers so diagnostics name the
real file); ``overlay_abi.h`` and system headers stay ordinary includes
(``-I<bpf>/include -I<bpf>/lib``).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from overlay import abi, resources
from overlay.datapath.ebpf import bpfsys
from overlay.errors import DatapathError, InvalidConfigError, UnsupportedError

log = logging.getLogger(__name__)

PROGRAMS = {
    "ingress": "ovl_ingress",
    "egress": "ovl_egress",
    "overlay_egress": "ovl_overlay_egress",
}
# socket mode: key -> (function, enum bpf_attach_type), loaded as BPF_PROG_TYPE_CGROUP_SOCK_ADDR
SOCK_PROGRAMS = {
    "connect4": ("ovl_connect4", 10),        # BPF_CGROUP_INET4_CONNECT
    "sendmsg4": ("ovl_sendmsg4", 14),        # BPF_CGROUP_UDP4_SENDMSG
    "recvmsg4": ("ovl_recvmsg4", 19),        # BPF_CGROUP_UDP4_RECVMSG
    "getpeername4": ("ovl_getpeername4", 29),  # BPF_CGROUP_INET4_GETPEERNAME
}
MAPS = (
    "ovl_nat",
    "ovl_nat_ext",
    "ovl_peers",
    "ovl_ports",
    "ovl_failsafe",
    "ovl_ct",
    "ovl_cfg",
    "ovl_counters",
    "ovl_events",
    "ovl_cidr_ident",
    "ovl_policy",
    "ovl_names",
    "ovl_peers6",
    "ovl_failsafe6",
    "ovl_cidr_ident6",
    "ovl_self",
    "ovl_ct6",
    "ovl_ct_in",
    "ovl_frag",
    "ovl_sock",
)

# -D name -> default: overlay/abi.py MAP_SIZES is the one place of the defaults (maps.h has none)
DEFAULT_SIZES: dict[str, int] = {abi.SIZE_DEFINES[k]: v for k, v in abi.MAP_SIZES.items()}
_SIZE_LIMIT = 1 << 26

MAIN_SOURCE = "datapath.c"
BPF_DIR_ENV = "OVERLAY_BPF_DIR"
_BPF_FS_MAGIC = 0xCAFE4A11
_PAGE_SIZE = 4096  # x86_64 and arm64 (4K); the ring buffer size is pages * PAGE_SIZE


_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*(?://.*|/\*.*\*/\s*)?$')


@dataclasses.dataclass(frozen=True)
class MapSpec:
    """The geometry bcc gives a map; what a pinned map must match to be adopted."""

    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0


# ---------------------------------------------------------------- sources


def _candidate_dirs() -> list[Path]:
    env = os.environ.get(BPF_DIR_ENV)
    return ([Path(env)] if env else []) + resources.candidates("bpf")


def bpf_dir() -> Path:
    """The ``bpf/`` source directory.

    ``$OVERLAY_BPF_DIR`` if set (an override), else the copy an installed wheel
    carries (``overlay/_data/bpf``), else the repository's ``bpf/`` next to the
    package (a checkout or an editable install): :mod:`overlay.resources`.
    """
    candidates = _candidate_dirs()
    for cand in candidates:
        if (cand / MAIN_SOURCE).is_file() and (cand / "include" / "overlay_abi.h").is_file():
            return cand
    raise UnsupportedError(
        "the eBPF sources (bpf/datapath.c) were not found; looked in "
        + ", ".join(str(c) for c in candidates)
        + f" (set {BPF_DIR_ENV} to the directory holding datapath.c)"
    )


def _source_files(root: Path) -> list[Path]:
    files = sorted(root.glob("*.c")) + sorted((root / "lib").glob("*.h"))
    files += sorted((root / "include").glob("*.h"))
    return files


def assemble_source(root: Path | None = None) -> str:
    """datapath.c with the quoted includes from bpf/lib and bpf/ inlined."""
    root = root or bpf_dir()
    seen: set[Path] = set()
    out: list[str] = []

    def display(path: Path) -> str:
        try:
            return str(path.relative_to(root.parent))
        except ValueError:
            return str(path)

    def expand(path: Path, depth: int) -> None:
        if depth > 16:
            raise DatapathError(f"include nesting too deep at {path}")
        seen.add(path)
        out.append(f'#line 1 "{display(path)}"')
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            m = _INCLUDE_RE.match(line)
            target = None
            if m:
                for d in (path.parent, root / "lib", root):
                    cand = (d / m.group(1)).resolve()
                    if cand.is_file():
                        target = cand
                        break
            if target is None:
                out.append(line)
                continue
            if target not in seen:
                expand(target, depth + 1)
            out.append(f'#line {lineno + 1} "{display(path)}"')

    expand((root / MAIN_SOURCE).resolve(), 0)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- sizes and flags


def normalize_sizes(sizes: Mapping[str, int] | None) -> dict[str, int]:
    """Defaults overlaid with ``sizes``; keys as the -D names (``OVL_CT_MAX``)
    or short (``ct_max``), case-insensitive."""
    out = dict(DEFAULT_SIZES)
    for key, value in (sizes or {}).items():
        name = str(key).upper()
        if not name.startswith("OVL_"):
            name = "OVL_" + name
        if name not in DEFAULT_SIZES:
            raise InvalidConfigError(
                f"datapath.sizes.{key}", f"unknown size; known: {', '.join(DEFAULT_SIZES)}"
            )
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _SIZE_LIMIT:
            raise InvalidConfigError(
                f"datapath.sizes.{key}", f"must be an integer in 1..{_SIZE_LIMIT}, got {value!r}"
            )
        out[name] = value
    if out["OVL_NAT_SLOTS"] > abi.NAT_SLOTS_MAX:
        raise InvalidConfigError(
            "datapath.sizes.OVL_NAT_SLOTS", f"at most {abi.NAT_SLOTS_MAX}, got {out['OVL_NAT_SLOTS']}"
        )
    pages = out["OVL_EVENTS_PAGES"]
    if pages & (pages - 1):
        raise InvalidConfigError(
            "datapath.sizes.OVL_EVENTS_PAGES", f"must be a power of two, got {pages}"
        )
    return out


def cflags(sizes: Mapping[str, int] | None = None, pin_dir: str | None = None) -> list[str]:
    root = bpf_dir()
    flags = [f"-I{root / 'include'}", f"-I{root / 'lib'}"]
    flags += [f"-D{name}={value}" for name, value in sorted(normalize_sizes(sizes).items())]
    if pin_dir is not None:
        flags.append(f'-DOVL_PIN_DIR="{_check_pin_dir_name(pin_dir)}"')
    return flags


def source_digest(sizes: Mapping[str, int] | None = None) -> str:
    """sha256 over every C source and the size flags.

    The same digest means the same programs and map geometry; ``pin_dir`` and
    the checkout location do not take part.
    """
    root = bpf_dir()
    h = hashlib.sha256()
    for path in _source_files(root):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    for name, value in sorted(normalize_sizes(sizes).items()):
        h.update(f"-D{name}={value}\0".encode())
    return h.hexdigest()


def map_specs(sizes: Mapping[str, int] | None = None) -> dict[str, MapSpec]:
    s = normalize_sizes(sizes)
    u32, u64 = 4, 8
    addr6, lpm6 = ctypes.sizeof(abi.OvlAddr6), ctypes.sizeof(abi.OvlLpm6Key)
    ct6 = ctypes.sizeof(abi.OvlCt6Key)
    return {
        "ovl_nat": MapSpec(bpfsys.MAP_TYPE_ARRAY, u32, ctypes.sizeof(abi.OvlNatVal), s["OVL_NAT_SLOTS"]),
        "ovl_nat_ext": MapSpec(bpfsys.MAP_TYPE_HASH, u32, ctypes.sizeof(abi.OvlNatVal), s["OVL_NAT_MAX"],
                               bpfsys.BPF_F_NO_PREALLOC),
        "ovl_peers": MapSpec(bpfsys.MAP_TYPE_HASH, u32, ctypes.sizeof(abi.OvlPeerVal), s["OVL_PEERS_MAX"]),
        "ovl_ports": MapSpec(bpfsys.MAP_TYPE_ARRAY, u32, u64, abi.PortSlot.SLOTS * abi.PORT_WORDS),
        "ovl_failsafe": MapSpec(
            bpfsys.MAP_TYPE_LPM_TRIE,
            ctypes.sizeof(abi.OvlLpmKey),
            u32,
            s["OVL_FAILSAFE_MAX"],
            bpfsys.BPF_F_NO_PREALLOC,
        ),
        "ovl_ct": MapSpec(
            bpfsys.MAP_TYPE_LRU_HASH, ctypes.sizeof(abi.OvlCtKey), ctypes.sizeof(abi.OvlCtVal), s["OVL_CT_MAX"]
        ),
        "ovl_cfg": MapSpec(bpfsys.MAP_TYPE_ARRAY, u32, u64, abi.CfgIndex.MAX),
        "ovl_counters": MapSpec(bpfsys.MAP_TYPE_PERCPU_ARRAY, u32, u64, abi.Reason.COUNTER_MAX),
        "ovl_events": MapSpec(bpfsys.MAP_TYPE_RINGBUF, 0, 0, s["OVL_EVENTS_PAGES"] * _PAGE_SIZE),
        "ovl_cidr_ident": MapSpec(
            bpfsys.MAP_TYPE_LPM_TRIE,
            ctypes.sizeof(abi.OvlLpmKey),
            u32,
            s["OVL_CIDR_IDENT_MAX"],
            bpfsys.BPF_F_NO_PREALLOC,
        ),
        "ovl_policy": MapSpec(
            bpfsys.MAP_TYPE_LPM_TRIE,
            ctypes.sizeof(abi.OvlPolicyKey),
            u32,
            s["OVL_POLICY_MAX"],
            bpfsys.BPF_F_NO_PREALLOC,
        ),
        "ovl_names": MapSpec(
            bpfsys.MAP_TYPE_HASH,
            ctypes.sizeof(abi.OvlNameKey),
            ctypes.sizeof(abi.OvlName),
            s["OVL_NAMES_MAX"],
            bpfsys.BPF_F_NO_PREALLOC,
        ),
        "ovl_peers6": MapSpec(
            bpfsys.MAP_TYPE_HASH, addr6, ctypes.sizeof(abi.OvlPeerVal), s["OVL_PEERS6_MAX"]
        ),
        "ovl_failsafe6": MapSpec(
            bpfsys.MAP_TYPE_LPM_TRIE, lpm6, u32, s["OVL_FAILSAFE6_MAX"], bpfsys.BPF_F_NO_PREALLOC
        ),
        "ovl_cidr_ident6": MapSpec(
            bpfsys.MAP_TYPE_LPM_TRIE, lpm6, u32, s["OVL_CIDR_IDENT6_MAX"], bpfsys.BPF_F_NO_PREALLOC
        ),
        "ovl_self": MapSpec(bpfsys.MAP_TYPE_HASH, addr6, u32, abi.SELF_MAX),
        "ovl_ct6": MapSpec(bpfsys.MAP_TYPE_LRU_HASH, ct6, ctypes.sizeof(abi.OvlCtVal), s["OVL_CT6_MAX"]),
        "ovl_ct_in": MapSpec(
            bpfsys.MAP_TYPE_LRU_HASH, ct6, ctypes.sizeof(abi.OvlCtInVal), s["OVL_CT_IN_MAX"]
        ),
        "ovl_frag": MapSpec(
            bpfsys.MAP_TYPE_LRU_HASH,
            ctypes.sizeof(abi.OvlFragKey),
            ctypes.sizeof(abi.OvlFragVal),
            s["OVL_FRAG_MAX"],
        ),
        "ovl_sock": MapSpec(bpfsys.MAP_TYPE_LRU_HASH, ctypes.sizeof(abi.OvlSockKey), u32, s["OVL_SOCK_MAX"]),
    }


# ---------------------------------------------------------------- pinned maps


def _check_pin_dir_name(pin_dir: str) -> str:
    if not os.path.isabs(pin_dir) or any(c in pin_dir for c in '"\\\n\0'):
        raise InvalidConfigError("datapath.pin_dir", f"must be an absolute plain path: {pin_dir!r}")
    return os.path.normpath(pin_dir)


def map_spec_of_fd(fd: int) -> MapSpec:
    """The geometry of the map behind ``fd`` (as the kernel reports it)."""
    from overlay.datapath.ebpf import bpfsys

    try:
        info = bpfsys.map_info(fd)
    except DatapathError as e:
        raise DatapathError(f"fd {fd} is not a readable BPF map ({e})") from None
    return MapSpec(info.type, info.key_size, info.value_size, info.max_entries, info.flags)


def _pinned_spec(path: str) -> MapSpec | None:
    """The geometry of the map pinned at ``path``; None if nothing is pinned there."""
    from overlay.datapath.ebpf import bpfsys

    if not os.path.lexists(path):
        return None
    try:
        fd = bpfsys.obj_get(path)
    except DatapathError as e:
        raise DatapathError(f"cannot open the pinned object {path}: {e}") from None
    try:
        return map_spec_of_fd(fd)
    except DatapathError as e:
        raise DatapathError(f"{path} is pinned but is not a readable map ({e})") from e
    finally:
        os.close(fd)


def check_pinned_maps(pin_dir: str, sizes: Mapping[str, int] | None = None) -> list[str]:
    """Problems that would stop the maps pinned under ``pin_dir`` from being
    adopted as declared; empty when every pin fits (or nothing is pinned)."""
    problems = []
    for name, want in map_specs(sizes).items():
        have = _pinned_spec(os.path.join(pin_dir, name))
        if have is None or have == want:
            continue
        diffs = [
            f"{field.name} {getattr(have, field.name)} != {getattr(want, field.name)}"
            for field in dataclasses.fields(MapSpec)
            if getattr(have, field.name) != getattr(want, field.name)
        ]
        problems.append(f"{name}: " + ", ".join(diffs))
    return problems


def _prepare_pin_dir(pin_dir: str, sizes: Mapping[str, int] | None) -> str:
    pin_dir = _check_pin_dir_name(pin_dir)
    try:
        os.makedirs(pin_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise DatapathError(f"cannot create the pin directory {pin_dir}: {e.strerror}") from e
    st = _statfs_type(pin_dir)
    if st is not None and st != _BPF_FS_MAGIC:
        raise UnsupportedError(
            f"{pin_dir} is not on a bpffs mount (mount -t bpf bpf /sys/fs/bpf)"
        )
    problems = check_pinned_maps(pin_dir, sizes)
    if problems:
        raise DatapathError(
            f"maps pinned under {pin_dir} do not match the datapath (have != want): "
            + "; ".join(problems)
        )
    return pin_dir


def _statfs_type(path: str) -> int | None:
    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 120)]

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    buf = _Statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF


# ---------------------------------------------------------------- compile and load


def _import_bcc() -> Any:
    try:
        import bcc
    except ImportError as e:
        raise UnsupportedError(
            "bcc (python3-bpfcc) is not installed or not importable: install the Debian "
            "packages python3-bpfcc and bpfcc-tools and use a virtualenv with "
            f"--system-site-packages ({e})"
        ) from e
    return bcc


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what C code (clang, the verifier log) writes to fd 2, and pass
    it on to the real stderr afterwards."""
    sink: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield sink
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield sink
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            sink.append(text)
            if text:
                os.write(2, text.encode())


def _tail(text: str, lines: int = 40) -> str:
    rows = [r for r in text.strip().splitlines() if r.strip()]
    return "\n".join(rows[-lines:])


def compile_programs(sizes: dict | None = None, pin_dir: str | None = None) -> Any:
    """Compile bpf/datapath.c; return the ``bcc.BPF`` (maps created or adopted).

    ``sizes``: max entries overriding :data:`DEFAULT_SIZES`.
    ``pin_dir``: declare every map pinned at ``<pin_dir>/<name>`` (see the
    module doc: existing pins are reused after a geometry check, missing ones
    are created and pinned by bcc).
    """
    bcc = _import_bcc()
    flags = cflags(sizes)
    if pin_dir is not None:
        pin_dir = _prepare_pin_dir(pin_dir, sizes)
        flags.append(f'-DOVL_PIN_DIR="{pin_dir}"')
    text = assemble_source()
    log.debug("compiling the tc datapath with %s", " ".join(flags))
    return _diagnosed("compiling the eBPF datapath", lambda: bcc.BPF(text=text.encode(), cflags=flags))


def load_programs(bpf: Any) -> dict[str, Any]:
    """Load the programs of :data:`PROGRAMS` (SCHED_CLS) and :data:`SOCK_PROGRAMS`
    (CGROUP_SOCK_ADDR); {key: bcc function (``.fd``)}."""
    bcc = _import_bcc()
    wanted = [(key, name, bcc.BPF.SCHED_CLS, -1) for key, name in PROGRAMS.items()]
    wanted += [(key, name, bcc.BPF.CGROUP_SOCK_ADDR, attach) for key, (name, attach) in SOCK_PROGRAMS.items()]
    return {
        key: _diagnosed(f"loading {name}", lambda name=name, kind=kind, attach=attach:
                        bpf.load_func(name.encode(), kind, attach_type=attach))
        for key, name, kind, attach in wanted
    }


def _diagnosed(what: str, call: Callable[[], Any]) -> Any:
    """``call()``; on failure a DatapathError ``<what> failed: ...`` with the tail of what
    bcc/the verifier wrote to stderr meanwhile."""
    with _captured_stderr() as diag:
        try:
            return call()
        except Exception as e:
            failure = e
    detail = _tail(diag[0]) if diag else ""
    raise DatapathError(f"{what} failed: {failure}" + (f"\n{detail}" if detail else "")) from failure
