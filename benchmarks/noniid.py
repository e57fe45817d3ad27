"""MPFL under label skew: every partition, against the pooled-data mask and the baselines.

    python benchmarks/noniid.py [--quick] [--json PATH] [--jobs N] [--data-dir DIR] [--cache PATH]
                                [--datasets ...] [--partitions ...] [--methods ...] [--seeds N] [--ablations]
                                [--set KEY=VALUE ...]

The study's sizing: mlp, 10 nodes, the first 20,000 training images, the full test set, 5 mask
and 20 training rounds, sparsity 0.9, the package's default settings, one torch thread per run.
MNIST and Fashion-MNIST x {iid, dirichlet 0.5, dirichlet 0.1, shards 2} x {mpfl, centralized,
fedavg, fedavg-prune, ssfl, topk} x seeds 0, 1, 2. --quick runs MNIST and seed 0 only, unless
--datasets or --seeds say otherwise.
--ablations adds the label-skew ablation rows (each MPFL option on every partition). --set changes
a setting for every run, baselines included (e.g. ``--set server_momentum=0`` for plain FedAvg steps).

Rows: dataset, partition, method, seed, final_accuracy, bytes_total_vs_fedavg (both ways,
everything included, against dense FedAvg on the same data and seed). A second table gives
the mean over seeds, each method minus `centralized` in points (``vs_centralized``, as in
docs/results.md), and checks the targets: MPFL at most 1.0 point below `centralized` on iid and
dirichlet 0.5 and at most 3.0 on dirichlet 0.1 and shards, at least as accurate as fedavg-prune
and ssfl, and at most 4 % of FedAvg's traffic. --json writes the rows of both tables, each
naming its ``table`` (``runs`` or ``summary``). --cache keeps finished cells in a JSON-lines
file, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from _common import emit, parser

PARTITIONS = {"iid": {"partition": "iid"}, "dir0.5": {"partition": "dirichlet", "alpha": 0.5},
              "dir0.1": {"partition": "dirichlet", "alpha": 0.1}, "shards2": {"partition": "shards", "shards": 2}}
METHODS = ("mpfl", "centralized", "fedavg", "fedavg-prune", "ssfl", "topk")
SIZING = {"model": "mlp", "nodes": 10, "train_samples": 20000, "mask_rounds": 5, "rounds": 20, "sparsity": 0.9,
          "threads": 1, "eval_every": 0}
# Label-skew ablation: MPFL with one option changed (the defaults are the first row).
ABLATIONS: dict[str, dict] = {
    "mpfl (defaults)": {},
    "extrapolate = 1 (magnitude, not movement)": {"extrapolate": 1.0},
    "core_share = 0 (no class-aware cores)": {"core_share": 0.0},
    "mask_average_from = 2 (averaged from the second mask round)": {"mask_average_from": 2},
    "mask_average_from = 0 (no averaged start)": {"mask_average_from": 0},
    "adapt_every = 0 (mask fixed in training)": {"adapt_every": 0},
    "mask_epochs = 1": {"mask_epochs": 1},
    "scope = layer": {"scope": "layer"},
    "all seven off (the earlier defaults)": {"extrapolate": 1.0, "core_share": 0.0, "mask_average_from": 0,
                                             "adapt_every": 0, "mask_epochs": 1, "scope": "layer",
                                             "server_momentum": 0.0},
    "classifier dense (--exclude 5.weight)": {"exclude": ["5.weight"]},
    "warmup_rounds = 2": {"warmup_rounds": 2},
    "mask_rounds = 8": {"mask_rounds": 8},
    "consensus = threshold": {"consensus": "threshold"},
    "criterion = saliency": {"criterion": "saliency"},
    "rewind = init, train_init = rewind": {"rewind": "init", "train_init": "rewind"},
    "server_momentum = 0 (plain FedAvg steps in training)": {"server_momentum": 0.0},
}
GRID_KEYS = {"dataset", "partition", "alpha", "shards", "method", "seed"}
"""What the grid sets per row, so that `--set` may not: the row would keep a label it no longer has."""
GAP_TARGET = {"iid": 1.0, "dir0.5": 1.0, "dir0.1": 3.0, "shards2": 3.0}
TRAFFIC_TARGET = 0.04


def run_cell(cell: dict) -> dict:
    """One run: the cell's overrides on the package defaults; the figures a row needs."""
    from mpfl.config import Config
    from mpfl.sim import simulate

    summary = simulate(Config().with_overrides(cell["overrides"])).summary
    return {**{k: cell[k] for k in ("dataset", "partition", "method", "seed", "settings")},
            "final_accuracy": summary["final_accuracy"], "bytes_total": summary["bytes_up"] + summary["bytes_down"],
            "wall_time_s": summary["wall_time"]}


def cells(datasets, partitions, methods, seeds: int, data_dir: str | None, ablations: bool,
          settings: dict | None = None) -> list[dict]:
    """Every run of the grid, with the overrides that make it (`settings` on top, for every run)."""
    settings = settings or {}
    variants = {m: {"method": m} for m in methods}
    if ablations:
        variants.update({name: {"method": "mpfl", **extra} for name, extra in ABLATIONS.items() if extra})
    out = []
    for dataset in datasets:
        for part in partitions:
            for label, variant in variants.items():
                for seed in range(seeds):
                    overrides = {**SIZING, **PARTITIONS[part], **variant, **settings, "dataset": dataset, "seed": seed}
                    if data_dir:
                        overrides["data_dir"] = data_dir
                    out.append({"dataset": dataset, "partition": part, "method": label, "seed": seed,
                                "settings": json.dumps(settings, sort_keys=True), "overrides": overrides})
    return out


