"""The data files the package carries: the eBPF sources, the proto, the systemd units.

In the repository they live once, at the top: ``bpf/``, ``proto/``, ``packaging/``
(:data:`DATA`). A wheel or sdist build copies each into the package as
``overlay/_data/<name>/`` (``setup.py`` reads :data:`DATA` from this file, loaded by
path), so an installed package finds them with :mod:`importlib.resources`, without the
checkout and without an environment variable. An editable install (or a checkout on
``sys.path``) has no ``overlay/_data`` and uses the repository's directories.

Stdlib only, and no import of the package: ``setup.py`` loads this file by path.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

PACKAGE_DATA = "_data"
DATA = {  # name inside overlay/_data -> directory in the repository
    "bpf": "bpf",
    "proto": "proto",
    "packaging": "packaging",
}


def candidates(name: str) -> list[Path]:
    """Where ``name`` is looked for, in order: the installed copy, then the repository's."""
    if name not in DATA:
        raise KeyError(f"no packaged data directory {name!r} (known: {', '.join(DATA)})")
    pkg = Path(str(files("overlay")))
    return [pkg / PACKAGE_DATA / name, pkg.parent / DATA[name]]


def data_dir(name: str) -> Path | None:
    """The directory ``name`` of :data:`DATA` (installed copy first), or None if neither exists."""
    for cand in candidates(name):
        if cand.is_dir():
            return cand
    return None


def data_file(name: str, relpath: str) -> Path | None:
    """A file inside the data directory ``name``, or None when it is not there."""
    for cand in candidates(name):
        path = cand / relpath
        if path.is_file():
            return path
    return None
