"""Tallies, agreement weights and consensus rules against numpy references and hand-worked examples,
including ties and extremes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpfl.core.consensus import RULES, VoteContext, agreement_weights, consensus, tally, trimmed_tally


def ctx(**kw):
    base = dict(density=0.5, prev_density=1.0, num_nodes=4)
    base.update(kw)
    return VoteContext(**base)


def test_tally_weights_votes_by_sample_counts():
    masks = [[np.array([1, 1, 0], bool)], [np.array([1, 0, 0], bool)], [np.array([0, 1, 1], bool)]]
    v = tally(masks, [100, 300, 600])[0]
    assert v == pytest.approx([0.4, 0.1 + 0.6, 0.6])


def test_vote_keeps_exactly_k_highest_votes_with_ties_broken_by_w0_then_index():
    votes = [np.array([1.0, 0.5, 0.5, 0.5, 0.25, 0.0])]
    support = [np.ones(6, bool)]
    w0 = [np.array([0, 0.1, 0.3, 0.3, 9, 9])]
    got = consensus(votes, support, "vote", ctx(density=0.5, tiebreak=w0))[0]
    # keep 3: index 0 (vote 1), then among the 0.5 ties the larger |w0| (2 and 3 tie at 0.3 -> lower index 2 first)
    assert got.tolist() == [True, False, True, True, False, False]


def test_vote_agrees_with_a_sorted_reference_on_random_matrices():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n_nodes, size = rng.integers(2, 8), rng.integers(5, 60)
        support = rng.random(size) < 0.8
        masks = [[(rng.random(size) < 0.5) & support] for _ in range(n_nodes)]
        weights = rng.integers(1, 100, n_nodes)
        votes = tally(masks, weights)
        w0 = rng.standard_normal(size)
        got = consensus(votes, [support], "vote", ctx(density=0.3, tiebreak=[np.abs(w0)]))[0]
        k = min(int(support.sum()), max(1, int(np.floor(0.3 * size + 0.5))))
        order = sorted(np.flatnonzero(support), key=lambda i: (-votes[0][i], -abs(w0[i]), i))
        want = np.zeros(size, bool)
        want[order[:k]] = True
        assert np.array_equal(got, want)


def test_all_agree_gives_the_common_mask_and_all_disagree_falls_back_to_w0():
    common = np.array([1, 0, 1, 0, 1, 0], bool)
    votes = tally([[common]] * 3, [1, 1, 1])
    got = consensus(votes, [np.ones(6, bool)], "vote", ctx(density=0.5))[0]
    assert np.array_equal(got, common)
    flat = [np.full(6, 0.5)]  # every entry equally voted: |w0| decides
    w0 = [np.array([1, 6, 2, 5, 3, 4.0])]
    got = consensus(flat, [np.ones(6, bool)], "vote", ctx(density=0.5, tiebreak=w0))[0]
    assert got.tolist() == [False, True, False, True, False, True]


def test_threshold_is_a_weighted_majority():
    votes = [np.array([0.0, 0.49, 0.5, 0.51, 1.0])]
    support = [np.array([1, 1, 1, 1, 0], bool)]
    got = consensus(votes, support, "threshold", ctx(tau=0.5))[0]
    assert got.tolist() == [False, False, True, True, False]


def test_dynamic_lowers_the_prune_threshold_until_the_target_is_met():
    # 4 nodes; vote = share of nodes keeping; prune share u = 1 - vote
    votes = [np.array([1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.25, 0.5])]
    support = [np.ones(8, bool)]
    # target sparsity 0.5: thr 3/4 prunes u>=0.75 -> entries 3,4,5,6 (4 of 8) -> reached
    got = consensus(votes, support, "dynamic", ctx(density=0.5, num_nodes=4))[0]
    assert got.tolist() == [True, True, True, False, False, False, False, True]
    # target sparsity 0.75: thr 3/4 gives 0.5, thr 2/4 prunes u>=0.5 -> also 2 and 7 -> 6 of 8
    got = consensus(votes, support, "dynamic", ctx(density=0.25, num_nodes=4))[0]
    assert got.tolist() == [True, True, False, False, False, False, False, False]


def test_histogram_keeps_votes_at_or_above_the_percentile():
    votes = [np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])]
    support = [np.ones(10, bool)]
    # density 0.3 from 0.6: remove half of the support -> 50th percentile ("lower") = 0.5
    got = consensus(votes, support, "histogram", ctx(density=0.3, prev_density=0.6))[0]
    assert got.tolist() == [False] * 4 + [True] * 6
    got = consensus(votes, support, "histogram", ctx(percentile=80.0))[0]
    assert got.sum() == 3


def test_histogram_never_keeps_an_entry_no_node_kept():
    # one voter keeping 3 of 5 at a round that removes 40 %: the 40th percentile ("lower") of
    # [0, 0, 1, 1, 1] is 0, which every entry reaches; the entries nobody kept still go
    mine = np.array([True, False, True, False, True])
    votes = tally([[mine]], [1])
    got = consensus(votes, [np.ones(5, bool)], "histogram", ctx(density=0.6, prev_density=1.0, num_nodes=1))[0]
    assert np.array_equal(got, mine)
    # three voters who agree on dropping entries 0 and 1, and split over the rest
    masks = [[np.array([False, False, True, True, False, True])], [np.array([False, False, True, False, True, True])],
             [np.array([False, False, False, True, True, True])]]
    votes = tally(masks, [1, 1, 1])  # [0, 0, 2/3, 2/3, 2/3, 1]
    got = consensus(votes, [np.ones(6, bool)], "histogram", ctx(percentile=20.0, num_nodes=3))[0]
    assert got.tolist() == [False, False, True, True, True, True]


def test_structured_vote_keeps_whole_rows():
    rows = np.array([0.9, 0.1, 0.6, 0.4])
    votes = [np.repeat(rows[:, None], 3, axis=1)]
    support = [np.ones((4, 3), bool)]
    got = consensus(votes, support, "vote", ctx(density=0.5, structured=True))[0]
    assert got.tolist() == [[True] * 3, [False] * 3, [True] * 3, [False] * 3]
    # equal row votes: the rows whose w0 has the larger L2 norm win (rows 1 and 2: norms 5 and 4, against 3 and 1)
    w0 = [np.array([[1.0, 2.0, 2.0], [0.0, 3.0, 4.0], [0.0, 0.0, 4.0], [1.0, 0.0, 0.0]])]
    got = consensus([np.full((4, 3), 0.5)], support, "vote", ctx(density=0.5, structured=True, tiebreak=w0))[0]
    assert got.tolist() == [[False] * 3, [True] * 3, [True] * 3, [False] * 3]


def test_dynamic_with_one_node_prunes_what_it_pruned():
    votes = [np.array([1.0, 0.0, 1.0, 0.0])]  # one node: every vote is 0 or 1
    got = consensus(votes, [np.ones(4, bool)], "dynamic", ctx(density=0.5, num_nodes=1))[0]
    assert got.tolist() == [True, False, True, False]


@settings(max_examples=40, deadline=None)
@given(rule=st.sampled_from(sorted(RULES)), seed=st.integers(0, 1000), density=st.floats(0.05, 1.0))
def test_every_rule_returns_a_subset_of_the_support(rule, seed, density):
    """Called directly (not through `consensus`, which intersects with the support anyway), with
    votes outside the support too, as forged masks could give."""
    rng = np.random.default_rng(seed)
    support = rng.random(40) < 0.7
    masks = [[rng.random(40) < 0.5] for _ in range(5)]
    votes = tally(masks, rng.integers(1, 10, 5))
    assert (votes[0][~support] > 0).any() or support.all()
    context = ctx(density=density * support.mean(), prev_density=support.mean(), num_nodes=5)
    got = np.asarray(RULES.get(rule)(votes, [support], context)[0], dtype=bool)
    assert not (got & ~support).any()


def test_agreement_weighting_silences_random_and_inverted_masks_and_leaves_honest_votes_alone():
    rng = np.random.default_rng(0)
    support = [np.ones(2000, bool)]
    truth = rng.random(2000) < 0.4
    honest = [[truth ^ (rng.random(2000) < 0.03)] for _ in range(7)]
    random_mask = [[rng.random(2000) < 0.4]]
    inverted = [[~truth]]
    sizes = [3.0, 1.0, 2.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0]
    w = agreement_weights(honest + [random_mask, inverted], sizes, support)
    assert w[:7].tolist() == sizes[:7]
    assert w[7] == 0.0 and w[8] == 0.0
    assert agreement_weights(honest, sizes[:7], support).tolist() == sizes[:7]


def disjoint_flips(counts, size):
    """One single-tensor mask per node, flipping `counts[n]` entries of an all-zero truth that no
    other node flips: the majority stays all zero, so each node's distance to it is its count."""
    masks, start = [], 0
    for flips in counts:
        mask = np.zeros(size, bool)
        mask[start : start + flips] = True
        masks.append([mask])
        start += flips
    return masks


