"""A ZooKeeper session left open by one run of the daemon, for the next run to resume.

The file (mode 0600, in a 0700 directory) holds the session id and password with the key
it belongs to (node id, ZooKeeper hosts, prefix): a run takes only a session of its own
key, and reads it once (the file is removed). docs/registry.md says when a session is left.
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)


def load_session(path: str | None, key: dict, node_id: str | None) -> tuple[int, bytes] | None:
    """The session saved at ``path`` for ``key`` (read once: the file is removed), or None."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
        if not isinstance(obj, dict) or {k: obj.get(k) for k in key} != key:
            return None      # another node's, ZooKeeper's or prefix's: not ours to take
        os.unlink(path)
        return int(obj["session"], 16), bytes.fromhex(obj["password"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("node %s: ignoring the saved ZooKeeper session %s: %s", node_id, path, exc)
        return None


def save_session(path: str | None, key: dict, cid: tuple[int, bytes] | None, node_id: str | None,
                 timeout_s: float) -> None:
    """Save session ``cid`` (id, password) for ``key`` at ``path``; a failure is logged."""
    if cid is None or not path:
        return
    body = json.dumps({"v": 1, **key, "session": f"{cid[0]:x}", "password": cid[1].hex()})
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        tmp = f"{path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(body)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("node %s: cannot save the ZooKeeper session to %s (%s); the next start cannot resume it",
                    node_id, path, exc.strerror)
        return
    log.info("node %s: left ZooKeeper session 0x%x open: its record stays up to %g s; the next start "
             "resumes it", node_id, cid[0], timeout_s)
