"""Local training, SNIP saliency and evaluation on one reusable torch model.

Data are whole tensors already normalised in memory; a node's samples are an index array,
and batches are slices of one `index_select` per chunk of shuffled samples, so no DataLoader
runs in the hot loop. Pruned weights stay exactly zero: they are zeroed once at the start and
their gradients are zeroed before every step, so with a fresh optimizer (whose state starts at
zero) SGD with momentum and weight decay, and Adam, never move them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..compact import CompactModel, mask_key
from .memo import ArrayMemo
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


CHUNK_SAMPLES = 4096


def batches(data: LocalData, batch_size: int, gen: torch.Generator, limit: int | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled minibatches (at most `limit`), gathered a chunk of samples at a time
    because one large `index_select` costs less than many small ones."""
    order = data.train[torch.randperm(data.num_samples, generator=gen)]
    if limit is not None:
        order = order[: limit * batch_size]
    chunk = max(batch_size, CHUNK_SAMPLES // batch_size * batch_size)
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk].to(data.x.device)
        x, y = data.x.index_select(0, idx), data.y.index_select(0, idx)
        for b in range(0, len(idx), batch_size):
            yield x[b : b + batch_size], y[b : b + batch_size]


class PlainSGD:
    """SGD without momentum or weight decay: the arithmetic of `torch.optim.SGD` (bit for bit, one
    `add_` per tensor) without its per-step Python overhead or the seconds its first use spends
    importing torch._dynamo."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float) -> None:
        self.params, self.lr = list(params), lr

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [p for p in self.params if p.grad is not None]
        torch._foreach_add_(live, [p.grad for p in live], alpha=-self.lr)


def generator(*key: int) -> torch.Generator:
    """A torch generator seeded from a tuple such as (seed, step, node), independent of call order."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def _mask_tensor(mask: np.ndarray) -> torch.Tensor | None:
    """A mask as a float32 tensor of ones and zeros to multiply by; None when it keeps everything."""
    return None if mask.all() else torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))  # a copy: masks are read-only


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
        self._mask_tensors = ArrayMemo(_mask_tensor)

    def _make_optimizer(self) -> torch.optim.Optimizer | PlainSGD:
        params = list(self.model.parameters())
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.momentum == 0 and self.weight_decay == 0:
            return PlainSGD(params, self.lr)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def _pruned(self, mask: Sequence[np.ndarray] | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The prunable parameters that `mask` prunes something of, with their masks as tensors."""
        if mask is None:
            return [], []
        pairs = [(p, t.to(device=p.device, dtype=p.dtype)) for p, t in zip(self._prunable, map(self._mask_tensors, mask))
                 if t is not None]
        return [p for p, _ in pairs], [t for _, t in pairs]

    def train(self, weights: Sequence[np.ndarray], mask: Sequence[np.ndarray] | None, data: LocalData,
              epochs: int, gen: torch.Generator) -> tuple[Weights, float]:
        """Run `epochs` of minibatch training from `weights` with `mask` fixed; return the new
        weights and the mean training loss. A fresh optimizer is used each call (stateless nodes)."""
        set_weights(self.model, self.spec, weights)
        params, masks = self._pruned(mask)
        if params:
            with torch.no_grad():
                torch._foreach_mul_(params, masks)
        opt = self._make_optimizer()
        self.model.train()
        losses = []
        for _ in range(epochs):
            for x, y in batches(data, self.batch_size, gen):
                opt.zero_grad()
                loss = self._loss(self.model(x), y)
                loss.backward()
                if params:
                    torch._foreach_mul_([p.grad for p in params], masks)
                opt.step()
                losses.append(loss.detach())  # summed once at the end: no host sync per step on a GPU
        mean = float(torch.stack(losses).mean()) if losses else 0.0
        return get_weights(self.model, self.spec), mean

    def saliency(self, weights: Sequence[np.ndarray], mask: Sequence[np.ndarray] | None, data: LocalData,
                 num_batches: int, gen: torch.Generator) -> Weights:
        """SNIP scores |w * dL/dw| of the prunable weights, summed over `num_batches` local batches."""
        set_weights(self.model, self.spec, weights if mask is None else self.spec.apply(weights, mask))
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        for x, y in batches(data, self.batch_size, gen, limit=num_batches):
            self._loss(self.model(x), y).backward()
        return [(p.detach() * p.grad).abs().cpu().numpy().astype(np.float32, copy=False) for p in self._prunable]

    def gradients(self, weights: Sequence[np.ndarray], data: LocalData, num_batches: int, gen: torch.Generator) -> Weights:
        """|dL/dw| of every prunable weight (pruned ones included) at `weights`, for the loss summed
        over `num_batches` local batches: where the model would grow if it could (the regrow score)."""
        set_weights(self.model, self.spec, weights)
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        for x, y in batches(data, self.batch_size, gen, limit=num_batches):
            self._loss(self.model(x), y).backward()
        return [p.grad.detach().abs().cpu().numpy().astype(np.float32, copy=False) for p in self._prunable]


def evaluate(model: nn.Module, spec: ParamSpec, weights: Sequence[np.ndarray], x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 128) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of `weights` on (x, y) under inference mode, in batches of `batch_size` and
    with convolutions in channels-last layout (both measured fastest on CPU); the layout is restored after."""
    set_weights(model, spec, weights)
    model.eval()
    convolutional = x.dim() == 4 and any(isinstance(m, nn.Conv2d) for m in model.modules())
    layout = torch.channels_last if convolutional else torch.contiguous_format
    model.to(memory_format=layout)
    correct, loss = 0, 0.0
    try:
        with torch.inference_mode():
            for start in range(0, len(y), batch_size):
                out = model(x[start : start + batch_size].contiguous(memory_format=layout))
                target = y[start : start + batch_size]
                loss += nn.functional.cross_entropy(out, target, reduction="sum").item()
                correct += int((out.argmax(1) == target).sum())
    finally:
        model.to(memory_format=torch.contiguous_format)
    n = max(len(y), 1)
    return correct / n, loss / n


class CompactTrainer(LocalTrainer):
    """A LocalTrainer that trains the shrunk model whenever the mask drops whole filters, for fewer FLOPs and less memory."""

    def __init__(self, model: nn.Module, spec: ParamSpec, **options) -> None:
        super().__init__(model, spec, **options)
        self._cached: tuple[bytes, CompactModel, LocalTrainer] | None = None

    def compact(self, mask: Sequence[np.ndarray]) -> tuple[CompactModel, LocalTrainer]:
        """The shrunk model for `mask` and a trainer on it, reused while the mask stays the same."""
        key = mask_key(mask)
        if self._cached is None or self._cached[0] != key:
            small = CompactModel(self.model, self.spec, mask)
            inner = LocalTrainer(small.model, small.spec, optimizer=self.optimizer, lr=self.lr, momentum=self.momentum,
                                 weight_decay=self.weight_decay, batch_size=self.batch_size)
            self._cached = (key, small, inner)
        return self._cached[1], self._cached[2]

    def train(self, weights: Sequence[np.ndarray], mask: Sequence[np.ndarray] | None, data: LocalData,
              epochs: int, gen: torch.Generator) -> tuple[Weights, float]:
        """Train the shrunk model from `weights`; return cleared full-size weights and the mean loss."""
        if mask is None or all(m.all() for m in mask):
            return super().train(weights, mask, data, epochs, gen)
        small, inner = self.compact(mask)
        trained, loss = inner.train(small.to_compact(weights), None, data, epochs, gen)
        return small.to_full(trained), loss
