"""``python -m nbcompletions``: the same command line as ``nbcompletions``."""

from __future__ import annotations

import sys

from ._cli import main

sys.exit(main())
