"""``vagrant validate`` on vagrant/Vagrantfile (docs/lab.md): Vagrant itself reads the file.

Not a unit test: each ``vagrant`` process costs seconds of CPU (Ruby and its gems), so it
runs with the integration tests (moved from tests/unit/test_lab_topology.py, which keeps the
pure checks and the Ruby reading of the topology). Needs no root.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _vagrant_env(tmp_path) -> dict:
    env = dict(os.environ)
    env["VAGRANT_HOME"] = str(tmp_path / "vagrant-home")
    env["VAGRANT_DOTFILE_PATH"] = str(tmp_path / "dotfile")
    env["VAGRANT_CHECKPOINT_DISABLE"] = "1"
    env.pop("OVERLAY_LAB_TOPOLOGY", None)
    return env


def _tree(path: str) -> list | None:
    """Names, sizes and mtimes under ``path`` (None when it does not exist)."""
    if not os.path.exists(path):
        return None
    out = []
    for root, _dirs, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out.append((os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns))
    return sorted(out)


def test_vagrant_validate(tmp_path):
    vagrant = shutil.which("vagrant")
    if vagrant is None:
        pytest.skip("vagrant is not installed (scripts/setup.sh installs Debian's package)")
    env = _vagrant_env(tmp_path)
    cwd = os.path.join(REPO, "vagrant")
    runs = [("--ignore-provider", [vagrant, "validate", "--ignore-provider"], env)]
    plugins = subprocess.run([vagrant, "plugin", "list"], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=120).stdout
    if "vagrant-libvirt" in plugins:
        runs.append(("libvirt", [vagrant, "validate"], {**env, "VAGRANT_DEFAULT_PROVIDER": "libvirt"}))
    if shutil.which("VBoxManage"):
        runs.append(("virtualbox", [vagrant, "validate"], {**env, "VAGRANT_DEFAULT_PROVIDER": "virtualbox"}))
    dot = os.path.join(cwd, ".vagrant")   # a user's own `vagrant up` leaves one: keep it, touch nothing
    before = _tree(dot)
    for label, argv, e in runs:
        proc = subprocess.run(argv, cwd=cwd, env=e, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, f"vagrant validate ({label}):\n{proc.stdout}\n{proc.stderr}"
        assert "validated successfully" in proc.stdout
    assert _tree(dot) == before   # the run wrote its state under VAGRANT_DOTFILE_PATH only
