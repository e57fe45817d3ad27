"""Simulator speed and memory: overhead over a bare torch loop, speed-up over Flower's simulation
engine, and peak resident memory.

    python benchmarks/speed.py [--quick] [--json PATH] [--threads N] [--only overhead|flower|memory|device]
                               [--device cpu|cuda|cuda:N|mps|auto ...] [--model mlp|cnn|lenet5|vgg11|resnet18 ...]
                               [--data-dir DIR]

1. Overhead (rows of part ``overhead``, column ``overhead``, one per model): the wall time of an MPFL
   run on the in-process simulator divided by the time of the same local training steps in a bare
   torch loop. The run:
   10 IID MNIST nodes, E = 1, B = 32, SGD lr 0.05, 2 geometric mask rounds towards sparsity 0.9,
   then 3 masked training rounds, test-set evaluation after every training round (the defaults).
   Simulator time: all of `simulate` once the data and model are built (training, masking,
   encoding and decoding every message, consensus, aggregation, evaluation, records). Bare loop:
   for every node of every round, load the start weights into the same architecture, a fresh
   ``torch.optim.SGD``, then for each minibatch of the node's shuffled samples (the same order
   and batches as the simulator) ``index_select``, ``zero_grad``, forward, cross-entropy,
   backward, ``step``, for as many epochs as the run's nodes train (``mask_epochs`` in a mask
   round); no masks, messages or evaluation. Both use the same torch threads. Each
   round's bare loop runs right after the simulator's round (from its ``on_round`` callback), so
   both see the same machine load, and its time is subtracted from the simulator's wall time.
   The same ratio of this process's CPU time (``overhead_cpu_time``), which other work on a
   shared machine disturbs less, is reported too.
2. Flower (part ``flower``; its ``all`` row sums both configs): MPFL (5 mask + 5 training rounds) and FedAvg
   (5 rounds), mlp, 10 nodes, on Flower's simulation engine (a SuperLink with ``--simulation`` on
   127.0.0.1, one CPU per virtual SuperNode, so it trains as many nodes at once as the machine
   has cores) and on the in-process simulator (``mpfl run`` in a fresh process), end to end: from
   submitting the run to its summary.json for Flower (SuperLink start-up not counted), from
   process start to exit for ``mpfl run``. The figure is the ratio of the summed wall times with
   both on the same cores: ``mpfl run --workers <cores>`` (``speedup``); the ratio against a single
   in-process worker is ``speedup_1_worker``. ``same`` says whether all three produced
   the same final weights.
3. Memory (part ``memory``, column ``peak_rss_mib``, 10 and 100 nodes): peak resident set size of a
   fresh process running an MPFL cnn run on all of MNIST (2 mask rounds, 1 training round).

4. Devices (part ``device``): for each ``--device`` (repeatable; default cpu) and ``--model``
   (repeatable; default mlp and cnn, mlp alone with --quick), one MPFL run of the overhead
   configuration on that device: rounds per second and local training samples per second (every
   sample each asked node trains on, per epoch, mask rounds included), from the start of
   `simulate` with the data and model already on the device. vgg11 and resnet18 train on
   CIFAR-10 where it is found (``--data-dir``, $MPFL_DATA, the cache), else on random
   CIFAR-shaped images (``synthetic-cifar10``, 50,000 + 10,000, 3x32x32, 10 classes), which
   measure speed only. ``nondeterministic_ops`` counts the operations torch warned have no
   deterministic implementation on that device. A device this machine lacks stops the benchmark
   with the run's own error.

The flower part needs the ``simulation`` extra (Ray); without it, a run of every part skips it and
says so. --json writes every part's rows as one list, each row naming its ``part``, between two
``machine`` rows (CPUs, torch, load average before and after).

--quick: overhead runs on 12,000 training and 2,000 test samples with 1 + 2 rounds, the Flower
comparison on 12,000 training samples, memory runs with 1 mask round. --threads sets torch
threads for the overhead runs (default 1: steadier on a shared machine).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _common import bare_round, emit, missing_extra, parser, require, round_epochs, stop_on_sigterm

from mpfl.checkpoint import load_final
from mpfl.config import Config
from mpfl.data import Dataset, available_datasets, dataset_available, register_dataset
from mpfl.errors import ConfigError
from mpfl.experiment import Experiment
from mpfl.flower.local import FINISHED
from mpfl.models import available_models, build_model
from mpfl.records import read_summary
from mpfl.sim import simulate

REPO = Path(__file__).resolve().parents[1]
PARTS = ("overhead", "flower", "memory", "device")
BASE = {"nodes": 10, "method": "mpfl", "sparsity": 0.9, "batch_size": 32, "lr": 0.05, "epochs": 1}


def overhead(model_name: str, quick: bool, threads: int) -> dict:
    """Simulator time over bare-loop time for one MPFL run (see the module docstring), as wall time
    and as this process's CPU time (which other work on the machine disturbs less)."""
    size = {"train_samples": 12000, "test_samples": 2000, "mask_rounds": 1, "rounds": 2} if quick else \
        {"mask_rounds": 2, "rounds": 3}
    cfg = Config().with_overrides({**BASE, **size, "model": model_name, "threads": threads})
    exp = Experiment.from_config(cfg)
    bare_model = build_model(model_name, exp.dataset.input_shape, exp.dataset.num_classes)
    bare_round(bare_model, exp, 0, [0], exp.w0)  # one-off costs (torch's first optimizer imports torch._dynamo)
    bare = {"wall": 0.0, "cpu": 0.0}

    def on_round(record: dict) -> None:
        cpu = time.process_time()
        bare["wall"] += bare_round(bare_model, exp, record["step"], record["nodes"], exp.w0, record["phase"])
        bare["cpu"] += time.process_time() - cpu

    started, cpu = time.perf_counter(), time.process_time()
    result = simulate(cfg, experiment=exp, on_round=on_round)
    sim_wall = time.perf_counter() - started - bare["wall"]
    sim_cpu = time.process_time() - cpu - bare["cpu"]
    evaluated = sum(r["accuracy"] is not None for r in result.records)
    return {"model": model_name, "rounds": len(result.records), "evaluations": evaluated, "threads": threads,
            "simulator_s": sim_wall, "bare_loop_s": bare["wall"], "overhead": sim_wall / bare["wall"],
            "overhead_cpu_time": sim_cpu / bare["cpu"]}


