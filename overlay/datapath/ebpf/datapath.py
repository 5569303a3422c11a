"""The eBPF tc datapath: load or adopt, pin, attach, observe and apply.

Everything lives under ``<pin_root>/<netns>/<interface>/`` on bpffs (:mod:`.pins`: the
network namespace's identity, an ``owner`` record, the move from the old layout):

- the maps of ``build.MAPS`` at ``<dir>/<map name>`` (pinned by bcc itself
  when the programs are compiled with ``pin_dir``, reused on the next build);
- the programs at ``<dir>/prog_ingress``, ``prog_egress`` and
  ``prog_overlay_egress``, and the socket-mode programs ``prog_connect4``,
  ``prog_sendmsg4``, ``prog_recvmsg4``, ``prog_getpeername4`` (loaded and pinned in
  both modes; attached to ``datapath.cgroup`` through the links ``<dir>/link_<hook>``
  only in socket mode, :mod:`.cgroup`);
- ``<dir>/loader``: a one-entry array map holding the digest
  (``build.source_digest(sizes)``) of the programs that are pinned and
  attached. bpffs holds no regular files, and a map goes away with the rest
  on teardown. It is written last: its presence means a complete load.

``start()`` adopts when it can: when the digest matches, every map and
program is pinned and the loaded ABI version is ours, it opens the pinned
maps, compiles nothing and leaves attached filters alone (a filter that is
missing or runs another program is re-attached from the pinned program).
Otherwise it compiles with bcc (through ``build.compile_programs``, the only
place that compiles C), keeps the pinned maps and their contents (a map
whose size changed is re-created and refilled with what fits), pins the
programs and replaces the filters atomically. Either way the process then
holds only fds of pinned maps: ``close()`` or ``kill -9`` leaves the
datapath running on its last state.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import struct
from collections.abc import Mapping

from overlay import abi
from overlay.datapath.ebpf import batch, bpfsys, cgroup, netdev, pins, upgrade
from overlay.datapath.ebpf.maps import CFG, MapSet, NatLayout, to_jsonable
from overlay.errors import DatapathError, OverlayError, UnsupportedError
from overlay.ops import Op

log = logging.getLogger(__name__)

DEFAULT_PIN_ROOT = "/sys/fs/bpf/overlay"
LOADER_MAP = "loader"
LOADER_VALUE_SIZE = 128

# program key (build.PROGRAMS) -> (pin name, hook)
# config MapSizes field -> build.py size name
_SIZE_FIELDS = abi.SIZE_DEFINES

PROGRAM_PINS = {
    "ingress": "prog_ingress",
    "egress": "prog_egress",
    "overlay_egress": "prog_overlay_egress",
    "connect4": "prog_connect4",
    "sendmsg4": "prog_sendmsg4",
    "recvmsg4": "prog_recvmsg4",
    "getpeername4": "prog_getpeername4",
}
MODES = ("tc", "socket")
SOCK_HOOKS = ("connect4", "sendmsg4", "recvmsg4", "getpeername4")  # build.SOCK_PROGRAMS, without bcc


def pin_dir_for(interface: str, pin_root: str = DEFAULT_PIN_ROOT) -> str:
    """The pin directory of ``interface`` in the calling thread's network namespace."""
    return pins.pin_dir(interface, pin_root)


def _bpffs_mounted(path: str) -> bool:
    """Is ``path`` (or where it would be created) on a bpf filesystem?"""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return False
    path = os.path.abspath(path)
    best, fstype = "", None
    for fields in mounts:
        if len(fields) < 3:
            continue
        mnt = fields[1]
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, fields[2]
    return fstype == "bpf"


def check_host(interface: str, pin_root: str) -> int:
    """Raise UnsupportedError (one line) when this host cannot run the
    datapath; returns the interface's ifindex."""
    if os.geteuid() != 0:
        raise UnsupportedError("the ebpf datapath needs root (CAP_BPF, CAP_NET_ADMIN)")
    if not _bpffs_mounted(pin_root):
        raise UnsupportedError(
            f"bpffs is not mounted for {pin_root} (mount -t bpf bpf /sys/fs/bpf)"
        )
    if importlib.util.find_spec("bcc") is None:
        raise UnsupportedError(
            "bcc is not installed (apt-get install python3-bpfcc; a virtualenv needs "
            "--system-site-packages)"
        )
    idx = netdev.ifindex(interface)
    if idx is None:
        raise UnsupportedError(f"interface {interface} does not exist")
    return idx


