"""A MapSet on the maps of a ``bcc.BPF`` compiled without pins (the bpf tests' datapath;
the product always opens its maps from their pins, ``MapSet.from_pinned``)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from overlay.datapath.ebpf import bpfsys
from overlay.datapath.ebpf.maps import DATA_MAPS, MapSet
from overlay.errors import DatapathError


def mapset_of(bpf, names: Iterable[str] = DATA_MAPS) -> MapSet:
    """Duplicate the fds of ``bpf``'s tables into a MapSet (independent lifetimes)."""
    fds: dict[str, int] = {}
    try:
        for name in names:
            fds[name] = os.dup(bpf[name.encode()].map_fd)
        return MapSet(fds)
    except KeyError as exc:
        for fd in fds.values():
            bpfsys.close(fd)
        raise DatapathError(f"compiled programs have no map {exc}") from None
    except BaseException:
        for fd in fds.values():
            bpfsys.close(fd)
        raise
