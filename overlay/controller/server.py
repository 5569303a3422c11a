"""``overlay controller``: the gRPC server (mutual TLS, health, reflection) over a :class:`Store`.

:class:`Controller` owns a ZooKeeper store and a ``grpc.aio`` server running on an
event loop in its own thread; :meth:`Controller.start` returns once it serves,
:meth:`Controller.stop` shuts both down. The CLI runs one until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from overlay.config import Config
from overlay.controller.fanout import Hub, add_to_server
from overlay.controller.servicer import RegistryServicer
from overlay.controller.store import Store
from overlay.errors import InvalidConfigError, OverlayError
from overlay.rpc.proto import SERVICE, modules
from overlay.rpc.tls import MAX_MESSAGE, read_tls

log = logging.getLogger(__name__)

# Keepalive (server side): ping idle clients every 20 s, drop them if no answer in 10 s;
# let clients ping every 5 s or more, even without calls in flight.
SERVER_OPTIONS = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
)


class Controller:
    def __init__(self, config: Config, *, options: tuple = SERVER_OPTIONS, replica: str | None = None):
        if config.controller is None:
            raise InvalidConfigError("controller", "is required to run the controller ({listen, tls})")
        if config.registry.backend != "zookeeper":
            raise InvalidConfigError("registry.backend", "the controller stores in ZooKeeper: use backend: zookeeper")
        self.config = config
        self.ctl = config.controller
        self._tls = read_tls(self.ctl.tls, "controller.tls")
        self._options = options
        self.store = Store(config.registry, config.overlay_subnet, lease_s=self.ctl.lease_s,
                           window=self.ctl.window, replica=replica)
        self.port = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="controller-rpc")
        self.servicer: RegistryServicer | None = None

    @property
    def address(self) -> str:
        host = self.ctl.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        self.store.start(timeout=timeout)
        self._thread = threading.Thread(target=self._thread_main, name="controller-grpc", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise OverlayError("the controller's gRPC server did not start in time")
        if self._error is not None:
            self.store.close()
            raise self._error
        log.info("controller %s serving %s on %s (mutual TLS)", self.store.replica, SERVICE, self.address)

    def stop(self, grace: float = 1.0) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(grace + 10)
        self.store.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def wait(self) -> None:
        """Block until the server stops."""
        if self._thread is not None:
            self._thread.join()

    # --- the event loop ---------------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start(), or logged after it
            if not self._started.is_set():
                self._error = exc if isinstance(exc, OverlayError) else OverlayError(f"controller: {exc}")
                self._started.set()
            else:
                log.exception("the controller's gRPC server failed")

    async def _main(self) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from grpc_health.v1._async import HealthServicer
        from grpc_reflection.v1alpha import reflection

        pb2, _ = modules()
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopping = asyncio.Event()
        hub = Hub(loop)
        self.store.add_listener(hub.fire_threadsafe)
        limits = self.ctl.limits
        # past maximum_concurrent_rpcs (Watch streams included) gRPC itself answers RESOURCE_EXHAUSTED
        server = grpc.aio.server(options=list(self._options), maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
        self.servicer = RegistryServicer(self.store, self.config.overlay_subnet, hub, self._executor,
                                         limits=limits, attest_public=self.ctl.attest_public)
        add_to_server(pb2, self.servicer, server, SERVICE)   # Watch may yield serialized messages
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        names = (pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        ca, cert, key = self._tls
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
        try:
            self.port = server.add_secure_port(self.ctl.listen, creds)
        except RuntimeError as exc:
            raise OverlayError(f"controller.listen: cannot listen on {self.ctl.listen}: {exc}") from None
        if not self.port:
            raise OverlayError(f"controller.listen: cannot listen on {self.ctl.listen}")
        await server.start()
        self._started.set()
        stop_task = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                fut = hub.future()
                status = (health_pb2.HealthCheckResponse.SERVING if self.store.ready
                          else health_pb2.HealthCheckResponse.NOT_SERVING)
                await health.set(SERVICE, status)
                await health.set("", status)
                await asyncio.wait([stop_task, fut], timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_task.cancel()
            await health.enter_graceful_shutdown()
            await server.stop(1.0)
