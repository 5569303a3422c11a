"""The datapath of another revision, for before/after rows in one run.

``extract(rev, dest)`` unpacks ``git archive <rev>`` (the ``bpf``, ``overlay``
and ``bench`` trees) into ``dest``; a datapath host then runs the current
``bench/dphost.py`` with ``PYTHONPATH=dest``, so the programs, maps and library
are that revision's and the driver (requests, timers) is the same for both.
The default revision is the branch point of issue 11 (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_REV = "57b97c1"
TREES = ("bpf", "overlay", "bench")


class ArchiveError(RuntimeError):
    pass


def extract(rev: str, dest: str) -> str:
    """``rev``'s trees under ``dest`` (created); returns ``dest``."""
    os.makedirs(dest, exist_ok=True)
    try:
        archive = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", rev, *TREES],
                                 capture_output=True, timeout=120, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        raise ArchiveError(f"git archive {rev} failed (a full clone is needed): "
                           f"{err.decode(errors='replace').strip() or exc}") from None
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True, timeout=120)
    if not os.path.exists(os.path.join(dest, "bpf", "datapath.c")):
        raise ArchiveError(f"{rev} has no bpf/datapath.c")
    return dest
