"""Where the simulator's time goes: a profile of typical MPFL runs, as percent of wall time.

    python benchmarks/profile_run.py [--quick] [--json PATH] [--threads N] [--models M ...] [--nodes N ...]
                                     [--fraction F] [--mask-rounds R] [--rounds R]

MPFL on MNIST, IID, E = 1, B = 32, SGD lr 0.05, by default 2 mask rounds + 2 training rounds, test-set
evaluation after every round, for `cnn` and `mlp` with 10 and 50 nodes, under cProfile. Each part
is the time spent below one call edge (e.g. `LocalTrainer.train` -> `Tensor.backward`), so parts do
not overlap: forward (model and loss), backward, optimizer (step and zero_grad), masking (the
gradient masks), batching, regrow gradients (the nodes' gradient pass in adaptation rounds), local
masks (the criteria and votes, `core/masks.py`), codec (every encode and decode), consensus,
aggregation, evaluation, records (rounds.jsonl and checkpoints); `other` is the rest (weights in and
out of the model, node and server bookkeeping). cProfile adds about a microsecond per Python call,
which weighs most on the small `mlp`. --quick uses a 12,000-image slice. The cross-device run of
docs/performance.md: ``--models mlp --nodes 1000 --fraction 0.1 --mask-rounds 5 --rounds 20``.
"""

from __future__ import annotations

import cProfile
import pstats
from pathlib import Path
from tempfile import TemporaryDirectory

from _common import emit, parser

from mpfl.config import Config
from mpfl.experiment import Experiment
from mpfl.sim import simulate

PKG = str(Path(__import__("mpfl").__file__).parent)
TRAIN_CALLEES = {  # callee function name below LocalTrainer.train -> part
    "_wrapped_call_impl": "forward", "backward": "backward", "step": "optimizer", "wrapper": "optimizer",
    "decorate_context": "optimizer",  # PlainSGD.step under @torch.no_grad()
    "zero_grad": "optimizer", "<built-in method torch._foreach_mul_>": "masking", "batches": "batching",
}
MODULE_PARTS = {"codec.py": "codec", "consensus.py": "consensus", "aggregate.py": "aggregation", "masks.py": "local masks"}
PARTS = ["forward", "backward", "optimizer", "masking", "batching", "regrow gradients", "local masks", "codec",
         "consensus", "aggregation", "evaluation", "records", "other"]


def _in(key: tuple, module: str) -> bool:
    return key[0].startswith(PKG) and key[0].endswith(module)


def breakdown(stats: dict) -> tuple[float, dict[str, float]]:
    """Seconds per part from cProfile's raw stats {(file, line, name): (cc, nc, tt, ct, callers)}."""
    parts = dict.fromkeys(PARTS, 0.0)
    total = 0.0
    for callee, (_, _, _, ct, callers) in stats.items():
        if _in(callee, "sim.py") and callee[2] == "simulate":
            total = ct
        if _in(callee, "training.py") and callee[2] == "evaluate":
            parts["evaluation"] += ct
        if _in(callee, "training.py") and callee[2] == "gradients":
            parts["regrow gradients"] += ct
        logging = _in(callee, "records.py") and callee[2] == "log"
        if logging or (_in(callee, "checkpoint.py") and callee[2] == "save_checkpoint"):
            parts["records"] += ct
        for caller, edge in callers.items():
            edge_ct = edge[3]
            if _in(caller, "training.py") and caller[2] in ("train", "saliency") and callee[2] in TRAIN_CALLEES:
                parts[TRAIN_CALLEES[callee[2]]] += edge_ct
            for module, part in MODULE_PARTS.items():
                if _in(callee, module) and not _in(caller, module):
                    parts[part] += edge_ct
    parts["other"] = total - sum(parts.values())
    return total, parts


def profile(model: str, nodes: int, quick: bool, threads: int | None, fraction: float = 1.0, mask_rounds: int = 2,
            rounds: int = 2) -> dict:
    cfg = Config().with_overrides({"model": model, "nodes": nodes, "mask_rounds": mask_rounds, "rounds": rounds,
                                   "fraction": fraction, "threads": threads, "train_samples": 12000 if quick else None})
    exp = Experiment.from_config(cfg)
    profiler = cProfile.Profile()
    with TemporaryDirectory() as tmp:
        profiler.runcall(simulate, cfg, Path(tmp) / "run", experiment=exp)
    total, parts = breakdown(pstats.Stats(profiler).stats)
    row = {"model": model, "nodes": nodes, "wall_time_s": round(total, 2)}
    row.update({p: round(100 * s / total, 1) for p, s in parts.items()})
    print(f"{model}, {nodes} nodes: {total:.1f} s", flush=True)
    return row


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    p.add_argument("--models", nargs="+", default=["cnn", "mlp"], help="models to profile (default: cnn mlp)")
    p.add_argument("--nodes", nargs="+", type=int, default=[10, 50], help="node counts to profile (default: 10 50)")
    p.add_argument("--fraction", type=float, default=1.0, help="share of the nodes asked per round (default 1)")
    p.add_argument("--mask-rounds", type=int, default=2, help="mask rounds (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="training rounds (default 2)")
    args = p.parse_args()
    rows = [profile(m, n, args.quick, args.threads, args.fraction, args.mask_rounds, args.rounds)
            for m in args.models for n in args.nodes]
    emit("Percent of the run's wall time per part (cProfile)", rows, args.json)


if __name__ == "__main__":
    main()
