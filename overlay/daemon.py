"""``overlay daemon``: wire config, registry, datapath, agent and status endpoint.

SIGTERM and SIGINT stop the daemon and leave the datapath in place, so
traffic keeps flowing on the last applied state; the next start adopts it. They
also leave this node's registration (ZooKeeper: the session is left open for the
next start to resume; grpc: the controller's lease), so peers do not remove a
node that is only restarting; ``overlay deregister`` removes it for good.
SIGHUP reloads the config file (static peers, filter settings, guard and
throttle); an invalid new config is logged and the old one kept.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time

from overlay import __version__, sdnotify
from overlay.config import Config, datapath_location, load_config
from overlay.errors import InvalidConfigError, OverlayError, UnsupportedError
from overlay.logs import setup_logging
from overlay.model import Node

log = logging.getLogger(__name__)


def preflight(config: Config) -> None:
    """Refuse, with one clear line, a config this host cannot honour."""
    if config.datapath.backend in ("ebpf", "iptables"):
        if os.geteuid() != 0:
            raise UnsupportedError(f"datapath.backend {config.datapath.backend} needs root (run as root, or use --dry-run)")
        try:
            socket.if_nametoindex(config.datapath.interface)
        except OSError:
            raise UnsupportedError(
                f"datapath.interface: no interface named {config.datapath.interface!r} on this host"
            ) from None
    if config.datapath.backend == "ebpf":
        try:
            import bcc  # noqa: F401  (Debian's python3-bpfcc)
        except ImportError:
            raise UnsupportedError(
                "datapath.backend ebpf needs bcc: install Debian's python3-bpfcc and run from a "
                "virtualenv made with --system-site-packages (make test / make lab do this)"
            ) from None
        if not os.path.ismount("/sys/fs/bpf"):
            raise UnsupportedError("bpffs is not mounted at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)")


def make_registry(config: Config):
    """The registry ``registry.backend`` names (:data:`overlay.backends.REGISTRIES`)."""
    from overlay.backends import create_registry

    return create_registry(config)


def make_datapath(config: Config, self_node: Node | None, dry_run: bool = False):
    from overlay.backends import create_datapath

    backend = "dryrun" if dry_run else config.datapath.backend
    dp = config.datapath
    return create_datapath(
        backend,
        interface=dp.interface,
        overlay_subnet=str(config.overlay_subnet),
        self_private=self_node.private if self_node else None,
        self_overlay=self_node.overlay if self_node else None,
        sizes=dp.sizes,
        pin_root=dp.pin_root,
        overlay_device=dp.overlay_device,
        mode=dp.mode,
        cgroup=dp.cgroup,
        extra_routes=config.override_routes,
        options=dp.options,
    )


def local_addresses(config: Config) -> tuple[str, str]:
    if config.addresses is not None:
        return config.addresses.private, config.addresses.public
    from overlay.discovery import discover

    return discover(config)


def with_network(config: Config) -> Config:
    """``config`` with its network filled in from discovery when the file leaves it out."""
    if config.network is not None:
        return config
    from overlay.discovery import network

    return dataclasses.replace(config, network=network(config))


def run_daemon(config_path: str, dry_run: bool = False, log_level: str = "info",
               log_format: str = "text") -> int:
    config = load_config(config_path)
    setup_logging(config.node_id, log_level, log_format)
    if not dry_run:
        preflight(config)
    private, public = local_addresses(config)
    config = with_network(config)
    registry = make_registry(config)
    requested = config.addresses.overlay if config.addresses else None
    overlay = registry.allocate(config.node_id, requested)
    self_node = Node(
        node_id=config.node_id,
        network=config.network,
        private=private,
        public=public,
        overlay=overlay,
        groups=config.groups,
        open_ports=config.filter.open_ports,
        private6=config.addresses.private6 if config.addresses else None,
        public6=config.addresses.public6 if config.addresses else None,
        agent_version=__version__,
    )
    log.info("this node: overlay %s, private %s, public %s, network %s", overlay, private, public, config.network)
    datapath = make_datapath(config, self_node, dry_run)

    from overlay.agent import Agent

    if dry_run:
        return _dry_run(config, registry, datapath, self_node)

    datapath.start()
    agent = Agent(config, registry, datapath, self_node)
    from overlay.status import StatusServer

    status = StatusServer(agent, config.status_listen, live=lambda: time.monotonic() - agent.heartbeat < 30,
                          metrics_listen=config.metrics_listen, control_socket=config.control_socket)
    stop = threading.Event()

    def on_stop(signum, _frame):
        log.info("signal %s: stopping, leaving the datapath in place", signal.Signals(signum).name)
        stop.set()
        agent.wake.set()

    def on_hup(_signum, _frame):
        threading.Thread(target=_reload, args=(config_path, agent, registry), daemon=True).start()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    status.start()
    log.info("status endpoint on http://%s:%d%s%s", *status.address,
             f", metrics on http://{config.metrics_listen[0]}:{config.metrics_listen[1]}/metrics"
             if config.metrics_listen else "",
             f", actions on {status.control_socket}" if status.control_socket else "")
    try:
        registry.start(agent.notify)
        registry.register(self_node)
        if sdnotify.enabled():
            threading.Thread(target=_announce_ready, args=(agent, stop, config.registry.timeout_s),
                             name="sd-notify", daemon=True).start()
        agent.run(stop)
    finally:
        sdnotify.notify("STOPPING=1")
        status.stop()
        # a stopping daemon leaves its record (a restart must not remove it from its peers):
        # the ZooKeeper backend keeps its session for the next start, the grpc one its lease
        getattr(registry, "detach", registry.close)()
        datapath.close()
    log.info("stopped")
    return 0


def _announce_ready(agent, stop: threading.Event, grace_s: float) -> None:
    """systemd READY=1 (Type=notify): once the first apply is done, or after ``grace_s``
    when the registry does not answer: the daemon then serves the last applied state
    (fail static), and a unit that waited for the registry would fail the whole boot."""
    deadline = time.monotonic() + grace_s
    while not agent.ready and time.monotonic() < deadline:
        if stop.wait(0.1):
            return
    status = ("in sync with the registry" if agent.ready
              else f"the registry did not answer within {grace_s:g} s: serving the last applied state")
    sdnotify.notify("READY=1", f"STATUS={status}")
    log.info("ready (systemd notified): %s", status)


def _reload(config_path: str, agent, registry) -> None:
    try:
        config = load_config(config_path)
    except InvalidConfigError as exc:
        log.error("SIGHUP: keeping the running config, the new one is invalid: %s", exc)
        return
    if config.network is None:
        config = dataclasses.replace(config, network=agent.config.network)
    if (config.node_id, config.network, config.datapath, config.override_routes) != (
            agent.config.node_id, agent.config.network, agent.config.datapath, agent.config.override_routes):
        log.warning("SIGHUP: node_id, network, datapath and the routes of nat_overrides outside "
                    "the overlay subnet change at a restart; applying the rest")
    if hasattr(registry, "replace"):
        registry.replace(config.registry.peers)
    agent.set_config(config)
    log.info("SIGHUP: config reloaded")


def _dry_run(config: Config, registry, datapath, self_node: Node) -> int:
    from overlay.agent import Agent
    from overlay.datapath.dryrun import format_op

    agent = Agent(config, registry, datapath, self_node)
    ready = threading.Event()
    registry.start(ready.set)
    deadline = time.monotonic() + config.registry.timeout_s
    while not registry.view().synced or not registry.view().connected:
        if time.monotonic() > deadline:
            raise OverlayError("dry run: the registry did not answer in time")
        ready.wait(0.2)
    ops = agent.reconcile()
    registry.close()
    for op in ops:
        print(format_op(op))
    for node_id, reason in agent.excluded:
        print(f"# excluded {node_id}: {reason}")
    print(f"# {len(ops)} ops for {len(agent.applied_peers)} peers")
    return 0


def deregister_node(config_path: str) -> str:
    """``overlay deregister``: remove this node's record for good, through the config's
    registry (a daemon that stops leaves it, so that a restart does not remove the node from
    its peers). Returns the node id."""
    config = load_config(config_path)
    registry = make_registry(config)
    deregister = getattr(registry, "deregister", None)
    if deregister is None:
        raise UnsupportedError(f"registry.backend {config.registry.backend}: there is no record to deregister")
    try:
        deregister()
    finally:
        registry.close()
    return config.node_id


def teardown_datapath(config_path: str | None, interface: str | None = None, pin_root: str | None = None) -> None:
    config, iface, root = datapath_location(config_path, interface, pin_root)
    backend = config.datapath.backend if config else "ebpf"
    if backend == "dryrun":
        return
    if os.geteuid() != 0:
        raise UnsupportedError("overlay datapath teardown needs root")
    from overlay.backends import teardown_datapath as remove

    remove(backend, interface=iface, pin_root=root,
           overlay_device=config.datapath.overlay_device if config else "ovl0",
           options=config.datapath.options if config else None)
