"""Address providers: where this node's private and public addresses come from.

``discover(config)`` returns ``(private, public)``: from ``config.addresses``
when the config lists them, else from the provider named by
``discovery.provider`` — ``static``, ``netlink`` (an interface's address, read
over netlink) or ``aws-imds`` (the EC2 instance metadata service, IMDSv2).
Third parties add providers through the ``overlay.providers`` entry point
group (:mod:`overlay.backends`): the entry point loads a callable
``provider(config) -> (private, public)``. Built-in names cannot be
overridden. Whatever a provider returns is checked to be a single usable IPv4
host address.

``network(config)`` returns this node's network: ``config.network``, else the one a
provider of :data:`NETWORK_PROVIDERS` reports (``aws-imds``: the VPC id, or ``ec2``
for an instance outside any VPC, as the old system decided).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from overlay import addr
from overlay.backends import PROVIDERS
from overlay.config import NETWORK_PROVIDERS  # noqa: F401  (re-exported: docs name it here)
from overlay.errors import DiscoveryError, OverlayError

if TYPE_CHECKING:
    from overlay.config import Config

log = logging.getLogger(__name__)

Provider = Callable[["Config"], tuple[str, str]]


def get_provider(name: str) -> Provider:
    """The provider called ``name``: a built-in one, else an ``overlay.providers`` entry point
    (:data:`overlay.backends.PROVIDERS`)."""
    return PROVIDERS.lookup(name)


def discover(config: Config) -> tuple[str, str]:
    """This node's ``(private, public)`` addresses, validated."""
    if config.addresses is not None:
        name = "static"
    elif config.discovery is not None:
        name = config.discovery.provider
    else:
        raise DiscoveryError("the config has neither addresses nor discovery: cannot tell this node's addresses")
    provider = get_provider(name)
    try:
        result = provider(config)
    except OverlayError:
        raise
    except Exception as exc:
        raise DiscoveryError(f"address provider {name!r} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(result, tuple) or len(result) != 2:
        raise DiscoveryError(f"address provider {name!r} returned {result!r}, expected (private, public)")
    out = []
    for what, value in zip(("private", "public"), result, strict=True):
        try:
            out.append(addr.host_ipv4(value))
        except ValueError as exc:
            raise DiscoveryError(f"address provider {name!r}: {what} address: {exc}") from None
    log.info("node %s: addresses from %s: private %s, public %s", config.node_id, name, out[0], out[1])
    return out[0], out[1]


def network(config: Config) -> str:
    """This node's network: the config's, else its discovery provider's (validated as a name)."""
    if config.network is not None:
        return config.network
    name = config.discovery.provider if config.discovery is not None else None
    if name == "aws-imds":
        from overlay.discovery import aws_imds

        value = aws_imds.network(config)
    else:
        raise DiscoveryError(f"the config has no network and discovery provider {name!r} does not supply one")
    from overlay.model import valid_name

    try:
        valid_name(value, "network")
    except (ValueError, TypeError) as exc:
        raise DiscoveryError(f"address provider {name!r}: network: {exc}") from None
    log.info("node %s: network %s from %s", config.node_id, value, name)
    return value