# --------------------------------------------------------------------------- Flower


def flower_configs(quick: bool) -> dict[str, dict]:
    """The run configs (Flower's flat keys) of the comparison."""
    common = {"nodes": 10, "train.model": "mlp", "threads": 1, "federated-eval": False, "round-timeout": 3600.0}
    if quick:
        common["data.train-samples"] = 12000
    return {"mpfl": {**common, "method": "mpfl", "rounds": 5, "prune.mask-rounds": 5},
            "fedavg": {**common, "method": "fedavg", "rounds": 5}}


def cli_args(run_config: dict) -> list[str]:
    """`mpfl run` flags for a Flower run config (the flag of a.b.c-d is --c-d)."""
    skip = {"federated-eval", "round-timeout"}
    return [a for k, v in run_config.items() if k not in skip for a in (f"--{k.rsplit('.', 1)[-1]}", str(v))]


def same_weights(a: Path, b: Path) -> bool:
    fa, fb = load_final(a), load_final(b)
    return fa.weights.keys() == fb.weights.keys() and all(np.array_equal(fa.weights[k], fb.weights[k]) for k in fa.weights)


def in_process(run_config: dict, out: Path, workers: int = 1) -> float:
    """Seconds for `mpfl run` in a fresh process, start to exit."""
    cmd = [sys.executable, "-m", "mpfl.cli", "run", *cli_args(run_config), "--workers", str(workers),
           "--out", str(out), "--quiet"]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=out.parent, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def wait_for_summary(fed, run_id: int, summary: Path, started: float, timeout: float = 3600.0) -> float:
    """Seconds from `started` until the Flower run writes `summary`; asks Flower every 10 s whether the
    run ended without it (it failed), so a failed run stops the benchmark at once."""
    asked = started
    while not summary.exists():
        now = time.perf_counter()
        if now - started > timeout:
            raise TimeoutError(f"the Flower run did not finish within {timeout:g} s")
        if now - asked > 10:
            asked, run = now, fed.status(run_id)
            if run["status"].startswith(FINISHED) and not summary.exists():
                raise SystemExit(f"Flower run {run_id} ended {run['status']}: {run['status-details']}")
        time.sleep(0.1)
    return time.perf_counter() - started


