"""Local training, SNIP saliency and evaluation on one reusable torch model.

Data are whole tensors already normalised in memory; a node's samples are an index array,
and batches are drawn with `index_select`, so no DataLoader runs in the hot loop. Pruned
weights stay exactly zero: gradients are masked before and weights after every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .params import ParamSpec, Weights, get_weights, set_weights


@dataclass(frozen=True)
class LocalData:
    """A node's view of the dataset: shared tensors plus its own index arrays."""

    x: torch.Tensor
    y: torch.Tensor
    train: torch.Tensor
    val: torch.Tensor

    @property
    def num_samples(self) -> int:
        return int(self.train.numel())


def generator(*key: int) -> torch.Generator:
    """A torch generator seeded from a tuple such as (seed, step, node), independent of call order."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


class LocalTrainer:
    """Trains one shared model in place for whichever node is being simulated."""

    def __init__(self, model: nn.Module, spec: ParamSpec, *, optimizer: str = "sgd", lr: float = 0.05,
                 momentum: float = 0.0, weight_decay: float = 0.0, batch_size: int = 32) -> None:
        self.model, self.spec = model, spec
        self.optimizer, self.lr, self.momentum, self.weight_decay = optimizer, lr, momentum, weight_decay
        self.batch_size = batch_size
        params = dict(model.named_parameters())
        self._prunable = [params[n] for n in spec.prunable_names]
        self._loss = nn.CrossEntropyLoss()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = list(self.model.parameters())
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def train(self, weights: Sequence[np.ndarray], mask: Sequence[np.ndarray] | None, data: LocalData,
              epochs: int, gen: torch.Generator) -> tuple[Weights, float]:
        """Run `epochs` of minibatch training from `weights` with `mask` fixed; return the new
        weights and the mean training loss. A fresh optimizer is used each call (stateless nodes)."""
        set_weights(self.model, self.spec, weights)
        masks = None if mask is None or all(m.all() for m in mask) else [torch.from_numpy(np.ascontiguousarray(m)).to(p.dtype) for m, p in zip(mask, self._prunable)]
        opt = self._make_optimizer()
        self.model.train()
        total, batches = 0.0, 0
        n = data.num_samples
        for _ in range(epochs):
            order = data.train[torch.randperm(n, generator=gen)]
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = self._loss(self.model(data.x.index_select(0, idx)), data.y.index_select(0, idx))
                loss.backward()
                if masks is not None:
                    torch._foreach_mul_([p.grad for p in self._prunable], masks)
                opt.step()
                if masks is not None:
                    with torch.no_grad():
                        torch._foreach_mul_(self._prunable, masks)
                total += loss.item()
                batches += 1
        return get_weights(self.model, self.spec), total / max(batches, 1)

    def saliency(self, weights: Sequence[np.ndarray], mask: Sequence[np.ndarray] | None, data: LocalData,
                 batches: int, gen: torch.Generator) -> Weights:
        """SNIP scores |w * dL/dw| of the prunable weights, summed over `batches` local batches."""
        set_weights(self.model, self.spec, weights if mask is None else self.spec.apply(weights, mask))
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        order = data.train[torch.randperm(data.num_samples, generator=gen)]
        for b in range(batches):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if idx.numel() == 0:
                break
            self._loss(self.model(data.x.index_select(0, idx)), data.y.index_select(0, idx)).backward()
        return [(p.detach() * p.grad).abs().numpy().astype(np.float32) for p in self._prunable]


@torch.inference_mode()
def evaluate(model: nn.Module, spec: ParamSpec, weights: Sequence[np.ndarray], x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 2048) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of `weights` on (x, y), in large batches."""
    set_weights(model, spec, weights)
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(y), batch_size):
        out = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss += nn.functional.cross_entropy(out, target, reduction="sum").item()
        correct += int((out.argmax(1) == target).sum())
    n = max(len(y), 1)
    return correct / n, loss / n