def key(row: dict) -> str:
    return json.dumps([row[k] for k in ("dataset", "partition", "method", "seed")] + [row.get("settings", "{}")])


def setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` from the command line; the value is read as JSON where it parses (numbers, lists)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--set {text!r}: expected KEY=VALUE, e.g. --set server_momentum=0")
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (dataset, partition, method), each minus `centralized` in points, and MPFL's targets."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["partition"], r["method"])].append(r)
    mean = {k: float(np.mean([r["final_accuracy"] for r in v])) for k, v in groups.items()}
    out = []
    for (dataset, part, method), rs in groups.items():
        acc = mean[(dataset, part, method)]
        ref = mean.get((dataset, part, "centralized"))
        rivals = [mean[(dataset, part, m)] for m in ("fedavg-prune", "ssfl") if (dataset, part, m) in mean]
        traffic = [r["bytes_total_vs_fedavg"] for r in rs if r["bytes_total_vs_fedavg"] is not None]
        versus = None if ref is None else 100 * (acc - ref)
        out.append({
            "dataset": dataset, "partition": part, "method": method, "seeds": len(rs), "final_accuracy": acc,
            "std": float(np.std([r["final_accuracy"] for r in rs], ddof=1)) if len(rs) > 1 else None,
            "vs_centralized": versus, "bytes_total_vs_fedavg": float(np.mean(traffic)) if traffic else None,
            "meets_targets": None if not method.startswith("mpfl") or versus is None else bool(
                versus >= -GAP_TARGET[part] and all(acc >= r for r in rivals)
                and (not traffic or np.mean(traffic) <= TRAFFIC_TARGET)),
        })
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each on one torch thread (default 1)")
    p.add_argument("--data-dir", help="where FashionMNIST/raw/ is (MNIST ships with the package)")
    p.add_argument("--cache", type=Path, help="JSON-lines file of finished cells, reused and appended to")
    p.add_argument("--datasets", help="comma-separated, of mnist, fashion-mnist (default: both; --quick: mnist)")
    p.add_argument("--partitions", default=",".join(PARTITIONS), help=f"comma-separated, of {', '.join(PARTITIONS)}")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names (fedavg always runs)")
    p.add_argument("--seeds", type=int, help="seeds 0 .. N-1 (default 3; --quick: 1)")
    p.add_argument("--ablations", action="store_true", help="also run the label-skew ablation of MPFL's options")
    p.add_argument("--set", type=setting, action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for every run, baselines included (repeatable)")
    args = p.parse_args()
    datasets = args.datasets.split(",") if args.datasets else ["mnist"] if args.quick else ["mnist", "fashion-mnist"]
    seeds = args.seeds or (1 if args.quick else 3)
    if unknown := [part for part in args.partitions.split(",") if part not in PARTITIONS]:
        p.error(f"unknown partition {', '.join(unknown)}; choose from {', '.join(PARTITIONS)}")
    if axes := sorted(set(dict(args.set)) & GRID_KEYS):
        p.error(f"--set {', '.join(axes)} would relabel the grid's rows; choose them with --datasets, --partitions, "
                "--methods and --seeds")
    methods = list(dict.fromkeys(args.methods.split(",") + ["fedavg"]))
    todo = cells(datasets, args.partitions.split(","), methods, seeds, args.data_dir, args.ablations, dict(args.set))
    done = {}
    if args.cache and args.cache.is_file():
        done = {key(r): r for r in map(json.loads, args.cache.read_text().splitlines()) if r}
    pending = [c for c in todo if key(c) not in done]
    print(f"{len(todo)} runs, {len(todo) - len(pending)} cached, {len(pending)} to run on {args.jobs} job(s)", flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(run_cell, pending):
            done[key(row)] = row
            print(f"{row['dataset']} {row['partition']} {row['method']} seed {row['seed']}: "
                  f"{100 * row['final_accuracy']:.2f}% in {row['wall_time_s']:.0f} s", flush=True)
            if args.cache:
                with open(args.cache, "a") as f:
                    f.write(json.dumps(row) + "\n")
    rows = [done[key(c)] for c in todo]
    dense = {(r["dataset"], r["partition"], r["seed"]): r["bytes_total"] for r in rows if r["method"] == "fedavg"}
    for r in rows:
        ref = dense.get((r["dataset"], r["partition"], r["seed"]))
        r["bytes_total_vs_fedavg"] = r["bytes_total"] / ref if ref else None
    columns = ["dataset", "partition", "method", "seed", "final_accuracy", "bytes_total_vs_fedavg"]
    emit("Label skew: mlp, 10 nodes, 20,000 images, 5 mask + 20 training rounds, sparsity 0.9", rows, None, columns)
    summary_columns = ["dataset", "partition", "method", "seeds", "final_accuracy", "std", "vs_centralized",
                       "bytes_total_vs_fedavg", "meets_targets"]
    summary = summarise(rows)
    emit("Mean over seeds; minus centralized in points; targets: >= -1.0 (iid, dir0.5) / -3.0 (dir0.1, shards), "
         ">= fedavg-prune and ssfl, traffic <= 4 % of FedAvg", summary, None, summary_columns)
    if args.json is not None:
        args.json.write_text(json.dumps([{"table": "runs", **{c: r.get(c) for c in columns}} for r in rows]
                                        + [{"table": "summary", **{c: r.get(c) for c in summary_columns}}
                                           for r in summary], indent=2) + "\n")


if __name__ == "__main__":
    main()
