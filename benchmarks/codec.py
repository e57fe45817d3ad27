"""Wire codec benchmark: mask size against the entropy bound, coding time, the bytes of a whole
MPFL mask phase, and the size and error of float16 / int8 values.

    python benchmarks/codec.py [--quick] [--json PATH]

Targets (issue 5): a range-coded mask of 1,663,370 weights takes at most 1.02 x n*H(p) bits
plus 64 bytes, and encoding plus decoding it takes under 50 ms on one core. The process pins
itself to one core where the OS allows it. Times are medians over repetitions of the public
``encode_mask`` / ``decode_mask`` calls, header and checksum included.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from _common import parser
from rich.console import Console
from rich.table import Table

from mpfl import codec
from mpfl.codec import HEADER_SIZE, Kind
from mpfl.core.masks import keep_count, target_density
from mpfl.core.params import param_spec
from mpfl.models import build_model

MASK_SIZE = 1_663_370
DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)
MASK_ROUNDS, SPARSITY, NODES = 5, 0.9, 10
RATIO_TARGET, SLACK_BYTES, TIME_TARGET_MS = 1.02, 64, 50.0


def pin_one_core() -> str:
    """Run on a single core when the OS supports affinity; say which."""
    if not hasattr(os, "sched_setaffinity"):
        return "affinity not supported; not pinned"
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return f"pinned to core {core}"


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def entropy_bits(n: int, ones: int) -> float:
    """n * H(ones / n): the cost of the bits under the best i.i.d. model."""
    if ones in (0, n):
        return 0.0
    p = ones / n
    return -n * (p * math.log2(p) + (1 - p) * math.log2(1 - p))


def exact_subset(support: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random subset of ``support`` with exactly k entries."""
    flat = np.zeros(support.size, dtype=bool)
    flat[rng.choice(np.flatnonzero(support), size=k, replace=False)] = True
    return flat.reshape(support.shape)


