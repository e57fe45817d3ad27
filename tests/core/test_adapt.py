"""Mask adaptation during training, class-aware votes and averaging over holders: hand-worked cases and invariants."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpfl.core.adapt import drop_votes, regrow_votes, server_drop, swap, swap_counts, swap_fraction
from mpfl.core.aggregate import holder_average
from mpfl.core.consensus import VoteContext, consensus, tally, with_cores
from mpfl.node import core_of, movement_scores


def test_a_regrow_and_drop_vote_on_a_small_matrix():
    mask = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=bool)
    weights = np.array([[0.9, -0.1, 0, 0], [0.05, 0, -0.7, 0]], dtype=np.float32)
    grads = [np.array([[9, 9, 0.5, 0.2], [9, 0.3, 9, 0.8]]), np.array([[9, 9, 0.1, 0.6], [9, 0.7, 9, 0.2]])]
    counts = swap_counts([mask], 0.5)
    assert counts == [2]  # half of the 4 kept entries, and there are 4 pruned ones to take them
    votes = [regrow_votes([g], [mask], counts)[0] for g in grads]
    assert votes[0].tolist() == [[False, False, True, False], [False, False, False, True]]  # 0.5 and 0.8
    assert votes[1].tolist() == [[False, False, False, True], [False, True, False, False]]  # 0.6 and 0.7
    regrow = tally([[v] for v in votes], [3, 1])[0]  # node 0 holds three times the samples of node 1
    new, grown, dropped = swap([mask], [regrow], server_drop([weights], [mask]), counts, [weights])
    # regrow the two positions node 0 voted for (0.75 each) over node 1's (0.25 each)
    assert grown[0].tolist() == [[False, False, True, False], [False, False, False, True]]
    # drop the two kept entries with the smallest global |w|: 0.05 and -0.1
    assert dropped[0].tolist() == [[False, True, False, False], [True, False, False, False]]
    assert new[0].tolist() == [[True, False, True, False], [False, False, True, True]]
    assert drop_votes([weights], [mask], [1])[0].tolist() == [[False, False, False, False], [True, False, False, False]]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), fraction=st.floats(0.0, 1.0), density=st.floats(0.05, 0.95))
def test_swaps_keep_each_layers_density_and_regrow_only_voted_pruned_positions(seed, fraction, density):
    rng = np.random.default_rng(seed)
    mask = [rng.random((6, 7)) < density, rng.random(11) < density]
    weights = [np.where(m, rng.normal(size=m.shape), 0).astype(np.float32) for m in mask]
    counts = swap_counts(mask, fraction)
    nodes = [regrow_votes([rng.normal(size=m.shape) for m in mask], mask, counts) for _ in range(3)]
    regrow = tally(nodes, [1, 2, 3])
    new, grown, dropped = swap(mask, regrow, server_drop(weights, mask), counts, weights)
    for m, n, g, d, r in zip(mask, new, grown, dropped, regrow):
        assert n.sum() == m.sum() and g.sum() == d.sum()
        assert not (g & m).any() and not (d & ~m).any() and (r[g] > 0).all()
        assert np.array_equal(n, (m & ~d) | g)


def test_the_swap_fraction_decays_with_a_cosine_and_stops():
    assert swap_fraction(2, 20, 2, 0.3, 0.75) == pytest.approx(0.3 * 0.5 * (1 + np.cos(np.pi * 1 / 15)))
    assert swap_fraction(3, 20, 2, 0.3, 0.75) == 0  # not a multiple of every
    assert swap_fraction(16, 20, 2, 0.3, 0.75) == 0  # past 75 % of the rounds
    assert swap_fraction(2, 20, 0, 0.3, 0.75) == 0  # adaptation off
    fractions = [swap_fraction(i, 20, 2, 0.3, 0.75) for i in range(2, 15, 2)]
    assert all(a > b > 0 for a, b in zip(fractions, fractions[1:]))
    assert swap_fraction(1, 20, 1, 0.3, 0.75) == pytest.approx(0.3)  # every round from the first, undecayed
    assert swap_fraction(14, 20, 2, 0.3, 0.75) > 0 and swap_fraction(16, 20, 2, 0.3, 0.8) == 0  # stops at 16 = 0.8 x 20


def test_swaps_are_capped_by_what_is_pruned_and_by_what_was_voted():
    mask = np.array([1, 1, 1, 1, 0, 0, 1, 1], bool)  # six kept, two pruned
    assert swap_counts([mask], 0.5) == [2]  # half of six is three, but only two are pruned
    assert swap_counts([mask], 0.05) == [0]  # 0.3 rounds to none: nothing swapped
    weights = np.array([0.5, 0.1, 0.4, 0.3, 0, 0, 0.2, 0.6], np.float32)
    regrow = np.array([0, 0, 0, 0, 0.0, 0.5, 0, 0])  # one pruned position voted for, two swaps allowed
    new, grown, dropped = swap([mask], [regrow], server_drop([weights], [mask]), [2], [weights])
    assert np.flatnonzero(grown[0]).tolist() == [5] and np.flatnonzero(dropped[0]).tolist() == [1]
    assert new[0].sum() == mask.sum()


def test_a_class_aware_tally_keeps_what_one_nodes_core_needs():
    """Three nodes vote on six entries; entry 5 matters to node 2's classes only."""
    support = [np.ones(6, dtype=bool)]
    masks = [[np.array([1, 1, 1, 0, 0, 0], bool)], [np.array([1, 1, 0, 1, 0, 0], bool)],
             [np.array([1, 0, 0, 0, 1, 1], bool)]]
    votes = tally(masks, [1, 1, 1])
    ctx = VoteContext(density=0.5, prev_density=1.0, num_nodes=3, scope="layer",
                      tiebreak=[np.array([0.1, 0.2, 0.6, 0.5, 0.4, 0.3])])
    plain = consensus(votes, support, "vote", ctx)[0]
    assert plain.tolist() == [True, True, True, False, False, False]  # votes 3, 2, then |w0| among the ones
    cores = [[np.array([1, 0, 0, 0, 0, 0], bool)], [np.array([1, 0, 0, 0, 0, 0], bool)],
             [np.array([0, 0, 0, 0, 0, 1], bool)]]
    boosted = with_cores(votes, cores)
    np.testing.assert_allclose(boosted[0], [3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, 7 / 3])
    assert consensus(boosted, support, "vote", ctx)[0].tolist() == [True, True, False, False, False, True]
    assert [c.tolist() for c in core_of([np.array([3.0, -5, 1, 0, 0, 0])], [masks[0][0]], 0.34)] == \
        [[False, True, False, False, False, False]]


