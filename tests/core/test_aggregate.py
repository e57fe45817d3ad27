"""FedAvg aggregation against a hand-computed weighted average; aggregators held to their contract."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# --------------------------------------------------------------------------- robust rules against numpy references

SHAPES = [(3, 4), (5,), (2, 1, 3)]


def reference(rule, tensors, weights, trim, byzantine):
    """The rules written out on stacked float64 copies: the weighted mean; per coordinate the middle
    of the sorted values (the mean of the two middle ones for an even count) or the mean of the sorted
    values without int(trim x n) at each end; Krum: the node whose n - f - 2 (at least 1) nearest
    other nodes, by squared distance over all tensors, are nearest in sum (ties to the first node)."""
    n = len(tensors)
    stacked = [np.stack([np.asarray(node[i], np.float64) for node in tensors]) for i in range(len(tensors[0]))]
    if rule == "mean":
        alpha = np.asarray(weights, np.float64) / np.sum(weights)
        return [np.tensordot(alpha, s, axes=1) for s in stacked]
    if rule == "median":
        middle = [np.sort(s, axis=0) for s in stacked]
        return [(s[(n - 1) // 2] + s[n // 2]) / 2 for s in middle]
    if rule == "trimmed-mean":
        cut = int(trim * n)
        return [np.sort(s, axis=0)[cut:n - cut].mean(axis=0) for s in stacked]
    flat = np.stack([np.concatenate([np.ravel(t) for t in node]).astype(np.float64) for node in tensors])
    dist = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2)
    nearest = max(1, n - byzantine - 2)
    scores = [sum(sorted(np.delete(dist[i], i))[:nearest]) for i in range(n)]
    return [s[int(np.argmin(scores))] for s in stacked]


def random_nodes(rng, n):
    """Node tensors with a few outliers (large values) among draws from one distribution."""
    nodes = []
    for _ in range(n):
        scale = 50.0 if rng.random() < 0.2 else 1.0
        nodes.append([(scale * rng.standard_normal(s)).astype(np.float32) for s in SHAPES])
    return nodes


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rule=st.sampled_from(["mean", "median", "trimmed-mean", "krum"]),
       n=st.integers(1, 8), trim=st.floats(0.0, 0.45), byzantine=st.integers(0, 3))
def test_every_built_in_aggregator_agrees_with_a_numpy_reference_and_the_robust_ones_ignore_sample_counts(
        seed, rule, n, trim, byzantine):
    rng = np.random.default_rng(seed)
    nodes = random_nodes(rng, n)
    weights = rng.uniform(0.2, 40.0, n)  # fractional counts (agreement-scaled) too
    got = robust_average(nodes, weights, rule, trim=trim, byzantine=byzantine)
    want = reference(rule, nodes, weights, trim, byzantine)
    assert [g.shape for g in got] == SHAPES and all(g.dtype == np.float32 for g in got)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    if rule != "mean":  # a robust rule: the claimed sample counts change nothing
        other = robust_average(nodes, rng.permutation(weights) * 7.0, rule, trim=trim, byzantine=byzantine)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(got, other))
    # copies of one tensor: every rule gives that tensor back
    copies = robust_average([nodes[0]] * n, weights, rule, trim=trim, byzantine=byzantine)
    assert all(np.allclose(c, t, rtol=1e-6, atol=0) for c, t in zip(copies, nodes[0]))


def test_krum_picks_a_node_of_the_tight_cluster_and_honours_the_allowed_number_of_attackers():
    """Hand-worked, one scalar per node, squared distances: nodes 0-2 at 0, 1, 2; nodes 3, 4 at 10, 11.
    With f = 0 each node sums its n - f - 2 = 3 nearest: 0 -> 1 + 4 + 100 = 105, 1 -> 1 + 1 + 81 = 83,
    2 -> 1 + 4 + 64 = 69, 3 -> 1 + 64 + 81 = 146, 4 -> 1 + 81 + 100 = 182: node 2 (value 2).
    With f = 2 only the nearest counts: 1, 1, 1, 1, 1, a tie that goes to the first node (value 0)."""
    nodes = [[np.array([v], np.float32)] for v in (0.0, 1.0, 2.0, 10.0, 11.0)]
    assert robust_average(nodes, [1] * 5, "krum", byzantine=0)[0].tolist() == [2.0]
    assert robust_average(nodes, [1] * 5, "krum", byzantine=2)[0].tolist() == [0.0]
    # sample counts do not buy a node the choice
    assert robust_average(nodes, [1, 1, 1, 1000, 1000], "krum", byzantine=0)[0].tolist() == [2.0]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rule=st.sampled_from(["median", "trimmed-mean", "krum"]),
       n=st.integers(1, 8), trim=st.floats(0.0, 0.45), byzantine=st.integers(0, 3))
def test_holder_robust_average_is_the_rule_over_tensors_filled_in_with_the_fallback(seed, rule, n, trim, byzantine):
    """Each node's full tensor is its sent values (row-major) where it holds an entry and the fallback
    elsewhere; the rule (a numpy reference) combines those; entries outside `keep` are exactly 0."""
    rng = np.random.default_rng(seed)
    holds = [[rng.random(s) < 0.6 for s in SHAPES] for _ in range(n)]
    fallback = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    keep = [rng.random(s) < 0.7 for s in SHAPES]
    values = [[(5.0 * rng.standard_normal(int(h.sum()))).astype(np.float32) for h in node] for node in holds]
    full = []
    for node, held in zip(values, holds):
        tensors = []
        for v, h, f in zip(node, held, fallback):
            t = f.astype(np.float64).copy()
            t[np.unravel_index(np.flatnonzero(h), h.shape)] = v
            tensors.append(t)
        full.append(tensors)
    want = reference(rule, full, None, trim, byzantine)
    got = holder_robust_average(values, holds, rng.uniform(1, 9, n), keep, fallback, rule, trim=trim,
                                byzantine=byzantine)
    for g, w, k in zip(got, want, keep):
        assert g.shape == k.shape and g.dtype == np.float32
        np.testing.assert_allclose(g, np.where(k, w, 0.0), rtol=1e-5, atol=1e-6)
        assert (g[~k] == 0).all()


def test_holder_robust_average_passes_the_trim_and_the_number_of_attackers_on_to_its_rule():
    """Five nodes, one entry each holds (the fallback never shows) and one nobody holds: the
    values 0, 1, 2, 10, 11 (Krum by hand in the test above: node 2 with f = 0, node 0 with f = 2)
    and 0, 1, 2, 10, 100 (trimmed mean: (1 + 2 + 10) / 3 trimming one at each end, 113 / 5 trimming none)."""
    holds = [[np.array([True, False])]] * 5
    fallback, keep = [np.array([-4.0, 6.0], np.float32)], [np.ones(2, bool)]

    def run(values, rule, **kw):
        kept = [[np.array([v], np.float32)] for v in values]
        return holder_robust_average(kept, holds, [1.0] * 5, keep, fallback, rule, **kw)[0].tolist()

    assert run([0, 1, 2, 10, 11], "krum", byzantine=0) == [2.0, 6.0]
    assert run([0, 1, 2, 10, 11], "krum", byzantine=2) == [0.0, 6.0]
    assert run([0, 1, 2, 10, 100], "trimmed-mean", trim=0.2) == pytest.approx([13 / 3, 6.0])
    assert run([0, 1, 2, 10, 100], "trimmed-mean", trim=0.0) == pytest.approx([22.6, 6.0])
