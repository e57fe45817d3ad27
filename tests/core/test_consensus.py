"""Tallies, agreement weights and consensus rules against numpy references and hand-worked examples,
including ties and extremes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpfl.core.consensus import RULES, VoteContext, agreement_weights, consensus, tally, trimmed_tally, with_cores


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


# --------------------------------------------------------------------------- references on random inputs


def equal_votes(rng, n_nodes, shapes, keep=0.5):
    """Random masks of `n_nodes` equal-weight voters and their ones-count per entry (an integer
    reference: the tally is ones / n), so ties are common and thresholds can be checked exactly."""
    masks = [[rng.random(s) < keep for s in shapes] for _ in range(n_nodes)]
    ones = [sum(m[i].astype(np.int64) for m in masks) for i in range(len(shapes))]
    return masks, ones


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), density=st.floats(0.0, 1.0), scope=st.sampled_from(["layer", "global"]),
       floor=st.sampled_from([0.0, 0.01, 0.2]))
def test_vote_keeps_the_top_voted_entries_of_every_layer_or_of_all_layers_against_a_sorted_reference(
        seed, density, scope, floor):
    """Several layers, tied votes (equal weights) and tied |w0| (small integers), so that the index
    decides too; per layer (or over all layers past each layer's floor) the kept entries are exactly the
    first of the support sorted by (-vote, -|w0|, index), as many as the contract's count."""
    rng = np.random.default_rng(seed)
    shapes = [(4, 5), (7,), (3, 2, 2)]
    support = [rng.random(s) < 0.7 for s in shapes]
    masks, _ = equal_votes(rng, int(rng.integers(1, 5)), shapes)
    votes = tally(masks, [1.0] * len(masks))
    w0 = [rng.integers(0, 3, s).astype(np.float64) for s in shapes]
    got = consensus(votes, support, "vote", ctx(density=density, scope=scope, floor=floor, tiebreak=w0))

    def count(size, d):  # round half up, at least one, never more than the layer
        return min(size, max(1, int(np.floor(d * size + 0.5))))

    def ranked(entries):  # entries: (layer, flat index) pairs
        return sorted(entries, key=lambda e: (-votes[e[0]].reshape(-1)[e[1]], -w0[e[0]].reshape(-1)[e[1]], e))

    want = [np.zeros(s, bool) for s in shapes]
    if scope == "layer":
        for j, s in enumerate(support):
            for _, i in ranked([(j, i) for i in np.flatnonzero(s)])[:count(s.size, density)]:
                want[j].reshape(-1)[i] = True
    else:
        taken = set()
        for j, s in enumerate(support):
            reserve = min(int(s.sum()), count(s.size, floor))
            taken.update(ranked([(j, i) for i in np.flatnonzero(s)])[:reserve])
        total = count(sum(s.size for s in support), density)
        rest = [(j, i) for j, s in enumerate(support) for i in np.flatnonzero(s) if (j, i) not in taken]
        # global order over layers: ties on vote and |w0| go to the earlier layer, then the lower index
        taken.update(ranked(rest)[:max(0, total - len(taken))])
        for j, i in taken:
            want[j].reshape(-1)[i] = True
    for g, w, s in zip(got, want, support):
        assert np.array_equal(g, w)
        assert not (g & ~s).any()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), nodes=st.integers(1, 9), tau_nodes=st.integers(0, 9))
def test_threshold_keeps_the_support_entries_with_at_least_tau_of_the_votes_exactly_at_the_boundary(
        seed, nodes, tau_nodes):
    """tau = j / n for equal voters: entries that exactly j of the n nodes kept are kept, despite
    the rounding of a sum of n float shares (1/n summed j times is not always j/n)."""
    rng = np.random.default_rng(seed)
    shapes = [(30,), (4, 6)]
    support = [rng.random(s) < 0.8 for s in shapes]
    masks, ones = equal_votes(rng, nodes, shapes)
    j = min(tau_nodes, nodes)
    got = consensus(tally(masks, [1] * nodes), support, "threshold", ctx(tau=j / nodes, num_nodes=nodes))
    for g, s, c in zip(got, support, ones):
        assert np.array_equal(g, s & (c >= j))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), nodes=st.integers(1, 8), density=st.floats(0.0, 1.0))
