"""Consensus rules: the parameter server's mask from the nodes' weighted votes.

Votes v_i = sum_n alpha_n m_{n,i} lie in [0, 1] (MPFL adds 2 where some node's core holds the
entry: `with_cores`). Every rule only keeps entries of the previous consensus (`support`), so the
new consensus is always a subset of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ..registry import Registry, check_callable, checked_reads, registry
from .aggregate import normalise
from .masks import Mask, checked_mask, expand_rows, rows, select

_EPS = 1e-9


def tally(masks: Sequence[Sequence[np.ndarray]], weights: Sequence[float]) -> list[np.ndarray]:
    """Weighted votes per entry, in float64; `weights` are normalised as aggregation weights are
    (non-negative, summing to 1: alpha_n = |D_n| / sum |D|)."""
    if len(masks) == 0 or len(masks) != len(weights):
        raise ValueError(f"consensus needs one weight per mask and at least one mask, got {len(masks)} masks and "
                         f"{len(weights)} weights")
    alpha = normalise(weights)
    return [sum(a * np.asarray(m[i], dtype=np.float64) for a, m in zip(alpha, masks)) for i in range(len(masks[0]))]


def trimmed_tally(masks: Sequence[Sequence[np.ndarray]], trim: float) -> list[np.ndarray]:
    """Per entry, the mean vote after dropping the `trim` share of highest and lowest votes
    (unweighted), so a few nodes cannot push an entry in or out on their own."""
    n = len(masks)
    cut = int(trim * n)
    if n - 2 * cut <= 0:
        raise ValueError(f"trimming {cut} of {n} votes from each end leaves none")
    out = []
    for i in range(len(masks[0])):
        ones = sum(np.asarray(m[i], dtype=np.int64) for m in masks)
        out.append(np.clip(ones - cut, 0, n - 2 * cut) / (n - 2 * cut))
    return out


def agreement_weights(masks: Sequence[Sequence[np.ndarray]], weights: Sequence[float], support: Sequence[np.ndarray],
                      cutoff: float = 3.0, tolerance: float = 0.5, floor: float = 1e-3) -> np.ndarray:
    """Sample weights with outliers down-weighted: d_n is the Hamming distance of node n's mask to
    the majority mask over the support, a majority of nodes (unweighted, so that no claimed sample
    count can make a node the reference it is measured against). A node within max(`cutoff` robust standard deviations
    (1.4826 MAD), `tolerance` x the median distance) above the median keeps its weight exactly,
    so honest votes are not perturbed (the relative tolerance guards against a small, noisy MAD
    when there are few nodes); a node beyond that cut is scaled by exp(-(d_n - cut) / sigma), and
    left out entirely once that factor falls below `floor`, so that it cannot even break ties
    between equal honest votes. Random, inverted or adversarial masks sit far beyond the cut."""
    majority = [s & (v >= 0.5) for v, s in zip(tally(masks, [1.0] * len(masks)), support)]
    dist = np.array([sum(int(np.count_nonzero((a != b) & s)) for a, b, s in zip(m, majority, support)) for m in masks],
                    dtype=np.float64)
    median = np.median(dist)
    # at least 1% of the median distance and one entry: with few nodes the MAD can be 0, which
    # would put an honest node one flipped entry above the median beyond the cut
    sigma = max(1.4826 * np.median(np.abs(dist - median)), 0.01 * median, 1.0)
    cut = median + max(cutoff * sigma, tolerance * median)
    factor = np.exp(-np.maximum(dist - cut, 0.0) / sigma)
    factor[factor < floor] = 0.0
    w = np.asarray(weights, dtype=np.float64) * factor
    return w if w.sum() > 0 else np.asarray(weights, dtype=np.float64)


def with_cores(votes: Sequence[np.ndarray], cores: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Class-aware votes: an entry in any node's core (the best share of its own mask) scores
    2 + its vote, so it outranks every entry that is in no core (votes lie in [0, 1]; 2, not 1,
    because a trimmed tally can cut a core entry's vote to 0, which would tie with a unanimous
    entry). Under label skew an entry that matters to the classes of one or two nodes gets few
    votes; its node's core keeps it."""
    if not cores:
        return [np.asarray(v, dtype=np.float64) for v in votes]
    return [np.asarray(v, dtype=np.float64) + 2.0 * np.logical_or.reduce([c[i] for c in cores])
            for i, v in enumerate(votes)]


@dataclass(frozen=True)
class VoteContext:
    """What a rule may use besides the votes: the round's target, the nodes, the tie-breaker."""

    density: float
    prev_density: float
    num_nodes: int
    scope: str = "layer"
    floor: float = 0.01
    tau: float = 0.5
    percentile: float | None = None
    structured: bool = False
    tiebreak: Sequence[np.ndarray] | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    """The run's `options` (``--options KEY=VALUE``): settings for a plug-in rule, as text."""