def on_flower_simulation(run_config: dict, nodes: int, work: Path) -> tuple[float, Path]:
    """Seconds from `flwr run` to the run's summary.json on Flower's simulation engine, and the run dir."""
    from mpfl.flower.local import LocalFederation

    out = work / "run"
    with LocalFederation(work, nodes, simulation=True) as fed:
        started = time.perf_counter()
        run_id = fed.run(REPO, {**run_config, "out-dir": str(out)})
        wall = wait_for_summary(fed, run_id, out / "summary.json", started)
        run = fed.wait(run_id, 600, done=out / "summary.json")
    if run["status"] != "finished:completed":
        raise SystemExit(f"Flower run {run_id} ended {run['status']}: {run['status-details']}")
    return wall, out


def flower(quick: bool) -> list[dict]:
    """Rows of the Flower comparison, then the overall speed-ups (summed Flower time / summed in-process
    time, on the same cores and against one in-process worker) as the row of config ``all``."""
    cores = os.cpu_count() or 1
    rows = []
    work = Path(tempfile.mkdtemp(prefix="mpfl-speed-"))
    try:
        for name, rc in flower_configs(quick).items():
            one = in_process(rc, work / f"{name}-1w")
            same_cores = in_process(rc, work / f"{name}-{cores}w", workers=cores)
            fl, out = on_flower_simulation(rc, rc["nodes"], work / f"{name}-flower")
            same = same_weights(out, work / f"{name}-1w") and same_weights(out, work / f"{name}-{cores}w")
            rows.append({"config": name, "cores": cores, "flower_simulation_s": fl, "in_process_s": same_cores,
                         "in_process_1_worker_s": one, "speedup": fl / same_cores, "speedup_1_worker": fl / one,
                         "same": same, "final_accuracy": read_summary(out)["final_accuracy"]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = {key: sum(r[key] for r in rows) for key in ("flower_simulation_s", "in_process_s", "in_process_1_worker_s")}
    return [*rows, {"config": "all", "cores": cores, **total, "speedup": total["flower_simulation_s"] / total["in_process_s"],
                    "speedup_1_worker": total["flower_simulation_s"] / total["in_process_1_worker_s"],
                    "same": all(r["same"] for r in rows)}]


# --------------------------------------------------------------------------- devices


def trained_samples(exp: Experiment, records: list[dict]) -> int:
    """Local training samples of a run: each asked node's samples times its epochs, every round."""
    cfg = exp.cfg
    sizes = exp.partition.sizes()
    total = 0
    for r in records:
        total += round_epochs(cfg, r["phase"]) * int(sum(int(sizes[n]) for n in r["nodes"]))
    return total


CIFAR_MODELS = ("vgg11", "resnet18")
"""Models built for 3x32x32 images: the device part trains them on CIFAR-10, or on synthetic-cifar10."""
SYNTHETIC_CIFAR = "synthetic-cifar10"


def synthetic_cifar10(data_dir: object = None) -> Dataset:
    """Random CIFAR-10-shaped images and labels (seeded): as much work per sample as CIFAR-10, no accuracy."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(60_000, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (60_000,), generator=generator)
    return Dataset(SYNTHETIC_CIFAR, images[:50_000], labels[:50_000], images[50_000:], labels[50_000:], 10)


def device_speed(model_name: str, device: str, quick: bool, threads: int, data_dir: Path | None) -> dict:
    """Rounds and training samples per second of the overhead configuration on `device`."""
    size = {"train_samples": 12000, "test_samples": 2000, "mask_rounds": 1, "rounds": 2} if quick else \
        {"mask_rounds": 2, "rounds": 3}
    dataset = "mnist"
    if model_name in CIFAR_MODELS:
        dataset = "cifar10" if dataset_available("cifar10", data_dir) else SYNTHETIC_CIFAR
        if dataset == SYNTHETIC_CIFAR and SYNTHETIC_CIFAR not in available_datasets():
            register_dataset(SYNTHETIC_CIFAR, synthetic_cifar10)
    cfg = Config().with_overrides({**BASE, **size, "model": model_name, "dataset": dataset, "threads": threads,
                                   "device": device, "data_dir": None if data_dir is None else str(data_dir)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exp = Experiment.from_config(cfg)
        started = time.perf_counter()
        result = simulate(cfg, experiment=exp)
        wall = time.perf_counter() - started
    nondeterministic = {str(w.message).split(" does not have a deterministic")[0] for w in caught
                        if "deterministic implementation" in str(w.message)}
    return {"device": str(exp.device), "model": model_name, "dataset": dataset, "rounds": len(result.records),
            "wall_s": wall, "rounds_per_s": len(result.records) / wall,
            "samples_per_s": trained_samples(exp, result.records) / wall,
            "final_accuracy": result.summary["final_accuracy"], "nondeterministic_ops": len(nondeterministic),
            "nondeterministic": "; ".join(sorted(nondeterministic)) or None}


# --------------------------------------------------------------------------- memory

PEAK = """
import json, sys
from mpfl.config import Config
from mpfl.sim import simulate
simulate(Config().with_overrides(json.loads(sys.argv[1])))
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024)
"""


def peak_rss(overrides: dict) -> float:
    """Peak resident MiB of a fresh process running one simulation. Read from VmHWM, not getrusage's
    ru_maxrss, which Linux carries over from the forked copy of this (larger) process across exec."""
    done = subprocess.run([sys.executable, "-c", PEAK, json.dumps(overrides)], check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def memory(quick: bool) -> list[dict]:
    rows = []
    for nodes in (10, 100):
        overrides = {**BASE, "model": "cnn", "nodes": nodes, "mask_rounds": 1 if quick else 2, "rounds": 1, "threads": 1}
        started = time.perf_counter()
        rows.append({"nodes": nodes, "model": "cnn", "peak_rss_mib": peak_rss(overrides), "run_s": time.perf_counter() - started})
    return rows


def machine() -> dict:
    return {"cpus": os.cpu_count(), "torch_threads_default": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average": os.getloadavg()}


def chosen_parts(only: list[str] | None) -> list[str]:
    """The parts to run: those named with --only (the flower part stopping at once if Ray is missing),
    else all of them, less the flower part (said on stderr) when Ray is missing."""
    flower_needs = ("ray", "simulation", "the flower part (Flower's simulation engine)")
    if only:
        if "flower" in only:
            require(*flower_needs, "or measure the rest alone: --only overhead --only memory")
        return list(only)
    if (missing := missing_extra(*flower_needs)) is not None:
        print(f"skipped: {missing}", file=sys.stderr, flush=True)
        return [part for part in PARTS if part != "flower"]
    return list(PARTS)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the overhead runs (default 1)")
    p.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable; default: all)")
    p.add_argument("--device", action="append", metavar="DEVICE",
                   help="a device the device part measures (repeatable; default cpu): cpu, cuda, cuda:N, mps, auto")
    p.add_argument("--model", action="append", choices=available_models(), dest="models",
                   help="a model the device part measures (repeatable; default mlp and cnn, --quick: mlp)")
    p.add_argument("--data-dir", type=Path, help="where the device part looks for CIFAR-10 (vgg11, resnet18)")
    args = p.parse_args()
    parts = chosen_parts(args.only)
    stop_on_sigterm()
    rows: list[dict] = [{"part": "machine", "when": "before", "quick": args.quick, **machine()}]

    def report(part: str, title: str, found: list[dict]) -> None:
        emit(title, found, None)
        rows.extend({"part": part, **row} for row in found)

    def measuring(part: str) -> None:  # a part takes minutes and prints its table only when done
        print(f"measuring the {part} part ...", file=sys.stderr, flush=True)

    if "overhead" in parts:
        measuring("overhead")
        report("overhead", "Overhead: in-process simulator vs the same steps in a bare torch loop (target cnn <= 1.10, "
               "mlp <= 1.25)", [overhead(m, args.quick, args.threads) for m in ("cnn", "mlp")])
    if "flower" in parts:
        measuring("flower")
        report("flower", "mlp, 10 nodes: Flower simulation engine vs the in-process simulator on the same cores, end "
               "to end (target >= 3x)", flower(args.quick))
    if "memory" in parts:
        measuring("memory")
        report("memory", "Peak resident memory, cnn on MNIST (fresh process per run)", memory(args.quick))
    if "device" in parts:
        measuring("device")
        models = args.models or (["mlp"] if args.quick else ["mlp", "cnn"])
        try:
            found = [device_speed(m, d, args.quick, args.threads, args.data_dir) for d in args.device or ["cpu"]
                     for m in models]
        except ConfigError as exc:
            print(f"speed.py --device: {exc}", file=sys.stderr)
            sys.exit(2)  # as mpfl run does for a config error
        report("device", "Rounds and local training samples per second by device", found)
    rows.append({"part": "machine", "when": "after", "quick": args.quick, **machine()})
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
