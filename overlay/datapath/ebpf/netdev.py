"""Network devices and tc attachment for the eBPF datapath (pyroute2 only).

Set-up, every step idempotent (EEXIST and ENODEV are expected answers):

- the overlay device: a veth pair ``ovl0``/``ovl0p`` (this kernel has no
  ``dummy``), ``arp off`` on ``ovl0``, both up, IPv6 off on both, forwarding
  off on ``ovl0p`` (a packet the overlay program lets through dies there
  instead of being routed back), this host's overlay address as /32 on
  ``ovl0`` and ``<overlay subnet> dev ovl0 src <private address>``, and a /32
  route to ``ovl0`` for each ``nat_overrides`` key outside the subnet;
- reverse-path filtering loosened (strict -> loose) on the uplink and
  ``all``: translated replies arrive on the uplink with an overlay source;
- a clsact qdisc and this module's own direct-action ``bpf`` filters, at a
  fixed priority and handle (:data:`FILTER_PRIO`, :data:`FILTER_HANDLE`), so
  other tc filters on the same device are never touched. Re-attaching uses
  ``replace``, which swaps the program atomically.

Checksum offload settings are left as they are.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from overlay.errors import DatapathError, UnsupportedError

log = logging.getLogger(__name__)

INGRESS = "ingress"
EGRESS = "egress"
_PARENT = {INGRESS: 0xFFFFFFF2, EGRESS: 0xFFFFFFF3}  # TC_H_MAKE(TC_H_CLSACT, MIN_{IN,E}GRESS)
CLSACT_HANDLE = 0xFFFF0000

FILTER_PRIO = 0x4F56     # "OV": this module's tc priority on every hook it uses
FILTER_HANDLE = 0x4F56
ETH_P_ALL = 0x0003

TCA_BPF_NAME = 7
TCA_BPF_TAG = 10
TCA_BPF_ID = 11

IFF_NOARP = 0x80
IFF_UP = 0x1


@dataclass(frozen=True)
class FilterInfo:
    ifindex: int
    direction: str
    prio: int
    handle: int
    name: str
    prog_id: int

    @property
    def ours(self) -> bool:
        return self.prio == FILTER_PRIO and self.handle == FILTER_HANDLE


def _netlink_error():
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError


@contextmanager
def _ipr() -> Iterator:
    try:
        from pyroute2 import IPRoute
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise UnsupportedError(f"pyroute2 is not installed: {exc}") from None
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _fail(what: str, exc: Exception) -> DatapathError:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return DatapathError(f"{what}: {errno.errorcode.get(code, code)} ({os.strerror(code)})")
    return DatapathError(f"{what}: {exc}")


def ifindex(name: str) -> int | None:
    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def require_interface(name: str) -> int:
    idx = ifindex(name)
    if idx is None:
        raise UnsupportedError(f"interface {name} does not exist")
    return idx


# -- sysctl (procfs, no subprocess) ---------------------------------------------


def _proc_write(path: str, value: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(value)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise DatapathError(f"write {path}: {exc.strerror}") from None


def _proc_read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def loosen_rp_filter(interface: str) -> None:
    """rp_filter strict (1) -> loose (2) on ``interface`` and ``all``; 0 and 2 are kept.

    The kernel uses max(all, interface), so both must be loose or off."""
    for dev in ("all", interface):
        path = f"/proc/sys/net/ipv4/conf/{dev}/rp_filter"
        if _proc_read(path) == "1":
            _proc_write(path, "2")
            log.info("rp_filter on %s: strict -> loose (translated replies carry overlay sources)", dev)


# -- overlay device -------------------------------------------------------------


def peer_name(device: str) -> str:
    return f"{device}p"


def ensure_overlay_device(device: str, overlay_subnet: str, self_private: str,
                          self_overlay: str | None, extra_routes: Iterable[str] = ()) -> int:
    """Create or fix the overlay device; returns its ifindex.

    ``extra_routes``: host addresses outside the subnet that are routed to the device
    too (``nat_overrides`` keys outside ``overlay_subnet``); other /32 routes to the
    device, left by an earlier config, are removed."""
    NetlinkError = _netlink_error()
    subnet = ipaddress.IPv4Network(overlay_subnet, strict=True)
    peer = peer_name(device)
    with _ipr() as ipr:
        if not ipr.link_lookup(ifname=device):
            try:
                ipr.link("add", ifname=device, kind="veth", peer=peer)
                log.info("created %s (veth, peer %s)", device, peer)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise _fail(f"create {device}", exc) from None
        found = ipr.link_lookup(ifname=device)
        peers = ipr.link_lookup(ifname=peer)
        if not found or not peers:
            raise DatapathError(f"{device}: exists but is not a veth pair with {peer}")
        idx, pidx = found[0], peers[0]
        for dev in (device, peer):
            _proc_write(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6", "1")
        _proc_write(f"/proc/sys/net/ipv4/conf/{peer}/forwarding", "0")
        try:
            ipr.link("set", index=idx, arp=False)
            ipr.link("set", index=idx, state="up")
            ipr.link("set", index=pidx, state="up")
        except NetlinkError as exc:
            raise _fail(f"set {device} up", exc) from None
        if self_overlay:
            try:
                ipr.addr("add", index=idx, address=self_overlay, prefixlen=32)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise _fail(f"address {self_overlay}/32 on {device}", exc) from None
        try:
            ipr.route(
                "replace", dst=str(subnet.network_address), dst_len=subnet.prefixlen, oif=idx,
                prefsrc=self_private, scope=253,
            )
        except NetlinkError as exc:
            raise _fail(f"route {subnet} dev {device} src {self_private}", exc) from None
        _sync_host_routes(ipr, device, idx, self_private, set(extra_routes))
    return idx


def _sync_host_routes(ipr, device: str, idx: int, self_private: str, want: set[str]) -> None:
    """Exactly the /32 routes ``want`` to the overlay device, in the main table."""
    NetlinkError = _netlink_error()
    for msg in ipr.get_routes(family=socket.AF_INET, table=254, oif=idx):
        dst = msg.get_attr("RTA_DST")
        if msg["dst_len"] == 32 and dst not in want and msg.get_attr("RTA_OIF") == idx:
            try:
                ipr.route("del", dst=dst, dst_len=32, oif=idx, table=254, scope=msg["scope"],
                          proto=msg["proto"])
                log.info("removed route %s/32 dev %s (no longer a nat_overrides key)", dst, device)
            except NetlinkError as exc:
                if exc.code not in (errno.ESRCH, errno.ENOENT):
                    raise _fail(f"remove route {dst}/32 dev {device}", exc) from None
    for dst in sorted(want):
        try:
            ipr.route("replace", dst=dst, dst_len=32, oif=idx, prefsrc=self_private, scope=253)
        except NetlinkError as exc:
            raise _fail(f"route {dst}/32 dev {device} src {self_private} (nat_overrides)", exc) from None


def remove_overlay_device(device: str) -> None:
    NetlinkError = _netlink_error()
    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=device)
        if not found:
            return
        try:
            ipr.link("del", index=found[0])
            log.info("removed %s", device)
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                raise _fail(f"remove {device}", exc) from None


# -- tc -------------------------------------------------------------------------


def ensure_clsact(idx: int) -> None:
    NetlinkError = _netlink_error()
    with _ipr() as ipr:
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _fail(f"clsact on ifindex {idx}", exc) from None


def _options(msg) -> dict[int, bytes]:
    """The raw TCA_OPTIONS attributes of a filter message (pyroute2 does
    not decode TCA_BPF_ID and TCA_BPF_TAG)."""
    opts = msg.get_attr("TCA_OPTIONS")
    if opts is None or not hasattr(opts, "data"):
        return {}
    raw = bytes(opts.data[opts.offset + 4:opts.offset + opts.length])
    out, i = {}, 0
    while i + 4 <= len(raw):
        length, kind = struct.unpack_from("=HH", raw, i)
        if length < 4:
            break
        out[kind & 0x3FFF] = raw[i + 4:i + length]
        i += (length + 3) & ~3
    return out


def list_filters(idx: int, direction: str) -> list[FilterInfo]:
    """The bpf filters on a clsact hook (empty when there is no clsact)."""
    NetlinkError = _netlink_error()
    out = []
    with _ipr() as ipr:
        try:
            msgs = list(ipr.get_filters(index=idx, parent=_PARENT[direction]))
        except NetlinkError as exc:
            if exc.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                return []
            raise _fail(f"list filters on ifindex {idx}", exc) from None
    for msg in msgs:
        if msg.get_attr("TCA_KIND") != "bpf" or not msg["handle"]:
            continue
        attrs = _options(msg)
        name = attrs.get(TCA_BPF_NAME, b"").split(b"\0")[0].decode(errors="replace")
        prog_id = struct.unpack("=I", attrs[TCA_BPF_ID][:4])[0] if TCA_BPF_ID in attrs else 0
        out.append(FilterInfo(idx, direction, msg["info"] >> 16, msg["handle"], name, prog_id))
    return out


def our_filter(idx: int, direction: str) -> FilterInfo | None:
    for f in list_filters(idx, direction):
        if f.ours:
            return f
    return None


def attach(idx: int, direction: str, prog_fd: int, name: str) -> None:
    """Attach (or atomically replace) this module's filter on a hook."""
    NetlinkError = _netlink_error()
    ensure_clsact(idx)
    with _ipr() as ipr:
        try:
            ipr.tc(
                "replace-filter", "bpf", idx, handle=FILTER_HANDLE, parent=_PARENT[direction],
                prio=FILTER_PRIO, protocol=ETH_P_ALL, fd=prog_fd, name=name, direct_action=True,
            )
        except NetlinkError as exc:
            raise _fail(f"attach {name} on ifindex {idx} {direction}", exc) from None
    log.info("attached %s on ifindex %d %s", name, idx, direction)