def mask_rows(reps: int) -> list[dict]:
    """One random mask of MASK_SIZE weights per density, over the full support."""
    rng = np.random.default_rng(0)
    base = [np.ones(MASK_SIZE, dtype=bool)]
    rows = []
    for density in DENSITIES:
        ones = keep_count(MASK_SIZE, density)
        mask = [exact_subset(base[0], ones, rng)]
        body = codec.encode_mask(mask, base, round=1)
        assert np.array_equal(codec.decode_mask(body, base, round=1).tensors[0], mask[0])
        coded = coded_length(body)
        entropy = entropy_bits(MASK_SIZE, ones)
        encode_ms = median_ms(lambda mask=mask: codec.encode_mask(mask, base, round=1), reps)
        decode_ms = median_ms(lambda body=body: codec.decode_mask(body, base, round=1), reps)
        rows.append({
            "density": density,
            "coded_bits": 8 * coded,
            "entropy_bits": entropy,
            "ratio": 8 * coded / entropy,
            "body_bytes": len(body),
            "size_ok": len(body) - HEADER_SIZE <= RATIO_TARGET * entropy / 8 + SLACK_BYTES,
            "packbits_bits": 8 * ((MASK_SIZE + 7) // 8),
            "encode_ms": encode_ms,
            "decode_ms": decode_ms,
            "total_ms": encode_ms + decode_ms,
            "time_ok": encode_ms + decode_ms < TIME_TARGET_MS,
        })
    return rows


def coded_length(body: bytes) -> int:
    """The coded length field of a one-tensor mask body (the bitstream alone, without metadata)."""
    return int.from_bytes(body[HEADER_SIZE + 8 : HEADER_SIZE + 12], "little")


def cnn_prunable_shapes() -> tuple[list[tuple[int, ...]], int]:
    """The prunable weight shapes of the McMahan CNN on MNIST, and its total parameter count."""
    spec = param_spec(build_model("cnn", (1, 28, 28), 10))
    return spec.prunable_shapes, sum(int(np.prod(s)) for s in spec.shapes)


def phase_rows() -> list[dict]:
    """Bytes of one MPFL mask phase, per node, by actually encoding the masks of every round.

    Each node's local mask is a random subset of the consensus at the round's density, per
    layer; the consensus keeps the most-voted weights per layer (random tie-break), so masks
    are nested round to round as the algorithm requires.
    """
    shapes, _ = cnn_prunable_shapes()
    weights = sum(int(np.prod(s)) for s in shapes)
    rng = np.random.default_rng(1)
    consensus = [np.ones(s, dtype=bool) for s in shapes]
    rows = []
    for t in range(1, MASK_ROUNDS + 1):
        density = target_density(t, MASK_ROUNDS, SPARSITY, "geometric")
        keep = [keep_count(int(np.prod(s)), density) for s in shapes]
        local = [[exact_subset(c, k, rng) for c, k in zip(consensus, keep)] for _ in range(NODES)]
        up = statistics.mean(len(codec.encode_mask(m, consensus, round=t, base_version=t - 1)) for m in local)
        votes = [sum(m[j].astype(np.int32) for m in local) for j in range(len(shapes))]
        new = [top_votes(v, c, k, rng) for v, c, k in zip(votes, consensus, keep)]
        down = len(codec.encode_mask(new, consensus, round=t, base_version=t - 1))
        rows.append(phase_row(f"round {t}", density, up, down, weights))
        consensus = new
    up, down = sum(r["up_bytes"] for r in rows), sum(r["down_bytes"] for r in rows)
    rows.append(phase_row("mask phase", density, up, down, weights))
    return rows


def top_votes(votes: np.ndarray, support: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    score = np.where(support, votes + rng.random(votes.shape) * 0.5, -1.0).reshape(-1)
    out = np.zeros(score.size, dtype=bool)
    out[np.argpartition(score, score.size - k)[score.size - k :]] = True
    return out.reshape(votes.shape)


def phase_row(step: str, density: float, up: float, down: float, weights: int) -> dict:
    total = 8 * (up + down) / weights
    fedavg = 32.0 * (MASK_ROUNDS if step == "mask phase" else 1)
    return {
        "step": step,
        "density": density,
        "up_bytes": up,
        "down_bytes": down,
        "up_bits_per_weight": 8 * up / weights,
        "down_bits_per_weight": 8 * down / weights,
        "bits_per_weight": total,
        "fedavg_bits_per_weight": 2 * fedavg,
        "share_of_fedavg": total / (2 * fedavg),
    }


def value_rows(reps: int) -> list[dict]:
    """Size and error of the CNN's initial weights (all 1,663,370 parameters) per value dtype."""
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 10)
    tensors = [p.detach().numpy().astype(np.float32) for p in model.state_dict().values()]
    flat = np.concatenate([t.ravel() for t in tensors])
    shapes = [t.shape for t in tensors]
    rms = float(np.sqrt(np.mean(flat.astype(np.float64) ** 2)))
    rows = []
    for dtype in codec.VALUE_DTYPES:
        body = codec.encode_dense(Kind.WEIGHTS, tensors, round=1, dtype=dtype)
        per_tensor = [codec.quantization_error(t, dtype) for t in tensors]
        sq = sum(e["rms_error"] ** 2 * t.size for e, t in zip(per_tensor, tensors)) / flat.size
        rows.append({
            "dtype": dtype,
            "values": int(flat.size),
            "body_bytes": len(body),
            "bits_per_value": 8 * len(body) / flat.size,
            "max_abs_error": max(e["max_abs_error"] for e in per_tensor),
            "rms_error": math.sqrt(sq),
            "relative_rms_error": math.sqrt(sq) / rms,
            "encode_ms": median_ms(lambda dtype=dtype: codec.encode_dense(Kind.WEIGHTS, tensors, round=1, dtype=dtype), reps),
            "decode_ms": median_ms(lambda body=body: codec.decode_dense(body, Kind.WEIGHTS, shapes, round=1), reps),
        })
    return rows


def fmt(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if key == "ratio":
        return f"{value:.5f}"
    if key.endswith("_bits") or key.endswith("_bytes"):
        return f"{value:,.0f}"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e7:
            return f"{value:.4g}" if abs(value) < 10 else f"{value:,.1f}"
        return f"{value:.3e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def show(title: str, rows: list[dict]) -> None:
    table = Table(title=title, title_justify="left")
    for key in rows[0]:
        table.add_column(key, justify="left" if key in ("step", "dtype") else "right")
    for row in rows:
        table.add_row(*(fmt(k, v) for k, v in row.items()))
    Console(width=200).print(table)


def main() -> None:
    args = parser(__doc__).parse_args()  # --quick: fewer timing repetitions
    reps = 3 if args.quick else 15
    print(f"mpfl codec benchmark: {pin_one_core()}, median of {reps} repetitions")

    masks = mask_rows(reps)
    show(f"Range-coded mask, n = {MASK_SIZE:,} (targets: ratio <= {RATIO_TARGET} plus {SLACK_BYTES} bytes, "
         f"encode + decode < {TIME_TARGET_MS:g} ms)", masks)
    phase = phase_rows()
    shapes, total = cnn_prunable_shapes()
    weights = sum(int(np.prod(s)) for s in shapes)
    show(f"One MPFL mask phase per node: cnn, {weights:,} prunable weights, {MASK_ROUNDS} geometric rounds to sparsity "
         f"{SPARSITY}, {NODES} nodes (bits_per_weight = up + down; dense FedAvg: 32 each way per round)", phase)
    phase_total = phase[-1]
    w0_bits = 8 * len(codec.encode_dense(Kind.WEIGHTS, [np.zeros(total, np.float32)], round=1)) / weights
    print(f"mask phase per node: {phase_total['up_bits_per_weight']:.3f} bits per weight up + "
          f"{phase_total['down_bits_per_weight']:.3f} down over {MASK_ROUNDS} rounds, against 32 each way for every "
          f"round of dense FedAvg. The initial weights travel as a 36-byte seed reference; only a node without "
          f"the run's --init file gets them as weights, once ({w0_bits:.2f} bits per prunable weight, all {total:,} "
          f"parameters in float32)")
    values = value_rows(reps)
    show(f"Values: the cnn's initial weights, {total:,} parameters", values)

    size_ok = all(r["size_ok"] for r in masks)
    time_ok = all(r["time_ok"] for r in masks)
    worst = max(r["encode_ms"] + r["decode_ms"] for r in masks)
    print(f"size target {'met' if size_ok else 'MISSED'} (worst ratio {max(r['ratio'] for r in masks):.5f}); "
          f"time target {'met' if time_ok else 'MISSED'} (worst encode + decode {worst:.1f} ms)")
    if args.json:
        rows = [{"table": "mask", **r} for r in masks] + [{"table": "phase", **r} for r in phase]
        rows += [{"table": "values", **r} for r in values]
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {len(rows)} rows to {args.json}")


if __name__ == "__main__":
    main()
