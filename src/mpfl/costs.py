"""What a model costs on a device: parameters, bytes in memory, FLOPs per sample and latency.

FLOPs count one multiply-accumulate of a Linear or Conv layer as 2 FLOPs; biases, activations,
pooling and normalisation are not counted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .compact import DENSE, compactable, shrink
from .core.params import ParamSpec, set_weights


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs per inference of one Linear/Conv layer: all entries, and only the non-zero weights."""

    layer: str
    kind: str
    flops: int
    nonzero_flops: int


def layer_flops(model: nn.Module, input_shape: Sequence[int]) -> list[LayerFlops]:
    """FLOPs of each Linear/Conv layer for one sample (2 per multiply-accumulate), sizes from one probe pass."""
    outputs: dict[str, tuple[int, ...]] = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, DENSE)}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: outputs.__setitem__(name, tuple(out.shape)))
             for name, m in layers.items()]
    training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    result = []
    for name, m in layers.items():
        if name not in outputs:
            continue
        channels = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        positions = int(np.prod(outputs[name])) // channels
        weight = m.weight.detach()
        result.append(LayerFlops(name, type(m).__name__, 2 * positions * weight.numel(),
                                 2 * positions * int(torch.count_nonzero(weight))))
    return result


def flops(model: nn.Module, input_shape: Sequence[int], *, nonzero: bool = False) -> int:
    """Total FLOPs per inference of one sample; with `nonzero`, only the multiplications by non-zero weights."""
    return sum(f.nonzero_flops if nonzero else f.flops for f in layer_flops(model, input_shape))


def parameter_count(model: nn.Module) -> int:
    """Number of parameter entries (weights and biases, not buffers)."""
    return sum(p.numel() for p in model.parameters())


def state_bytes(model: nn.Module) -> int:
    """In-memory size of a model's state (parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def latency_ms(model: nn.Module, input_shape: Sequence[int], *, batch: int = 1, repeats: int = 50,
               warmup: int = 5, threads: int | None = 1) -> float:
    """Median wall time in ms of one forward pass on `threads` torch threads (one: stable on a shared machine)."""
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    training, before = model.training, torch.get_num_threads()
    model.eval()
    torch.set_num_threads(threads or before)
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                model(x)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        model.train(training)
        torch.set_num_threads(before)
    return 1000.0 * statistics.median(times)


def model_stats(model: nn.Module, spec: ParamSpec, weights: Sequence[np.ndarray], mask: Sequence[np.ndarray],
                input_shape: Sequence[int], structured: bool) -> dict:
    """What the final pruned model costs on a device, next to the dense model: parameters kept,
    bytes (a shrunk dense model for filter masks; kept float32 values plus a 1-bit-per-weight
    mask otherwise, no mask when nothing is pruned) and FLOPs per sample (of the shrunk model, or of the non-zero weights)."""
    set_weights(model, spec, spec.apply(weights, mask))
    dense_params, dense_flops = parameter_count(model), flops(model, input_shape)
    if structured and compactable(model):
        small = shrink(model, spec, mask).model
        params, size, cost = parameter_count(small), state_bytes(small), flops(small, input_shape)
    else:
        pruned = sum(int(m.size - m.sum()) for m in mask)
        params = dense_params - pruned
        size = state_bytes(model) - 4 * pruned + (sum(m.size for m in mask) + 7) // 8 * bool(pruned)
        cost = flops(model, input_shape, nonzero=True)
    return {"params_kept": params, "params_dense": dense_params, "model_bytes": size,
            "model_bytes_dense": state_bytes(model), "flops_per_sample": cost, "flops_per_sample_dense": dense_flops}
