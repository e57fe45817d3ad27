"""Long runs: what grows with the rounds of a run, measured without training.

    python benchmarks/long_runs.py [--quick] [--json PATH] [--model M] [--nodes N]

For 20, 200 and 1,000 training rounds (20 and 200 with --quick) of the default MPFL settings
(5 mask rounds, mask adaptation every other training round up to three quarters of the run) on
all of MNIST with 10 % of the nodes asked per round, at 10,000 nodes (1,000 with --quick):

* ``mask_versions``: the masks the server's history holds by the end (`resources.mask_versions`);
* ``build_nodes_s``, ``build_nodes_mib``: the time and the memory (tracemalloc) of building every
  node object of a process (`node.build_nodes`), whose plan is one copy shared by all of them;
* ``history_mb``: the memory the server's history of those masks takes (one bit per weight and version);
* ``checkpoint_mb``, ``checkpoint_s``: the size and write time of a checkpoint (`save_checkpoint`)
  holding the server's state at the end of such a run: its weights, w0, momentum and a history of
  ``mask_versions`` random masks at the final density (what every round rewrites);
* ``estimate_gib``: the memory the check before a run estimates for it (`resources.estimate_run`).
"""

from __future__ import annotations

import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from _common import emit, parser

from mpfl.checkpoint import CHECKPOINT, save_checkpoint
from mpfl.config import Config
from mpfl.core.history import MaskHistory
from mpfl.experiment import Experiment
from mpfl.node import build_nodes
from mpfl.resources import estimate_run, mask_versions
from mpfl.server import ServerState

COLUMNS = ("model", "nodes", "rounds", "mask_versions", "build_nodes_s", "build_nodes_mib", "history_mb", "checkpoint_mb",
           "checkpoint_s", "estimate_gib")


def measure(cfg: Config, exp: Experiment) -> dict:
    """One row: node set-up, an end-of-run checkpoint and the memory estimate for `cfg`."""
    tracemalloc.start()
    started = time.perf_counter()
    nodes = build_nodes(cfg, exp, range(cfg.nodes), {})
    build_s, (_, peak) = time.perf_counter() - started, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del nodes
    versions = mask_versions(cfg)
    draw = np.random.default_rng(cfg.seed)
    density = 1 - cfg.prune.sparsity
    history = MaskHistory({v: [draw.random(shape) < density for shape in exp.spec.prunable_shapes]
                           for v in range(versions)})
    weights = list(exp.w0)
    state = ServerState(weights=weights, w0=weights, mask=history[versions - 1], version=versions - 1, history=history,
                        velocity=weights)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        save_checkpoint(Path(folder), state, {}, spec=exp.spec)
        checkpoint_s = time.perf_counter() - started
        size = (Path(folder) / CHECKPOINT).stat().st_size
    return {"model": cfg.train.model, "nodes": cfg.nodes, "rounds": cfg.rounds, "mask_versions": versions,
            "build_nodes_s": build_s, "build_nodes_mib": peak / 2**20, "history_mb": history.nbytes / 1e6,
            "checkpoint_mb": size / 1e6,
            "checkpoint_s": checkpoint_s, "estimate_gib": estimate_run(cfg).total / 2**30}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="mlp", help="model of every row (default mlp)")
    p.add_argument("--nodes", type=int, help="nodes of every row (default 10,000; 1,000 with --quick)")
    args = p.parse_args()
    nodes = args.nodes or (1000 if args.quick else 10000)
    base = Config().with_overrides({"model": args.model, "nodes": nodes, "fraction": 0.1, "threads": 1})
    exp = Experiment.from_config(base)
    rows = [measure(base.with_overrides({"rounds": rounds}), exp) for rounds in ((20, 200) if args.quick else (20, 200, 1000))]
    emit(f"Long runs: {args.model} on MNIST, {nodes:,} nodes, 10 % asked per round", rows, args.json, COLUMNS)


if __name__ == "__main__":
    main()
