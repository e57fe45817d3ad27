"""Cross-device scale: MPFL with 10 to 10,000 nodes, a tenth of them asked per round.

    python benchmarks/scale.py [--quick] [--json PATH] [--plot PNG] [--nodes N ...] [--workers W] [--mask-coder packbits]

Each run: mlp on all of MNIST (60,000 training images; 6 per node at 10,000 nodes), IID, the
default MPFL settings, ``--fraction 0.1`` (so mask rounds ask a tenth of the nodes too), 5 mask
and 20 training rounds (2 + 3 with --quick), one torch thread, in a fresh process per run.
Reported per run:

* ``setup_s``: building the data split, the model and every node, up to the first round;
* ``round_s``: mean wall time per round (mask and training rounds together), ``max_asked``: the
  most nodes any round asked;
* ``peak_rss_mib``: the process's peak resident memory (VmHWM);
* ``checkpoint_mb``: the largest per-round checkpoint;
* ``accuracy``: final test accuracy, and, at up to 1,000 nodes, ``accuracy_all_masks``: the same
  run with every node asked in every mask round (``--mask-fraction 1``; training still samples a
  tenth), so the difference is what sampling the mask rounds costs;
* ``vs_bare``: the run's wall time (set-up and test-set evaluation left out) over the same local
  training steps in a bare torch loop, run right after each round on the same nodes, batches and
  epochs (a fresh ``torch.optim.SGD``, ``index_select``, forward, loss, backward, step; no masks,
  messages, consensus or adaptation); ``eval_s`` is the evaluation time left out;
* ``vs_bare_mask``, ``vs_bare_train``, ``vs_bare_adapt``: the same ratio over the mask rounds, the
  plain training rounds and the adaptation rounds (training rounds that also vote on regrowth) alone;
* ``beyond_training_vs_bare``: the run's time outside local training (the nodes' torch work:
  `LocalTrainer`'s train, gradients and saliency calls; set-up and evaluation left out as above)
  over the same bare loop: the ``vs_bare`` the run would have if its local training took no time
  at all (one process only: with --workers the training runs in the workers and this is left blank);
* ``fedavg_vs_bare``, at up to 1,000 nodes: ``vs_bare`` of dense FedAvg on the same nodes and
  rounds (``--method fedavg``: whole float32 models both ways, no masks), the share of the ratio
  that any method pays for sending, checking, decoding and averaging each node's model.

--plot writes time per round, peak memory and the largest checkpoint against N as a PNG (docs/scale.png in the docs).
--mask-coder packbits sends masks as plain bits instead of range-coded ones (what the mask code
costs). --workers runs the nodes in W worker processes (the bare loop stays one process, so ``vs_bare``
then says how much the extra cores buy).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import bare_round, emit, parser, stop_on_sigterm

from mpfl.config import Config
from mpfl.core.training import LocalTrainer
from mpfl.experiment import Experiment
from mpfl.models import build_model
from mpfl.sim import simulate

REPO = Path(__file__).resolve().parents[1]
NODES = (10, 100, 1000, 10000)
COMPARE_UP_TO = 1000
COLUMNS = ("nodes", "mask_rounds", "rounds", "max_asked", "setup_s", "round_s", "peak_rss_mib", "checkpoint_mb",
           "accuracy", "accuracy_all_masks", "vs_bare", "vs_bare_mask", "vs_bare_train", "vs_bare_adapt",
           "beyond_training_vs_bare", "fedavg_vs_bare", "eval_s", "wall_s")
PHASES = ("mask", "train", "adapt")


def config(nodes: int, quick: bool, **extra: object) -> Config:
    """The run at `nodes` nodes (see the module docstring)."""
    rounds = {"mask_rounds": 2, "rounds": 3} if quick else {"mask_rounds": 5, "rounds": 20}
    return Config().with_overrides({"model": "mlp", "nodes": nodes, "fraction": 0.1, "threads": 1, **rounds, **extra})


def peak_mib() -> float:
    """This process's peak resident memory (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def phase_of(record: dict) -> str:
    """`mask`, `train`, or `adapt` for a training round that also swapped part of the mask."""
    if record["phase"] == "mask":
        return "mask"
    return "adapt" if "swap_fraction" in record else "train"


def ratio(run: float, bare: float) -> float | None:
    """Run time over bare-loop time (None when the phase did not occur)."""
    return run / bare if bare > 0 else None