def _on_rows(rule: Callable[..., Mask], votes: Sequence[np.ndarray], support: Sequence[np.ndarray], ctx: VoteContext) -> Mask:
    """Run a rule on one vote per output filter, then expand back (structured masks)."""
    row_votes = [rows(v).mean(axis=1) for v in votes]
    row_support = [rows(s).any(axis=1) for s in support]
    ties = None if ctx.tiebreak is None else [np.linalg.norm(rows(t), axis=1) for t in ctx.tiebreak]
    flat = rule(row_votes, row_support, replace(ctx, structured=False, tiebreak=ties))
    return [expand_rows(f, s.shape) for f, s in zip(flat, support)]


def vote(votes: Sequence[np.ndarray], support: Sequence[np.ndarray], ctx: VoteContext) -> Mask:
    """Keep exactly the highest-voted entries at the target density (per layer or global);
    ties go to the larger |w0|, then the lower index."""
    if ctx.structured:
        return _on_rows(vote, votes, support, ctx)
    return select(votes, support, ctx.density, ctx.scope, ctx.floor, ctx.tiebreak)


def threshold(votes: Sequence[np.ndarray], support: Sequence[np.ndarray], ctx: VoteContext) -> Mask:
    """Keep entries with a vote of at least tau (0.5: a weighted majority); density emerges."""
    return [s & (v >= ctx.tau - _EPS) for v, s in zip(votes, support)]


def dynamic(votes: Sequence[np.ndarray], support: Sequence[np.ndarray], ctx: VoteContext) -> Mask:
    """Per layer, prune entries that at least a share `thr` of the nodes pruned, lowering thr
    from (N-1)/N in steps of 1/N until the layer reaches its target pruned fraction."""
    n = ctx.num_nodes
    thresholds = [(n - j) / n for j in range(1, n)] or [1.0]
    out = []
    for v, s in zip(votes, support):
        target_pruned = 1.0 - ctx.density
        for thr in thresholds:
            keep = s & ~(1.0 - v >= thr - _EPS)
            if 1.0 - keep.mean() >= target_pruned - _EPS:
                break
        out.append(keep)
    return out


def histogram(votes: Sequence[np.ndarray], support: Sequence[np.ndarray], ctx: VoteContext) -> Mask:
    """Per layer, keep votes at or above a percentile of the votes over the support; by default
    the percentile that removes the round's share of the support (1 - d_t / d_{t-1}). An entry no
    node kept is never kept: when more of the support than that share has no vote (one voter, or
    nodes that agree on what to drop) the percentile is 0, and `v >= 0` would keep everything."""
    q = ctx.percentile if ctx.percentile is not None else 100.0 * (1.0 - ctx.density / ctx.prev_density)
    out = []
    for v, s in zip(votes, support):
        if not s.any():
            out.append(s.copy())
            continue
        cut = np.percentile(v[s], min(max(q, 0.0), 100.0), method="lower")
        out.append(s & (v >= cut - _EPS) & (v > 0))
    return out


Rule = Callable[[Sequence[np.ndarray], Sequence[np.ndarray], VoteContext], Mask]
RULES: Registry[Rule] = registry("consensus rule")
for _name, _rule, _reads in (("vote", vote, ()), ("threshold", threshold, ("tau",)), ("dynamic", dynamic, ()),
                             ("histogram", histogram, ("percentile",))):
    RULES.register(_name, _rule, reads=_reads)


SETTINGS = ("tau", "percentile")
"""The `VoteContext` settings a rule declares it reads, as `reads` (the rest are every rule's to use)."""


def register_rule(name: str, rule: Rule, *, reads: Sequence[str] | None = None) -> None:
    """Add a consensus rule `rule(votes, support, ctx) -> mask` (a subset of `support`). `reads` names
    those of `SETTINGS` it uses, such as ``("tau",)``: `mpfl run` then says when --tau or --percentile
    has no effect on it (left unsaid, it never does)."""
    check_callable(rule, "consensus rule", name, "rule(votes, support, ctx)", None, None, None)
    RULES.register(name, rule, reads=checked_reads(reads, SETTINGS, "consensus rule", name))


def consensus(votes: Sequence[np.ndarray], support: Sequence[np.ndarray], rule: str, ctx: VoteContext) -> Mask:
    """Apply the named rule, holding it to its contract (`masks.checked_mask`)."""
    return checked_mask(RULES.get(rule)(votes, support, ctx), support, f"the mask the consensus rule {rule!r} returned",
                        structured=ctx.structured)
