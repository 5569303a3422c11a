"""Fixtures of the integration tests: namespaces and bpffs directories they create,
removed on the way out, failures included (helpers: tests/support/netns.py)."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.support.netns import NetnsSet, new_pin_root, require_root


@pytest.fixture
def netns_factory():
    require_root()
    made = NetnsSet()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def pin_root():
    """A private bpffs directory; unpinned (recursively) at the end."""
    require_root()
    path = new_pin_root(str(time.monotonic_ns() % 10**9))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