def test_dynamic_prunes_at_the_highest_share_of_pruning_nodes_that_reaches_the_target(seed, nodes, density):
    """Integer reference: with n equal voters an entry is pruned at threshold (n - j) / n when at
    most j nodes kept it. j rises from 1 until the layer's pruned share reaches 1 - density (or
    j = n - 1, the last step); a single node prunes what it pruned."""
    rng = np.random.default_rng(seed)
    shapes = [(40,), (5, 6), (9,)]
    support = [rng.random(s) < 0.8 for s in shapes]
    support[2][:] = False  # a layer already fully pruned stays so
    masks, ones = equal_votes(rng, nodes, shapes, keep=rng.uniform(0.2, 0.8))
    got = consensus(tally(masks, [1] * nodes), support, "dynamic", ctx(density=density, num_nodes=nodes))
    for g, s, c in zip(got, support, ones):
        steps = list(range(1, nodes)) or [0]
        for j in steps:
            want = s & (c > j)
            if s.size - want.sum() >= (1 - density) * s.size - 1e-6:
                break
        assert np.array_equal(g, want)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), nodes=st.integers(1, 6), prev=st.floats(0.1, 1.0), ratio=st.floats(0.0, 1.2),
       percentile=st.none() | st.floats(0.0, 100.0))
def test_histogram_cuts_at_the_lower_percentile_of_the_supports_votes_against_a_sorted_reference(
        seed, nodes, prev, ratio, percentile):
    """The cut is the vote at position floor(q / 100 x (m - 1)) of the m support votes in ascending
    order, q = 100 (1 - d_t / d_{t-1}) clipped to [0, 100] unless a percentile is given; entries at or
    above it with a vote are kept, and a layer with an empty support stays empty."""
    rng = np.random.default_rng(seed)
    shapes = [(25,), (3, 7), (6,)]
    support = [rng.random(s) < 0.75 for s in shapes]
    support[2][:] = False
    masks, _ = equal_votes(rng, nodes, shapes)
    votes = tally(masks, rng.integers(1, 20, nodes))
    context = ctx(density=prev * ratio, prev_density=prev, num_nodes=nodes, percentile=percentile)
    got = consensus(votes, support, "histogram", context)
    q = percentile if percentile is not None else 100.0 * (1.0 - (prev * ratio) / prev)
    q = min(max(q, 0.0), 100.0)
    for g, s, v in zip(got, support, votes):
        if not s.any():
            assert not g.any()
            continue
        ordered = sorted(v[s])
        cut = ordered[int(np.floor((len(ordered) - 1) * (q / 100)))]
        assert np.array_equal(g, s & (v >= cut - 1e-9) & (v > 0))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), nodes=st.integers(1, 9), trim=st.floats(0.0, 0.49))
def test_trimmed_tally_is_the_mean_of_the_sorted_votes_without_the_trimmed_ends(seed, nodes, trim):
    rng = np.random.default_rng(seed)
    shapes = [(17,), (3, 4)]
    masks, _ = equal_votes(rng, nodes, shapes, keep=rng.uniform(0.1, 0.9))
    cut = int(trim * nodes)
    if nodes - 2 * cut <= 0:
        with pytest.raises(ValueError, match="leaves none"):
            trimmed_tally(masks, trim)
        return
    got = trimmed_tally(masks, trim)
    for i, shape in enumerate(shapes):
        stacked = np.sort(np.stack([m[i].astype(np.float64) for m in masks]), axis=0)  # (nodes, *shape)
        want = stacked[cut:nodes - cut].mean(axis=0)
        assert got[i].shape == shape
        np.testing.assert_allclose(got[i], want, rtol=0, atol=1e-12)


def flipped(rng, truth, support, counts):
    """One mask per node: `truth` with `counts[n]` support entries flipped that no other node flips;
    off the support (which must not count) the first node keeps everything and the others nothing."""
    inside = rng.permutation(np.flatnonzero(support))
    masks, start = [], 0
    for n, c in enumerate(counts):
        m = truth.copy()
        m[inside[start:start + c]] ^= True
        m[~support] = n == 0
        masks.append([m])
        start += c
    return masks


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), honest=st.integers(4, 8), base=st.integers(4, 12))
def test_agreement_weights_leave_close_nodes_exactly_as_given_and_silence_an_inverted_mask_whatever_it_claims(
        seed, honest, base):
    """Honest nodes each flip between `base` and 1.5 `base` entries of the support (disjoint), so every
    distance to the majority is within half the median above it: their weights come back bit for bit,
    whatever sample counts they claim and whatever they send off the support. An inverted mask is
    far beyond the cut and is left out even when it claims a thousand times everyone's samples, since
    the majority it is measured against is unweighted."""
    rng = np.random.default_rng(seed)
    size = 600
    support = rng.random(size) < 0.85
    truth = rng.random(size) < 0.4
    counts = rng.integers(base, (3 * base + 1) // 2, honest)
    masks = flipped(rng, truth, support, counts)
    weights = rng.uniform(0.1, 10.0, honest)
    got = agreement_weights(masks, weights, [support])
    assert got.dtype == np.float64 and got.tolist() == weights.tolist()
    inverted = [[~truth]]
    claimed = np.r_[weights, 1000.0 * weights.sum()]
    got = agreement_weights(masks + [inverted], claimed, [support])
    assert got[:honest].tolist() == weights.tolist() and got[honest] == 0.0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), nodes=st.integers(1, 6), share=st.floats(0.0, 0.5))
