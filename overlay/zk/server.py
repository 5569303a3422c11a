"""A ZooKeeper server from Debian's ``zookeeper`` package: standalone, or one of an ensemble.

Used by the tests, the netns lab and ``make`` targets. The server runs from a
config file of our own in ``data_dir`` (its own snapshots, a loopback or lab
client address, admin server off, a short ``tickTime`` so that session expiry
is fast to test), never from ``/etc/zookeeper``. With ``ensemble`` (every
server's address, in server id order) and ``server_id``, it is one server of a
quorum: peers on ports 2888 (quorum) and 3888 (election) of each address, so
each server needs an address (a network namespace) of its own.

``python -m overlay.zk.server --data-dir D --port P`` runs one in the
foreground until interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

from overlay.errors import OverlayError
from overlay.netns import die_with_parent_preexec, in_netns

log = logging.getLogger(__name__)

DEBIAN_ENVIRONMENT = "/etc/zookeeper/conf/environment"
DEFAULT_JAVA = "/usr/bin/java"
DEFAULT_CLASSPATH = "/usr/share/java/zookeeper.jar"
# zookeeper.jar only carries slf4j-api; these bind it to log4j 1.2 (both in Debian).
LOG_JARS = ("/usr/share/java/slf4j-log4j12.jar", "/usr/share/java/log4j-1.2.jar")
MAIN_CLASS = "org.apache.zookeeper.server.quorum.QuorumPeerMain"


class ZooKeeperError(OverlayError):
    """The ZooKeeper server could not be started or did not answer."""


def debian_environment(path: str = DEBIAN_ENVIRONMENT) -> dict[str, str]:
    """``JAVA`` and ``CLASSPATH`` as Debian's zkEnv.sh sets them (shell assignments)."""
    env: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return env
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Z_][A-Z0-9_]*)=(.*)$", line)
        if not m:
            continue
        try:
            words = shlex.split(m.group(2), comments=True)
        except ValueError:
            continue
        env[m.group(1)] = words[0] if words else ""
    return env


def java_command(config_file: str, conf_dir: str, *, heap_mb: int = 512) -> list[str]:
    """The java command line Debian's zkServer.sh would run, with our config and log setup.

    ``conf_dir`` goes first on the class path (in place of ``/etc/zookeeper/conf``)
    so that the ``log4j.properties`` we write there is the one used.
    """
    denv = debian_environment()
    java = denv.get("JAVA") or DEFAULT_JAVA
    entries = [e for e in (denv.get("CLASSPATH") or DEFAULT_CLASSPATH).split(":") if e]
    entries = [e for e in entries if not e.rstrip("/").endswith("/etc/zookeeper/conf")]
    if not any(e.endswith("zookeeper.jar") for e in entries):
        entries.append(DEFAULT_CLASSPATH)
    classpath = [conf_dir, *entries, *(j for j in LOG_JARS if os.path.exists(j))]
    return [
        java,
        f"-Xmx{heap_mb}m",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        f"-Dzookeeper.log.dir={conf_dir}",
        "-Dzookeeper.root.logger=INFO,CONSOLE",
        f"-Dlog4j.configuration=file:{conf_dir}/log4j.properties",
        "-Dzookeeper.admin.enableServer=false",
        "-Dzookeeper.jmx.log4j.disable=true",
        "-cp",
        ":".join(classpath),
        MAIN_CLASS,
        config_file,
    ]


