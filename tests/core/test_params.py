"""Masking weights: the fast float32 path against `np.where`, bit for bit; which tensors are running statistics."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from mpfl.core.params import masked, param_spec
from mpfl.models import build_model

SPECIAL = st.sampled_from([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, -3.5, 2.0])


@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from([np.float32, np.float64]), st.tuples(st.integers(1, 6), st.integers(1, 7)))
def test_masked_equals_np_where_bit_for_bit(data, dtype, shape):
    weights = data.draw(arrays(dtype, shape, elements=st.one_of(SPECIAL, st.floats(-1e6, 1e6, width=32))))
    mask = data.draw(arrays(bool, shape))
    got = masked(weights, mask)
    expected = np.where(mask, weights, np.float32(0))
    assert got.dtype == expected.dtype and got.shape == shape
    assert got.tobytes() == expected.tobytes()  # -0.0 and NaN payloads included


def test_masked_takes_a_transposed_view_and_leaves_the_input_alone():
    weights = np.arange(-6, 6, dtype=np.float32).reshape(3, 4).T
    mask = np.arange(12).reshape(4, 3) % 2 == 0
    before = weights.copy()
    np.testing.assert_array_equal(masked(weights, mask), np.where(mask, weights, 0))
    np.testing.assert_array_equal(weights, before)


def test_running_statistics_are_the_batchnorm_buffers_and_nothing_else():
    model = build_model("resnet18", (3, 32, 32), 10)
    spec = param_spec(model)
    statistics = {spec.names[i] for i in spec.statistics}
    batchnorms = [name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]
    assert statistics == {f"{name}.{kind}" for name in batchnorms for kind in ("running_mean", "running_var")}
    assert not param_spec(build_model("mlp", (1, 28, 28), 10)).statistics


def test_the_shared_full_mask_is_one_read_only_copy_and_the_plain_one_is_the_callers_to_edit():
    spec = param_spec(build_model("mlp", (1, 28, 28), 10))
    first, again = spec.full_mask(shared=True), spec.full_mask(shared=True)
    assert [a is b for a, b in zip(first, again)] == [True] * len(spec.prunable)
    assert all(a.all() and a.shape == s and not a.flags.writeable for a, s in zip(first, spec.prunable_shapes))
    mine = spec.full_mask()
    mine[0][0, 0] = False
    assert spec.full_mask()[0].all() and spec.full_mask(shared=True)[0].all()
    supports = spec.supports(mine)
    assert supports[spec.prunable[0]] is mine[0]
    assert all(s.all() and s.shape == spec.shapes[i] for i, s in enumerate(supports) if i not in spec.prunable)