def test_agreement_weighting_tolerates_an_honest_node_somewhat_further_out():
    # Six nodes each flip 60 entries of the truth (disjoint), so every distance to the majority is
    # exactly 60 and the MAD is 0; a seventh flips 80: within half the median above it, so kept.
    masks = disjoint_flips([60] * 6 + [80], 1000)
    support = [np.ones(1000, bool)]
    assert agreement_weights(masks, [1.0] * 7, support).tolist() == [1.0] * 7
    assert agreement_weights(masks, [1.0] * 7, support, tolerance=0.0)[6] == 0.0
    far = masks[:6] + [[np.r_[np.ones(120, bool), np.zeros(880, bool)]]]  # 120 > 60 + 30: an outlier
    assert agreement_weights(far, [1.0] * 7, support)[6] == 0.0


def test_trimmed_votes_by_hand():
    masks = [[np.array([1, 1, 0, 0, 1, 1], bool)], [np.array([1, 0, 0, 1, 1, 0], bool)],
             [np.array([1, 1, 1, 0, 1, 1], bool)], [np.array([0, 1, 0, 0, 1, 0], bool)],
             [np.array([1, 1, 0, 0, 1, 0], bool)]]
    # 5 votes, trim 1 from each end: ones per entry 4, 4, 1, 1, 5, 2 -> clip(ones - 1, 0, 3) / 3
    assert trimmed_tally(masks, 0.2)[0].tolist() == pytest.approx([1.0, 1.0, 0.0, 0.0, 1.0, 1 / 3])


