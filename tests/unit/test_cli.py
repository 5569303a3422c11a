"""The ``overlay`` command line (DESIGN §4.1): exit codes and messages, no tracebacks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import overlay
from overlay.cli import main

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "overlay"
ENTRY_POINTS = [
    pytest.param([sys.executable, "-m", "overlay.cli"], id="python-m"),
    pytest.param(
        [str(SCRIPT)],
        id="console-script",
        marks=pytest.mark.skipif(not SCRIPT.exists(), reason="console script not installed"),
    ),
]


def run(entry: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*entry, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def no_traceback(res: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help(entry):
    res = run(entry, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: overlay")
    for command in ("check-config", "daemon", "status", "maps", "datapath", "guard"):
        assert command in res.stdout


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_version(entry):
    res = run(entry, "--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"overlay {overlay.__version__}"


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_unknown_command(entry):
    res = run(entry, "frobnicate")
    assert res.returncode == 2
    assert "invalid choice: 'frobnicate'" in res.stderr
    no_traceback(res)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_check_config_nonexistent_file(entry):
    res = run(entry, "check-config", "/nonexistent")
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "overlay: invalid config: cannot read config file /nonexistent: No such file or directory"
    )
    assert res.stdout == ""
    no_traceback(res)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_check_config_valid_example(entry):
    res = run(entry, "check-config", "examples/full.yaml")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (
        "examples/full.yaml: OK (node web-1, network ec2, registry zookeeper, datapath ebpf)"
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((), "usage: overlay"),
        (("check-config",), "the following arguments are required: file"),
        (("check-config", "a.yaml", "b.yaml"), "unrecognized arguments: b.yaml"),
        (("--log-level", "loud", "check-config", "examples/full.yaml"), "invalid choice: 'loud'"),
        (("daemon",), "the following arguments are required: -c/--config"),
        (("guard", "hold"), "invalid choice: 'hold'"),
        (("status", "--bogus"), "unrecognized arguments: --bogus"),
    ],
    ids=["no-command", "missing-file", "extra-arg", "bad-log-level", "daemon-no-config", "guard-bad-action", "status-bad-flag"],
)
def test_usage_errors_exit_2(args, fragment):
    res = run([sys.executable, "-m", "overlay.cli"], *args)
    assert res.returncode == 2
    assert fragment in res.stderr
    no_traceback(res)


# --- in process: the same contract, quicker -------------------------------------------------


def test_main_check_config_directory(tmp_path, capsys):
    assert main(["check-config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"overlay: invalid config: cannot read config file {tmp_path}: ")


def test_main_check_config_non_utf8(tmp_path, capsys):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"node_id: caf\xe9\n")
    assert main(["check-config", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"overlay: invalid config: {p} is not UTF-8 text")


def test_main_check_config_names_the_key(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("node_id: a\nfilter:\n  open_ports: [80, 0]\n")
    assert main(["check-config", str(p)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == "overlay: invalid config: filter.open_ports[1]: port 0 is outside 1..65535\n"


def test_main_check_config_ok(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    shutil.copy(REPO / "examples" / "static-peers.yaml", p)
    assert main(["check-config", str(p)]) == 0
    assert capsys.readouterr().out == f"{p}: OK (node ec2-a, network ec2, registry static, datapath dryrun)\n"


def test_main_usage_error_raises_system_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
