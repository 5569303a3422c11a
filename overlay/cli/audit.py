"""``overlay audit -c FILE [--inventory FILE] [--column NAME] [--min-version V] [--stale-days N] [--json]``:
the fleet in ZooKeeper (both layouts with ``registry.neti``) against an inventory
(docs/migration.md, "Audit"). Reads only."""

from __future__ import annotations

import time

from overlay.cli.output import EXIT_OK, add_command, out, out_json


def cmd_audit(args) -> int:
    from overlay.audit import audit, format_report, parse_inventory
    from overlay.config import load_config
    from overlay.errors import InvalidConfigError
    from overlay.zk.audit_read import read_snapshot

    config = load_config(args.config)
    if config.registry.backend != "zookeeper":
        raise InvalidConfigError("registry.backend", "overlay audit reads ZooKeeper: give a config with "
                                 "backend: zookeeper (a controller's config will do)")
    inventory = None
    if args.inventory is not None:
        try:
            with open(args.inventory, encoding="utf-8") as fh:
                inventory = parse_inventory(fh.read(), args.column)
        except OSError as exc:
            raise InvalidConfigError("--inventory", f"{args.inventory}: {exc.strerror}") from None
        except ValueError as exc:
            raise InvalidConfigError("--inventory", f"{args.inventory}: {exc}") from None
    if args.stale_days < 0:
        raise InvalidConfigError("--stale-days", f"must be >= 0, got {args.stale_days:g}")
    snap, invalid = read_snapshot(config.registry, config.overlay_subnet)
    try:
        report = audit(snap, inventory, args.min_version, args.stale_days, time.time())
    except ValueError as exc:
        raise InvalidConfigError("--min-version", str(exc)) from None
    report["invalid_records"] = invalid
    if args.json:
        out_json(report)
    else:
        for line in format_report(report):
            out(line)
        if invalid:
            out(f"invalid records left out: {invalid}")
    return EXIT_OK


def register(sub) -> None:
    sp = add_command(sub, "audit", cmd_audit,
                     "compare the fleet in ZooKeeper (and the old system's layout, with registry.neti) with an "
                     "inventory: missing and unlisted hosts, agent versions, free addresses, stale allocations")
    sp.add_argument("-c", "--config", required=True, help="YAML with overlay_subnet and registry (backend zookeeper)")
    sp.add_argument("--inventory", metavar="FILE", help="one id or address per line, or a CSV with a header")
    sp.add_argument("--column", metavar="NAME", help="the CSV column to use (default: the first id or address column)")
    sp.add_argument("--min-version", metavar="V", help="list hosts whose agent is older (old-layout hosts count)")
    sp.add_argument("--stale-days", type=float, default=30.0, metavar="N",
                    help="report allocations without a live host last written over N days ago (default 30)")
    sp.add_argument("--json", action="store_true", help="print JSON")