def count_local_training(spent: dict) -> None:
    """Add the seconds this process spends in local training from now on (`LocalTrainer`'s train,
    gradients and saliency calls: all the torch work of the nodes) to ``spent["training"]``."""
    def timed(call):
        def wrapper(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return call(self, *args, **kwargs)
            finally:
                spent["training"] += time.perf_counter() - started

        return wrapper

    for name in ("train", "gradients", "saliency"):
        setattr(LocalTrainer, name, timed(getattr(LocalTrainer, name)))


def measure(overrides: dict, bare: bool) -> dict:
    """One run in this process: set-up, per-round times, checkpoint sizes, peak memory, accuracy,
    and (with `bare`) the bare-loop time of the same local training."""
    work = Path(tempfile.mkdtemp(prefix="mpfl-scale-"))
    try:
        cfg = Config.from_dict(overrides)
        started = time.perf_counter()
        exp = Experiment.from_config(cfg)
        built = time.perf_counter() - started
        evaluate, spent = exp.evaluate, {"eval": 0.0, "eval_seen": 0.0, "bare": 0.0, "training": 0.0}
        in_process = cfg.workers == 1
        if in_process:
            count_local_training(spent)

        def timed_evaluate(weights):
            t = time.perf_counter()
            out = evaluate(weights)
            spent["eval"] += time.perf_counter() - t
            return out

        exp.evaluate = timed_evaluate
        model = build_model(cfg.train.model, exp.dataset.input_shape, exp.dataset.num_classes) if bare else None
        if model is not None:
            bare_round(model, exp, 0, [0], exp.w0)  # one-off costs (torch's first optimizer imports torch._dynamo)
        sizes: list[int] = []
        by_phase = {phase: {"run": 0.0, "bare": 0.0} for phase in PHASES}

        def on_round(record: dict) -> None:
            sizes.append((work / "run" / "checkpoint.npz").stat().st_size)
            if model is not None:
                bare_s = bare_round(model, exp, record["step"], record["nodes"], exp.w0, record["phase"])
                phase = by_phase[phase_of(record)]
                phase["run"] += record["time"] - (spent["eval"] - spent["eval_seen"])
                phase["bare"] += bare_s
                spent["bare"] += bare_s
            spent["eval_seen"] = spent["eval"]

        run_started = time.perf_counter()
        result = simulate(cfg, work / "run", experiment=exp, on_round=on_round, keep_checkpoint=True)
        wall = time.perf_counter() - run_started - spent["bare"]
        first = result.records[0]
        setup = built + first["elapsed"] - first["time"]
        rounds_time = sum(r["time"] for r in result.records)
        return {"nodes": cfg.nodes, "mask_rounds": cfg.prune.mask_rounds, "rounds": cfg.rounds,
                "max_asked": max(len(r["nodes"]) for r in result.records), "setup_s": setup,
                "round_s": rounds_time / len(result.records), "peak_rss_mib": peak_mib(),
                "checkpoint_mb": max(sizes) / 1e6, "accuracy": result.summary["final_accuracy"],
                "vs_bare": (rounds_time - spent["eval"]) / spent["bare"] if bare else None,
                "beyond_training_vs_bare": ((rounds_time - spent["eval"] - spent["training"]) / spent["bare"]
                                            if bare and in_process else None),
                **{f"vs_bare_{name}": ratio(t["run"], t["bare"]) for name, t in by_phase.items()},
                "eval_s": spent["eval"], "wall_s": wall}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def in_fresh_process(overrides: dict, bare: bool) -> dict:
    """`measure` in a new Python process, so that its peak memory is its own."""
    cmd = [sys.executable, __file__, "--one", json.dumps({"overrides": overrides, "bare": bare})]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    """Time per round, peak memory and the largest checkpoint against the number of nodes (log scale), as a
    PNG; the checkpoint has an axis of its own, as its few MB would lie flat along hundreds of MiB of memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mpfl.report import plain_log_ticks  # here, so that a measured run's memory holds no matplotlib

    nodes = [r["nodes"] for r in rows]
    fig, (seconds, memory, checkpoint) = plt.subplots(1, 3, figsize=(12, 3.4))
    seconds.plot(nodes, [r["round_s"] for r in rows], "o-", label="per round")
    seconds.plot(nodes, [r["setup_s"] for r in rows], "s--", label="set-up")
    seconds.set(yscale="log", ylabel="seconds", title="Time")
    seconds.legend()
    for ax, key, unit, title in ((memory, "peak_rss_mib", "MiB", "Peak memory (RSS)"),
                                 (checkpoint, "checkpoint_mb", "MB", "Largest checkpoint")):
        values = [r[key] for r in rows]
        ax.plot(nodes, values, "o-")
        ax.set(ylabel=unit, title=title, ylim=(0, 1.1 * max(values)))
    for ax in (seconds, memory, checkpoint):
        ax.set(xscale="log", xlabel="nodes (a tenth asked per round)")
        plain_log_ticks(ax.xaxis)
    plain_log_ticks(seconds.yaxis)
    fig.suptitle(f"MPFL, mlp on MNIST, {rows[0]['mask_rounds']} mask + {rows[0]['rounds']} training rounds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--nodes", type=int, action="append", help="node counts to run (repeatable; default 10 to 10,000)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="write the time, memory and checkpoint plot here")
    p.add_argument("--workers", type=int, default=1, help="worker processes of each run (default 1)")
    p.add_argument("--mask-coder", choices=("range", "packbits"), default="range",
                   help="how masks are coded (default range; packbits sends plain bits, with nothing to decode)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        task = json.loads(args.one)
        print(json.dumps(measure(task["overrides"], task["bare"])))
        return
    stop_on_sigterm()
    settings = {"workers": args.workers, "mask_coder": args.mask_coder}
    rows = []
    for nodes in args.nodes or NODES:
        overrides = config(nodes, args.quick, **settings).to_dict()
        row = in_fresh_process(overrides, bare=True)
        if nodes <= COMPARE_UP_TO:
            every = config(nodes, args.quick, **settings, mask_fraction=1.0).to_dict()
            row["accuracy_all_masks"] = in_fresh_process(every, bare=False)["accuracy"]
            dense = config(nodes, args.quick, **settings, method="fedavg").to_dict()
            row["fedavg_vs_bare"] = in_fresh_process(dense, bare=True)["vs_bare"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    emit("MPFL at scale: mlp on MNIST, 10 % of the nodes per round (mask rounds included)", rows, args.json, COLUMNS)
    if args.plot is not None:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
