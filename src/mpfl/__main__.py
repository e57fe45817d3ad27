"""`python -m mpfl`: the `mpfl` command."""

import sys

from ._launch import main

if __name__ == "__main__":
    sys.exit(main())
