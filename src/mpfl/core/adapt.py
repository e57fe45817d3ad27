"""Mask adaptation during training: the RigL / FedDST idea with MPFL's mask-sized messages.

In an adaptation round every node sends, besides its trained values, a regrow vote coded like
a mask: the k pruned positions per layer with the largest |gradient| of the received global
weights on its data (and, with node drop votes, the k kept positions with the smallest |w|
after its local training). The server swaps the top-voted positions at constant density per
layer: it regrows k voted positions, at exactly 0, and drops k kept ones (by default those
with the smallest global |w|, which the server knows without any message). The share of a
layer swapped decays over training with a cosine, as in RigL, so the mask settles.

The mask search under label skew keeps what the nodes' own classes need; the training phase,
where every node trains the shared model, can then repair it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .masks import Mask, keep_count, top_k
from .memo import complement


def swap_fraction(index: int, rounds: int, every: int, fraction: float, until: float) -> float:
    """Share of each layer's kept weights swapped after training round `index` (1-based): 0 unless
    `index` is a multiple of `every` before `until` x rounds; `fraction` decayed by a cosine."""
    stop = until * rounds
    if every <= 0 or fraction <= 0 or index % every != 0 or index >= stop:
        return 0.0
    return fraction * 0.5 * (1.0 + math.cos(math.pi * (index - 1) / stop))


def swap_counts(mask: Sequence[np.ndarray], fraction: float) -> list[int]:
    """Positions swapped per layer: `fraction` of its kept weights, never more than it has pruned."""
    return [min(keep_count(int(m.sum()), fraction, minimum=0), int(m.size - m.sum())) for m in mask]


def regrow_votes(grads: Sequence[np.ndarray], mask: Sequence[np.ndarray], counts: Sequence[int]) -> Mask:
    """A node's regrow vote: the `k` pruned positions per layer with the largest |gradient|
    (ties to the lower index)."""
    return [top_k(np.abs(g), complement(m), k).reshape(m.shape) for g, m, k in zip(grads, mask, counts)]


def drop_votes(weights: Sequence[np.ndarray], mask: Sequence[np.ndarray], counts: Sequence[int]) -> Mask:
    """A node's drop vote: the `k` kept positions per layer with the smallest |w| (ties to the lower index)."""
    return [top_k(-np.abs(w), m, k).reshape(m.shape) for w, m, k in zip(weights, mask, counts)]


def server_drop(weights: Sequence[np.ndarray], mask: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Drop scores from the global weights: kept positions with a smaller |w| score higher."""
    return [np.where(m, -np.abs(w), -np.inf) for w, m in zip(weights, mask)]


def swap(mask: Sequence[np.ndarray], regrow: Sequence[np.ndarray], drop: Sequence[np.ndarray], counts: Sequence[int],
         weights: Sequence[np.ndarray]) -> tuple[Mask, Mask, Mask]:
    """The server's swap from tallied regrow votes and drop scores, per layer: regrow the k
    top-voted pruned positions (only positions some node voted for; ties to the lower index) and
    drop as many top-scored kept positions (ties to the smaller global |w|, then the lower
    index), so each layer keeps its density. Returns (new mask, regrown, dropped)."""
    new, grown, dropped = [], [], []
    for m, g, d, k, w in zip(mask, regrow, drop, counts, weights):
        k = min(k, int(np.count_nonzero((g > 0) & ~m)))
        up = top_k(g, ~m, k).reshape(m.shape)
        down = top_k(d, m, k, tiebreak=-np.abs(w)).reshape(m.shape)
        new.append((m & ~down) | up)
        grown.append(up)
        dropped.append(down)
    return new, grown, dropped
