"""``overlay certs init|issue``: the mutual-TLS certificates of the controller and its
clients (:mod:`overlay.controller.certs`; docs/grpc.md)."""

from __future__ import annotations

from overlay.cli.output import EXIT_OK, Parser, add_command, out


def cmd_certs_init(args) -> int:
    from overlay.controller import certs

    written = certs.init(args.dir, tuple(args.name or ()), force=args.force)
    if written:
        out(f"{args.dir}: wrote {', '.join(written)}")
    else:
        out(f"{args.dir}: CA, controller and operator certificates already present (use --force to replace)")
    return EXIT_OK


def cmd_certs_issue(args) -> int:
    from overlay.controller import certs

    written = certs.issue(args.dir, args.node, force=args.force)
    out(f"{args.dir}: wrote {', '.join(written)}")
    return EXIT_OK


def register(sub) -> None:
    sp = add_command(sub, "certs", None, "mutual-TLS certificates for the controller")
    csub = sp.add_subparsers(dest="certs_command", metavar="ACTION", parser_class=Parser)
    ci = add_command(csub, "init", cmd_certs_init, "create ca, controller and operator certificates in a directory")
    ci.add_argument("--dir", required=True, help="where to write ca.crt/.key, controller.crt/.key, operator.crt/.key")
    ci.add_argument("--name", action="append", metavar="NAME",
                    help="another DNS name or IP address of the controller (repeatable; localhost and 127.0.0.1 always)")
    ci.add_argument("--force", action="store_true", help="replace existing files (a new CA invalidates all certificates)")
    cs = add_command(csub, "issue", cmd_certs_issue, "create a node certificate NODE_ID.crt/.key signed by the CA")
    cs.add_argument("--dir", required=True, help="the directory of `overlay certs init`")
    cs.add_argument("--node", required=True, metavar="NODE_ID", help="the node id the certificate names")
    cs.add_argument("--force", action="store_true", help="replace an existing certificate")
