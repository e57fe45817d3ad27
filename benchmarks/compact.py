"""Local training and inference cost of cnn on MNIST with filter masks: dense, masked full-size, shrunk.

    python benchmarks/compact.py [--quick] [--json PATH] [--threads N]

Every prunable layer keeps the filters with the largest L2 norm at initialisation, so 50 %,
75 % and 90 % of each layer's filters are gone. For each sparsity the `masked` variant trains
the full-size model with the mask held fixed (what a node pays without shrinking) and the
`compact` variant trains the physically smaller model; `dense` is the unpruned model.

train_time_s: one local epoch (6000 samples, 1000 with --quick; B=32, SGD 0.05).
peak_mem_mib: each variant runs in its own process (tracemalloc cannot see torch's
allocations). A tiny linear model first trains on two batches, so torch's one-time runtime
allocations (some 60-80 MiB, the same for every model) are made before the measurement; then
the process's peak resident set size is reset (Linux /proc/self/clear_refs) and the figure
is the peak during the epoch (VmHWM) minus the resident size at its start: activations,
gradients, optimizer state and kernel workspace. getrusage's ru_maxrss is not used: it cannot
be reset, and a child inherits its parent's peak across exec. flops: per inference of one sample, 2 per multiply-accumulate
of Linear/Conv layers. model_bytes: parameters and buffers in memory. latency_ms: median
forward pass of one sample. All on --threads torch threads (default 1). Linux only.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import emit, parser, stop_on_sigterm
from torch import nn

from mpfl.core.masks import filter_mask
from mpfl.core.params import get_weights, param_spec, set_weights
from mpfl.core.training import CompactTrainer, LocalData, LocalTrainer, generator
from mpfl.costs import flops, latency_ms, parameter_count, state_bytes
from mpfl.data import load_dataset
from mpfl.models import build_model

SPARSITIES = (0.5, 0.75, 0.9)
COLUMNS = ("sparsity", "variant", "params", "flops", "model_bytes", "train_time_s", "peak_mem_mib", "latency_ms")
INPUT = (1, 28, 28)


def memory_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: resident now, VmHWM: peak), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; this benchmark needs Linux")


def warm_up_runtime(data: LocalData) -> None:
    """Train a tiny linear model on two batches, so torch's one-time allocations happen before any measurement."""
    tiny = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(INPUT), 10))
    spec = param_spec(tiny)
    two_batches = LocalData(data.x, data.y, data.train[:64], data.val)
    LocalTrainer(tiny, spec, batch_size=32).train(get_weights(tiny, spec), None, two_batches, 1, generator(0))


def measure(variant: str, sparsity: float, data_dir: Path, threads: int) -> dict:
    """One variant in this process: train one epoch, then measure memory growth, size, FLOPs and latency."""
    torch.set_num_threads(threads)
    x, y = torch.from_numpy(np.load(data_dir / "x.npy")), torch.from_numpy(np.load(data_dir / "y.npy"))
    data = LocalData(x, y, torch.arange(len(y)), torch.arange(0))
    warm_up_runtime(data)
    torch.manual_seed(0)
    model = build_model("cnn", INPUT, 10)
    spec = param_spec(model, structured=True)
    weights = get_weights(model, spec)
    mask = None if variant == "dense" else filter_mask(spec.pick(weights), spec.full_mask(), 1 - sparsity)
    trainer = (CompactTrainer if variant == "compact" else LocalTrainer)(model, spec, lr=0.05, batch_size=32)
    weights = weights if mask is None else spec.apply(weights, mask)
    infer = model
    if variant == "compact":
        small, _ = trainer.compact(mask)
        infer = small.model
    Path("/proc/self/clear_refs").write_text("5")
    before = memory_kib("VmRSS")
    started = time.perf_counter()
    trained, _ = trainer.train(weights, mask, data, 1, generator(0, 1, 0))
    seconds = time.perf_counter() - started
    peak_kib = memory_kib("VmHWM") - before
    if variant == "compact":
        set_weights(infer, small.spec, small.to_compact(trained))
    else:
        set_weights(model, spec, trained)
    return {"sparsity": sparsity, "variant": variant, "params": parameter_count(infer), "flops": flops(infer, INPUT),
            "model_bytes": state_bytes(infer), "train_time_s": seconds, "peak_mem_mib": peak_kib / 1024,
            "latency_ms": latency_ms(infer, INPUT, threads=threads)}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--threads", type=int, default=1, help="torch threads in every measurement")
    p.add_argument("--worker", nargs=3, metavar=("VARIANT", "SPARSITY", "DATA_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    stop_on_sigterm()
    if args.worker:
        variant, sparsity, data_dir = args.worker
        print(json.dumps(measure(variant, float(sparsity), Path(data_dir), args.threads)))
        return
    samples = 1000 if args.quick else 6000
    runs = [("dense", 0.0)] + [(v, s) for s in SPARSITIES for v in ("masked", "compact")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mnist = load_dataset("mnist")
        np.save(Path(tmp) / "x.npy", mnist.x_train[:samples].numpy())
        np.save(Path(tmp) / "y.npy", mnist.y_train[:samples].numpy())
        for variant, sparsity in runs:
            cmd = [sys.executable, __file__, "--worker", variant, str(sparsity), tmp, "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    emit(f"cnn on MNIST, filter masks: one local epoch on {samples} samples, inference per sample, "
         f"{args.threads} thread(s)", rows, args.json, COLUMNS)


if __name__ == "__main__":
    main()
