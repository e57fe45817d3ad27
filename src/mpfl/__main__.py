"""`python -m mpfl`: the `mpfl` command."""

import sys

from .cli import main

sys.exit(main())
