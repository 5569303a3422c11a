"""``overlay plugins``: the registries, datapaths and address providers this installation can
use, built in and installed as entry points (docs/plugins.md).

Each is listed with the distribution that provides it and its version, the
``module:attribute`` it names, whether it loads (a broken plugin is listed with its error,
never a traceback), whether it validates its own config section, and what shadows it.
"""

from __future__ import annotations

from overlay.cli.output import EXIT_OK, add_command, out, out_json, table

# the config key that chooses from each entry point group
CONFIG_KEYS = {"overlay.registries": "registry.backend", "overlay.datapaths": "datapath.backend",
               "overlay.providers": "discovery.provider"}


def _source(row: dict) -> str:
    if row["builtin"]:
        return "built in"
    return " ".join(v for v in (row["distribution"] or "?", row["version"]) if v)


def _state(row: dict) -> str:
    if row["shadowed_by"] is not None:
        return f"unused: shadowed by {row['shadowed_by']}"
    if not row["loads"]:
        return f"ERROR: {row['error']}"
    if row["config_hook"]:
        return "ok, validates its own section"
    return "ok"


def format_plugins(groups: dict[str, list[dict]]) -> str:
    lines = []
    for group, rows in groups.items():
        if lines:
            lines.append("")
        lines.append(f"{group} ({CONFIG_KEYS.get(group, '?')})")
        body = table([("NAME", "SOURCE", "MODULE", "STATE"),
                      *((r["name"], _source(r), r["module"], _state(r)) for r in rows)])
        lines += [f"  {line}" for line in body]
    return "\n".join(lines)


def cmd_plugins(args) -> int:
    from overlay.backends import TABLES

    groups = {t.group: t.describe() for t in TABLES}
    if args.json:
        out_json(groups)
    else:
        out(format_plugins(groups))
    return EXIT_OK


def register(sub) -> None:
    sp = add_command(sub, "plugins", cmd_plugins,
                     "list the registry, datapath and address-provider backends: built in and installed plugins")
    sp.add_argument("--json", action="store_true",
                    help="print JSON: {group: [{name, builtin, distribution, version, module, loads, error, "
                         "config_hook, shadowed_by}]}")
