"""``python -m pep.cli``: the ``pep`` command line, pep.ops.cli (the keepalived checks the lab
writes run it this way)."""

import sys

from pep.ops.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
