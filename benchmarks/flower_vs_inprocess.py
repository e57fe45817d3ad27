"""The same MPFL run on the in-process simulator, on a Flower deployment over loopback, and on
Flower's simulation engine (if flwr[simulation] is installed), wall time side by side.

    python benchmarks/flower_vs_inprocess.py [--quick] [--json PATH]

Every runner must produce the same masks, weights, accuracy and bytes (column ``same``);
only the wall time differs. ``wall_time_s`` runs from submitting the run to its end (for
Flower: ``flwr run`` until ``flwr ls`` reports it finished); SuperLink and SuperNode start-up
is not included. --quick: 2 nodes, mlp on 2,000 MNIST samples, 2 mask + 2 training rounds;
otherwise 4 nodes on all of MNIST, 5 mask + 5 training rounds.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import emit, parser, stop_on_sigterm

from mpfl.checkpoint import load_final
from mpfl.flower.local import LocalFederation
from mpfl.flower.server_app import MASKS
from mpfl.flower.settings import from_run_config
from mpfl.records import read_summary
from mpfl.sim import RunResult, simulate

REPO = Path(__file__).resolve().parents[1]
QUICK = {"nodes": 2, "rounds": 2, "prune.mask-rounds": 2, "data.train-samples": 2000, "data.test-samples": 500}
FULL = {"nodes": 4, "rounds": 5, "prune.mask-rounds": 5}
COMMON = {"threads": 1, "federated-eval": False, "round-timeout": 1800.0}


def same_as(out: Path, sim: RunResult) -> bool:
    """Whether a Flower run directory holds the simulator's final weights and every consensus mask."""
    final = load_final(out)
    with np.load(out / MASKS) as masks:
        names = list(final.mask)
        same_masks = all(np.array_equal(masks[f"{step}/{n}"], m) for step, mask in sim.masks.items()
                         for n, m in zip(names, mask))
    return same_masks and all(np.array_equal(a, b) for a, b in zip(final.weights.values(), sim.weights, strict=True))


def on_flower(runner: str, overrides: dict, nodes: int, sim: RunResult, work: Path, simulation: bool) -> dict:
    """Run on a fresh local federation; one row of the table."""
    out = work / runner / "run"
    with LocalFederation(work / runner, nodes, simulation=simulation) as fed:
        started = time.perf_counter()
        run = fed.wait(fed.run(REPO, {**overrides, "out-dir": str(out)}), 7200, done=out / "summary.json", poll=5.0)
        wall = time.perf_counter() - started
    if run["status"] != "finished:completed":
        raise SystemExit(f"{runner}: run {run['run-id']} ended {run['status']}: {run['status-details']}")
    s = read_summary(out)
    return {"runner": runner, "wall_time_s": wall, "final_accuracy": s["final_accuracy"], "bytes_up": s["bytes_up"],
            "bytes_down": s["bytes_down"], "same": same_as(out, sim)}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    stop_on_sigterm()
    simulation = importlib.util.find_spec("ray") is not None
    if not simulation:
        print("Flower's simulation engine is not installed (pip install -e \".[simulation]\"): its row is left out",
              flush=True)
    overrides = {**(QUICK if args.quick else FULL), **COMMON}
    cfg, _ = from_run_config(overrides)
    started = time.perf_counter()
    sim = simulate(cfg)
    rows = [{"runner": "in-process", "wall_time_s": time.perf_counter() - started,
             "final_accuracy": sim.summary["final_accuracy"], "bytes_up": sim.summary["bytes_up"],
             "bytes_down": sim.summary["bytes_down"], "same": True}]
    work = Path(tempfile.mkdtemp(prefix="mpfl-flower-bench-"))
    try:
        rows.append(on_flower("flower-deployment", overrides, cfg.nodes, sim, work, simulation=False))
        if simulation:
            rows.append(on_flower("flower-simulation", overrides, cfg.nodes, sim, work, simulation=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(f"MPFL on {cfg.nodes} nodes, {cfg.train.model}, {cfg.prune.mask_rounds} mask + {cfg.rounds} training rounds: "
         "in-process vs Flower", rows, args.json)


if __name__ == "__main__":
    main()
