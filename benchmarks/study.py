"""The experimental study: MPFL against FedAvg and the baselines, as `mpfl study` runs it.

    python benchmarks/study.py [--quick] [--json PATH] [--out DIR] [--seeds N] [--datasets NAMES] [--data-dir DIR]
                               [--force]

Runs the `full` preset's grid (the `quick` one with --quick) into DIR (default studies/<preset>),
skipping the cells already done, so a stopped study resumes; then prints one row per group of
runs (means over seeds) and writes the study's report (report.md and plots) into DIR. --json
writes the same rows, keyed like `mpfl report --json`. See `mpfl.study` for the grid, the presets
and their measured sizing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import emit, parser, stop_on_sigterm

from mpfl.report import load_runs, table
from mpfl.study import cell_name, cell_status, preset_cells, run_study

COLUMNS = ("method", "model", "variant", "dataset", "partition", "sparsity", "n", "final_accuracy", "mask_rounds",
           "train_rounds", "bytes_up", "bytes_down", "bytes_vs_fedavg", "wall_time")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", type=Path, help="study folder (default: studies/<preset>)")
    p.add_argument("--seeds", type=int, help="seeds of the main comparison and sparsity sweep (default: the preset's)")
    p.add_argument("--datasets", help="datasets of the main comparison, comma-separated (default: mnist,fashion-mnist)")
    p.add_argument("--data-dir", help="where the datasets are (else $MPFL_DATA, the user cache, a download)")
    p.add_argument("--force", action="store_true",
                   help="replace a report.md or plot in the study folder that mpfl report did not write")
    args = p.parse_args()
    stop_on_sigterm()
    preset = "quick" if args.quick else "full"
    datasets = [name.strip() for name in args.datasets.split(",")] if args.datasets else None
    cells = preset_cells(preset, args.seeds, datasets=datasets)
    out = args.out or Path("studies") / preset
    result = run_study(cells, out, data_dir=args.data_dir, force=args.force)
    done = [out / cell_name(cell.config(args.data_dir)) for cell in cells]
    rows = table(load_runs([path for path in done if cell_status(path) == "done"]))
    emit(f"The {preset} study: {len(result.ran)} cells run, {len(result.skipped)} already done, "
         f"{len(result.failed)} failed", rows, args.json, COLUMNS)
    if result.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