def _zk_probe(host: str, port: int, timeout: float) -> bool:
    """True if a ZooKeeper server at host:port completes a session handshake.

    Speaks the client protocol directly (ConnectRequest, then CloseSession), so
    it needs neither four-letter-word commands nor kazoo, and it can run in a
    thread that has entered another network namespace.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            # protocolVersion, lastZxidSeen, timeOut (ms), sessionId, passwd, readOnly
            body = struct.pack("!iqiqi", 0, 0, 2000, 0, 16) + b"\0" * 16 + b"\0"
            sock.sendall(struct.pack("!i", len(body)) + body)
            head = _recv_exact(sock, 4)
            (length,) = struct.unpack("!i", head)
            if length < 20 or length > 4096:
                return False
            reply = _recv_exact(sock, length)
            _proto, _timeout, session_id = struct.unpack_from("!iiq", reply)
            if session_id == 0:
                return False
            close = struct.pack("!ii", 1, -11)  # xid 1, OpCode.closeSession
            sock.sendall(struct.pack("!i", len(close)) + close)
            try:
                _recv_exact(sock, 4)  # the close reply, so the server sees a clean close
            except OSError:
                pass
            return True
    except (OSError, struct.error):
        return False


def _zk_command(host: str, port: int, cmd: bytes, timeout: float) -> str | None:
    """A four-letter-word command's answer (None when the server does not answer)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(cmd)
            out = b""
            while chunk := sock.recv(4096):
                out += chunk
            return out.decode("utf-8", "replace")
    except OSError:
        return None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed")
        buf += chunk
    return buf


