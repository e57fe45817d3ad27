"""Tests of the model zoo: sizes, shapes, the registry and all-or-nothing weight loading."""

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mpfl.errors import ConfigError, ModelError
from mpfl.models import available_models, build_model, count_parameters, load_init, register_model
from mpfl.registry import UnknownNameError

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)
SHAPES = {"mlp": [MNIST, CIFAR], "cnn": [MNIST, CIFAR], "lenet5": [MNIST, CIFAR], "vgg11": [CIFAR], "resnet18": [CIFAR]}


def test_mlp_parameter_count_matches_mcmahan_2nn():
    expected = (784 * 200 + 200) + (200 * 200 + 200) + (200 * 10 + 10)
    assert expected == 199_210
    assert count_parameters(build_model("mlp", MNIST, 10)) == expected


def test_cnn_parameter_count_matches_mcmahan_cnn():
    conv1 = 1 * 32 * 5 * 5 + 32
    conv2 = 32 * 64 * 5 * 5 + 64
    fc1 = (64 * 7 * 7) * 512 + 512
    fc2 = 512 * 10 + 10
    assert conv1 + conv2 + fc1 + fc2 == 1_663_370
    assert count_parameters(build_model("cnn", MNIST, 10)) == conv1 + conv2 + fc1 + fc2


def test_lenet5_parameter_count_is_the_same_for_28_and_32_inputs():
    def lenet(c):
        return (c * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (16 * 5 * 5 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)

    assert count_parameters(build_model("lenet5", MNIST, 10)) == lenet(1)
    assert count_parameters(build_model("lenet5", CIFAR, 10)) == lenet(3)


def test_vgg11_parameter_count():
    def conv_bn(cin, cout):
        return cin * cout * 3 * 3 + cout + 2 * cout

    convs = (conv_bn(3, 64) + conv_bn(64, 128) + conv_bn(128, 256) + conv_bn(256, 256)
             + conv_bn(256, 512) + 3 * conv_bn(512, 512))
    assert count_parameters(build_model("vgg11", CIFAR, 10)) == convs + 512 * 10 + 10


def test_resnet18_parameter_count():
    def bn(c):
        return 2 * c

    def block(cin, cout):
        body = cin * cout * 9 + bn(cout) + cout * cout * 9 + bn(cout)
        shortcut = cin * cout + bn(cout) if cin != cout else 0
        return body + shortcut

    stem = 3 * 64 * 9 + bn(64)
    stages = sum(block(cin, cout) + block(cout, cout) for cin, cout in [(64, 64), (64, 128), (128, 256), (256, 512)])
    expected = stem + stages + 512 * 10 + 10
    assert expected == 11_173_962
    assert count_parameters(build_model("resnet18", CIFAR, 10)) == expected


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name,shape", [(n, s) for n, shapes in SHAPES.items() for s in shapes])
def test_forward_output_shape(name, shape, num_classes):
    model = build_model(name, shape, num_classes).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


def test_resnet18_accepts_small_inputs_and_other_channel_counts():
    out = build_model("resnet18", (5, 8, 8), 7).eval()(torch.randn(2, 5, 8, 8))
    assert out.shape == (2, 7)


@settings(max_examples=25, deadline=None)
@given(c=st.integers(1, 4), h=st.integers(4, 40), w=st.integers(4, 40), k=st.integers(1, 20))
def test_mlp_and_cnn_sizes_follow_the_input_shape(c, h, w, k):
    mlp = (c * h * w * 200 + 200) + (200 * 200 + 200) + (200 * k + k)
    cnn = (c * 32 * 25 + 32) + (32 * 64 * 25 + 64) + (64 * (h // 4) * (w // 4) * 512 + 512) + (512 * k + k)
    assert count_parameters(build_model("mlp", (c, h, w), k)) == mlp
    assert count_parameters(build_model("cnn", (c, h, w), k)) == cnn


def test_flat_models_are_one_sequential_in_data_flow_order():
    for name in ["mlp", "cnn", "lenet5"]:
        model = build_model(name, MNIST, 10)
        assert isinstance(model, nn.Sequential)
        weighted = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
        for a, b in zip(weighted, weighted[1:]):
            out = a.out_features if isinstance(a, nn.Linear) else a.out_channels
            inp = b.in_features if isinstance(b, nn.Linear) else b.in_channels
            assert inp % out == 0, f"{name}: {b} does not consume the output of {a}"
    for name in SHAPES:
        model = build_model(name, CIFAR, 10)
        assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_names_are_case_insensitive_and_listed():
    assert set(available_models()) >= {"mlp", "cnn", "lenet5", "vgg11", "resnet18"}
    assert available_models() == sorted(available_models())
    assert count_parameters(build_model(" MLP", MNIST, 10)) == count_parameters(build_model("mlp", MNIST, 10))


def test_unknown_name_lists_available_models():
    with pytest.raises(UnknownNameError, match="unknown model 'alexnet'") as err:
        build_model("alexnet", CIFAR, 10)
    for name in ["mlp", "cnn", "lenet5", "vgg11", "resnet18"]:
        assert name in str(err.value)


def test_vgg11_refuses_28x28_input():
    with pytest.raises(ModelError, match="32x32"):
        build_model("vgg11", MNIST, 10)


@pytest.mark.parametrize("shape,classes", [((28, 28), 10), ((1, 0, 28), 10), ((1, 28.0, 28), 10), (MNIST, 0)])
def test_bad_shape_or_class_count_is_refused(shape, classes):
    with pytest.raises(ModelError, match="input_shape|num_classes"):
        build_model("mlp", shape, classes)


def test_register_model_adds_a_usable_model():
    def tiny(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes))

    register_model("Tiny_Test_Model", tiny)
    assert "tiny_test_model" in available_models()
    model = build_model("tiny_test_model", MNIST, 3)
    assert count_parameters(model) == 784 * 3 + 3
    assert model(torch.zeros(2, *MNIST)).shape == (2, 3)
    with pytest.raises(ConfigError, match="already registered"):
        register_model("TINY_test_model", tiny)
    with pytest.raises(ConfigError, match="already registered"):
        register_model("mlp", tiny)


def test_a_registered_model_with_the_wrong_outputs_is_refused_when_built():
    def seven(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], 7))

    def flat_only(input_shape, num_classes):
        return nn.Linear(784, num_classes)  # forgets to flatten (C, H, W) inputs

    register_model("seven_outputs_test_model", seven)
    register_model("flat_only_test_model", flat_only)
    with pytest.raises(ModelError, match=r"returns \(2, 7\) for a batch of 2 inputs, but the run needs \(2, 10\)"):
        build_model("seven_outputs_test_model", MNIST, 10)
    assert build_model("seven_outputs_test_model", MNIST, 7).training  # fits a 7-class dataset, left in train mode
    with pytest.raises(ModelError, match=r"fails on a batch of inputs of shape \(2, 1, 28, 28\): RuntimeError"):
        build_model("flat_only_test_model", MNIST, 10)


