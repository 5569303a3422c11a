"""Hostile config files through the real CLI (`overlay check-config`): exit 2, a short message.

Each case runs in a child process whose address space is capped with ``RLIMIT_AS``
(deterministic: a run that builds a huge value dies instead of passing slowly); the
time is recorded (printed with ``-s``), not asserted.
"""

from __future__ import annotations

import resource
import subprocess
import time

import pytest

from overlay.config_yaml import MAX_ALIASES, MAX_BYTES, MAX_DEPTH, MAX_INT_DIGITS
from tests.support.paths import PYTHON, REPO

MEMORY_CAP = 1024 * 1024 * 1024   # bytes of address space for the child


def _alias_bomb(levels: int, width: int) -> str:
    """``levels`` anchors (keys a0..aN), each a list of ``width`` aliases of the previous one;
    ``*aN`` names width**levels strings."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _nested(depth: int) -> str:
    return "network: ec2\nfilter: {open_ports: " + "[" * depth + "80" + "]" * depth + "}\n"


BASE = "node_id: web-1\nnetwork: ec2\naddresses: {private: 10.0.0.1, public: 198.18.0.1}\n"

# description, file text, a word the message must contain
CASES = [
    ("alias bomb, more aliases than allowed", _alias_bomb(12, 10) + BASE + "groups: *a12\n", "aliases"),
    # under the alias cap (9 x 9 = 81), but 9**10 strings if expanded, quoted by the error
    ("alias bomb under the cap, quoted as a name", _alias_bomb(9, 9) + BASE.replace("network: ec2", "network: *a9"),
     "network"),
    ("alias bomb under the cap, quoted as a boolean", _alias_bomb(9, 9) + BASE + "filter: {reject_all: *a9}\n",
     "reject_all"),
    ("alias bomb under the cap, quoted as a port", _alias_bomb(9, 9) + BASE + "filter: {open_ports: *a9}\n",
     "open_ports"),
    ("10 MB config", BASE + "# " + "x" * (10 * 1024 * 1024) + "\n", "KiB"),
    ("10 MB string value", "node_id: " + "a" * (10 * 1024 * 1024) + "\n", "KiB"),
    ("800 KB string value quoted by an error", BASE.replace("network: ec2", "network: " + "a/" * 400_000),
     "network"),
    ("deep nesting (10,000 levels)", _nested(10_000), "nested"),
    ("nesting just past the cap", _nested(MAX_DEPTH), "nested"),
    ("huge integer (5,000 digits)", BASE + "guard: {max_change: " + "9" * 5000 + "}\n", "digits"),
    (f"integer of {MAX_INT_DIGITS + 1} digits", BASE + "guard: {max_change: " + "9" * (MAX_INT_DIGITS + 1) + "}\n",
     "digits"),
    ("huge integer key", BASE + "nat_overrides:\n  ? " + "9" * 4000 + "\n  : 10.0.0.9\n", "digits"),
    ("huge unknown key", BASE + "? " + "k" * 500_000 + "\n: 1\n", "k"),
]


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


@pytest.mark.parametrize(("what", "text", "word"), CASES, ids=[c[0] for c in CASES])
def test_hostile_config_exits_2_with_a_short_message(tmp_path, what, text, word):
    path = tmp_path / "hostile.yaml"
    path.write_text(text, encoding="utf-8")
    t0 = time.monotonic()
    proc = subprocess.run([PYTHON, "-m", "overlay.cli", "check-config", str(path)], cwd=REPO,
                          capture_output=True, timeout=120, preexec_fn=_limit_memory)
    elapsed = time.monotonic() - t0
    print(f"{what}: {len(text)} bytes in, exit {proc.returncode}, {len(proc.stdout) + len(proc.stderr)} "
          f"bytes out, {elapsed:.2f} s")
    assert proc.returncode == 2, (what, proc.stderr[-500:])
    assert len(proc.stdout) + len(proc.stderr) < 1024, (what, proc.stderr[:1200])
    assert b"Traceback" not in proc.stderr
    assert word.encode() in proc.stderr, proc.stderr


def test_limits_are_what_the_docs_say():
    # docs/config.md states these numbers
    assert (MAX_BYTES, MAX_ALIASES, MAX_DEPTH, MAX_INT_DIGITS) == (1024 * 1024, 100, 32, 32)


def test_a_config_within_the_limits_still_loads(tmp_path):
    """Anchors and aliases as people use them (a few, shallow) are fine."""
    from overlay.config import load_config

    path = tmp_path / "ok.yaml"
    path.write_text(BASE + "filter: {open_ports: &web [80, 443], ssh_whitelist: [10.0.0.0/8]}\n"
                    "registry: {hosts: &zk [\"10.0.0.2:2181\"]}\nguard: {max_change: 123456}\n")
    cfg = load_config(str(path))
    assert cfg.filter.open_ports == ((80, 80), (443, 443)) and cfg.guard.max_change == 123456
