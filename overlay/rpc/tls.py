"""The mutual-TLS files of both sides (docs/grpc.md): CA, certificate and key, PEM."""

from __future__ import annotations

import os

from overlay.config import TlsConfig
from overlay.errors import InvalidConfigError

MAX_MESSAGE = 64 * 1024 * 1024   # the largest message either side sends (a Watch snapshot chunk)


def read_tls(tls: TlsConfig, path: str) -> tuple[bytes, bytes, bytes]:
    """``(ca, cert, key)`` PEM bytes; a file that is missing or not PEM is an
    InvalidConfigError naming its key (``path.ca``, ``path.cert``, ``path.key``)."""
    out = []
    for name in ("ca", "cert", "key"):
        filename = getattr(tls, name)
        try:
            with open(filename, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise InvalidConfigError(f"{path}.{name}", f"cannot read {filename}: {exc.strerror}") from None
        if b"-----BEGIN" not in data:
            raise InvalidConfigError(f"{path}.{name}", f"{filename} is not a PEM file")
        out.append(data)
    return out[0], out[1], out[2]


def tls_from_dir(directory: str, name: str = "operator") -> TlsConfig:
    """The files ``overlay certs`` wrote: ca.crt, NAME.crt, NAME.key."""
    return TlsConfig(os.path.join(directory, "ca.crt"), os.path.join(directory, f"{name}.crt"),
                     os.path.join(directory, f"{name}.key"))
