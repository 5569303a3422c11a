"""`overlay certs` writes its files safely (overlay/controller/certs.py): a random temporary
name created with O_EXCL|O_NOFOLLOW in the target directory, renamed into place; keys 0600;
a directory others could write in, or that belongs to someone else, is refused."""

from __future__ import annotations

import os
import stat

import pytest

from overlay.controller import certs
from overlay.errors import OverlayError


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_and_issue_write_keys_0600_and_leave_no_temporary_file(tmp_path):
    d = tmp_path / "certs"
    certs.init(str(d))
    certs.issue(str(d), "web-1")
    assert _mode(d) == 0o700
    names = sorted(os.listdir(d))
    assert names == sorted(f"{n}.{ext}" for n in ("ca", "controller", "operator", "web-1") for ext in ("crt", "key"))
    for n in names:
        assert _mode(d / n) == (0o600 if n.endswith(".key") else 0o644), n


def test_a_planted_link_at_the_old_temporary_name_is_not_followed(tmp_path):
    """The old code wrote ``<file>.tmp<pid>`` with O_TRUNC: a link planted there was followed."""
    d = tmp_path / "certs"
    d.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name in ("ca.key", "ca.crt", "controller.key", "operator.key"):
        os.symlink(victim, d / f"{name}.tmp{os.getpid()}")
    certs.init(str(d))
    assert victim.read_text() == "precious"
    assert not (d / "ca.key").is_symlink() and _mode(d / "ca.key") == 0o600


def test_a_link_in_place_of_a_key_is_replaced_not_followed(tmp_path):
    d = tmp_path / "certs"
    certs.init(str(d))
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (d / "web-1.key").symlink_to(victim)
    certs.issue(str(d), "web-1", force=True)
    assert victim.read_text() == "precious"
    assert not (d / "web-1.key").is_symlink() and _mode(d / "web-1.key") == 0o600


def test_the_temporary_file_is_made_with_o_excl_and_o_nofollow(tmp_path, monkeypatch):
    seen = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *a, **kw):
        if str(path).endswith(".tmp"):
            seen.append((os.path.dirname(path), flags, mode))
        return real_open(path, flags, mode, *a, **kw)

    monkeypatch.setattr(os, "open", spy)
    d = tmp_path / "certs"
    certs.init(str(d))
    assert seen and all(dirname == str(d) for dirname, _, _ in seen)            # in the target directory
    for _, flags, _ in seen:
        assert flags & os.O_EXCL and flags & os.O_NOFOLLOW and flags & os.O_CREAT
    assert {m for _, _, m in seen} == {0o600, 0o644}


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o722, 0o702])
def test_a_group_or_world_writable_dir_is_refused(tmp_path, mode):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(OverlayError, match="group- or world-writable"):
        certs.init(str(d))
    assert os.listdir(d) == []
    os.chmod(d, 0o700)
    certs.init(str(d))
    os.chmod(d, mode)
    with pytest.raises(OverlayError, match="writable"):
        certs.issue(str(d), "web-1")
    assert not (d / "web-1.key").exists()


def test_a_readable_but_not_writable_dir_is_fine(tmp_path):
    d = tmp_path / "certs"
    d.mkdir()
    os.chmod(d, 0o755)
    certs.init(str(d))
    assert (d / "ca.key").exists()


def test_cli_says_why_with_exit_1(tmp_path):
    import subprocess

    from tests.support.paths import PYTHON, REPO

    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o777)
    res = subprocess.run([PYTHON, "-m", "overlay.cli", "certs", "init", "--dir", str(d)], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert res.returncode == 1 and "world-writable" in res.stderr and "Traceback" not in res.stderr