def test_averaging_over_the_nodes_that_hold_an_entry():
    values = [[np.array([1.0, 2.0], np.float32), np.array([1.0], np.float32)],  # each node's values where it holds
              [np.array([3.0], np.float32), np.array([3.0], np.float32)]]
    holds = [[np.array([1, 1, 0, 0], bool), np.ones(1, bool)], [np.array([1, 0, 0, 0], bool), np.ones(1, bool)]]
    keep = [np.array([1, 1, 1, 0], bool), np.ones(1, bool)]
    fallback = [np.array([9.0, 9.0, 7.0, 9.0], np.float32), np.zeros(1, np.float32)]
    got = holder_average(values, holds, [1, 3], keep, fallback)
    # entry 0: both hold it, 1/4 * 1 + 3/4 * 3; entry 1: only node 0; entry 2: nobody (previous value); entry 3: pruned
    np.testing.assert_allclose(got[0], [2.5, 2.0, 7.0, 0.0])
    np.testing.assert_allclose(got[1], [2.5])


def test_movement_scores_rank_by_what_training_moved():
    w0 = [np.array([1.0, -0.9, 0.05, 0.0], np.float32)]
    trained = [np.array([1.0, -0.89, 0.15, -0.08], np.float32)]
    assert np.array_equal(movement_scores(w0, trained, 1.0)[0], trained[0])
    scored = np.abs(movement_scores(w0, trained, 100.0)[0])
    # |w0 + 100 (w - w0)|: 10.05 and 8 for the entries that moved, 1 for the large unmoved one, and 0.1
    # for the large one that moved 0.01 towards zero
    np.testing.assert_allclose(scored, [1.0, 0.1, 10.05, 8.0], rtol=1e-4)
    assert np.argsort(-scored).tolist() == [2, 3, 0, 1]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 5))
def test_holder_average_is_the_mean_over_holders_of_full_tensors(seed, nodes):
    """Against the same mean written over full tensors (zeros where a node does not hold an entry),
    bit for bit: the kept values alone carry everything the average needs."""
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (5,)]
    holds = [[rng.random(s) < 0.6 for s in shapes] for _ in range(nodes)]
    full = [[np.where(h, rng.standard_normal(h.shape), 0).astype(np.float32) for h in node] for node in holds]
    weights = rng.integers(1, 50, nodes).tolist()
    keep = [rng.random(s) < 0.7 for s in shapes]
    fallback = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    alpha = np.asarray(weights, np.float64) / np.sum(weights)
    for i, (k, previous) in enumerate(zip(keep, fallback)):
        total = sum(a * np.where(h[i], f[i], 0.0) for a, h, f in zip(alpha, holds, full))
        share = sum(a * h[i] for a, h in zip(alpha, holds))
        mean = np.divide(total, share, out=np.zeros_like(total), where=share > 0)
        want = np.where(k, np.where(share > 0, mean, previous), 0.0).astype(np.float32)
        kept = [[f[j][h[j]] for j in range(len(shapes))] for f, h in zip(full, holds)]
        got = holder_average(kept, holds, weights, keep, fallback)[i]
        assert got.shape == want.shape and got.tobytes() == want.tobytes()


