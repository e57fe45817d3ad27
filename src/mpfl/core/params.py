"""Which tensors a model exchanges and which of them are prunable, as plain numpy arrays."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch

import numpy as np
import torch
from torch import nn

from .masks import Mask

Weights = list[np.ndarray]

_PRUNABLE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class ParamSpec:
    """The exchanged state of a model: floating tensors in state_dict order, the prunable ones, and
    the running statistics (BatchNorm's buffers), which training measures rather than learns."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    prunable: tuple[int, ...]
    statistics: tuple[int, ...] = ()

    @property
    def prunable_names(self) -> list[str]:
        return [self.names[i] for i in self.prunable]

    @property
    def prunable_shapes(self) -> list[tuple[int, ...]]:
        return [self.shapes[i] for i in self.prunable]

    @property
    def prunable_sizes(self) -> np.ndarray:
        return np.array([int(np.prod(s)) for s in self.prunable_shapes], dtype=np.int64)

    def full_mask(self, *, shared: bool = False) -> Mask:
        """The all-ones mask (version 0: nothing pruned). With `shared`, the same read-only arrays on
        every call, so that what a round derives from them (`core.memo`) is computed once, not per node."""
        if shared:
            return [_all_ones(self.shapes)[i] for i in self.prunable]
        return [np.ones(s, dtype=bool) for s in self.prunable_shapes]

    def supports(self, mask: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One support per exchanged tensor: the mask for prunable ones, all-ones for the rest."""
        out = list(_all_ones(self.shapes))
        for i, m in zip(self.prunable, mask):
            out[i] = m
        return out

    def apply(self, weights: Sequence[np.ndarray], mask: Sequence[np.ndarray]) -> Weights:
        """Weights with every pruned entry set to exactly zero."""
        out = list(weights)
        for i, m in zip(self.prunable, mask):
            out[i] = masked(weights[i], m)
        return out

    def pick(self, weights: Sequence[np.ndarray]) -> Weights:
        """The prunable tensors of a full weight list."""
        return [weights[i] for i in self.prunable]


@functools.lru_cache(maxsize=8)
def _all_ones(shapes: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, ...]:
    """One all-True array per shape, read-only: shared by every caller, so none may change it."""
    ones = tuple(np.ones(s, dtype=bool) for s in shapes)
    for array in ones:
        array.flags.writeable = False
    return ones


def masked(weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``np.where(mask, weights, 0)`` bit for bit (+0.0 where pruned; NaN, -0.0 kept where not).
    float32 takes a bitwise AND with all-ones or all-zeros words, which is about six times
    faster than `np.where` on a scattered mask."""
    if weights.dtype != np.float32 or weights.shape != mask.shape or mask.dtype != bool:
        return np.where(mask, weights, np.float32(0))
    words = mask.astype(np.int32)
    np.negative(words, out=words)  # True -> -1, every bit set
    words &= np.ascontiguousarray(weights).view(np.int32)
    return words.view(np.float32)


def param_spec(model: nn.Module, exclude: Sequence[str] = (), structured: bool = False,
               keep: Callable[[list[str]], list[str]] | None = None) -> ParamSpec:
    """Describe a model's exchanged state; prunable = Linear/Conv weights not matched by `exclude`.

    `exclude` holds fnmatch patterns on tensor names (e.g. ``"0.*"``). A structured (filter)
    mask never prunes the last prunable layer, whose output rows are the classes. `keep`, when
    given, narrows the candidates further (a method's `prunable_layers`).
    """
    state = model.state_dict()
    names = tuple(k for k, v in state.items() if v.is_floating_point())
    candidates = [
        f"{mod_name}.weight" if mod_name else "weight"
        for mod_name, module in model.named_modules()
        if isinstance(module, _PRUNABLE_MODULES)
    ]
    classes = candidates[-1] if candidates else None
    if keep is not None:
        candidates = keep(candidates)
    if structured:
        candidates = [c for c in candidates if c != classes]
    chosen = {c for c in candidates if not any(fnmatch(c, pattern) for pattern in exclude)}
    prunable = tuple(i for i, n in enumerate(names) if n in chosen)
    buffers = {name for name, _ in model.named_buffers()}
    statistics = tuple(i for i, n in enumerate(names) if n in buffers)
    return ParamSpec(names, tuple(tuple(state[n].shape) for n in names), prunable, statistics)


def get_weights(model: nn.Module, spec: ParamSpec) -> Weights:
    """Copy the exchanged tensors of a model out as float32 numpy arrays."""
    state = model.state_dict()
    return [state[n].detach().cpu().numpy().astype(np.float32, copy=True) for n in spec.names]


def set_weights(model: nn.Module, spec: ParamSpec, weights: Sequence[np.ndarray]) -> None:
    """Copy numpy arrays into a model's tensors in place (no new model, no new optimizer)."""
    state = model.state_dict()
    with torch.no_grad():
        for n, w in zip(spec.names, weights):
            state[n].copy_(torch.from_numpy(np.ascontiguousarray(w)))
