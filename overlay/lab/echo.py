"""The lab's test-port server: ``python -m overlay.lab.echo --port 7000 --name HOST``.

Every lab host runs one. To each TCP connection it writes one JSON line and
closes: ``{"host": <its name>, "peer": <the client address it saw>,
"peer_port": ..., "local": <the address the client reached>}``. The
connectivity check reads it to show which address a flow arrived from (the
client's public address across networks, its private one inside a network).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import socketserver
import sys


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        peer_ip, peer_port = self.client_address[:2]
        local_ip = self.request.getsockname()[0]
        line = json.dumps({"host": self.server.host_name, "peer": peer_ip, "peer_port": peer_port,
                           "local": local_ip}) + "\n"
        try:
            self.request.sendall(line.encode())
            self.request.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], host_name: str):
        self.host_name = host_name
        super().__init__(address, _Handler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m overlay.lab.echo", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", required=True, help="the host name to answer with")
    p.add_argument("--bind", default="0.0.0.0")
    args = p.parse_args(argv)
    try:
        server = EchoServer((args.bind, args.port), args.name)
    except OSError as exc:
        print(f"echo: cannot listen on {args.bind}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1

    def stop(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"echo: {args.name} listening on {args.bind}:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