def _tc_delete(what: str, *args, **kwargs) -> bool:
    """``ipr.tc(*args, **kwargs)`` that deletes something; False if it was not there (or the
    device is gone), a DatapathError naming ``what`` on any other failure."""
    NetlinkError = _netlink_error()
    with _ipr() as ipr:
        try:
            ipr.tc(*args, **kwargs)
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                return False
            raise _fail(what, exc) from None
    return True


def detach(idx: int, direction: str) -> bool:
    """Remove this module's filter from a hook; False if it was not there."""
    if our_filter(idx, direction) is None:
        return False
    return _tc_delete(
        f"detach filter on ifindex {idx} {direction}", "del-filter", "bpf", idx, handle=FILTER_HANDLE,
        parent=_PARENT[direction], prio=FILTER_PRIO, protocol=ETH_P_ALL,
    )


def remove_clsact_if_unused(idx: int) -> bool:
    """Delete the clsact qdisc when no filter at all is left on it."""
    if _any_filter(idx):
        return False
    return _tc_delete(f"remove clsact on ifindex {idx}", "del", "clsact", idx)


def _any_filter(idx: int) -> bool:
    """Any filter of any kind on either clsact hook (not only bpf ones)."""
    NetlinkError = _netlink_error()
    with _ipr() as ipr:
        for parent in _PARENT.values():
            try:
                if any(m.get_attr("TCA_KIND") and m["handle"]
                       for m in ipr.get_filters(index=idx, parent=parent)):
                    return True
            except NetlinkError:
                continue
    return False