def test_same_seed_gives_identical_models():
    for name in ["mlp", "resnet18"]:
        torch.manual_seed(0)
        a = build_model(name, CIFAR, 10).state_dict()
        torch.manual_seed(0)
        b = build_model(name, CIFAR, 10).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(1)
    c = build_model("mlp", CIFAR, 10).state_dict()
    torch.manual_seed(0)
    d = build_model("mlp", CIFAR, 10).state_dict()
    assert not torch.equal(c["1.weight"], d["1.weight"])


# load_init


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"state_dict": sd}, lambda sd: {"model": sd, "epoch": 3}])
def test_load_init_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    source = build_model("lenet5", MNIST, 10)
    torch.save(wrap(source.state_dict()), tmp_path / "init.pt")
    torch.manual_seed(1)
    target = build_model("lenet5", MNIST, 10)
    assert not torch.equal(target[0].weight, source[0].weight)
    load_init(target, str(tmp_path / "init.pt"))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())


def test_load_init_round_trip_with_batchnorm_buffers(tmp_path):
    source = build_model("vgg11", CIFAR, 10)
    source[1].running_mean.fill_(0.5)
    source[1].num_batches_tracked.fill_(7)
    torch.save(source.state_dict(), tmp_path / "init.pt")
    target = build_model("vgg11", CIFAR, 10)
    load_init(target, tmp_path / "init.pt")
    assert torch.equal(target[1].running_mean, torch.full((64,), 0.5))
    assert target[1].num_batches_tracked.item() == 7


def mlp_file(tmp_path, edit):
    """Save a state dict of a fresh mlp after `edit` changed it; return (target model, its snapshot, path)."""
    state = build_model("mlp", MNIST, 10).state_dict()
    edit(state)
    path = tmp_path / "init.pt"
    torch.save(state, path)
    target = build_model("mlp", MNIST, 10)
    return target, snapshot(target), path


def test_load_init_missing_file(tmp_path):
    model = build_model("mlp", MNIST, 10)
    before = snapshot(model)
    with pytest.raises(ModelError, match="does not exist"):
        load_init(model, tmp_path / "nope.pt")
    assert_unchanged(model, before)


