"""``python -m fastres ...``: the same as the ``fastres`` console script."""

import sys

from fastres.cli import main

if __name__ == "__main__":
    sys.exit(main())
