"""``overlay daemon``: wire config, registry, datapath, agent and status endpoint.

SIGTERM and SIGINT stop the daemon and leave the datapath in place, so
traffic keeps flowing on the last applied state; the next start adopts it.
SIGHUP reloads the config file (static peers, filter settings, guard and
throttle); an invalid new config is logged and the old one kept.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

from overlay.config import Config, load_config
from overlay.errors import InvalidConfigError, OverlayError, UnsupportedError
from overlay.model import Node

log = logging.getLogger(__name__)


class _NodeIdFilter(logging.Filter):
    def __init__(self, node_id: str):
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.node_id = self.node_id
        return True


def setup_logging(node_id: str, level: str = "info") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_NodeIdFilter(node_id))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s node=%(node_id)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("kazoo").setLevel(logging.WARNING)


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
    backend = config.registry.backend
    if backend == "static":
        from overlay.registry.static import StaticRegistry

        return StaticRegistry(config.registry.peers)
    if backend == "zookeeper":
        from overlay.registry.zookeeper import ZooKeeperRegistry

        return ZooKeeperRegistry(config.registry, config.overlay_subnet, config.node_id)
    if backend == "grpc":
        from overlay.registry.grpc import GrpcRegistry

        return GrpcRegistry(config.registry, config.overlay_subnet, config.node_id)
    raise UnsupportedError(f"registry.backend {backend} is not available in this build")


def make_datapath(config: Config, self_node: Node | None, dry_run: bool = False):
    from overlay.datapath.registry import create

    backend = "dryrun" if dry_run else config.datapath.backend

    dp = config.datapath
    return create(
        backend,
        interface=dp.interface,
        overlay_subnet=str(config.overlay_subnet),
        self_private=self_node.private if self_node else None,
        self_overlay=self_node.overlay if self_node else None,
        sizes=dp.sizes,
        pin_root=dp.pin_root,
        overlay_device=dp.overlay_device,
    )


def local_addresses(config: Config) -> tuple[str, str]:
    if config.addresses is not None:
        return config.addresses.private, config.addresses.public
    from overlay.discovery import discover

    return discover(config)


def run_daemon(config_path: str, dry_run: bool = False, log_level: str = "info") -> int:
    config = load_config(config_path)
    setup_logging(config.node_id, log_level)
    if not dry_run:
        preflight(config)
    private, public = local_addresses(config)
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
    )
    log.info("this node: overlay %s, private %s, public %s, network %s", overlay, private, public, config.network)
    datapath = make_datapath(config, self_node, dry_run)

    from overlay.agent import Agent

    if dry_run:
        return _dry_run(config, registry, datapath, self_node)

    datapath.start()
    agent = Agent(config, registry, datapath, self_node)
    from overlay.status import StatusServer

    status = StatusServer(agent, config.status_listen, live=lambda: time.monotonic() - agent.heartbeat < 30)
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
    log.info("status endpoint on http://%s:%d", *status.address)
    try:
        registry.start(agent.notify)
        registry.register(self_node)
        agent.run(stop)
    finally:
        status.stop()
        registry.close()
        datapath.close()
    log.info("stopped")
    return 0


def _reload(config_path: str, agent, registry) -> None:
    try:
        config = load_config(config_path)
    except InvalidConfigError as exc:
        log.error("SIGHUP: keeping the running config, the new one is invalid: %s", exc)
        return
    if config.node_id != agent.config.node_id or config.datapath != agent.config.datapath:
        log.warning("SIGHUP: node_id and datapath changes need a restart; applying the rest")
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


def teardown_datapath(config_path: str | None, interface: str | None = None, pin_root: str | None = None) -> None:
    config = load_config(config_path) if config_path else None
    iface = interface or (config.datapath.interface if config else "eth0")
    root = pin_root or (config.datapath.pin_root if config else "/sys/fs/bpf/overlay")
    backend = config.datapath.backend if config else "ebpf"
    if backend == "dryrun":
        return
    if os.geteuid() != 0:
        raise UnsupportedError("overlay datapath teardown needs root")
    from overlay.datapath.registry import teardown

    teardown(backend, interface=iface, pin_root=root,
             overlay_device=config.datapath.overlay_device if config else "ovl0")
