"""The experimental study, the same as `mpfl study`: MPFL against FedAvg and the baselines.

    python benchmarks/study.py --preset quick|full [--out DIR] [--seeds N] [--data-dir DIR] [--dry-run]

See `mpfl.study` for the grid, the presets and their measured sizing.
"""

import sys

from mpfl.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
