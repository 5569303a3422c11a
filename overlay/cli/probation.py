"""``overlay policies plan|apply|confirm|rollback``: a whole policy set, written straight to
ZooKeeper with the config's operator credentials, and the dead-man switch
(docs/policies.md, "Changing policies without locking yourself out"; overlay.pending).

    overlay policies plan -c FILE POLICIES            which hosts change verdict, before applying
    overlay policies apply -c FILE POLICIES [--confirm-within S]
    overlay policies confirm -c FILE                  keep the pending change
    overlay policies rollback -c FILE                 write the previous policies back now
"""

from __future__ import annotations

import time

from overlay.cli.output import EXIT_OK, add_command, out, out_json, table


def _setup(args):
    from overlay.config import load_config
    from overlay.errors import InvalidConfigError
    from overlay.zk import client as zkc
    from overlay.zk.acl import operator_acl
    from overlay.zk.layout import Layout

    config = load_config(args.config)
    reg = config.registry
    if reg.backend != "zookeeper":
        raise InvalidConfigError("registry.backend", "these commands write ZooKeeper: give a config with "
                                 "backend: zookeeper and registry.operator (a controller's config will do)")
    client = zkc.new_client(reg)
    return config, client, Layout(reg.prefix), operator_acl(reg.operator), zkc


def _load(path: str):
    from overlay.config_yaml import load_yaml, read_text
    from overlay.errors import InvalidConfigError, InvalidRecord
    from overlay.pending import load_policy_file

    try:
        return load_policy_file(load_yaml(read_text(path), path))
    except InvalidRecord as exc:
        raise InvalidConfigError(path, str(exc)) from None


def _run(args, what: str, fn):
    config, client, layout, acl, zkc = _setup(args)
    with zkc.translate(what, ",".join(config.registry.hosts)):
        client.start(timeout=max(config.registry.timeout_s, 1.0))
        try:
            return config, fn(client, layout, acl)
        finally:
            zkc.close(client)


def cmd_plan(args) -> int:
    from kazoo.exceptions import NoNodeError

    from overlay.errors import InvalidRecord
    from overlay.model import parse_node_record
    from overlay.ownership import parse_assignment
    from overlay.pending import verdict_changes
    from overlay.zk.pending import current_policies

    want = _load(args.file)

    def read(client, layout, _acl):
        hosts = {}
        grants = {}
        for name in client.get_children(layout.assignments):
            try:
                grants[name] = parse_assignment(client.get(f"{layout.assignments}/{name}")[0])
            except (NoNodeError, InvalidRecord, ValueError):
                grants[name] = ()   # not in force: the host holds no group
        for name in client.get_children(layout.nodes):
            try:
                node = parse_node_record(client.get(f"{layout.nodes}/{name}")[0])
            except (NoNodeError, InvalidRecord, ValueError):
                continue   # not a peer anywhere
            hosts[name] = tuple(g for g in node.groups if g in grants.get(name, ()))
        return hosts, current_policies(client, layout)

    _, (hosts, current) = _run(args, "reading the registry for the plan", read)
    rows = verdict_changes(hosts, current, want)
    added = sorted(set(want) - set(current))
    removed = sorted(set(current) - set(want))
    changed = sorted(p for p in set(want) & set(current) if want[p] != current[p])
    if args.json:
        out_json({"added": added, "removed": removed, "changed": changed, "verdicts": rows, "hosts": len(hosts)})
        return EXIT_OK
    out(f"policies: {len(added)} added, {len(removed)} removed, {len(changed)} changed; {len(hosts)} hosts")
    if rows:
        for line in table([("HOST", "FROM", "PROTO", "PORTS", "BEFORE", "AFTER")]
                          + [(r["host"], r["from"], r["proto"], r["ports"], r["before"], r["after"]) for r in rows]):
            out(line)
    else:
        out("no host changes verdict")
    return EXIT_OK


def cmd_apply(args) -> int:
    from overlay.errors import InvalidConfigError
    from overlay.zk.pending import apply_change

    if args.confirm_within is not None and not 1 <= args.confirm_within <= 86400:
        raise InvalidConfigError("--confirm-within", f"must be 1..86400 seconds, got {args.confirm_within:g}")
    want = _load(args.file)
    _, pend = _run(args, "applying the policies", lambda c, lay, acl: apply_change(c, lay, want, args.confirm_within,
                                                                                    acl))
    if pend is None:
        out(f"applied {len(want)} policies")
    else:
        out(f"applied {len(want)} policies as change {pend.change_id}: every host rolls it back at "
            f"{time.strftime('%H:%M:%S', time.localtime(pend.deadline))} ({args.confirm_within:g} s) unless "
            f"`overlay policies confirm -c {args.config}` arrives first")
    return EXIT_OK


def cmd_confirm(args) -> int:
    from overlay.zk.pending import confirm

    _, pend = _run(args, "confirming the policy change", confirm)
    out(f"policy change {pend.change_id} confirmed")
    return EXIT_OK


def cmd_rollback(args) -> int:
    from overlay.zk.pending import rollback

    _, pend = _run(args, "rolling back the policy change", rollback)
    out(f"policy change {pend.change_id} rolled back: {len(pend.previous)} policies written back")
    return EXIT_OK


def register(psub) -> None:
    """Add the actions to the ``policies`` family's subparsers ``psub``."""
    def action(name, func, help):
        sp = add_command(psub, name, func, help)
        sp.add_argument("-c", "--config", required=True,
                        help="YAML with registry (backend zookeeper, with registry.operator when ACLs are on)")
        return sp

    p = action("plan", cmd_plan, "which hosts change verdict for which (source, proto, ports), before applying FILE")
    p.add_argument("file", help="the whole policy set: {policies: {<id>: {from, to, proto, ports}}}")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = action("apply", cmd_apply, "write the policy set of FILE (ids not in it are deleted); with --confirm-within "
               "S every host rolls it back after S seconds unless confirmed")
    p.add_argument("file", help="the whole policy set: {policies: {<id>: {from, to, proto, ports}}}")
    p.add_argument("--confirm-within", type=float, metavar="S", help="roll back unless confirmed within S seconds")
    action("confirm", cmd_confirm, "keep the pending policy change")
    action("rollback", cmd_rollback, "write the pending change's previous policies back now")
