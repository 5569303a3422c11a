"""An old-format (Neti) host of the lab: ``python -m overlay.lab.neti_agent CONFIG.json``,
run inside the host's namespace by ``overlay lab up --with-neti`` (docs/lab.md).

It does what an agent of the old system does, from the layout in docs/migration.md (our
own code, on :mod:`overlay.lab.neti_host`'s ZooKeeper steps):

1. allocates its overlay address the old way (``id-to-ip`` / ``ip-to-id``, kept on restart);
2. joins the old party with one ephemeral ``<uuid4 hex>-<public>|<private>|<overlay>|<flag>``
   entry (joined again when its session was lost);
3. watches the party and renders the whole ruleset, applied only when it changed:
   nat ``OUTPUT`` -> ``NETI-NAT``: ``DNAT <peer overlay> -> <private>`` for a peer with its
   flag, ``-> <public>`` for the others; with ``reject_all``, filter ``INPUT`` policy DROP
   and ``NETI-IN`` accepting established flows, loopback, SSH from the whitelist, the
   peers' addresses (an ipset ``NETI-PEERS``, swapped whole) and the open ports;
4. on SIGTERM: removes its rules and set, leaves the party, exits 0.

Not emulated: the old ``maxchange`` guard and the 30-60 s random delay before a re-read
(a change is applied at once), ``nat_overrides``, dry-run.

It writes what it applied to ``state_file`` (JSON: ``overlay``, ``entry``, ``peers``
{overlay: address}), which the lab reads to learn its address and to wait until it has
converged.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from overlay.config_neti import NetiConfig

log = logging.getLogger(__name__)

SET = "NETI-PEERS"
SET_NEW = "NETI-PEERS-NEW"
CHAIN_NAT = "NETI-NAT"
CHAIN_IN = "NETI-IN"
POLL_S = 5.0          # re-read the party at least this often (a watch can be missed across a session loss)


def render(peers: dict[str, str], cfg: dict) -> tuple[str, str]:
    """``(ipset restore text, iptables-restore text)`` for ``peers`` (overlay -> address to use)."""
    order = sorted(peers, key=ipaddress.IPv4Address)
    members = sorted(set(peers.values()), key=ipaddress.IPv4Address)
    sets = [f"create {SET} hash:ip family inet -exist", f"create {SET_NEW} hash:ip family inet -exist",
            f"flush {SET_NEW}", *(f"add {SET_NEW} {a}" for a in members),
            f"swap {SET_NEW} {SET}", f"destroy {SET_NEW}"]
    nat = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
           ":POSTROUTING ACCEPT [0:0]", f":{CHAIN_NAT} - [0:0]",
           f"-A OUTPUT -d {cfg['overlay_subnet']} -j {CHAIN_NAT}",
           *(f"-A {CHAIN_NAT} -d {o}/32 -j DNAT --to-destination {peers[o]}" for o in order), "COMMIT"]
    policy = "DROP" if cfg["reject_all"] else "ACCEPT"
    filt = ["*filter", f":INPUT {policy} [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
            f":{CHAIN_IN} - [0:0]", f"-A INPUT -j {CHAIN_IN}"]
    if cfg["reject_all"]:
        filt += [f"-A {CHAIN_IN} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                 f"-A {CHAIN_IN} -i lo -j ACCEPT",
                 *(f"-A {CHAIN_IN} -s {c} -p tcp --dport 22 -j ACCEPT" for c in cfg["ssh_whitelist"]),
                 f"-A {CHAIN_IN} -m set --match-set {SET} src -j ACCEPT",
                 *(f"-A {CHAIN_IN} -p tcp --dport {str(p).replace('-', ':')} -j ACCEPT" for p in cfg["open_ports"])]
    filt.append("COMMIT")
    return "\n".join(sets) + "\n", "\n".join(nat + filt) + "\n"


CLEAR = ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
         "COMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")


def _restore(argv: list[str], text: str) -> None:
    proc = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")


def neti_of(cfg: dict) -> NetiConfig:
    n = cfg["neti"]
    return NetiConfig(n["prefix"], n["ip_map"], n["id_to_ip"], n["ip_to_id"], n["max_change"],
                      tuple(sorted(n["vpcflag"].items())))


def _write_state(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(state, fh, sort_keys=True)
    os.replace(tmp, path)


def run(cfg: dict, stop: threading.Event, changed: threading.Event | None = None) -> None:
    """Until ``stop`` is set (then set ``changed`` too, to wake the loop at once)."""
    from kazoo.client import KazooClient, KazooState
    from kazoo.exceptions import KazooException
    from kazoo.recipe.watchers import ChildrenWatch

    from overlay.lab.neti_host import join_party, old_allocate, read_party

    neti = neti_of(cfg)
    me = cfg["instance_id"]
    client = KazooClient(hosts=cfg["zookeeper"], timeout=10.0)
    client.start(timeout=60)
    changed = changed or threading.Event()
    applied = False
    try:
        overlay = old_allocate(client, neti, ipaddress.IPv4Network(cfg["overlay_subnet"]), me)
        log.info("%s: overlay address %s (old allocation)", me, overlay)
        client.ensure_path(neti.path(neti.ip_map))
        ChildrenWatch(client, neti.path(neti.ip_map), lambda _children: changed.set())
        client.add_listener(lambda state: changed.set() if state == KazooState.CONNECTED else None)
        entry, last = None, None
        changed.set()
        while not stop.is_set():
            changed.wait(POLL_S)
            changed.clear()
            if stop.is_set():
                break
            try:
                if entry is None or client.exists(entry) is None:
                    entry = join_party(client, neti, cfg["public"], cfg["private"], overlay, cfg["flag"])
                    log.info("%s: joined the party as %s", me, entry.rsplit("/", 1)[1])
                peers = read_party(client, neti, cfg["flag"])
            except KazooException as exc:
                log.warning("%s: ZooKeeper: %s; trying again", me, exc)
                time.sleep(1.0)
                changed.set()
                continue
            peers.pop(overlay, None)
            rules = render(peers, cfg)
            if rules != last:
                _restore(["ipset", "restore"], rules[0])
                _restore(["iptables-restore"], rules[1])
                applied, last = True, rules
                log.info("%s: applied %d peers", me, len(peers))
                _write_state(cfg["state_file"], {"instance_id": me, "overlay": overlay, "entry": entry,
                                                 "peers": peers, "applied": time.time()})
    finally:
        if applied:
            _restore(["iptables-restore"], CLEAR)
            subprocess.run(["ipset", "destroy", SET], capture_output=True, timeout=30)
        client.stop()      # the ephemeral party entry goes with the session
        client.close()
        log.info("%s: rules removed, left the party", me)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("kazoo").setLevel(logging.WARNING)
    if len(argv) != 1:
        log.error("usage: python -m overlay.lab.neti_agent CONFIG.json")
        return 2
    with open(argv[0], encoding="utf-8") as fh:
        cfg = json.load(fh)
    stop, wake = threading.Event(), threading.Event()

    def on_signal(*_args) -> None:
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        run(cfg, stop, wake)
    except Exception as exc:  # noqa: BLE001 - a lab process: one line, exit 1
        log.error("%s: %s: %s", cfg.get("instance_id"), type(exc).__name__, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
