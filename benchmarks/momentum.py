"""Server momentum against run length: where the default (0.9) helps and where it diverges.

    python benchmarks/momentum.py [--quick] [--json PATH] [--momentum 0.9,0.5,0] [--settings NAME,...]

MPFL on MNIST with the package defaults (mlp, E = 1, B = 32, SGD 0.05, sparsity 0.9, one torch
thread), each setting run once per server momentum. The settings, by name:

* little-data-long: 3 nodes of 900 training images, 2 mask + 300 training rounds, 300 test images;
* study-long: the study's sizing (10 nodes, the first 20,000 training images) for 100 training
  rounds, 2,000 test images;
* study-shards: the study's MNIST shards(2) cell, seed 0: 20 training rounds, 10,000 test images;
* cross-device: 1,000 nodes, a tenth of them asked per round, 5 mask + 20 training rounds.

Columns: the final accuracy, the best accuracy of the training rounds and its round, and the
final and lowest test loss of the training rounds (a loss that climbs while the accuracy holds is
the model growing over-confident, the first sign of a diverging run). --quick runs
little-data-long and study-shards with 2,000 test images.
"""

from __future__ import annotations

from _common import emit, parser

from mpfl.config import Config
from mpfl.sim import simulate

STUDY = {"nodes": 10, "train_samples": 20000}
SETTINGS = {
    "little-data-long": {"nodes": 3, "train_samples": 3000, "test_samples": 300, "mask_rounds": 2, "rounds": 300},
    "study-long": {**STUDY, "test_samples": 2000, "rounds": 100},
    "study-shards": {**STUDY, "test_samples": 10000, "rounds": 20, "partition": "shards", "shards": 2},
    "cross-device": {"nodes": 1000, "fraction": 0.1, "rounds": 20},
}
QUICK = {"little-data-long": {}, "study-shards": {"test_samples": 2000}}


def run(setting: dict, momentum: float) -> dict:
    """One run's figures: final and best accuracy, final and lowest loss of the training rounds."""
    result = simulate(Config().with_overrides({**setting, "server_momentum": momentum, "threads": 1}))
    training = [r for r in result.records if r["phase"] == "train" and r["accuracy"] is not None]
    best = max(training, key=lambda r: r["accuracy"])
    return {"final_accuracy": result.summary["final_accuracy"], "best_accuracy": best["accuracy"],
            "best_round": best["round"], "final_loss": training[-1]["loss"],
            "lowest_loss": min(r["loss"] for r in training), "wall_time_s": result.summary["wall_time"]}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--momentum", default="0.9,0.5,0", help="comma-separated server momenta (default 0.9,0.5,0)")
    p.add_argument("--settings", help=f"comma-separated settings (default: all of {', '.join(SETTINGS)}; "
                                      f"with --quick: {', '.join(QUICK)})")
    args = p.parse_args()
    names = args.settings.split(",") if args.settings else list(QUICK if args.quick else SETTINGS)
    if unknown := [n for n in names if n not in SETTINGS]:
        p.error(f"unknown setting {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    rows = []
    for name in names:
        setting = {**SETTINGS[name], **(QUICK.get(name, {}) if args.quick else {})}
        for momentum in (float(m) for m in args.momentum.split(",")):
            row = {"setting": name, "rounds": setting["rounds"], "server_momentum": momentum,
                   **run(setting, momentum)}
            print(f"{name}, momentum {momentum:g}: {row['final_accuracy']:.4f}", flush=True)
            rows.append(row)
    emit("Server momentum against run length, MNIST, mlp, MPFL defaults, seed 0", rows, args.json)


if __name__ == "__main__":
    main()
