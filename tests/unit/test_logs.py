"""``--log-format json|text`` (overlay/logs.py): the formatter, and the real CLI's stderr."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from overlay.logs import JsonFormatter, setup_logging

REPO = Path(__file__).resolve().parents[2]
KEYS = {"time", "level", "logger", "node_id", "message"}


def _record(msg: str, *args, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("overlay.agent", logging.WARNING, __file__, 7, msg, args, exc_info)


def test_json_line_has_the_documented_fields():
    rec = _record("applied %d ops\nfor %s", 3, "web-1")
    rec.created = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z
    rec.node_id = "web-1"
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2023-11-14T22:13:20.250Z", "level": "WARNING", "logger": "overlay.agent",
        "node_id": "web-1", "message": "applied 3 ops\nfor web-1",
    }


def test_json_line_carries_the_exception_text():
    try:
        {}["missing"]
    except KeyError:
        rec = _record("reconcile failed", exc_info=sys.exc_info())
    out = json.loads(JsonFormatter().format(rec))
    assert out["exception"].startswith("Traceback (most recent call last):")
    assert out["exception"].rstrip().endswith("KeyError: 'missing'")
    assert out["node_id"] is None  # no filter: not a daemon's record


def test_setup_logging_refuses_an_unknown_format():
    with pytest.raises(ValueError, match="xml"):
        setup_logging("n", "info", "xml")


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "overlay.cli", *argv], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def _dry_run_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "overlay.yaml"
    cfg.write_text(yaml.safe_dump({
        "node_id": "json-1", "network": "ec2",
        "addresses": {"private": "10.0.0.1", "public": "198.18.0.1", "overlay": "192.168.0.1"},
        "registry": {"backend": "static", "peers": [
            {"node_id": "p1", "network": "vpc", "private": "10.0.1.2", "public": "198.18.1.2", "overlay": "192.168.1.2"}]},
        "datapath": {"backend": "dryrun"},
    }))
    return cfg


def test_daemon_logs_json_lines_with_its_node_id(tmp_path):
    res = _cli("--log-format", "json", "daemon", "-c", str(_dry_run_config(tmp_path)), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "put nat 192.168.1.2 -> 198.18.1.2" in res.stdout  # the dry run's output is unchanged
    lines = res.stderr.strip().splitlines()
    assert lines
    for line in lines:
        obj = json.loads(line)
        assert KEYS <= set(obj), obj
        assert obj["node_id"] == "json-1"
        datetime.fromisoformat(obj["time"].replace("Z", "+00:00"))
    messages = [json.loads(line)["message"] for line in lines]
    assert any("this node: overlay 192.168.0.1" in m for m in messages), messages


def test_daemon_logs_text_by_default(tmp_path):
    res = _cli("daemon", "-c", str(_dry_run_config(tmp_path)), "--dry-run")
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stderr.splitlines() if "this node: overlay" in ln)
    assert " INFO node=json-1 overlay.daemon: this node: overlay 192.168.0.1" in line
    assert not line.startswith("{")


def test_a_config_error_is_a_json_line_too(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("zk_hosts: 'zk1:2181'\n")
    res = _cli("--log-format", "json", "check-config", str(bad))
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    obj = json.loads(line)
    assert obj["level"] == "ERROR" and obj["node_id"] is None
    assert obj["message"].startswith("invalid config: zk_hosts: unknown key") and "registry.hosts" in obj["message"]
