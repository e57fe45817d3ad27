"""FedAvg aggregation against a hand-computed weighted average; aggregators held to their contract."""

import numpy as np
import pytest

from mpfl.core.aggregate import (
    checked_aggregate,
    holder_average,
    holder_robust_average,
    normalise,
    register_aggregator,
    robust_average,
    weighted_average,
)
from mpfl.errors import ConfigError, MethodError


def test_weighted_average_by_hand():
    a = [np.array([1.0, 2.0], np.float32), np.array([[0.0]], np.float32)]
    b = [np.array([3.0, 6.0], np.float32), np.array([[4.0]], np.float32)]
    out = weighted_average([a, b], [1, 3])
    assert out[0].tolist() == pytest.approx([0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6])
    assert out[1][0, 0] == pytest.approx(3.0)
    assert all(o.dtype == np.float32 for o in out)


def test_zero_entries_stay_exactly_zero():
    a = [np.array([0.0, 1.5], np.float32)]
    b = [np.array([0.0, -2.5], np.float32)]
    assert weighted_average([a, b], [7, 11])[0][0] == 0.0


def test_bad_weights_are_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        normalise([1, -1])
    with pytest.raises(ValueError):
        normalise([])
    with pytest.raises(ValueError, match="positive sum"):
        normalise([0, 0])


LIKE = [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)]


@pytest.mark.parametrize(("out", "says"), [
    (LIKE[:1], "it holds 1 items"),
    (np.zeros(3), "it is a ndarray"),
    ([np.zeros((3, 2)), LIKE[1]], "item 0 is a float64 array of shape (3, 2), the tensor's shape is (2, 3)"),
    ([LIKE[0], np.zeros(4, np.int64)], "item 1 is an int64 array, not floats"),
    ([LIKE[0], np.array([0, np.nan, 0, 0], np.float32)], "item 1 holds NaN or infinity"),
    ([np.full((2, 3), -np.inf), LIKE[1]], "item 0 holds NaN or infinity"),
])
def test_an_aggregate_that_breaks_the_contract_is_refused_with_the_rules_name(out, says):
    with pytest.raises(MethodError, match="the aggregator 'mine' must return a list of 2 float arrays") as raised:
        checked_aggregate(out, LIKE, "mine")
    assert says in str(raised.value)


def test_a_float64_aggregate_is_kept_as_float32_and_a_float32_one_as_it_is():
    exact = [np.full((2, 3), 0.1, np.float32), np.arange(4, dtype=np.float32)]
    assert all(a is b for a, b in zip(checked_aggregate(exact, LIKE, "mine"), exact))
    wide = checked_aggregate([np.full((2, 3), 0.1), np.arange(4.0)], LIKE, "mine")
    assert [a.dtype for a in wide] == [np.float32, np.float32]
    assert wide[0][0, 0] == np.float32(0.1) and wide[1].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_a_registered_aggregator_runs_by_name_and_one_with_the_wrong_parameters_is_refused():
    def clipped_mean(tensors, weights, *, trim, byzantine):
        share = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        return [sum(a * np.clip(node[i], -1, 1) for a, node in zip(share, tensors)) for i in range(len(tensors[0]))]

    register_aggregator("clipped-mean-test", clipped_mean)
    nodes = [[np.array([3.0, -0.5], np.float32)], [np.array([0.5, -4.0], np.float32)]]
    out = robust_average(nodes, [1, 3], "clipped-mean-test")
    assert out[0].tolist() == pytest.approx([0.25 * 1 + 0.75 * 0.5, 0.25 * -0.5 + 0.75 * -1])
    with pytest.raises(ConfigError, match=r"aggregator 'short-test'.*cannot be called as rule\(tensors, weights"):
        register_aggregator("short-test", lambda tensors: tensors[0])


def test_a_robust_average_of_held_values_fills_what_a_node_does_not_hold_with_the_fallback():
    """Hand-worked: three nodes' values over their own masks, the median of the filled-in tensors."""
    holds = [[np.array([True, True, True, False])], [np.array([True, True, False, False])],
             [np.array([True, False, False, True])]]
    kept = [[np.array([1.0, 2.0, 3.0], dtype=np.float32)], [np.array([1.5, 100.0], dtype=np.float32)],
            [np.array([2.0, 7.0], dtype=np.float32)]]
    fallback = [np.full(4, 0.5, dtype=np.float32)]
    keep = [np.array([True, True, True, False])]
    # filled in: [1, 2, 3, .5], [1.5, 100, .5, .5], [2, .5, .5, 7]; medians [1.5, 2, .5, .5]; entry 3 not kept
    got = holder_robust_average(kept, holds, [1.0, 1.0, 1.0], keep, fallback, "median")
    np.testing.assert_array_equal(got[0], np.array([1.5, 2.0, 0.5, 0.0], dtype=np.float32))
    assert holder_average(kept, holds, [1.0, 1.0, 1.0], keep, fallback)[0][1] == np.float32(51.0)  # its holders: (2 + 100) / 2