@dataclass(eq=False)
class ZooKeeperServer:
    """One standalone ZooKeeper process with its own config and data in ``data_dir``.

    ``start()`` returns once the server completes a client handshake; ``stop()``
    ends the process group; ``pause()``/``resume()`` send SIGSTOP/SIGCONT (to
    simulate a hung server). Logs go to ``<data_dir>/zookeeper.log``.
    """

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 2181
    netns: str | None = None
    _: KW_ONLY
    tick_ms: int = 500
    min_session_ms: int = 1000
    max_session_ms: int = 30000
    fsync: bool = True
    heap_mb: int = 512
    # SIGKILL the server when the thread that started it dies (tests: nothing outlives
    # a killed pytest). Off by default: the lab's server outlives `overlay lab up`.
    die_with_parent: bool = False
    ensemble: tuple[str, ...] = ()   # every server's address, server id order; () = standalone
    server_id: int = 1
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _paused: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()   # str or os.PathLike given
        self.port = int(self.port)

    @property
    def address(self) -> str:
        """``host:port`` as clients (and ``registry.hosts``) spell it."""
        return f"{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "zookeeper.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def write_config(self) -> Path:
        """Write ``zoo.cfg`` and ``log4j.properties`` into ``data_dir``; return the config path."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "data").mkdir(exist_ok=True)
        cfg = self.data_dir / "zoo.cfg"
        lines = [
            "# written by overlay.zk.server; standalone server for tests and the lab",
            f"tickTime={self.tick_ms}",
            f"minSessionTimeout={self.min_session_ms}",
            f"maxSessionTimeout={self.max_session_ms}",
            f"dataDir={self.data_dir / 'data'}",
            f"clientPort={self.port}",
            f"clientPortAddress={self.host}",
            "maxClientCnxns=0",
            "admin.enableServer=false",
            "autopurge.snapRetainCount=3",
            "autopurge.purgeInterval=1",
            "4lw.commands.whitelist=srvr,ruok",
        ]
        if self.ensemble:
            # quorum timing in ticks: a follower may take 10 s to sync, 5 s to answer
            lines += ["initLimit=20", "syncLimit=10"]
            lines += [f"server.{i}={a}:2888:3888" for i, a in enumerate(self.ensemble, start=1)]
            (self.data_dir / "data" / "myid").write_text(f"{self.server_id}\n", encoding="utf-8")
        if not self.fsync:
            lines.append("forceSync=no")
        cfg.write_text("\n".join(lines) + "\n", encoding="utf-8")
        (self.data_dir / "log4j.properties").write_text(
            "log4j.rootLogger=INFO, CONSOLE\n"
            "log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.CONSOLE.layout.ConversionPattern=%d{ISO8601} %-5p [%t:%C{1}@%L] - %m%n\n",
            encoding="utf-8",
        )
        return cfg

    def command(self) -> list[str]:
        cmd = java_command(str(self.data_dir / "zoo.cfg"), str(self.data_dir), heap_mb=self.heap_mb)
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        return cmd

    def start(self, timeout: float = 60, wait: bool = True) -> None:
        """Start the server and wait (at most ``timeout`` seconds) until it answers; with
        ``wait=False`` return at once (an ensemble's servers answer only once a quorum is up:
        start them all, then :meth:`wait_serving` on each)."""
        if self.running():
            return
        self.write_config()
        cmd = self.command()
        log.info("starting ZooKeeper on %s%s (log %s)", self.address,
                 f" in netns {self.netns}" if self.netns else "", self.log_file)
        with open(self.log_file, "ab") as out:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=str(self.data_dir),
                preexec_fn=die_with_parent_preexec if self.die_with_parent else None,
            )
        self._paused = False
        if wait:
            self.wait_serving(timeout)

    def wait_serving(self, timeout: float = 60) -> None:
        """Wait until the server answers clients (raise ZooKeeperError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None:
                break
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise ZooKeeperError(
                    f"ZooKeeper on {self.address} exited with status {code} while starting; "
                    f"last log lines:\n{self._log_tail()}"
                )
            if self.ping(timeout=1.0):
                log.info("ZooKeeper on %s is up (pid %d)", self.address, self._proc.pid)
                return
            time.sleep(0.2)
        self.stop()
        raise ZooKeeperError(
            f"ZooKeeper on {self.address} did not answer within {timeout:g} s; "
            f"last log lines:\n{self._log_tail()}"
        )

    def role(self, timeout: float = 2.0) -> str | None:
        """``leader``, ``follower`` or ``standalone`` (the ``srvr`` command); None if no answer."""
        if self.netns:
            text = in_netns(self.netns, _zk_command, self.host, self.port, b"srvr", timeout, timeout=timeout + 5)
        else:
            text = _zk_command(self.host, self.port, b"srvr", timeout)
        if not isinstance(text, str):
            return None
        m = re.search(r"^Mode: (\w+)", text, re.MULTILINE)
        return m.group(1) if m else None

    def ping(self, timeout: float = 1.0) -> bool:
        """True if the server completes a client handshake now."""
        if self.netns:
            return in_netns(self.netns, _zk_probe, self.host, self.port, timeout, timeout=timeout + 5) is True
        return _zk_probe(self.host, self.port, timeout)

    def _signal(self, sig: int) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass

    def pause(self) -> None:
        """SIGSTOP the server: clients see it hang (connections stay open, no answers)."""
        if not self.running():
            raise ZooKeeperError(f"ZooKeeper on {self.address} is not running")
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self._proc is not None:
            self._signal(signal.SIGCONT)
        self._paused = False

    def stop(self, timeout: float = 10) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` s). Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal(signal.SIGTERM)
            self._signal(signal.SIGCONT)  # a paused server must wake up to die
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                proc.wait(10)
        self._proc = None
        self._paused = False
        log.info("ZooKeeper on %s stopped", self.address)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ZooKeeperServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m overlay.zk.server",
        description="Run a standalone ZooKeeper (Debian's package) in the foreground.",
    )
    parser.add_argument("--data-dir", required=True, help="directory for config, data and zookeeper.log")
    parser.add_argument("--host", default="127.0.0.1", help="client address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=2181, help="client port (default 2181)")
    parser.add_argument("--netns", default=None, help="run inside this network namespace")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for start-up")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = ZooKeeperServer(args.data_dir, args.host, args.port, args.netns)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start(args.timeout)
    except ZooKeeperError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"ZooKeeper listening on {server.address} (log {server.log_file}); Ctrl-C stops it", flush=True)
    try:
        while not stop.is_set():
            if not server.running():
                print(f"error: ZooKeeper exited; see {server.log_file}", file=sys.stderr)
                return 1
            stop.wait(1.0)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
