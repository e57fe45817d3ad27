"""Bring your own dataset, model, mask criterion and consensus rule, without editing mpfl.

    python examples/custom_extensions.py

Registers a synthetic two-blob dataset, a tiny MLP, a "keep the largest weights" criterion
and a "two-thirds majority" consensus rule when imported, then runs MPFL on them from Python.
Imported as a plug-in, the same pieces serve `mpfl run`:

    mpfl run --plugins examples/custom_extensions.py --dataset blobs --model tiny-mlp \
        --criterion squared --consensus two-thirds --nodes 4 --mask-rounds 2 --rounds 3 --sparsity 0.5
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import mpfl
from mpfl.core.masks import select


def blobs(data_dir=None) -> mpfl.data.Dataset:
    """Two Gaussian blobs in 16 dimensions, shaped as 1x4x4 images."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, 1, 4, 4, generator=g) + (2.0 * y - 1.0).view(-1, 1, 1, 1)
        return x, y

    (xtr, ytr), (xte, yte) = split(1200), split(400)
    return mpfl.data.Dataset("blobs", xtr.contiguous(), ytr, xte.contiguous(), yte, num_classes=2)


def tiny_mlp(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A 16-32-classes MLP."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 32), nn.ReLU(), nn.Linear(32, num_classes))


def largest_weights(weights, current, density, *, scope="layer", floor=0.01, **_):
    """A criterion is any function (weights, current mask, density) -> a subset of the current mask."""
    return select([np.abs(w) ** 2 for w in weights], current, density, scope, floor)


def two_thirds(votes, support, ctx):
    """A consensus rule is any function (votes, support, context) -> a subset of the support."""
    return [s & (v >= 2 / 3) for v, s in zip(votes, support)]


for register, name, piece in ((mpfl.register_dataset, "blobs", blobs), (mpfl.register_model, "tiny-mlp", tiny_mlp),
                              (mpfl.register_criterion, "squared", largest_weights),
                              (mpfl.register_rule, "two-thirds", two_thirds)):
    try:
        register(name, piece)
    except ValueError:
        pass  # registered already: a notebook ran this file before in the same process


def main() -> mpfl.RunResult:
    cfg = mpfl.Config().with_overrides({"dataset": "blobs", "model": "tiny-mlp", "criterion": "squared",
                                        "consensus": "two-thirds", "nodes": 4, "mask_rounds": 2, "rounds": 3,
                                        "sparsity": 0.5, "threads": 1})
    result = mpfl.simulate(cfg)
    print(f"accuracy {result.summary['final_accuracy']:.3f} at density {result.summary['final_density']:.3f}")
    return result


if __name__ == "__main__":
    main()
