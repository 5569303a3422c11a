"""Logging of the commands: text lines (the default) or one JSON object per line.

``--log-format json`` (a global option of ``overlay``) is for log pipelines: each
record is one line ``{"time", "level", "logger", "node_id", "message"}`` plus
``"exception"`` (the formatted traceback) when the record carries one. ``time`` is
UTC, ISO 8601 with milliseconds. Both formats go to stderr: the journal under systemd.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s%(node_tag)s %(name)s: %(message)s"


class _NodeIdFilter(logging.Filter):
    def __init__(self, node_id: str | None):
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.node_id = self.node_id
        record.node_tag = f" node={self.node_id}" if self.node_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "node_id": getattr(record, "node_id", None),
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(node_id: str | None, level: str = "info", fmt: str = "text") -> None:
    """Replace the root logger's handlers with one stderr handler in format ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of: {', '.join(FORMATS)}")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_NodeIdFilter(node_id))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("kazoo").setLevel(logging.WARNING)