@contextlib.contextmanager
def _locked(pin_root: str):
    """Serialise loaders and teardowns of one pin root (flock on the directory)."""
    os.makedirs(pin_root, exist_ok=True)
    fd = os.open(pin_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- the digest map ---------------------------------------------------------------


def _read_digest(pin_dir: str) -> str | None:
    raw = pins.read_entry(os.path.join(pin_dir, LOADER_MAP), LOADER_VALUE_SIZE)
    if raw is None:
        return None
    return raw.split(b"\0")[0].decode(errors="replace") or None


def _write_digest(pin_dir: str, digest: str) -> None:
    raw = digest.encode()
    if len(raw) >= LOADER_VALUE_SIZE:
        import hashlib

        raw = hashlib.sha256(raw).hexdigest().encode()
    pins.write_entry(os.path.join(pin_dir, LOADER_MAP), "ovl_loader", raw.ljust(LOADER_VALUE_SIZE, b"\0"))


def _pinned_prog_id(path: str) -> int | None:
    try:
        fd = bpfsys.obj_get(path)
    except DatapathError:
        return None
    try:
        return bpfsys.prog_info(fd).id
    finally:
        bpfsys.close(fd)


def _unpin_all(pin_dir: str) -> None:
    if not os.path.isdir(pin_dir):
        return
    for entry in os.listdir(pin_dir):
        path = os.path.join(pin_dir, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            _unpin_all(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(pin_dir)


class EbpfDatapath:
    """The tc datapath on ``interface`` (see the module docstring)."""

    name = "ebpf"

    def __init__(self, interface: str, overlay_subnet: str, self_private: str,
                 self_overlay: str | None = None, sizes=None,
                 pin_root: str = DEFAULT_PIN_ROOT, overlay_device: str = "ovl0",
                 extra_routes=(), mode: str = "tc", cgroup: str = cgroup.DEFAULT_CGROUP, **_ignored):
        if mode not in MODES:
            raise DatapathError(f"datapath mode {mode!r}: want one of {', '.join(MODES)}")
        self.interface = interface
        self.mode = mode
        self.cgroup = cgroup
        self.extra_routes = tuple(extra_routes)  # nat_overrides keys outside the subnet
        self.overlay_subnet = str(overlay_subnet)
        self.self_private = self_private
        self.self_overlay = self_overlay
        self.sizes = sizes
        self.pin_root = pin_root
        self.pin_dir = pin_dir_for(interface, pin_root)
        self.overlay_device = overlay_device
        self.maps: MapSet | None = None
        self.adopted = False
        self.reattached: list[str] = []

    # -- start ---------------------------------------------------------------

    def start(self) -> None:
        if self.maps is not None:
            return
        uplink = check_host(self.interface, self.pin_root)
        if not self.self_private:
            raise UnsupportedError("the ebpf datapath needs this host's private address")
        if self.mode == "socket":
            cgroup.check_cgroup(self.cgroup)
        from overlay.datapath.ebpf import build

        digest = build.source_digest(self._build_sizes())
        with _locked(self.pin_root):
            pins.claim_legacy(self.interface, self.pin_root, self.pin_dir, uplink, PROGRAM_PINS["ingress"])
            if (gone := pins.foreign_owner(self.pin_dir)) is not None:
                log.warning("%s belongs to network namespace %d (cookie %d), which is gone; reloading",
                            self.pin_dir, gone.inode, gone.cookie)
                _unpin_all(self.pin_dir)
            os.makedirs(self.pin_dir, exist_ok=True)
            if self._can_adopt(build, digest):
                self._adopt(uplink)
            else:
                self._load(build, digest, uplink)
            self._sync_sockets(build)
            pins.write_owner(self.pin_dir)

    def _can_adopt(self, build, digest: str) -> bool:
        stored = _read_digest(self.pin_dir)
        if stored != digest:
            if stored is not None:
                log.info("pinned programs differ (digest %s, want %s): reloading", stored[:12], digest[:12])
            return False
        names = list(build.MAPS) + list(PROGRAM_PINS.values())
        missing = [n for n in names if not os.path.exists(os.path.join(self.pin_dir, n))]
        if missing:
            log.info("incomplete pinned state (missing %s): reloading", ", ".join(missing))
            return False
        try:
            maps = MapSet.from_pinned(self.pin_dir)
        except DatapathError as exc:
            log.info("pinned maps unusable (%s): reloading", exc)
            return False
        try:
            version = maps.get_cfg(abi.CfgIndex.ABI_VERSION)
        finally:
            maps.close()
        if version != abi.ABI_VERSION:
            log.info("pinned ABI version %d, want %d: reloading", version, abi.ABI_VERSION)
            return False
        return True

    def _adopt(self, uplink: int) -> None:
        """Open the pinned maps; re-attach only a filter that is missing or stale."""
        maps = MapSet.from_pinned(self.pin_dir)
        try:
            netdev.loosen_rp_filter(self.interface)
            ovl = netdev.ensure_overlay_device(
                self.overlay_device, self.overlay_subnet, self.self_private, self.self_overlay,
                self.extra_routes,
            )
            if maps.get_cfg(abi.CfgIndex.EGRESS_IFINDEX) != uplink:
                maps.set_cfg(abi.CfgIndex.EGRESS_IFINDEX, uplink)
            maps.set_nat_base(self._nat_layout().base)
            self.reattached = []
            for key, (idx, direction) in self._hooks(uplink, ovl).items():
                path = os.path.join(self.pin_dir, PROGRAM_PINS[key])
                want = _pinned_prog_id(path)
                have = netdev.our_filter(idx, direction)
                if have is not None and have.prog_id == want:
                    continue
                fd = bpfsys.obj_get(path)
                try:
                    netdev.attach(idx, direction, fd, self._prog_name(key))
                finally:
                    bpfsys.close(fd)
                self.reattached.append(key)
        except BaseException:
            maps.close()
            raise
        self.maps = maps
        self.adopted = True
        log.info(
            "adopted pinned datapath at %s%s", self.pin_dir,
            f" (re-attached {', '.join(self.reattached)})" if self.reattached else "",
        )

    def _sync_sockets(self, build) -> None:
        """Socket mode: the cgroup links run the pinned socket programs, and the programs
        know this namespace's cookie. tc mode: no links (a switch from socket mode removes them)."""
        maps = self._maps()
        cookie = pins.netns_cookie()
        if maps.get_cfg(abi.CfgIndex.NETNS_COOKIE) != cookie:
            maps.set_cfg(abi.CfgIndex.NETNS_COOKIE, cookie)
        if self.mode != "socket":
            cgroup.detach(self.pin_dir)
            return
        if not cookie:
            log.warning("this kernel does not report network namespace cookies (SO_NETNS_COOKIE, "
                        "Linux 5.14+): socket mode translates nothing, the tc path carries everything")
        progs = {}
        try:
            for hook, (_name, attach_type) in build.SOCK_PROGRAMS.items():
                progs[hook] = (bpfsys.obj_get(os.path.join(self.pin_dir, PROGRAM_PINS[hook])), attach_type)
            cgroup.attach(self.pin_dir, self.cgroup, progs)
        finally:
            for fd, _attach in progs.values():
                bpfsys.close(fd)

    def _hooks(self, uplink: int, ovl: int) -> dict[str, tuple[int, str]]:
        # attach order: reverse NAT first, translation last
        return {
            "ingress": (uplink, netdev.INGRESS),
            "egress": (uplink, netdev.EGRESS),
            "overlay_egress": (ovl, netdev.EGRESS),
        }

    @staticmethod
    def _prog_name(key: str) -> str:
        return f"ovl_{key}"

    def _compile(self, build):
        try:
            return build.compile_programs(sizes=self._build_sizes(), pin_dir=self.pin_dir)
        except OverlayError:
            raise
        except Exception as exc:
            raise DatapathError(f"compiling the eBPF programs failed: {exc}") from exc

    def _build_sizes(self) -> dict[str, int] | None:
        """``sizes`` as build.py takes them: a mapping of -D names (OVL_NAT_MAX...).
        Accepts such a mapping or the config's MapSizes (nat, peers, conntrack, failsafe,
        policy, cidr_ident, names)."""
        sizes = self.sizes
        out = {"OVL_NAT_SLOTS": abi.nat_slots(self.overlay_subnet)}
        if sizes is None or isinstance(sizes, Mapping):
            out.update(sizes or {})  # a mapping may force the slot count (tests)
            return out
        for attr, name in _SIZE_FIELDS.items():
            value = getattr(sizes, attr, None)
            if value is not None:
                out[name] = value
        return out

    def _nat_layout(self) -> NatLayout:
        from overlay.datapath.ebpf import build

        slots = build.normalize_sizes(self._build_sizes())["OVL_NAT_SLOTS"]
        return NatLayout(abi.nat_base(self.overlay_subnet), slots)

    def _load(self, build, digest: str, uplink: int) -> None:
        carried = self._unpin_stale_maps(build)
        bpf = self._compile(build)
        try:
            self._refill(bpf, carried)
            for name in build.MAPS:
                path = os.path.join(self.pin_dir, name)
                if not os.path.exists(path):  # bcc pins what it creates; be sure
                    bpfsys.obj_pin(bpf[name.encode()].map_fd, path)
            fds = {key: fn.fd for key, fn in build.load_programs(bpf).items()}
            maps = MapSet.from_pinned(self.pin_dir)
            try:
                maps.set_cfg(abi.CfgIndex.EGRESS_IFINDEX, uplink)
                maps.set_cfg(abi.CfgIndex.ABI_VERSION, abi.ABI_VERSION)
                if "ovl_nat" in carried:  # re-created, refilled in this layout already
                    maps.set_cfg(abi.CfgIndex.NAT_BASE, self._nat_layout().base)
                maps.set_nat_base(self._nat_layout().base)  # moves what a subnet change misplaced
                netdev.loosen_rp_filter(self.interface)
                ovl = netdev.ensure_overlay_device(
                    self.overlay_device, self.overlay_subnet, self.self_private, self.self_overlay,
                    self.extra_routes,
                )
                for key, (idx, direction) in self._hooks(uplink, ovl).items():
                    netdev.attach(idx, direction, fds[key], self._prog_name(key))
                for key, fd in fds.items():
                    bpfsys.pin_replace(fd, os.path.join(self.pin_dir, PROGRAM_PINS[key]))
                _write_digest(self.pin_dir, digest)
            except BaseException:
                maps.close()
                raise
        finally:
            bpf.cleanup()
        self.maps = maps
        self.adopted = False
        log.info("loaded and attached the datapath on %s (pinned at %s)", self.interface, self.pin_dir)

    def _pinned_cfg(self, index: int) -> int:
        """A slot of the pinned ovl_cfg (the ABI version, the NAT base; 0: none, or unreadable)."""
        try:
            fd = bpfsys.obj_get(os.path.join(self.pin_dir, CFG))
        except DatapathError:
            return 0
        try:
            info = bpfsys.map_info(fd)
            raw = bpfsys.lookup(fd, struct.pack("=I", index), 4, info.value_size)
        except DatapathError:
            return 0
        finally:
            bpfsys.close(fd)
        return struct.unpack("=Q", raw[:8])[0] if raw else 0

    def _unpin_stale_maps(self, build) -> dict[str, tuple[bpfsys.MapInfo, list]]:
        """Unpin the pinned maps whose geometry is not what this build declares
        (bcc would reuse them unchecked), or whose layout an ABI change made
        unreadable, keeping the entries that can be carried over
        (:mod:`overlay.datapath.ebpf.upgrade`). The programs attached now keep
        using the old maps until replaced."""
        old_abi = self._pinned_cfg(abi.CfgIndex.ABI_VERSION)
        abi_changed = old_abi not in (0, abi.ABI_VERSION)
        carried = {}
        for name in upgrade.RETIRED_MAPS:
            path = os.path.join(self.pin_dir, name)
            if os.path.exists(path):
                os.unlink(path)
                log.warning("map %s is gone since ABI %d: unpinned it", name, abi.ABI_VERSION)
        layout = self._nat_layout()
        for name, want in build.map_specs(self._build_sizes()).items():
            path = os.path.join(self.pin_dir, name)
            if not os.path.exists(path):
                continue
            fd = bpfsys.obj_get(path)
            try:
                info = bpfsys.map_info(fd)
                have = (info.type, info.key_size, info.value_size, info.max_entries, info.flags)
                if have == (want.map_type, want.key_size, want.value_size, want.max_entries,
                            want.flags) and not (abi_changed and name in upgrade.RECREATE_ON_ABI_CHANGE):
                    continue
                same = info.type != bpfsys.MAP_TYPE_RINGBUF and (
                    info.type, info.key_size, info.value_size
                ) == (want.map_type, want.key_size, want.value_size)
                items = bpfsys.items(fd, info) if info.type != bpfsys.MAP_TYPE_RINGBUF else []
                if abi_changed:
                    converted = upgrade.carry(name, old_abi, info.value_size, items, layout)
                elif name == "ovl_nat" and same:  # the slot count changed: slots re-indexed
                    old = NatLayout(self._pinned_cfg(abi.CfgIndex.NAT_BASE), info.max_entries)
                    converted = upgrade.nat_relayout(items, old, layout)
                else:
                    converted = None
                converted = converted or {name: items if same else []}
                for m, entries in converted.items():
                    carried[m] = (info, carried.get(m, (info, []))[1] + entries)
                moved = sum(map(len, converted.values()))
            finally:
                bpfsys.close(fd)
            os.unlink(path)
            log.warning(
                "map %s changed (max_entries %d -> %d, value size %d -> %d, ABI %d -> %d): "
                "re-creating it%s", name, info.max_entries, want.max_entries, info.value_size,
                want.value_size, old_abi, abi.ABI_VERSION,
                f", carrying {moved} entries over" if moved else "",
            )
        return carried

    @staticmethod
    def _refill(bpf, carried: dict[str, tuple[bpfsys.MapInfo, list]]) -> None:
        for name, (_old, items) in carried.items():
            if not items:
                continue
            fd = bpf[name.encode()].map_fd
            new = bpfsys.map_info(fd)
            if new.type in bpfsys.ARRAY_MAP_TYPES:
                items = [(k, v) for k, v in items if struct.unpack("=I", k)[0] < new.max_entries]
            batch.update_pairs(fd, items[: new.max_entries], new.key_size, new.value_buffer_size)

    # -- the Datapath protocol --------------------------------------------------

    def _maps(self) -> MapSet:
        if self.maps is None:
            raise DatapathError("the ebpf datapath is not started")
        return self.maps

    def observe(self) -> dict[str, dict]:
        return self._maps().read_all()

    def apply(self, ops: list[Op]) -> None:
        self._maps().apply(ops)

    def counters(self) -> dict[str, int]:
        return self._maps().counters()

    def ct_entries(self, limit: int | None = None) -> list[dict]:
        return self._maps().ct_entries(limit)

    def fill(self) -> dict[str, dict[str, int]]:
        return self._maps().fill()

    def sweep(self, budget: int = 4096) -> dict[str, int]:
        """Delete expired conntrack, marker and fragment entries (bounded; see MapSet.sweep)."""
        return self._maps().sweep(budget)

    def attachments(self) -> dict[str, dict]:
        """Our tc filters and the ids of what they run (for status and tests)."""
        uplink = netdev.ifindex(self.interface)
        ovl = netdev.ifindex(self.overlay_device)
        out = {}
        for key, (idx, direction) in self._hooks(uplink or 0, ovl or 0).items():
            f = netdev.our_filter(idx, direction) if idx else None
            out[key] = {
                "ifindex": idx,
                "direction": direction,
                "handle": f.handle if f else None,
                "prio": f.prio if f else None,
                "prog_id": f.prog_id if f else None,
                "pinned_prog_id": _pinned_prog_id(os.path.join(self.pin_dir, PROGRAM_PINS[key])),
            }
        for hook, link in cgroup.links(self.pin_dir, SOCK_HOOKS).items():
            out[hook] = dict(link, cgroup=self.cgroup if self.mode == "socket" else None,
                             pinned_prog_id=_pinned_prog_id(os.path.join(self.pin_dir, PROGRAM_PINS[hook])))
        return out

    def close(self) -> None:
        if self.maps is not None:
            self.maps.close()
            self.maps = None

    def teardown(self) -> None:
        self.close()
        remove(self.interface, self.pin_root, self.overlay_device)

    @classmethod
    def remove(cls, interface: str, pin_root: str = DEFAULT_PIN_ROOT,
               overlay_device: str = "ovl0", **_ignored) -> None:
        remove(interface, pin_root, overlay_device)


def remove(interface: str, pin_root: str = DEFAULT_PIN_ROOT, overlay_device: str = "ovl0") -> None:
    """Detach our filters, remove the overlay device, unpin everything of ``interface``."""
    if os.geteuid() != 0:
        raise UnsupportedError("removing the ebpf datapath needs root")
    pin_dir = pin_dir_for(interface, pin_root)
    with _locked(pin_root):
        uplink = netdev.ifindex(interface)
        if uplink is not None:
            pins.claim_legacy(interface, pin_root, pin_dir, uplink, PROGRAM_PINS["ingress"])
            netdev.detach(uplink, netdev.INGRESS)
            netdev.detach(uplink, netdev.EGRESS)
            netdev.remove_clsact_if_unused(uplink)
        cgroup.detach(pin_dir)
        netdev.remove_overlay_device(overlay_device)
        _unpin_all(pin_dir)
    for parent in (os.path.dirname(pin_dir), pin_root):
        with contextlib.suppress(OSError):
            os.rmdir(parent)  # only when no other interface or namespace is pinned there
    log.info("removed the datapath of %s", interface)


def read_pinned(interface: str, pin_root: str = DEFAULT_PIN_ROOT) -> dict:
    """The live maps of ``interface``'s datapath, JSON-ready, read from the
    pins (no daemon, no compiler). Each map is ``{"entries": ..., "max_entries": n}``;
    ``ovl_peers`` and ``ovl_failsafe`` list the IPv6 entries of ovl_peers6 and
    ovl_failsafe6 too, ``ovl_ct`` those of ovl_ct6; ``fill`` counts every map
    (the inbound markers ovl_ct_in and the fragments ovl_frag by count only)."""
    pin_dir = pin_dir_for(interface, pin_root)
    if not os.path.isdir(pin_dir):
        raise DatapathError(f"nothing pinned at {pin_dir} (is the datapath loaded? run this in the "
                            "daemon's network namespace)")
    maps = MapSet.from_pinned(pin_dir)
    try:
        state = maps.read_all()
        cfg = {
            "reject_all": maps.get_cfg(abi.CfgIndex.REJECT_ALL),
            "mode": maps.get_cfg(abi.CfgIndex.MODE),
            "egress_ifindex": maps.get_cfg(abi.CfgIndex.EGRESS_IFINDEX),
            "abi_version": maps.get_cfg(abi.CfgIndex.ABI_VERSION),
            "policy_enforced": maps.get_cfg(abi.CfgIndex.POLICY_ENFORCED),
            "policy_default": maps.get_cfg(abi.CfgIndex.POLICY_DEFAULT),
            "nat_gen": maps.get_cfg(abi.CfgIndex.NAT_GEN),
            "netns_cookie": maps.get_cfg(abi.CfgIndex.NETNS_COOKIE),
            "nat_base": maps.nat_layout().address(0),   # ovl_nat's slot 0
            "lifetimes_ns": maps.lifetimes_ns(),
        }
        js = to_jsonable(state)
        fill = maps.fill()

        def body(name: str, entries) -> dict:
            return {"entries": entries, "max_entries": maps.info(name).max_entries}

        return {
            "interface": interface,
            "pin_dir": pin_dir,
            "digest": _read_digest(pin_dir),
            "ovl_nat": body("ovl_nat", {
                k: {"real": v.real, "override": v.override} for k, v in state["nat"].items()
            }),
            "ovl_peers": body("ovl_peers", {
                k: {"identity": v.identity, "flags": v.flags} for k, v in state["peers"].items()
            }),
            "ovl_ports": body("ovl_ports", abi.ports_by_proto(state["ports"])),
            "ovl_failsafe": body("ovl_failsafe", dict(state["failsafe"])),
            "ovl_policy": body("ovl_policy", js["policy"]),
            "ovl_cidr_ident": body("ovl_cidr_ident", js["cidr_ident"]),
            "ovl_names": body("ovl_names", js["names"]),
            "ovl_cfg": body(CFG, cfg),
            "ovl_self": body("ovl_self", js["self"]),
            "ovl_ct": body("ovl_ct", maps.ct_entries()),
            "ovl_counters": {"entries": maps.counters()},
            "socket_links": cgroup.links(pin_dir, SOCK_HOOKS),
            "fill": fill,
        }
    finally:
        maps.close()
