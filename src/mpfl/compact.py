"""Structured shrinking of flat sequential models: the physically smaller model a filter mask leaves.

A filter mask keeps or drops whole output filters / neurons. Shrinking removes a dropped filter
for good: its weight row, its bias, its BatchNorm entries and the input channels (or flattened
features) of the next Conv/Linear layer that read it. The shrunk model therefore computes exactly
what the full-size model computes with all of those entries set to zero (`CompactModel.clear`).
The masked full-size model zeroes only the weight row and keeps the bias, so both agree once the
biases of dropped filters are zero; `CompactTrainer` returns weights in that cleared form, and the
server clears its own weights the same way after every round (`Experiment.cleared`).

Training the shrunk model (`mpfl.core.training.CompactTrainer`) gives the weights
`LocalTrainer` gives from the cleared full-size weights: there every entry a dropped filter
owns is zero, its activation is zero and so is every gradient reaching it, and SGD (with
momentum and weight decay) and Adam update each entry on its own, so those entries stay zero
and the others follow the same updates.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from .core.masks import whole_filters
from .core.params import ParamSpec, Weights
from .errors import ModelError

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
DENSE = (nn.Linear, *_CONV)
# Modules that act on each channel separately and map zero to zero, so a zeroed channel stays zero.
_CHANNELWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Identity,
                nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)

Index = tuple[np.ndarray | None, np.ndarray | None]


def unsupported(model: nn.Module) -> str | None:
    """Why `model` cannot be shrunk, or None: it must be a flat nn.Sequential of layers this module knows."""
    if not isinstance(model, nn.Sequential):
        return f"{type(model).__name__} is not a flat nn.Sequential"
    for i, m in enumerate(model):
        if isinstance(m, _CONV) and m.groups != 1:
            return f"layer {i} is a grouped convolution"
        if isinstance(m, _NORM) and m.momentum is None:
            return f"layer {i} is a BatchNorm with a cumulative average (momentum=None)"
        if isinstance(m, nn.Flatten) and m.start_dim != 1:
            return f"layer {i} flattens from dimension {m.start_dim}, not 1"
        if not isinstance(m, (*DENSE, *_NORM, nn.Flatten, *_CHANNELWISE)):
            return f"layer {i} ({type(m).__name__}) is not a Linear, Conv, BatchNorm, Flatten, activation or pooling layer"
    return None


def compactable(model: nn.Module) -> bool:
    """Whether filter masks on `model` can be trained and exported as a physically smaller model."""
    return unsupported(model) is None


def mask_key(mask: Sequence[np.ndarray]) -> bytes:
    """A mask's bits as bytes: a cheap key under which to keep what a mask determines."""
    return b"".join(np.packbits(np.asarray(m, dtype=bool)).tobytes() for m in mask)