def ties_sorted(positions, *keys):
    """`positions` sorted by the given per-position keys, then by position (the lower index first)."""
    return sorted(positions, key=lambda i: tuple(k[i] for k in keys) + (i,))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), fraction=st.floats(0.0, 1.0), density=st.floats(0.1, 0.9),
       node_drops=st.booleans())
def test_swaps_regrow_the_top_voted_and_drop_the_top_scored_positions_with_the_documented_tie_breaks(
        seed, fraction, density, node_drops):
    """Against a sorted reference, per layer, with many ties (equal voters, |w| from a few values):
    k' = min(k, pruned positions with a vote); regrown = the first k' pruned positions by (-vote, index);
    dropped = the first k' kept positions by (-drop score, |w|, index), the drop scores being the
    server's (-|w|) or the nodes' tallied drop votes."""
    rng = np.random.default_rng(seed)
    shapes = [(5, 6), (17,)]
    mask = [rng.random(s) < density for s in shapes]
    weights = [np.where(m, rng.integers(-2, 3, m.shape) * 0.5, 0).astype(np.float32) for m in mask]
    counts = swap_counts(mask, fraction)
    nodes = int(rng.integers(1, 4))
    regrow = tally([[(rng.random(s) < 0.3) & ~m for s, m in zip(shapes, mask)] for _ in range(nodes)], [1] * nodes)
    if node_drops:
        drop = tally([[(rng.random(s) < 0.3) & m for s, m in zip(shapes, mask)] for _ in range(nodes)], [1] * nodes)
    else:
        drop = server_drop(weights, mask)
    new, grown, dropped = swap(mask, regrow, drop, counts, weights)
    for m, n, g, d, r, s, w, k in zip(mask, new, grown, dropped, regrow, drop, weights, counts):
        m, r, s, w = m.reshape(-1), r.reshape(-1), s.reshape(-1), np.abs(w.reshape(-1)).astype(np.float64)
        voted = [i for i in np.flatnonzero(~m) if r[i] > 0]
        k = min(k, len(voted))
        want_grown = np.zeros(m.size, bool)
        want_grown[ties_sorted(voted, -r)[:k]] = True
        want_dropped = np.zeros(m.size, bool)
        want_dropped[ties_sorted(list(np.flatnonzero(m)), -s, w)[:k]] = True
        assert np.array_equal(g.reshape(-1), want_grown) and np.array_equal(d.reshape(-1), want_dropped)
        assert np.array_equal(n.reshape(-1), (m & ~want_dropped) | want_grown)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), fraction=st.floats(0.0, 1.0))
def test_a_nodes_regrow_and_drop_votes_and_the_swap_counts_against_a_sorted_reference(seed, fraction):
    """swap_counts: round(fraction x kept) (half up), at most the pruned count; regrow vote: the k pruned
    positions with the largest |gradient|; drop vote: the k kept positions with the smallest |w|; ties
    to the lower index (values from a few levels, of both signs, so ties happen)."""
    rng = np.random.default_rng(seed)
    shapes = [(4, 7), (19,), (2, 3, 3)]
    mask = [rng.random(s) < rng.uniform(0.1, 0.9) for s in shapes]
    counts = swap_counts(mask, fraction)
    for m, k in zip(mask, counts):
        assert k == min(int(np.floor(fraction * m.sum() + 0.5)), m.size - int(m.sum()))
    grads = [rng.integers(-3, 4, s) * 0.25 for s in shapes]
    weights = [rng.integers(-3, 4, s).astype(np.float32) * 0.5 for s in shapes]
    votes, drops = regrow_votes(grads, mask, counts), drop_votes(weights, mask, counts)
    for m, k, g, w, v, d in zip(mask, counts, grads, weights, votes, drops):
        flat_m = m.reshape(-1)
        up = ties_sorted(list(np.flatnonzero(~flat_m)), -np.abs(g.reshape(-1)))[:k]
        down = ties_sorted(list(np.flatnonzero(flat_m)), np.abs(w.reshape(-1)))[:k]
        assert v.shape == m.shape and d.shape == m.shape
        assert sorted(np.flatnonzero(v.reshape(-1))) == sorted(up)
        assert sorted(np.flatnonzero(d.reshape(-1))) == sorted(down)
