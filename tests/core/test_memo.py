"""The array memo: hits only for the same, unchanged array; results equal a fresh computation."""

import numpy as np
import pytest

from mpfl.core.memo import MIN_SIZE, ArrayMemo, complement, positions


def counting_memo(size: int = 16) -> tuple[ArrayMemo, list[int]]:
    calls: list[int] = []

    def compute(array: np.ndarray) -> int:
        calls.append(1)
        return int(np.count_nonzero(array))

    return ArrayMemo(compute, size=size), calls


def test_the_same_unchanged_array_is_computed_once():
    memo, calls = counting_memo()
    support = np.random.default_rng(0).random(MIN_SIZE * 2) < 0.3
    assert memo(support) == memo(support) == np.count_nonzero(support)
    assert len(calls) == 1


def test_an_array_changed_in_place_is_recomputed():
    memo, calls = counting_memo()
    support = np.zeros(MIN_SIZE * 2, dtype=bool)
    assert memo(support) == 0
    support[7] = True
    assert memo(support) == 1
    assert len(calls) == 2


def test_an_equal_copy_is_a_different_key():
    memo, calls = counting_memo()
    support = np.ones(MIN_SIZE, dtype=bool)
    memo(support)
    memo(support.copy())
    assert len(calls) == 2


def test_small_arrays_are_never_remembered():
    memo, calls = counting_memo()
    small = np.ones(MIN_SIZE - 1, dtype=bool)
    memo(small)
    memo(small)
    assert len(calls) == 2


def test_the_oldest_entry_goes_first():
    memo, calls = counting_memo(size=2)
    a, b, c = (np.ones(MIN_SIZE, dtype=bool) for _ in range(3))
    memo(a), memo(b), memo(a), memo(c)  # a was used after b, so b is dropped
    assert len(calls) == 3
    memo(a)
    assert len(calls) == 3
    memo(b)
    assert len(calls) == 4


@pytest.mark.parametrize("shape", [(5, 3), (128, 70), (200, 784)])
def test_positions_are_flatnonzero_and_read_only(shape):
    support = np.random.default_rng(1).random(shape) < 0.2
    for _ in range(2):
        where = positions(support)
        np.testing.assert_array_equal(where, np.flatnonzero(support))
        with pytest.raises(ValueError):
            where[0] = 1
    support[:] = ~support
    np.testing.assert_array_equal(positions(support), np.flatnonzero(support))


def test_the_complement_of_a_mask_is_one_read_only_array_until_the_mask_changes():
    mask = np.random.default_rng(2).random((200, 784)) < 0.1
    pruned = complement(mask)
    assert complement(mask) is pruned and not pruned.flags.writeable
    np.testing.assert_array_equal(pruned, np.logical_not(mask))
    assert positions(complement(mask)) is positions(pruned)  # what the nodes of a round share
    mask[0, 0] = not mask[0, 0]
    assert complement(mask) is not pruned
    np.testing.assert_array_equal(complement(mask), np.logical_not(mask))
