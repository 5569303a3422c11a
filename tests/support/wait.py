"""Free ports and polling with a deadline: every wait in the tests is bounded."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

import pytest


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.02, ignore: tuple[type[BaseException], ...] = ()) -> object:
    """Poll ``predicate`` until it returns something truthy (returned); fail the test after
    ``timeout`` seconds, naming ``what``. Errors of the ``ignore`` types count as not yet
    (a server still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except ignore:
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """True if ``host:port`` accepts a TCP connection now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def now_ns() -> int:
    """bpf_ktime_get_ns()'s clock (CLOCK_MONOTONIC), for conntrack timestamps in tests."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def stop_process(proc, timeout: float = 15.0) -> None:
    """SIGTERM ``proc`` (a Popen we started), then SIGKILL if it has not exited in ``timeout`` s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
