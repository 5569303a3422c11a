"""Where the repository is, and the Python that runs test programs (the project's venv)."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable


def program(name: str) -> list[str]:
    """The command line of test program ``tests.support.<name>`` (run it with ``cwd=REPO``)."""
    return [PYTHON, "-m", f"tests.support.{name}"]
