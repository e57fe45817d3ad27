"""FedAvg aggregation against a hand-computed weighted average."""

import numpy as np
import pytest

from mpfl.core.aggregate import normalise, weighted_average


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
