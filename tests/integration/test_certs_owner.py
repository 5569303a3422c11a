"""`overlay certs` refuses a directory another user owns (root: the test gives it away)."""

from __future__ import annotations

import os

import pytest

from overlay.controller import certs
from overlay.errors import OverlayError


def test_a_dir_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory away")
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(OverlayError, match="belongs to uid 65534"):
        certs.init(str(d))
    with pytest.raises(OverlayError, match="belongs to uid 65534"):
        certs.issue(str(d), "web-1")
