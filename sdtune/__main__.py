"""`python -m sdtune`: the same as the `sdtune` command."""

import sys

from sdtune.cli import main

if __name__ == "__main__":
    sys.exit(main())