@pytest.mark.parametrize("obj,kind", [([1, 2, 3], "list"), (42, "int")])
def test_load_init_refuses_objects_that_are_not_state_dicts(tmp_path, obj, kind):
    torch.save(obj, tmp_path / "init.pt")
    model = build_model("mlp", MNIST, 10)
    before = snapshot(model)
    with pytest.raises(ModelError, match=f"holds a {kind}, not a state dict"):
        load_init(model, tmp_path / "init.pt")
    assert_unchanged(model, before)


def test_load_init_refuses_dict_with_non_tensor_values(tmp_path):
    torch.save({"1.weight": [1.0, 2.0], "epoch": 3}, tmp_path / "init.pt")
    with pytest.raises(ModelError, match="1.weight, epoch are not name -> tensor"):
        load_init(build_model("mlp", MNIST, 10), tmp_path / "init.pt")


def test_load_init_refuses_garbage_bytes(tmp_path):
    (tmp_path / "init.pt").write_bytes(b"this is not a torch file")
    model = build_model("mlp", MNIST, 10)
    before = snapshot(model)
    with pytest.raises(ModelError, match="cannot load .* as plain torch weights: not a readable torch file"):
        load_init(model, tmp_path / "init.pt")
    assert_unchanged(model, before)


CALLS = []


def record_call(*args):
    CALLS.append(args)
    return args


class Payload:
    """Pickles into a call of record_call, standing in for code smuggled into a weight file."""

    def __reduce__(self):
        return (record_call, ("ran",))


def test_load_init_refuses_pickled_code(tmp_path):
    torch.save({"1.weight": Payload()}, tmp_path / "evil.pt")
    assert pickle.loads(pickle.dumps(Payload())) == ("ran",) and CALLS == [("ran",)]
    CALLS.clear()
    model = build_model("mlp", MNIST, 10)
    before = snapshot(model)
    with pytest.raises(ModelError, match="evil.pt as plain torch weights: it holds pickled Python objects"):
        load_init(model, tmp_path / "evil.pt")
    assert CALLS == []
    assert_unchanged(model, before)


def test_load_init_wrong_shape_names_layer_and_both_shapes(tmp_path):
    def edit(state):
        state["3.weight"] = torch.zeros(100, 200)
        state["3.bias"] = torch.zeros(100)
        state["1.weight"] = torch.full_like(state["1.weight"], 0.25)

    model, before, path = mlp_file(tmp_path, edit)
    with pytest.raises(ModelError) as err:
        load_init(model, path)
    msg = str(err.value)
    assert "3.weight: shape (100, 200) in the file vs (200, 200) in the model" in msg
    assert "3.bias: shape (100,) in the file vs (200,) in the model" in msg
    assert_unchanged(model, before)


def test_load_init_missing_key(tmp_path):
    model, before, path = mlp_file(tmp_path, lambda s: s.pop("5.bias"))
    with pytest.raises(ModelError, match=r"missing keys \(in the model, not in the file\): 5.bias"):
        load_init(model, path)
    assert_unchanged(model, before)


def test_load_init_unexpected_key(tmp_path):
    def edit(state):
        state["1.weight"].fill_(1.0)
        state["extra.weight"] = torch.ones(3)

    model, before, path = mlp_file(tmp_path, edit)
    with pytest.raises(ModelError, match=r"unexpected keys \(in the file, not in the model\): extra.weight"):
        load_init(model, path)
    assert_unchanged(model, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_init_non_finite_value(tmp_path, bad):
    def edit(state):
        state["1.weight"].fill_(1.0)
        state["3.bias"][5] = bad

    model, before, path = mlp_file(tmp_path, edit)
    with pytest.raises(ModelError, match="fits the model but holds NaN or Inf values in 3.bias; save weights"):
        load_init(model, path)
    assert_unchanged(model, before)


def test_load_init_integer_tensor_where_float_expected(tmp_path):
    def edit(state):
        state["5.bias"] = torch.arange(10)

    model, before, path = mlp_file(tmp_path, edit)
    with pytest.raises(ModelError, match=r"5.bias: dtype torch.int64 in the file, the model needs floating point"):
        load_init(model, path)
    assert_unchanged(model, before)


def test_load_init_lists_many_missing_keys_briefly(tmp_path):
    torch.save(build_model("mlp", CIFAR, 10).state_dict(), tmp_path / "init.pt")
    model = build_model("resnet18", CIFAR, 10)
    before = snapshot(model)
    with pytest.raises(ModelError, match=r"\.\.\. and \d+ more") as err:
        load_init(model, tmp_path / "init.pt")
    assert "same name, input shape and number of classes" in str(err.value)
    assert_unchanged(model, before)