def filter_flags(spec: ParamSpec, mask: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The kept output filters of each prunable tensor; the mask must keep or drop whole rows."""
    out = {}
    for name, m in zip(spec.prunable_names, mask):
        flags = whole_filters(np.asarray(m, dtype=bool))
        if flags is None:
            raise ModelError(f"the mask of {name} does not keep or drop whole filters; only filter masks can be shrunk")
        if not flags.any():
            raise ModelError(f"the mask drops every filter of {name}; keep at least one")
        out[name] = flags
    return out


def _spread(kept: np.ndarray | None, width: int, size: int) -> np.ndarray | None:
    """Kept channel indices as indices into a layer input of `size` (a flattened input holds `size / width` per channel)."""
    if kept is None or size == width:
        return kept
    if size % width:
        raise ModelError(f"a layer reads {size} inputs, which is not a whole number of the {width} channels before it")
    per = size // width
    return (kept[:, None] * per + np.arange(per)).reshape(-1)


def _resized(m: nn.Module, n_in: int, n_out: int) -> nn.Module:
    """An uninitialised copy of a Linear/Conv/BatchNorm layer with new channel counts (no RNG draws)."""
    meta = torch.device("meta")
    if isinstance(m, nn.Linear):
        return nn.Linear(n_in, n_out, bias=m.bias is not None, device=meta)
    if isinstance(m, _CONV):
        return type(m)(n_in, n_out, m.kernel_size, m.stride, m.padding, m.dilation, 1, m.bias is not None,
                       m.padding_mode, device=meta)
    return type(m)(n_out, m.eps, m.momentum, m.affine, m.track_running_stats, device=meta)


def _take(a: np.ndarray | torch.Tensor, index: Index) -> np.ndarray | torch.Tensor:
    """The kept part of one tensor (numpy array or torch tensor): rows along dim 0, columns along dim 1."""
    r, c = index
    if a.ndim == 0:
        return a
    if r is not None:
        a = a[r]
    if c is not None:
        a = a[:, c]
    return a


class CompactModel:
    """A flat nn.Sequential cut down to the filters a structured mask keeps, with maps between both forms."""

    def __init__(self, model: nn.Module, spec: ParamSpec, mask: Sequence[np.ndarray]) -> None:
        reason = unsupported(model)
        if reason is not None:
            raise ModelError(f"cannot shrink the model: {reason}")
        flags = filter_flags(spec, mask)
        self.full_spec = spec
        self.index: dict[str, Index] = {}
        layers: list[nn.Module] = []
        kept: np.ndarray | None = None
        width = 0
        for i, m in enumerate(model):
            if isinstance(m, DENSE):
                n_in, n_out = (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels, m.out_channels)
                cols = _spread(kept, width, n_in)
                f = flags.get(f"{i}.weight")
                out = None if f is None else np.flatnonzero(f)
                self.index[f"{i}.weight"] = (out, cols)
                self.index[f"{i}.bias"] = (out, None)
                layers.append(_resized(m, n_in if cols is None else cols.size, n_out if out is None else out.size))
                kept, width = out, n_out
            elif isinstance(m, _NORM):
                kept = _spread(kept, width, m.num_features)
                width = m.num_features
                for key in m.state_dict():
                    self.index[f"{i}.{key}"] = (kept, None)
                layers.append(_resized(m, 0, width if kept is None else kept.size))
            else:
                layers.append(copy.deepcopy(m))
        device = next(model.parameters()).device
        self.model = nn.Sequential(*layers).to_empty(device=device)
        full_state = model.state_dict()
        self.model.load_state_dict({k: self._take_state(k, v) for k, v in full_state.items()})
        state = self.model.state_dict()
        self.spec = replace(spec, shapes=tuple(tuple(state[n].shape) for n in spec.names))

    def _take_state(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The kept part of one entry of the full model's state_dict, as a new tensor."""
        r, c = self.index.get(name, (None, None))
        index = (None if r is None else torch.from_numpy(r).to(t.device),
                 None if c is None else torch.from_numpy(c).to(t.device))
        return _take(t, index).clone()

    def to_compact(self, weights: Sequence[np.ndarray]) -> Weights:
        """The compact model's tensors cut out of full-size exchanged tensors."""
        return [np.ascontiguousarray(_take(w, self.index.get(n, (None, None))), dtype=np.float32)
                for n, w in zip(self.full_spec.names, weights)]

    def to_full(self, weights: Sequence[np.ndarray]) -> Weights:
        """Compact tensors scattered into full-size ones, zero wherever a dropped filter was."""
        out = []
        for n, w, shape in zip(self.full_spec.names, weights, self.full_spec.shapes):
            full = np.zeros(shape, dtype=np.float32)
            r, c = self.index.get(n, (None, None))
            if full.ndim == 0 or (r is None and c is None):
                full[...] = w
            elif c is None:
                full[r] = w
            elif r is None:
                full[:, c] = w
            else:
                full[r[:, None], c[None, :]] = w
            out.append(full)
        return out

    def clear(self, weights: Sequence[np.ndarray]) -> Weights:
        """Full-size weights with everything a dropped filter owns set to zero: the shrunk model's function."""
        return self.to_full(self.to_compact(weights))


def shrink(model: nn.Module, spec: ParamSpec, mask: Sequence[np.ndarray]) -> CompactModel:
    """The physically smaller model that a filter mask on `model` leaves, holding the model's current weights."""
    return CompactModel(model, spec, mask)
