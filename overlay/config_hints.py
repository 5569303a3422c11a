"""Hints for unknown config keys: the old system's keys, and near misses.

Operators of the old system (Neti: an INI file with ``[neti]``, ``[ec2]``, ``[vpc]``
and ``[nat_overrides]`` sections) bring its key names along. An unknown key that the
old system had is rejected with the key that replaces it, or with the reason it is not
needed (docs/config.md, "Coming from the old system"); any other unknown key close to a
known one gets a "did you mean" (:func:`difflib.get_close_matches`). Pure data and
functions: :mod:`overlay.config` calls :func:`unknown_key_reason`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

_LOGS = ("not needed: the daemon logs to stderr, which systemd sends to the journal "
         "(journalctl -u overlay); `overlay --log-format json` writes JSON lines for log "
         "pipelines; for a file, redirect stderr (StandardError=append:PATH in the unit)")
_LAYOUT = ("not needed: the ZooKeeper layout under registry.prefix is fixed "
           "(alloc/id-to-ip, alloc/ip-to-id, nodes/: docs/registry.md)")
_AWS = ("not needed: nothing is tagged; discovery: {provider: aws-imds} reads the "
        "instance metadata without keys")
_NETWORK_SECTION = ("the old system's per-network section: set network: <this host's network> "
                    "and registry.hosts")

# old key -> what to write instead (or why nothing is needed)
OLD_KEYS: dict[str, str] = {
    "log_file": _LOGS,
    "zk_hosts": "the old system's key: use registry.hosts, a list of \"host:port\"",
    "zk_prefix": "the old system's key: use registry.prefix",
    "zk_iptoid_node": _LAYOUT,
    "zk_idtoip_node": _LAYOUT,
    "zk_ip_map_node": _LAYOUT,
    "zk_update_interval_path": ("not needed: changes are applied as they arrive; "
                                "throttle.min_s/max_s add a random delay"),
    "update_interval": "the old system's key: use throttle.min_s and throttle.max_s",
    "table_files_path": ("not needed: no rule files are written (the eBPF datapath's state is "
                         "pinned under datapath.pin_root)"),
    "reject_all": "the old system's top-level key: use filter.reject_all",
    "open_ports": "the old system's top-level key: use filter.open_ports",
    "ssh_whitelist": "the old system's top-level key: use filter.ssh_whitelist (a list of CIDRs)",
    "max_change": "the old system's top-level key: use guard.max_change",
    "aws_key": _AWS,
    "aws_secret_key": _AWS,
    "ec2": _NETWORK_SECTION,
    "vpc": _NETWORK_SECTION,
    "neti": ("the old system's [neti] section: its keys are top-level or in sections here "
             "(docs/config.md, \"Coming from the old system\")"),
    "overlay_ip": "the old system's key: use addresses.overlay",
    "private_ip": "the old system's key: use addresses.private",
    "public_ip": "the old system's key: use addresses.public",
    "dry_run": "not a config key: use `overlay daemon -c FILE --dry-run`",
    "log_level": "not a config key: use `overlay --log-level LEVEL`",
    "log_format": "not a config key: use `overlay --log-format text|json`",
}


def unknown_key_reason(key: str, known: Iterable[str]) -> str:
    """The reason for rejecting ``key``, where the section's valid keys are ``known``."""
    if key in OLD_KEYS:
        return f"unknown key: {OLD_KEYS[key]}"
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    if close:
        return f"unknown key (did you mean {close[0]}?)"
    return "unknown key"