def test_with_cores_adds_two_on_the_union_of_the_cores_so_every_core_entry_outranks_every_other(seed, nodes, share):
    rng = np.random.default_rng(seed)
    shapes = [(5, 4), (13,)]
    masks = [[rng.random(s) < 0.5 for s in shapes] for _ in range(nodes)]
    weights = rng.integers(1, 30, nodes)
    votes = tally(masks, weights)
    cores = [[m & (rng.random(m.shape) < share) for m in node] for node in masks]  # a share of each node's own mask
    boosted = with_cores(votes, cores)
    assert [b.tolist() for b in with_cores(votes, [])] == [v.tolist() for v in votes]
    for i, v in enumerate(votes):
        union = np.zeros(shapes[i], bool)
        for c in cores:
            union |= c[i]
        np.testing.assert_array_equal(boosted[i], v + 2 * union.astype(np.float64))
        if union.any() and (~union).any():
            assert boosted[i][union].min() > boosted[i][~union].max()


def test_a_core_entry_outranks_a_unanimous_entry_under_trimmed_votes_too():
    """`with_cores`: an entry in any node's core outranks every entry that is in no core, even where a
    trimmed tally (a plug-in may combine them; MPFL sends no cores under trimmed votes) cuts its vote to
    0: entry 2, kept by node 0 alone and in its core, must beat entries 0 and 1, which all five nodes
    keep (vote 1, in no core), whatever the |w0| tie-break says."""
    masks = [[np.array([1, 1, 1, 0, 0, 0], bool)]] + [[np.array([1, 1, 0, 1, 0, 0], bool)]] * 4
    votes = trimmed_tally(masks, 0.2)  # one of five trimmed at each end: [1, 1, 0, 1, 0, 0]
    cores = [[np.array([0, 0, 1, 0, 0, 0], bool)]] + [[np.zeros(6, bool)]] * 4
    boosted = with_cores(votes, cores)
    w0 = [np.array([0.9, 0.8, 0.1, 0.7, 0.0, 0.0])]
    got = consensus(boosted, [np.ones(6, bool)], "vote", ctx(density=0.5, num_nodes=5, tiebreak=w0))[0]
    assert got[2]  # the node's core entry survives


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), density=st.floats(0.0, 1.0))
def test_structured_vote_keeps_the_whole_rows_with_the_highest_mean_vote_against_a_sorted_reference(seed, density):
    """Per layer: the supported rows (output filters) sorted by (-mean vote over the row, -L2 norm of
    the row's w0, row index), the first round(density x rows) kept whole."""
    rng = np.random.default_rng(seed)
    shapes = [(6, 2, 3), (9, 4), (5,)]
    support = [np.broadcast_to((rng.random(s[0]) < 0.8).reshape((-1,) + (1,) * (len(s) - 1)), s).copy()
               for s in shapes]
    masks, _ = equal_votes(rng, int(rng.integers(1, 5)), shapes)
    votes = tally(masks, [1.0] * len(masks))
    w0 = [rng.integers(-2, 3, s).astype(np.float64) for s in shapes]  # small integers: equal norms happen
    got = consensus(votes, support, "vote", ctx(density=density, structured=True, tiebreak=w0))
    for g, v, s, w in zip(got, votes, support, w0):
        n_rows = s.shape[0]
        row_vote = [float(np.mean(v[r])) for r in range(n_rows)]
        norm = [float(np.sqrt(np.sum(np.square(w[r])))) for r in range(n_rows)]
        live = [r for r in range(n_rows) if s[r].any()]
        k = min(n_rows, max(1, int(np.floor(density * n_rows + 0.5))))
        chosen = sorted(live, key=lambda r: (-row_vote[r], -norm[r], r))[:k]
        want = np.zeros(s.shape, bool)
        want[chosen] = True
        assert np.array_equal(g, want)
