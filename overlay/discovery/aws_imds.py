"""``aws-imds``: addresses from the EC2 instance metadata service, IMDSv2 only.

A session token is fetched with ``PUT /latest/api/token``, then
``/latest/meta-data/local-ipv4`` (private) and ``/latest/meta-data/public-ipv4``
(public) are read with it. Where the instance has no ``public-ipv4`` entry (an
Elastic IP on a VPC interface, for instance), the public address is read from
``/latest/meta-data/network/interfaces/macs/<mac>/public-ipv4s`` of the
primary interface (``/latest/meta-data/mac``). Proxies from the environment are
never used: the metadata service is link-local.

The network (when the config has no ``network``) is the primary interface's VPC id
(``.../macs/<mac>/vpc-id``), or ``ec2`` when it has none (an instance outside any
VPC), as the old system decided.
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

from overlay.discovery import DiscoveryError

if TYPE_CHECKING:
    from overlay.config import Config

TOKEN_TTL_S = 300
MAX_BODY = 4096
TOKEN_PATH = "/latest/api/token"
LOCAL_IPV4 = "/latest/meta-data/local-ipv4"
PUBLIC_IPV4 = "/latest/meta-data/public-ipv4"
MAC = "/latest/meta-data/mac"
MAC_PUBLIC_IPV4S = "/latest/meta-data/network/interfaces/macs/{mac}/public-ipv4s"
MAC_VPC_ID = "/latest/meta-data/network/interfaces/macs/{mac}/vpc-id"
NO_VPC_NETWORK = "ec2"


class _NotFound(Exception):
    pass


class Client:
    """A tiny IMDSv2 client over urllib."""

    def __init__(self, endpoint: str = "http://169.254.169.254", timeout: float = 2.0):
        if not endpoint.startswith(("http://", "https://")):
            raise DiscoveryError(f"discovery.endpoint {endpoint!r} must be an http:// or https:// URL")
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._token: str | None = None

    def _request(self, method: str, path: str, headers: dict[str, str]) -> str:
        url = self.endpoint + path
        req = urllib.request.Request(url, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                body = resp.read(MAX_BODY + 1)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise _NotFound(path) from None
            hint = " (the IMDSv2 token was refused)" if exc.code in (401, 403) else ""
            raise DiscoveryError(f"instance metadata service: {method} {url} answered HTTP {exc.code}{hint}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DiscoveryError(
                f"instance metadata service at {self.endpoint} is unreachable ({method} {path}: {reason}); "
                "is this an EC2 instance with the metadata service enabled?"
            ) from None
        if len(body) > MAX_BODY:
            raise DiscoveryError(f"instance metadata service: {url} answered more than {MAX_BODY} bytes")
        try:
            return body.decode("ascii").strip()
        except UnicodeDecodeError:
            raise DiscoveryError(f"instance metadata service: {url} answered non-ASCII data") from None

    def token(self) -> str:
        if self._token is None:
            try:
                token = self._request("PUT", TOKEN_PATH, {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
            except _NotFound:
                raise DiscoveryError(
                    f"instance metadata service at {self.endpoint} has no {TOKEN_PATH} (IMDSv2 is required)"
                ) from None
            if not token:
                raise DiscoveryError("instance metadata service returned an empty IMDSv2 token")
            self._token = token
        return self._token

    def get(self, path: str) -> str:
        """GET a metadata path with the session token; raises _NotFound on 404."""
        return self._request("GET", path, {"X-aws-ec2-metadata-token": self.token()})

    def addresses(self) -> tuple[str, str]:
        try:
            private = self.get(LOCAL_IPV4)
        except _NotFound:
            raise DiscoveryError(f"instance metadata service has no {LOCAL_IPV4}") from None
        try:
            public = self.get(PUBLIC_IPV4)
        except _NotFound:
            public = self._vpc_public()
        return private, public

    def _vpc_public(self) -> str:
        try:
            mac = self.get(MAC)
        except _NotFound:
            raise DiscoveryError(
                f"instance metadata service has neither {PUBLIC_IPV4} nor {MAC}: this instance "
                "has no public IPv4 address (give addresses.private/public in the config instead)"
            ) from None
        path = MAC_PUBLIC_IPV4S.format(mac=mac)
        try:
            listed = self.get(path)
        except _NotFound:
            raise DiscoveryError(
                f"this instance has no public IPv4 address (no {PUBLIC_IPV4}, no {path}); "
                "give addresses.private/public in the config instead"
            ) from None
        first = listed.split()[0] if listed.split() else ""
        if not first:
            raise DiscoveryError(f"instance metadata service: {path} is empty")
        return first


    def network(self) -> str:
        """The primary interface's VPC id, or ``ec2`` outside any VPC."""
        try:
            mac = self.get(MAC)
            return self.get(MAC_VPC_ID.format(mac=mac)) or NO_VPC_NETWORK
        except _NotFound:
            return NO_VPC_NETWORK


def _client(config: Config) -> Client:
    d = config.discovery
    if d is None:
        raise DiscoveryError("discovery provider aws-imds needs a discovery section")
    return Client(d.endpoint, d.timeout_s)


def network(config: Config) -> str:
    return _client(config).network()


def discover(config: Config) -> tuple[str, str]:
    return _client(config).addresses()
