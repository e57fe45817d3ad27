"""Schedules, local mask criteria and mask statistics against hand-worked examples and numpy references."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mpfl.core import masks
from mpfl.errors import ConfigError, MethodError


def test_geometric_schedule_keeps_the_same_fraction_each_round():
    d = [masks.target_density(t, 5, 0.9, "geometric") for t in range(1, 6)]
    assert d[-1] == pytest.approx(0.1)
    ratios = [d[0]] + [b / a for a, b in zip(d, d[1:])]
    assert ratios == pytest.approx([0.1 ** 0.2] * 5)


def test_linear_schedule_removes_the_same_share_each_round():
    assert [masks.target_density(t, 4, 0.8, "linear") for t in range(1, 5)] == pytest.approx([0.8, 0.6, 0.4, 0.2])


def test_keep_count_rounds_and_keeps_one():
    assert masks.keep_count(10, 0.25) == 3  # 2.5 rounds half up
    assert masks.keep_count(10, 0.0) == 1
    assert masks.keep_count(10, 1.0) == 10
    assert masks.keep_count(0, 0.5) == 0


def test_top_k_breaks_ties_by_tiebreak_then_index():
    scores = np.array([5, 3, 3, 3, 1.0])
    eligible = np.array([True, True, True, True, True])
    assert masks.top_k(scores, eligible, 2).tolist() == [True, True, False, False, False]
    tiebreak = np.array([0, 0.1, 0.9, 0.5, 0])
    assert masks.top_k(scores, eligible, 3, tiebreak).tolist() == [True, False, True, True, False]


def test_top_k_only_chooses_eligible_entries():
    scores = np.array([9, 8, 7, 6.0])
    eligible = np.array([False, True, False, True])
    assert masks.top_k(scores, eligible, 1).tolist() == [False, True, False, False]
    assert masks.top_k(scores, eligible, 5).tolist() == eligible.tolist()


_LARGE = 4 * masks._SAMPLE + 1  # the smallest size kth_largest narrows through a sample


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["normal", "few values", "sorted", "reversed", "nan", "misleading sample"]),
       st.integers(_LARGE, 3 * _LARGE), st.floats(0.0, 1.0))
def test_kth_largest_equals_a_full_partition(seed, kind, n, share):
    rng = np.random.default_rng(seed)
    values = {"normal": lambda: rng.standard_normal(n).astype(np.float32),
              "few values": lambda: rng.integers(0, 4, n).astype(np.float64),
              "sorted": lambda: np.arange(n, dtype=np.float32),
              "reversed": lambda: -np.arange(n, dtype=np.float32),
              "nan": lambda: np.where(rng.random(n) < 0.05, np.nan, rng.random(n)),
              # zero at every position the strided sample reads, so its quantiles bracket nothing but zeros
              "misleading sample": lambda: np.where(np.arange(n) % (n // masks._SAMPLE) == 0, 0.0, 1.0 + rng.random(n))
              }[kind]()
    k = 1 + int(share * (n - 1))
    expected = np.partition(values, n - k)[n - k]
    got = masks.kth_largest(values, k)
    assert got == expected or (np.isnan(got) and np.isnan(expected))


def test_top_k_on_a_large_array_matches_a_stable_sort():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 50, 3 * _LARGE).astype(np.float32)  # many ties at the threshold
    eligible = rng.random(scores.size) < 0.8
    k = 7000
    order = sorted(np.flatnonzero(eligible), key=lambda i: (-scores[i], i))
    expected = np.zeros(scores.size, dtype=bool)
    expected[order[:k]] = True
    np.testing.assert_array_equal(masks.top_k(scores, eligible, k), expected)


def _reference_layer_magnitude(w, current, density):
    k = min(w.size, max(1, int(np.floor(density * w.size + 0.5))))
    flat, cur = np.abs(w).ravel(), current.ravel()
    order = sorted(np.flatnonzero(cur), key=lambda i: (-flat[i], i))
    out = np.zeros(w.size, bool)
    out[order[:k]] = True
    return out.reshape(w.shape)


def test_magnitude_layer_scope_matches_numpy_reference():
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((20, 30)).astype(np.float32), rng.standard_normal((7, 20)).astype(np.float32)]
    current = [rng.random(w.shape) < 0.7 for w in weights]
    new = masks.magnitude_mask(weights, current, 0.3)
    for w, c, n in zip(weights, current, new):
        assert np.array_equal(n, _reference_layer_magnitude(w, c, 0.3))
        assert n.sum() == masks.keep_count(w.size, 0.3)


def test_magnitude_global_scope_keeps_exact_total_and_the_floor():
    rng = np.random.default_rng(1)
    big = rng.standard_normal((100, 100)).astype(np.float32) * 10
    small = rng.standard_normal((10, 10)).astype(np.float32) * 0.01  # would vanish under one global threshold
    current = [np.ones_like(big, bool), np.ones_like(small, bool)]
    new = masks.magnitude_mask([big, small], current, 0.1, scope="global", floor=0.05)
    assert sum(int(m.sum()) for m in new) == masks.keep_count(big.size + small.size, 0.1)
    assert new[1].sum() == masks.keep_count(small.size, 0.05)
    assert new[1].sum() == 5
    # without the floor layer, the global threshold keeps the globally largest magnitudes
    rest = np.abs(big)[new[0]].min()
    assert (np.abs(big)[~new[0]] <= rest).all()


def test_filter_mask_removes_whole_rows_by_l2_norm():
    w = np.array([[3, 0, 0], [1, 1, 1], [0, 0, 0.5], [2, 2, 0]], dtype=np.float32)  # norms 3, 1.73, 0.5, 2.83
    new = masks.filter_mask([w], [np.ones_like(w, bool)], 0.5)[0]
    assert new.tolist() == [[True] * 3, [False] * 3, [False] * 3, [True] * 3]
    conv = np.random.default_rng(2).standard_normal((8, 3, 5, 5)).astype(np.float32)
    m = masks.filter_mask([conv], [np.ones_like(conv, bool)], 0.25)[0]
    flags = m.reshape(8, -1)
    assert (flags.all(1) | ~flags.any(1)).all() and flags.all(1).sum() == 2


def test_filter_mask_only_keeps_rows_still_in_the_mask():
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    current = np.array([[1] * 3, [1] * 3, [1] * 3, [0] * 3], dtype=bool)  # the largest row is already pruned
    new = masks.filter_mask([w], [current], 0.5)[0]
    assert new[:, 0].tolist() == [False, True, True, False]


LAYER = arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.floats(-5, 5, width=32))


@settings(max_examples=80, deadline=None)
@given(
    layers=st.lists(LAYER, min_size=1, max_size=3),
    density=st.floats(0.0, 1.0),
    scope=st.sampled_from(["layer", "global"]),
    floor=st.sampled_from([0.0, 0.01, 0.3]),
    seed=st.integers(0, 10),
)
def test_new_masks_are_subsets_of_the_current_mask_with_the_promised_counts(layers, density, scope, floor, seed):
    """Within the current mask, the kept entries number what `keep_count` promises and none weighs less than a
    dropped one (under global scope, apart from the largest entries each layer keeps as its floor)."""
    rng = np.random.default_rng(seed)
    current = [rng.random(w.shape) < 0.6 for w in layers]
    new = masks.magnitude_mask(layers, current, density, scope=scope, floor=floor)
    assert all(not (n & ~c).any() for n, c in zip(new, current))
    if scope == "layer":
        reserved = [0] * len(layers)
        assert [int(n.sum()) for n in new] == [min(int(c.sum()), masks.keep_count(c.size, density)) for c in current]
    else:
        reserved = [min(int(c.sum()), masks.keep_count(c.size, floor)) for c in current]
        total = masks.keep_count(sum(c.size for c in current), density)
        assert sum(int(n.sum()) for n in new) == max(sum(reserved), min(total, sum(int(c.sum()) for c in current)))
        assert all(n.sum() >= r for n, r in zip(new, reserved))
    chosen = [np.sort(np.abs(w[n]))[: int(n.sum()) - r] for w, n, r in zip(layers, new, reserved)]
    dropped = [np.abs(w[c & ~n]) for w, n, c in zip(layers, new, current)]
    if scope == "layer":
        assert all(k.min() >= d.max() for k, d in zip(chosen, dropped) if k.size and d.size)
    else:
        kept, lost = np.concatenate(chosen), np.concatenate(dropped)
        assert not (kept.size and lost.size) or kept.min() >= lost.max()


def test_mask_statistics_by_hand():
    a = [np.array([1, 1, 0, 0], bool), np.array([1, 0], bool)]
    b = [np.array([1, 0, 1, 0], bool), np.array([1, 0], bool)]
    assert masks.density(a) == pytest.approx(3 / 6)
    assert masks.layer_density(a) == pytest.approx([0.5, 0.5])
    assert masks.hamming(a, b) == 2
    assert masks.jaccard(a, b) == pytest.approx(2 / 4)
    support = [np.array([1, 1, 1, 0], bool), np.array([1, 1], bool)]
    assert masks.agreement(a, b, support) == pytest.approx(3 / 5)
    # nothing to keep, compare or agree on counts as whole: empty layers, masks and supports
    empty, none = [np.zeros(0, bool)], [np.zeros(3, bool)]
    assert masks.density(empty) == 1.0 and masks.layer_density(empty + a) == [1.0, 0.5, 0.5]
    assert masks.jaccard(none, none) == 1.0 and masks.agreement(a, b, [np.zeros(4, bool), np.zeros(2, bool)]) == 1.0


def test_checked_mask_holds_plug_ins_to_the_mask_contract():
    current = [np.array([True, True, False]), np.ones((2, 2), dtype=bool)]
    good = [np.array([True, False, False]), np.eye(2, dtype=bool)]
    assert all(a is b for a, b in zip(masks.checked_mask(good, current, "the rule 'r'"), good))
    for bad, says in [(None, "it is a NoneType"), ([good[0]], "it holds 1 items"),
                      ([good[0], np.eye(2)], "item 1 is a float64 array, not booleans$"),
                      ([good[0], np.ones(4, dtype=bool)], "item 1 is a bool array of shape \\(4,\\)"),
                      ([np.array([True, False, True]), good[1]], "item 0 keeps entries the current mask has pruned")]:
        with pytest.raises(MethodError, match=f"^the rule 'r' must be a list of 2 boolean arrays.*; {says}"):
            masks.checked_mask(bad, current, "the rule 'r'")


def test_a_structured_mask_must_keep_or_drop_whole_output_filters():
    current = [np.ones((3, 2, 2), dtype=bool)]
    whole = [np.zeros((3, 2, 2), dtype=bool)]
    whole[0][1] = True
    assert masks.checked_mask(whole, current, "the criterion 'c'", structured=True)[0] is whole[0]
    part = [whole[0].copy()]
    part[0][2, 0, 0] = True
    assert masks.checked_mask(part, current, "the criterion 'c'")[0] is part[0]  # fine unstructured
    with pytest.raises(MethodError, match="^the criterion 'c' must keep or drop whole output filters .* as its "
                                          "source is structured, but item 0 keeps part of a filter"):
        masks.checked_mask(part, current, "the criterion 'c'", structured=True)


def test_a_criterion_or_rule_that_cannot_take_its_arguments_is_refused_when_registered():
    from mpfl.core.consensus import RULES, register_rule

    with pytest.raises(ConfigError, match=r"^mask criterion 'short': <lambda>\(w, c, d\) cannot be called as fn\(weights, "
                                          r"current, density, \*, scope, floor\).*unexpected keyword argument 'scope'"):
        masks.register_criterion("short", lambda w, c, d: c)
    with pytest.raises(ConfigError, match=r"^consensus rule 'two': .* cannot be called as rule\(votes, support, ctx\)"):
        register_rule("two", lambda votes, support: support)
    with pytest.raises(ConfigError, match="^consensus rule 'text' must be a function"):
        register_rule("text", "keep everything")
    assert "short" not in masks.CRITERIA and "two" not in RULES
    masks.register_criterion("keywords", lambda w, c, d, **options: c)  # **kwargs takes scope and floor
    masks.register_criterion("named", lambda w, c, d, *, scope, floor: c)
