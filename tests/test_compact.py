"""Structured shrinking: same function as the masked model, hand-counted FLOPs, and training that matches."""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_config
from mpfl.compact import compactable, shrink
from mpfl.core.masks import expand_rows
from mpfl.core.params import get_weights, param_spec, set_weights
from mpfl.core.training import CompactTrainer, LocalData, LocalTrainer, generator
from mpfl.costs import flops, parameter_count
from mpfl.errors import ModelError
from mpfl.models import build_model
from mpfl.node import make_trainer

MNIST = (1, 28, 28)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: small models run fastest that way, and timings do not depend on other load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bn_net(input_shape=MNIST, num_classes=10):
    """A small flat model with BatchNorm after a conv and after a linear layer."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 14 * 14, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes))


def make(name):
    torch.manual_seed(0)
    model = bn_net() if name == "bn" else build_model(name, MNIST, 10)
    return model, param_spec(model, structured=True)


def random_filter_mask(spec, seed, keep=0.5):
    """Each prunable layer keeps a random subset of its filters (at least one)."""
    rng = np.random.default_rng(seed)
    mask = []
    for shape in spec.prunable_shapes:
        flags = rng.random(shape[0]) < keep
        flags[rng.integers(shape[0])] = True
        mask.append(expand_rows(flags, shape))
    return mask


def noisy(spec, weights, seed):
    """Weights with random biases and BatchNorm statistics, so nothing is trivially zero."""
    rng = np.random.default_rng(seed)
    out = []
    for name, w in zip(spec.names, weights):
        if name.endswith("running_var"):
            out.append(rng.uniform(0.5, 2.0, w.shape).astype(np.float32))
        elif w.ndim == 1:
            out.append(rng.normal(0, 0.5, w.shape).astype(np.float32))
        else:
            out.append(w)
    return out


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_flops_match_a_hand_count_for_mlp_and_cnn():
    mlp, _ = make("mlp")
    cnn, _ = make("cnn")
    lenet, _ = make("lenet5")
    assert flops(mlp, MNIST) == 2 * (784 * 200 + 200 * 200 + 200 * 10)
    assert flops(cnn, MNIST) == 2 * (28 * 28 * 32 * 1 * 5 * 5 + 14 * 14 * 64 * 32 * 5 * 5 + 7 * 7 * 64 * 512 + 512 * 10)
    assert flops(lenet, MNIST) == 2 * (28 * 28 * 6 * 1 * 5 * 5 + 10 * 10 * 16 * 6 * 5 * 5 + 400 * 120 + 120 * 84 + 84 * 10)


def test_nonzero_flops_count_only_kept_weights():
    mlp, spec = make("mlp")
    mask = spec.full_mask()
    mask[0][100:] = False
    set_weights(mlp, spec, spec.apply(get_weights(mlp, spec), mask))
    assert flops(mlp, MNIST, nonzero=True) == 2 * (784 * 100 + 200 * 200 + 200 * 10)


def test_shrunk_cnn_has_the_hand_counted_size_and_flops():
    cnn, spec = make("cnn")
    mask = random_filter_mask(spec, seed=1)
    k1, k2, k3 = (int(m.reshape(m.shape[0], -1)[:, 0].sum()) for m in mask)
    small = shrink(cnn, spec, mask).model
    assert flops(small, MNIST) == 2 * (28 * 28 * k1 * 25 + 14 * 14 * k2 * k1 * 25 + 7 * 7 * k2 * k3 + k3 * 10)
    assert parameter_count(small) == (k1 * 25 + k1) + (k2 * k1 * 25 + k2) + (49 * k2 * k3 + k3) + (k3 * 10 + 10)


@pytest.mark.parametrize("name", ["mlp", "cnn", "lenet5", "bn"])
@pytest.mark.parametrize("seed", [0, 1])
def test_shrinking_keeps_the_function_of_the_cleared_model(name, seed):
    model, spec = make(name)
    mask = random_filter_mask(spec, seed)
    weights = noisy(spec, spec.apply(get_weights(model, spec), mask), seed)
    small = shrink(model, spec, mask)
    set_weights(model, spec, small.clear(weights))
    set_weights(small.model, small.spec, small.to_compact(weights))
    x = torch.randn(8, *MNIST, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(outputs(small.model, x), outputs(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "cnn", "lenet5"])
def test_shrunk_model_equals_the_masked_model_once_dropped_biases_are_zero(name):
    model, spec = make(name)
    mask = random_filter_mask(spec, seed=2)
    weights = noisy(spec, spec.apply(get_weights(model, spec), mask), seed=2)
    for i, m in zip(spec.prunable, mask):
        bias = spec.names.index(spec.names[i].replace("weight", "bias"))
        weights[bias] = np.where(m.reshape(m.shape[0], -1)[:, 0], weights[bias], np.float32(0))
    small = shrink(model, spec, mask)
    set_weights(model, spec, weights)
    set_weights(small.model, small.spec, small.to_compact(weights))
    x = torch.randn(8, *MNIST, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(outputs(small.model, x), outputs(model, x), rtol=1e-5, atol=1e-5)


def test_maps_between_full_and_compact_forms():
    model, spec = make("cnn")
    mask = random_filter_mask(spec, seed=3)
    small = shrink(model, spec, mask)
    weights = get_weights(model, spec)
    compact = small.to_compact(weights)
    assert [c.shape for c in compact] == list(small.spec.shapes)
    cleared = small.clear(weights)
    assert all(np.array_equal(a, b) for a, b in zip(small.clear(cleared), cleared))
    assert all(np.array_equal(a, b) for a, b in zip(small.to_compact(cleared), compact))
    for i, m in zip(spec.prunable, mask):
        assert not cleared[i][~m].any()


def test_non_filter_masks_and_unsupported_models_are_refused():
    model, spec = make("mlp")
    mask = spec.full_mask()
    mask[0][0, 0] = False
    with pytest.raises(ModelError, match="whole filters"):
        shrink(model, spec, mask)
    resnet = build_model("resnet18", (3, 32, 32), 10)
    assert not compactable(resnet)
    with pytest.raises(ModelError, match="BasicBlock"):
        shrink(resnet, param_spec(resnet, structured=True), param_spec(resnet, structured=True).full_mask())


@pytest.mark.parametrize("name, options", [
    ("cnn", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    ("mlp", {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-3}),
    ("bn", {"lr": 0.05, "momentum": 0.5, "weight_decay": 1e-2}),
])
def test_compact_training_gives_the_weights_of_masked_full_size_training(name, options):
    model, spec = make(name)
    mask = random_filter_mask(spec, seed=4)
    weights = noisy(spec, spec.apply(get_weights(model, spec), mask), seed=4)
    g = torch.Generator().manual_seed(5)
    data = LocalData(torch.randn(80, *MNIST, generator=g), torch.randint(0, 10, (80,), generator=g),
                     torch.arange(64), torch.arange(64, 80))
    small = shrink(model, spec, mask)
    full, full_loss = LocalTrainer(model, spec, batch_size=16, **options).train(small.clear(weights), mask, data, 2,
                                                                               generator(7, 1, 0))
    compact, compact_loss = CompactTrainer(model, spec, batch_size=16, **options).train(weights, mask, data, 2,
                                                                                       generator(7, 1, 0))
    assert compact_loss == pytest.approx(full_loss, rel=1e-5)
    for name_, a, b in zip(spec.names, compact, full):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name_)


def test_simulator_trains_filter_masks_shrunk_and_other_masks_full_size():
    model, spec = make("cnn")
    assert isinstance(make_trainer(tiny_config(model="cnn", criterion="filter"), model, spec), CompactTrainer)
    assert type(make_trainer(tiny_config(model="cnn"), model, spec)) is LocalTrainer
    resnet = build_model("resnet18", (3, 32, 32), 10)
    trainer = make_trainer(tiny_config(model="resnet18", criterion="filter"), resnet, param_spec(resnet, structured=True))
    assert type(trainer) is LocalTrainer
