"""``python -m overlay.cli``: the ``overlay`` command."""

import sys

from overlay.cli import main

sys.exit(main())
