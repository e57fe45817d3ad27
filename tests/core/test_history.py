"""The packed mask history: every version reads back as added, at a bit per entry."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpfl.core.history import MaskHistory, packed

shapes_strategy = st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4)


def random_masks(shapes, versions: int, seed: int) -> dict[int, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {2 * v: [rng.random(shape) < 0.5 for shape in shapes] for v in range(versions)}


@settings(max_examples=60, deadline=None)
@given(shapes=shapes_strategy, versions=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_every_version_reads_back_as_added_at_a_bit_per_entry(shapes, versions, seed):
    masks = random_masks(shapes, versions, seed)
    history = MaskHistory(masks)
    assert list(history) == sorted(masks) and len(history) == versions
    for version, mask in masks.items():
        got = history[version]
        assert [m.shape for m in got] == [m.shape for m in mask] and all(g.dtype == bool for g in got)
        assert all(np.array_equal(g, m) for g, m in zip(got, mask))
    entries = sum(m.size for m in masks[0])
    assert history.nbytes == versions * -(-entries // 8)
    assert 1 not in history and 0 in history


def test_a_row_is_the_tensors_bits_in_order_most_significant_first():
    mask = [np.array([[True, False, True], [False, False, True]]), np.array([True, True, False, False, True])]
    # 101001 then 11001, padded with zeros: 10100111 00100000
    assert packed(mask).tolist() == [0b10100111, 0b00100000]


def test_the_latest_version_is_the_mask_added_and_no_version_can_be_changed_in_place():
    masks = random_masks([(70,), (3, 5)], 3, seed=1)
    history = MaskHistory(masks)
    latest = history[4]
    assert all(a is b for a, b in zip(latest, masks[4]))
    for version in history:
        for array in history[version]:
            with pytest.raises(ValueError, match="read-only"):
                array[0] = ~array[0]
    assert all(np.array_equal(a, b) for v in history for a, b in zip(history[v], masks[v]))


def test_rows_give_back_the_same_history_and_damaged_rows_are_refused():
    shapes = [(3, 4), (7,)]  # 19 entries: 5 padding bits in the last of 3 bytes
    history = MaskHistory(random_masks(shapes, 4, seed=2))
    again = MaskHistory.from_rows(shapes, list(history), history.rows())
    assert all(np.array_equal(a, b) for v in history for a, b in zip(again[v], history[v]))
    rows = history.rows()
    with pytest.raises(ValueError, match="padding bits"):
        MaskHistory.from_rows(shapes, list(history), rows | np.uint8(1))
    with pytest.raises(ValueError, match=r"not uint8 \(4, 3\)"):
        MaskHistory.from_rows(shapes, list(history), rows[:, :-1])
    with pytest.raises(ValueError, match="not uint8"):
        MaskHistory.from_rows(shapes, list(history), rows.astype(np.int16))


def test_a_mask_of_other_shapes_cannot_join():
    history = MaskHistory({0: [np.ones((2, 3), dtype=bool)]})
    with pytest.raises(ValueError, match=r"shapes \(\(3, 2\),\) cannot join a history of shapes \(\(2, 3\),\)"):
        history[1] = [np.ones((3, 2), dtype=bool)]
