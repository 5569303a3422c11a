"""Helpers of the gRPC controller tests (tests/integration/test_grpc_*.py).

Controllers run in-process on loopback (``127.0.0.1:0``) over the session's real
ZooKeeper, one prefix per test; certificates are made once per module.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator

import grpc
import pytest

from overlay.config import Config, config_from_dict
from overlay.model import Node
from tests.support.paths import PYTHON, REPO

PROTO = os.path.join(REPO, "proto", "overlay.proto")

NODES = ("web-1", "web-2", "web-3", "db-1")

# Faster keepalive than production, so that tests notice dead peers quickly.
FAST_CLIENT_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.enable_retries", 0),
)


def make_certs(base: str) -> tuple[str, str]:
    """``(certs, other)``: our CA with controller, operator and NODES certificates, and
    another CA with its own operator and web-1 certificates."""
    from overlay.controller import certs

    ours, other = os.path.join(base, "certs"), os.path.join(base, "other-ca")
    certs.init(ours)
    for n in NODES:
        certs.issue(ours, n)
    certs.init(other)
    certs.issue(other, "web-1")
    return ours, other


def controller_config(zk_address: str, prefix: str, certs_dir: str, *, subnet: str = "192.168.0.0/24",
                      window: int = 10000, lease_s: float = 30.0, listen: str = "127.0.0.1:0",
                      registry: dict | None = None, controller: dict | None = None) -> Config:
    """``registry`` and ``controller``: more keys of those sections (operator, limits, ...)."""
    return config_from_dict({
        "overlay_subnet": subnet,
        "registry": {"backend": "zookeeper", "hosts": [zk_address], "prefix": prefix, "timeout_s": 5,
                     **(registry or {})},
        "controller": {
            "listen": listen, "lease_s": lease_s, "window": window,
            "tls": {"ca": f"{certs_dir}/ca.crt", "cert": f"{certs_dir}/controller.crt",
                    "key": f"{certs_dir}/controller.key"},
            **(controller or {}),
        },
    })


@contextlib.contextmanager
def controllers() -> Iterator[Callable]:
    """``start(config)`` -> a started Controller; all stopped at the end."""
    from overlay.controller.server import Controller

    made: list[Controller] = []

    def start(config: Config, **kw) -> Controller:
        c = Controller(config, **kw)
        made.append(c)
        c.start(timeout=60)
        return c

    try:
        yield start
    finally:
        for c in reversed(made):
            with contextlib.suppress(Exception):
                c.stop()


def client(address: str, certs_dir: str, name: str = "operator", timeout: float = 10.0):
    from overlay.rpc.client import Client
    from overlay.rpc.tls import tls_from_dir

    return Client(address, tls_from_dir(certs_dir, name), timeout=timeout, options=FAST_CLIENT_OPTIONS)


def node(node_id: str, overlay: str, network: str = "ec2", groups=("web",), index: int = 1) -> Node:
    return Node(node_id, network, f"10.0.0.{index}", f"198.18.1.{index}", overlay, tuple(groups), ((80, 80),))


def code_of(fn: Callable) -> grpc.StatusCode:
    """The status code a raw stub call fails with."""
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    pytest.fail("the call succeeded")


def generate_standalone(directory: str) -> str:
    """Generate Python code from proto/overlay.proto alone (grpc_tools, nothing of the
    overlay package) into ``directory``; returns it."""
    proc = subprocess.run(
        [PYTHON, "-m", "grpc_tools.protoc", f"-I{os.path.dirname(PROTO)}", f"--python_out={directory}",
         f"--grpc_python_out={directory}", PROTO],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return directory


def standalone_env() -> dict[str, str]:
    """An environment in which the overlay package cannot be imported (cwd is a temp dir)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def tmpdir() -> str:
    return tempfile.mkdtemp(prefix="overlay-grpc-test-")


@contextlib.contextmanager
def made_certs() -> Iterator[tuple[str, str]]:
    """:func:`make_certs` in a fresh directory, removed afterwards."""
    import shutil

    base = tmpdir()
    try:
        yield make_certs(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def node_certs(nodes: Iterator[str] | list[str]) -> Iterator[str]:
    """A CA directory (operator and controller certificates) with a node certificate for
    each of ``nodes``, in a fresh directory removed afterwards."""
    import shutil

    from overlay.controller import certs as certlib

    base = tmpdir()
    try:
        d = f"{base}/certs"
        certlib.init(d)
        for n in nodes:
            certlib.issue(d, n)
        yield d
    finally:
        shutil.rmtree(base, ignore_errors=True)
