"""The simulator's speed and memory measures change no result: worker processes, shared decoded
bodies, chunked batches, gradient-only masking and the plain SGD step give bit-for-bit the same
masks and weights; channels-last evaluation gives the same accuracy."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import BENCHMARKS, assert_same_run, benchmark_module, bits, tiny_config
from mpfl import codec
from mpfl.checkpoint import CHECKPOINT
from mpfl.config import Config
from mpfl.core import training
from mpfl.core.params import get_weights, param_spec
from mpfl.core.training import LocalData, LocalTrainer, batches, evaluate, generator
from mpfl.experiment import Experiment
from mpfl.models import build_model
from mpfl.node import build_nodes
from mpfl.server import Server
from mpfl.sim import FaultyTransport, simulate


def test_worker_processes_give_the_sequential_run_bit_for_bit(tmp_path):
    cfg = tiny_config(nodes=4, train_samples=800, test_samples=100, rewind="none", train_init="local", malicious=1,
                      attack="shuffle", dropout=0.2, min_nodes=2)
    sequential = simulate(cfg)
    parallel = simulate(cfg.with_overrides({"workers": 2}), tmp_path / "run", keep_checkpoint=True)
    assert_same_run(sequential, parallel)
    assert (tmp_path / "run" / CHECKPOINT).is_file()


def run_server(cfg, share):
    exp = Experiment.from_config(cfg)
    nodes = build_nodes(cfg, exp, range(cfg.nodes), {}, share=share)
    server = Server(cfg, exp.spec, exp.w0, FaultyTransport(nodes, cfg.faults, cfg.seed), evaluate=exp.evaluate)
    server.run()
    return server.state, nodes


@pytest.mark.parametrize("method", ["mpfl", "topk"])
def test_nodes_sharing_decoded_bodies_hold_one_copy_and_get_the_same_results(method, monkeypatch):
    cfg = tiny_config(method=method, rounds=1, train_samples=600, test_samples=100)
    hashed = []
    digest = codec.weights_digest
    monkeypatch.setattr(codec, "weights_digest", lambda weights: hashed.append(weights) or digest(weights))
    shared, shared_nodes = run_server(cfg, share=True)
    hashed_shared, hashed[:] = len(hashed), []
    own, own_nodes = run_server(cfg, share=False)
    # the server hashes w0 once for its reference; nodes sharing one copy hash it once, the others each
    assert (hashed_shared, len(hashed)) == ((2, 1 + cfg.nodes) if method == "mpfl" else (0, 0))
    assert bits(shared.weights) == bits(own.weights)
    for v in shared.history:
        assert bits(shared.history[v]) == bits(own.history[v])
    if method == "mpfl":
        # seeded initial weights are never decoded: every node holds the one copy its process built
        for nodes in (shared_nodes, own_nodes):
            assert all(n.state.w0[0] is nodes[0].state.w0[0] for n in nodes)
        assert all(n.state.mask[0] is shared_nodes[0].state.mask[0] for n in shared_nodes)
        assert own_nodes[0].state.mask[0] is not own_nodes[1].state.mask[0]


@pytest.mark.parametrize("batch_size, chunk", [(32, 64), (50, 64), (32, 4096)])
def test_chunked_batches_are_the_per_batch_draws(monkeypatch, batch_size, chunk):
    monkeypatch.setattr(training, "CHUNK_SAMPLES", chunk)
    g = torch.Generator().manual_seed(0)
    data = LocalData(torch.randn(500, 1, 4, 4, generator=g), torch.randint(0, 10, (500,), generator=g),
                     torch.arange(3, 403), torch.arange(0))
    order = data.train[torch.randperm(400, generator=generator(1, 2))]
    want = [(data.x[order[s : s + batch_size]], data.y[order[s : s + batch_size]]) for s in range(0, 400, batch_size)]
    got = list(batches(data, batch_size, generator(1, 2)))
    assert len(got) == len(want)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, want))
    assert len(list(batches(data, batch_size, generator(1, 2), limit=3))) == 3


def reference_train(model, spec, weights, mask, data, opt_kwargs, gen):
    """The textbook masked loop: torch.optim, gradients masked before and weights masked after every step."""
    params = dict(model.named_parameters())
    prunable = [params[n] for n in spec.prunable_names]
    masks = [torch.from_numpy(m).float() for m in mask]
    with torch.no_grad():
        for name, w in zip(spec.names, weights):
            params[name].copy_(torch.from_numpy(w))
    kind = opt_kwargs.pop("optimizer", "sgd")
    opt = (torch.optim.Adam if kind == "adam" else torch.optim.SGD)(model.parameters(), **opt_kwargs)
    order = data.train[torch.randperm(data.num_samples, generator=gen)]
    for s in range(0, data.num_samples, 32):
        idx = order[s : s + 32]
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
        torch._foreach_mul_([p.grad for p in prunable], masks)
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(prunable, masks)
    return [params[n].detach().numpy().copy() for n in spec.names]


@pytest.mark.parametrize("opt", [dict(lr=0.05), dict(lr=0.05, momentum=0.9, weight_decay=1e-3),
                                 dict(optimizer="adam", lr=1e-3, weight_decay=1e-4)])
def test_gradient_only_masking_and_plain_sgd_give_the_textbook_loops_weights(mnist, opt):
    torch.manual_seed(0)
    model = build_model("mlp", mnist.input_shape, 10)
    spec = param_spec(model)
    w0 = get_weights(model, spec)
    rng = np.random.default_rng(0)
    mask = [rng.random(s) < 0.3 for s in spec.prunable_shapes]
    data = LocalData(mnist.x_train, mnist.y_train, torch.arange(320), torch.arange(0))
    start = spec.apply(w0, mask)
    want = reference_train(model, spec, start, mask, data, dict(opt), generator(3))
    got, _ = LocalTrainer(model, spec, batch_size=32, **opt).train(start, mask, data, 1, generator(3))
    assert bits(got) == bits(want)


def test_eval_every_and_test_samples_set_what_is_evaluated(mnist):
    every = simulate(tiny_config(method="fedavg", rounds=4, eval_every=2, train_samples=300, test_samples=100))
    assert [r["accuracy"] is not None for r in every.records] == [False, True, False, True]
    end = simulate(tiny_config(method="fedavg", rounds=3, eval_every=0, train_samples=300, test_samples=100))
    assert [r["accuracy"] is not None for r in end.records] == [False, False, True]
    model = build_model("mlp", mnist.input_shape, 10)
    for run in (every, end):  # the first 100 test images, no more and no others
        accuracy, loss = evaluate(model, param_spec(model), run.weights, mnist.x_test[:100], mnist.y_test[:100])
        assert (run.records[-1]["accuracy"], run.records[-1]["loss"]) == pytest.approx((accuracy, loss))


def test_channels_last_evaluation_matches_plain_evaluation_and_restores_the_layout(mnist):
    torch.manual_seed(0)
    model = build_model("cnn", mnist.input_shape, 10)
    spec = param_spec(model)
    w0 = get_weights(model, spec)
    x, y = mnist.x_test[:300], mnist.y_test[:300]
    with torch.inference_mode():
        out = torch.cat([model.eval()(x[s : s + 100]) for s in range(0, 300, 100)])
    accuracy, loss = evaluate(model, spec, w0, x, y)
    assert accuracy == int((out.argmax(1) == y).sum()) / 300
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(out, y).item(), rel=1e-5)
    assert all(p.is_contiguous() and not p.is_inference() for p in model.parameters())


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="the simulation extra is installed")
def test_a_benchmark_part_that_needs_a_missing_extra_says_so_at_once_and_a_run_of_every_part_skips_it(tmp_path,
                                                                                                       capsys):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "speed.py"), "--quick", "--only", "flower"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0 and done.stdout == ""  # refused before any part ran
    assert "needs the 'simulation' extra" in done.stderr and "--only overhead --only memory" in done.stderr
    assert list(tmp_path.iterdir()) == []
    speed = benchmark_module("speed")
    assert speed.chosen_parts(None) == ["overhead", "memory", "device"]
    assert capsys.readouterr().err.startswith("skipped: the flower part (Flower's simulation engine) needs the "
                                              "'simulation' extra")


def test_the_device_part_of_speed_py_reports_rounds_and_samples_per_second(tmp_path):
    out = tmp_path / "speed.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "speed.py"), "--only", "device", "--quick", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert [r["part"] for r in rows] == ["machine", "device", "machine"]
    row = rows[1]
    assert (row["device"], row["model"], row["dataset"], row["rounds"]) == ("cpu", "mlp", "mnist", 3)
    assert row["rounds_per_s"] == pytest.approx(3 / row["wall_s"])
    # --quick: 12,000 images less the validation share, every node asked in 1 mask + 2 training rounds
    cfg = Config()
    epochs = cfg.prune.mask_epochs + 2 * cfg.train.epochs
    assert row["samples_per_s"] == pytest.approx(epochs * 12_000 * (1 - cfg.data.val_fraction) / row["wall_s"], rel=0.01)
    assert row["nondeterministic_ops"] == 0 and 0.5 < row["final_accuracy"] <= 1
