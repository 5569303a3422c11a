"""A pytest plugin for ``make mutate`` (scripts/mutate.py): a run that fails in any way exits
with status 1. mutmut 2 counts only status 1 as a killed mutant, but a mutant that breaks
the import of a test module makes pytest stop with status 2 (an error during collection):
the tests caught that mutant too."""

from __future__ import annotations

import pytest


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus) -> None:
    if exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
