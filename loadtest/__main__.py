"""``python -m loadtest`` and the ``kv-loadtest`` console script."""

from __future__ import annotations

import sys

from loadtest.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
