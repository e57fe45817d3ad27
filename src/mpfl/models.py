"""Model zoo: the networks of the federated-learning literature, built by name, and safe loading of initial weights."""

from __future__ import annotations

import math
import operator
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError
from .registry import Registry, registry

Factory = Callable[[tuple[int, int, int], int], nn.Module]


def _need_size(name: str, input_shape: tuple[int, int, int], minimum: int, hint: str) -> None:
    """Refuse inputs too small for the model's pooling stages, before building anything."""
    _, h, w = input_shape
    if h < minimum or w < minimum:
        raise ModelError(f"{name} needs inputs of at least {minimum}x{minimum}, got {h}x{w}; {hint}")


def _mlp(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """McMahan et al. 2017 "2NN": two hidden layers of 200 ReLU units."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 200), nn.ReLU(),
        nn.Linear(200, 200), nn.ReLU(),
        nn.Linear(200, num_classes),
    )


def _cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """McMahan et al. 2017 CNN: two 5x5 conv + max-pool stages, a 512-unit hidden layer."""
    _need_size("cnn", input_shape, 4, "use a larger input or the mlp model")
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (h // 4) * (w // 4), 512), nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def _lenet5(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """LeCun et al. 1998 LeNet-5 with ReLU; 28x28 inputs are padded to 32x32 as in the original."""
    c, h, w = input_shape
    pad = 2 if h == 28 else 0
    if min(h, w) + 2 * pad < 16:
        raise ModelError(f"lenet5 needs inputs of at least 16x16, got {h}x{w}; use a larger input or the mlp model")
    fh, fw = (((s + 2 * pad - 4) // 2 - 4) // 2 for s in (h, w))  # conv5, pool2, conv5, pool2
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * fh * fw, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )


_VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def _vgg11(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Simonyan & Zisserman 2015 VGG-11 with BatchNorm, CIFAR-size: one linear classifier after five poolings."""
    _need_size("vgg11", input_shape, 32, "vgg11 is for 32x32 images such as CIFAR; use cnn or lenet5 for 28x28")
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for v in _VGG11:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            c = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512 * (h // 32) * (w // 32), num_classes))


class BasicBlock(nn.Module):
    """He et al. 2016 residual block: two 3x3 conv + BN, identity or 1x1 conv + BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet18(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """CIFAR ResNet-18: 3x3 stem without max-pool, [2, 2, 2, 2] basic blocks, global average pool."""
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))


MODELS: Registry[Factory] = registry("model")
"""Every buildable model: a factory `factory(input_shape, num_classes) -> nn.Module` per name."""
BUILT_IN = (("mlp", _mlp), ("cnn", _cnn), ("lenet5", _lenet5), ("vgg11", _vgg11), ("resnet18", _resnet18))
for _name, _factory in BUILT_IN:
    MODELS.register(_name, _factory)


def available_models() -> list[str]:
    """Names accepted by build_model, sorted, for help texts and error messages."""
    return sorted(MODELS)


def register_model(name: str, factory: Factory) -> None:
    """Make `factory(input_shape, num_classes)` buildable as `name`, so users can add their own models."""
    if not callable(factory):
        raise ModelError(f"factory for model {name!r} must be callable as factory(input_shape, num_classes)")
    MODELS.register(name, factory)


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build the named model for (C, H, W) inputs and `num_classes` outputs; weights come from torch's global RNG."""
    key = MODELS.canonical(name)
    try:
        shape = tuple(operator.index(d) for d in input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ModelError(f"input_shape must be three positive integers (channels, height, width), got {input_shape!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    model = MODELS.get(key)(shape, num_classes)
    if not isinstance(model, nn.Module):
        got = type(model).__name__
        raise ModelError(f"factory for model {key!r} returned {got}, not a torch.nn.Module; make it return the network")
    if MODELS.get(key) not in dict(BUILT_IN).values():
        _check_outputs(model, key, shape, num_classes)
    return model


def _check_outputs(model: nn.Module, key: str, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """Refuse a registered model whose output for a batch is not (batch, num_classes) logits, before any run
    trains it (the loss would fail later with a message about its targets). The model is left in train mode."""
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *input_shape))
    except Exception as exc:  # the model's own code: any failure means it cannot take these inputs
        raise ModelError(f"model {key!r} fails on a batch of inputs of shape (2, {', '.join(map(str, input_shape))}): "
                         f"{type(exc).__name__}: {exc}; make its forward take (batch, channels, height, width)") from None
    finally:
        model.train()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"model {key!r} returns {got} for a batch of 2 inputs, but the run needs (2, {num_classes}): "
                         f"one logit per class of the dataset; make its last layer output {num_classes} values")


def count_parameters(model: nn.Module) -> int:
    """Number of parameter entries (weights and biases, not buffers such as BN running statistics): the dense size."""
    return sum(p.numel() for p in model.parameters())


def _names(keys: list[str], limit: int = 10) -> str:
    """Comma-separated key names, cut after `limit` so a wrong architecture does not flood the screen."""
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """Load `path` without running arbitrary pickled code and return the state dict inside it."""
    if not path.is_file():
        raise ModelError(f"initial weight file {path} does not exist; check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelError(
            f"cannot load {path} as plain torch weights: it holds pickled Python objects other than tensors, "
            "refused because loading them could run arbitrary code; save it with torch.save(model.state_dict(), path)"
        ) from e
    except Exception as e:
        raise ModelError(
            f"cannot load {path} as plain torch weights: not a readable torch file ({type(e).__name__}: {e}); "
            "save it with torch.save(model.state_dict(), path)"
        ) from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ModelError(
            f"{path} holds a {type(obj).__name__}, not a state dict; "
            "save it with torch.save(model.state_dict(), path)"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(
            f"{path} is not a state dict: entries {_names(bad)} are not name -> tensor; "
            "save it with torch.save(model.state_dict(), path)"
        )
    return obj


def load_init(model: nn.Module, path: str | Path) -> None:
    """Load initial weights from a torch file into `model`, all or nothing, so every node starts from the same point."""
    path = Path(path)
    state = _read_state_dict(path)
    expected = model.state_dict()
    problems: list[str] = []
    nonfinite: list[str] = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing keys (in the model, not in the file): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (in the file, not in the model): {_names(unexpected)}")
    for k, want in expected.items():
        got = state.get(k)
        if got is None:
            continue
        if got.shape != want.shape:
            problems.append(f"{k}: shape {tuple(got.shape)} in the file vs {tuple(want.shape)} in the model")
        elif want.is_floating_point() and not got.is_floating_point():
            problems.append(f"{k}: dtype {got.dtype} in the file, the model needs floating point ({want.dtype})")
        elif got.is_floating_point() and not torch.isfinite(got).all():
            nonfinite.append(k)
    if problems:
        raise ModelError(f"{path} does not fit the model: " + "; ".join(problems)
                         + ". Use weights saved from a model built with the same name, input shape and number of classes")
    if nonfinite:
        raise ModelError(f"{path} fits the model but holds NaN or Inf values in {_names(nonfinite)}; save weights that "
                         "are all finite (those of a run whose training diverged are not)")
    model.load_state_dict(state, strict=True)
