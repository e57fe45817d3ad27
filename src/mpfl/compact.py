"""Structured shrinking of flat sequential models, analytic FLOPs, and training on the shrunk model.

A filter mask keeps or drops whole output filters / neurons. Shrinking removes a dropped filter
for good: its weight row, its bias, its BatchNorm entries and the input channels (or flattened
features) of the next Conv/Linear layer that read it. The shrunk model therefore computes exactly
what the full-size model computes with all of those entries set to zero (`CompactModel.clear`).
The masked full-size model zeroes only the weight row and keeps the bias, so both agree once the
biases of dropped filters are zero; `CompactTrainer` returns weights in that cleared form.

Training the shrunk model gives the weights `LocalTrainer` gives from the cleared full-size
weights: there every entry a dropped filter owns is zero, its activation is zero and so is
every gradient reaching it, and SGD (with momentum and weight decay) and Adam update each entry
on its own, so those entries stay zero and the others follow the same updates.

FLOPs count one multiply-accumulate of a Linear or Conv layer as 2 FLOPs; biases, activations,
pooling and normalisation are not counted.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .core.masks import rows
from .core.params import ParamSpec, Weights, set_weights
from .core.training import LocalData, LocalTrainer
from .errors import ModelError

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_DENSE = (nn.Linear, *_CONV)
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
        if not isinstance(m, (*_DENSE, *_NORM, nn.Flatten, *_CHANNELWISE)):
            return f"layer {i} ({type(m).__name__}) is not a Linear, Conv, BatchNorm, Flatten, activation or pooling layer"
    return None


def compactable(model: nn.Module) -> bool:
    """Whether filter masks on `model` can be trained and exported as a physically smaller model."""
    return unsupported(model) is None


def filter_flags(spec: ParamSpec, mask: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The kept output filters of each prunable tensor; the mask must keep or drop whole rows."""
    out = {}
    for name, m in zip(spec.prunable_names, mask):
        r = rows(np.asarray(m, dtype=bool))
        flags = r.any(axis=1)
        if not (r == flags[:, None]).all():
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
            if isinstance(m, _DENSE):
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
        self.model = nn.Sequential(*layers).to_empty(device="cpu")
        full_state = model.state_dict()
        self.model.load_state_dict({k: self._take_state(k, v) for k, v in full_state.items()})
        state = self.model.state_dict()
        self.spec = ParamSpec(spec.names, tuple(tuple(state[n].shape) for n in spec.names), spec.prunable)

    def _take_state(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The kept part of one entry of the full model's state_dict, as a new tensor."""
        r, c = self.index.get(name, (None, None))
        index = (None if r is None else torch.from_numpy(r), None if c is None else torch.from_numpy(c))
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


class CompactTrainer(LocalTrainer):
    """A LocalTrainer that trains the shrunk model whenever the mask drops whole filters, for fewer FLOPs and less memory."""

    def __init__(self, model: nn.Module, spec: ParamSpec, **options) -> None:
        super().__init__(model, spec, **options)
        self._cached: tuple[bytes, CompactModel, LocalTrainer] | None = None

    def compact(self, mask: Sequence[np.ndarray]) -> tuple[CompactModel, LocalTrainer]:
        """The shrunk model for `mask` and a trainer on it, reused while the mask stays the same."""
        key = b"".join(np.packbits(np.asarray(m, dtype=bool)).tobytes() for m in mask)
        if self._cached is None or self._cached[0] != key:
            small = shrink(self.model, self.spec, mask)
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


# --------------------------------------------------------------------------- costs


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
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _DENSE)}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: outputs.__setitem__(name, tuple(out.shape)))
             for name, m in layers.items()]
    training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, *input_shape))
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
