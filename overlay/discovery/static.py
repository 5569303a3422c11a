"""``static``: the addresses written in the config (``addresses.private`` / ``addresses.public``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from overlay.discovery import DiscoveryError

if TYPE_CHECKING:
    from overlay.config import Config


def discover(config: Config) -> tuple[str, str]:
    if config.addresses is None:
        raise DiscoveryError(
            "discovery provider static needs addresses.private and addresses.public in the config"
        )
    return config.addresses.private, config.addresses.public
