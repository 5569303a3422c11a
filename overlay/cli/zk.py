"""``overlay zk bootstrap|acl-repair|digest``: the operator's ZooKeeper chores (docs/registry.md, "ACLs").

    overlay zk bootstrap -c FILE [--max-change N]   create the layout with its ACLs (idempotent)
    overlay zk acl-repair -c FILE                   bring every existing entry to the ACL policy
    overlay zk digest USER                          the digest id of USER (password on stdin)

``bootstrap`` and ``acl-repair`` use the config's ``registry`` section, which must hold the
operator's credentials (``registry.operator``) and may list ``registry.node_identities``.
"""

from __future__ import annotations

import sys

from overlay.cli.output import EXIT_FAILURE, EXIT_OK, Parser, add_command, err, out


def _operator_config(path: str):
    from overlay.config import load_config
    from overlay.errors import InvalidConfigError

    config = load_config(path)
    if config.registry.operator is None:
        raise InvalidConfigError("registry.operator", "is required: ACLs are set with the operator's credentials")
    return config.registry


def cmd_bootstrap(args) -> int:
    from overlay.zk.layout import bootstrap

    reg = _operator_config(args.config)
    bootstrap(reg, reg.operator, max_change=args.max_change)
    out(f"layout under {reg.prefix} created or updated ({len(reg.node_identities)} node identities may register)")
    return EXIT_OK


def cmd_acl_repair(args) -> int:
    from overlay.zk import acl
    from overlay.zk import client as zkc

    reg = _operator_config(args.config)
    client = zkc.new_client(reg)
    with zkc.translate(f"re-ACLing the layout under {reg.prefix}", ",".join(reg.hosts)):
        client.start(timeout=max(reg.timeout_s, 1.0))
        try:
            report = acl.repair(client, reg.prefix, reg.operator, reg.node_identities, limit=args.limit,
                                timeout=max(reg.timeout_s, 5.0))
        finally:
            client.stop()
            client.close()
    out(f"{reg.prefix}: {report.summary()}")
    for path in report.refused[:20]:
        err(f"cannot re-ACL {path}: its ACL gives the operator no ADMIN right")
    return EXIT_FAILURE if report.refused or report.truncated else EXIT_OK


def cmd_digest(args) -> int:
    from kazoo.security import make_digest_acl_credential

    from overlay.errors import InvalidConfigError

    password = sys.stdin.readline().rstrip("\n")
    if not password:
        raise InvalidConfigError("stdin", "give the password on standard input (one line)")
    if ":" in args.user or not args.user:
        raise InvalidConfigError("USER", "a non-empty user name without ':'")
    out(make_digest_acl_credential(args.user, password))
    return EXIT_OK


def register(sub) -> None:
    sp = add_command(sub, "zk", None, "ZooKeeper layout and ACLs (operator)")
    zsub = sp.add_subparsers(dest="zk_command", metavar="ACTION", parser_class=Parser)
    b = add_command(zsub, "bootstrap", cmd_bootstrap, "create the registry layout with its ACLs (idempotent)")
    b.add_argument("-c", "--config", required=True, help="a config whose registry section has operator credentials")
    b.add_argument("--max-change", type=int, help="also set config/max_change (the churn guard threshold)")
    r = add_command(zsub, "acl-repair", cmd_acl_repair,
                    "set the ACL policy on every existing entry of the layout (exit 1 if some could not be)")
    r.add_argument("-c", "--config", required=True, help="a config whose registry section has operator credentials")
    r.add_argument("--limit", type=int, default=10_000_000, help="check at most this many entries")
    d = add_command(zsub, "digest", cmd_digest,
                    "print USER's ZooKeeper digest id (for registry.node_identities); the password is read from stdin")
    d.add_argument("user", metavar="USER", help="the user name of registry.auth on the node")