def test_agreement_weighting_scales_a_node_beyond_the_cut_by_its_distance():
    # Disjoint flips of an all-zero truth, so each node's distance to the (all-zero) majority is its
    # number of flips: 20, 22, ..., 32, 60, 100. By hand: median 28; absolute deviations 8, 6, 4, 2,
    # 0, 2, 4, 32, 72, whose median is 4, so sigma = 1.4826 * 4 = 5.9304; the cut is
    # 28 + max(3 sigma, 0.5 * 28) = 45.7912. The node at 60 keeps exp(-(60 - 45.7912) / 5.9304)
    # = 0.0911 of its weight; the node at 100 would keep 1.07e-4, below the floor of 1e-3, so 0.
    masks = disjoint_flips([20, 22, 24, 26, 28, 30, 32, 60, 100], 1000)
    sizes = [1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 1.0]
    got = agreement_weights(masks, sizes, [np.ones(1000, bool)])
    assert got[:7].tolist() == sizes[:7]
    assert got[7] == pytest.approx(3.0 * np.exp(-(60 - 45.7912) / 5.9304), rel=1e-4)
    assert got[8] == 0.0
    # outside the support nothing counts: the same flips moved off it leave every node at distance 0
    off = [[np.r_[np.zeros(1000, bool), m[0]]] for m in masks]
    assert agreement_weights(off, sizes, [np.r_[np.ones(1000, bool), np.zeros(1000, bool)]]).tolist() == sizes
    # every honest distance equal (MAD 0): sigma is a hundredth of the median, 10 at a median of 1,000;
    # the cut is 1,000 + max(3 * 10, 0.5 * 1,000) = 1,500, so a node at 1,520 keeps exp(-20 / 10)
    got = agreement_weights(disjoint_flips([1000] * 6 + [1520], 8000), [1.0] * 7, [np.ones(8000, bool)])
    assert got[:6].tolist() == [1.0] * 6 and got[6] == pytest.approx(np.exp(-2.0), rel=1e-9)


def test_tallies_refuse_what_leaves_no_vote():
    masks = [[np.array([True, False])], [np.array([False, True])]]
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        tally(masks, [0.0, 0.0])
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        tally(masks, [2.0, -1.0])  # would push the second mask's entries below zero votes
    with pytest.raises(ValueError, match="one weight per mask"):
        tally(masks, [1.0])
    with pytest.raises(ValueError, match="at least one mask"):
        tally([], [])
    with pytest.raises(ValueError, match="leaves none"):
        trimmed_tally(masks, 0.5)  # one of two votes cut from each end
    assert trimmed_tally(masks, 0.49)[0].tolist() == [0.5, 0.5]  # int(0.49 * 2) = 0: nothing trimmed
    three = masks + [[np.array([True, True])]]  # one of three cut from each end leaves the middle vote
    assert trimmed_tally(three, 0.34)[0].tolist() == [1.0, 1.0]
