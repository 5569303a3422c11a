"""``overlay maps``: the live datapath maps, read from the kernel (works while the daemon is down)."""

from __future__ import annotations

import os

from overlay.config import load_config
from overlay.errors import UnsupportedError


def read_maps(config_path: str | None, interface: str | None = None, pin_root: str | None = None) -> dict:
    config = load_config(config_path) if config_path else None
    iface = interface or (config.datapath.interface if config else "eth0")
    root = pin_root or (config.datapath.pin_root if config else "/sys/fs/bpf/overlay")
    if os.geteuid() != 0:
        raise UnsupportedError("overlay maps reads pinned BPF maps and needs root")
    from overlay.datapath.ebpf.datapath import read_pinned

    return read_pinned(iface, root)


def format_maps(maps: dict) -> str:
    lines = []
    for name, body in maps.items():
        if isinstance(body, dict) and "entries" in body:
            entries = body["entries"]
            lines.append(f"{name} ({len(entries)} entries{', max ' + str(body['max_entries']) if 'max_entries' in body else ''})")
            items = entries.items() if isinstance(entries, dict) else enumerate(entries)
            for i, (k, v) in enumerate(items):
                if i >= 50:
                    lines.append(f"  ... {len(entries) - 50} more (use --json)")
                    break
                lines.append(f"  {k} -> {v}" if isinstance(entries, dict) else f"  {v}")
        else:
            lines.append(f"{name}: {body}")
    return "\n".join(lines)
