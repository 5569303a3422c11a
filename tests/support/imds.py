"""A fake EC2 instance metadata service (IMDSv2) on loopback, for discovery tests."""

from __future__ import annotations

import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from overlay.discovery import aws_imds


class FakeIMDS:
    """IMDSv2 on 127.0.0.1: PUT /latest/api/token, then GETs with the token (401 without)."""

    def __init__(self, meta: dict[str, str], token_status: int = 200, delay: float = 0.0):
        self.meta = meta
        self.token_status = token_status
        self.delay = delay
        self.token = uuid.uuid4().hex
        self.requests: list[tuple[str, str, dict]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: str = "") -> None:
                data = body.encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def do_PUT(self):
                fake.requests.append(("PUT", self.path, {k.lower(): v for k, v in self.headers.items()}))
                if fake.delay:
                    time.sleep(fake.delay)
                if self.path != aws_imds.TOKEN_PATH:
                    return self._send(404)
                if "X-aws-ec2-metadata-token-ttl-seconds" not in self.headers:
                    return self._send(400)
                if fake.token_status != 200:
                    return self._send(fake.token_status)
                self._send(200, fake.token)

            def do_GET(self):
                fake.requests.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                if self.headers.get("X-aws-ec2-metadata-token") != fake.token:
                    return self._send(401)
                if self.path in fake.meta:
                    return self._send(200, fake.meta[self.path])
                self._send(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


