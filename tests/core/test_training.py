"""Local training keeps pruned weights exactly zero; SNIP scores equal |w * dL/dw|; evaluation is exact."""

import numpy as np
import pytest
import torch
from torch import nn

from mpfl.core.params import get_weights, param_spec, set_weights
from mpfl.core.training import LocalData, LocalTrainer, evaluate, generator


def tiny_cnn() -> nn.Sequential:
    """The cnn's layer layout (conv, pool, conv, pool, two Linear layers) at a fraction of its width."""
    return nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10))


@pytest.fixture(scope="module")
def setup(mnist):
    data = mnist.take(600, 200)
    torch.manual_seed(0)
    model = tiny_cnn()
    spec = param_spec(model)
    local = LocalData(data.x_train, data.y_train, torch.arange(300), torch.arange(0))
    return data, model, spec, local, get_weights(model, spec)


def _random_mask(spec, density, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random(s) < density for s in spec.prunable_shapes]


@pytest.mark.parametrize("opt", [dict(optimizer="sgd", momentum=0.9, weight_decay=1e-3),
                                 dict(optimizer="adam", weight_decay=1e-4)])
def test_pruned_weights_stay_exactly_zero(setup, opt):
    data, model, spec, local, w0 = setup
    mask = _random_mask(spec, 0.2)
    trainer = LocalTrainer(model, spec, lr=0.01, batch_size=64, **opt)
    trained, loss = trainer.train(spec.apply(w0, mask), mask, local, 1, generator(0, 1, 2))
    for w, m in zip(spec.pick(trained), mask):
        assert (w[~m] == 0).all()
        assert (w[m] != 0).mean() > 0.99
    assert np.isfinite(loss)


def test_training_is_deterministic_for_a_generator_key_and_lowers_the_loss(setup):
    data, model, spec, local, w0 = setup
    trainer = LocalTrainer(model, spec, lr=0.05, batch_size=32)
    a, _ = trainer.train(w0, None, local, 1, generator(5, 1, 0))
    b, _ = trainer.train(w0, None, local, 1, generator(5, 1, 0))
    c, _ = trainer.train(w0, None, local, 1, generator(5, 1, 1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    x, y = data.x_train[:300], data.y_train[:300]
    assert evaluate(model, spec, a, x, y)[1] < evaluate(model, spec, w0, x, y)[1]


def test_saliency_equals_w_times_gradient(setup):
    data, model, spec, local, w0 = setup
    trainer = LocalTrainer(model, spec, batch_size=50)
    scores = trainer.saliency(w0, None, local, 2, generator(1))
    order = local.train[torch.randperm(300, generator=generator(1))]
    ref = tiny_cnn()
    set_weights(ref, spec, w0)
    for b in range(2):
        idx = order[b * 50 : (b + 1) * 50]
        torch.nn.functional.cross_entropy(ref(data.x_train[idx]), data.y_train[idx]).backward()
    params = dict(ref.named_parameters())
    for name, s in zip(spec.prunable_names, scores):
        p = params[name]
        np.testing.assert_allclose(s, (p * p.grad).abs().detach().numpy(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("opt", [dict(optimizer="sgd"), dict(optimizer="sgd", momentum=0.9),
                                 dict(optimizer="sgd", weight_decay=1e-3), dict(optimizer="adam", weight_decay=1e-4)])
def test_local_training_is_the_textbook_loop_with_the_mask_held_fixed(setup, opt):
    """Bit for bit: a fresh torch optimizer over the node's samples, reshuffled every epoch by the
    round's generator, with the gradients of the pruned entries zeroed before every step."""
    data, model, spec, local, w0 = setup
    mask, settings = _random_mask(spec, 0.3, seed=1), {k: v for k, v in opt.items() if k != "optimizer"}
    start = spec.apply(w0, mask)
    trained, loss = LocalTrainer(model, spec, lr=0.01, batch_size=64, **opt).train(start, mask, local, 2,
                                                                                 generator(3, 1, 0))
    ref = tiny_cnn()
    set_weights(ref, spec, start)
    optimizer = (torch.optim.Adam if opt["optimizer"] == "adam" else torch.optim.SGD)(ref.parameters(), lr=0.01,
                                                                                       **settings)
    params, gen, losses = dict(ref.named_parameters()), generator(3, 1, 0), []
    for _ in range(2):
        order = local.train[torch.randperm(300, generator=gen)]
        for b in range(0, 300, 64):
            idx = order[b : b + 64]
            optimizer.zero_grad()
            step_loss = torch.nn.functional.cross_entropy(ref(data.x_train[idx]), data.y_train[idx])
            step_loss.backward()
            for name, m in zip(spec.prunable_names, mask):
                params[name].grad *= torch.from_numpy(m)
            optimizer.step()
            losses.append(step_loss.item())
    assert [t.tobytes() for t in trained] == [w.tobytes() for w in get_weights(ref, spec)]
    assert loss == pytest.approx(np.mean(losses), rel=1e-6)


def test_evaluate_counts_correct_predictions(setup):
    data, model, spec, _, w0 = setup
    x, y = data.x_test, data.y_test
    acc, loss = evaluate(model, spec, w0, x, y, batch_size=64)
    with torch.no_grad():
        out = model.eval()(x)
    assert acc == pytest.approx((out.argmax(1) == y).float().mean().item())
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(out, y).item(), rel=1e-5)
    right = int(out[0].argmax() == y[0])  # one sample: right or wrong, its own loss
    one = evaluate(model, spec, w0, x[:1], y[:1])
    assert one[0] == right and one[1] == pytest.approx(torch.nn.functional.cross_entropy(out[:1], y[:1]).item(), rel=1e-5)
    assert evaluate(model, spec, w0, x[:0], y[:0]) == (0.0, 0.0)  # no samples: nothing to count, not a division by 0


def test_param_spec_marks_linear_and_conv_weights_prunable(setup):
    _, model, spec, _, _ = setup
    assert spec.prunable_names == ["0.weight", "3.weight", "7.weight", "9.weight"]
    assert set(spec.names) - set(spec.prunable_names) == {"0.bias", "3.bias", "7.bias", "9.bias"}
    structured = param_spec(model, structured=True)
    assert structured.prunable_names == ["0.weight", "3.weight", "7.weight"]  # never the class rows
    excluded = param_spec(model, exclude=["0.*", "9.weight"])
    assert excluded.prunable_names == ["3.weight", "7.weight"]
