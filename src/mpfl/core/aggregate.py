"""Server-side aggregation of the nodes' tensors (FedAvg and its relatives)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..errors import MethodError
from ..registry import Registry, check_callable, checked_reads, registry
from .contract import checked_arrays


def normalise(weights: Sequence[float]) -> np.ndarray:
    """Aggregation weights alpha_n summing to one (FedAvg weighs by local sample counts)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"aggregation weights must be non-negative with a positive sum, got {list(w)}")
    return w / w.sum()


def count_cap(counts: Sequence[int], limit: float) -> float:
    """The largest count a node may weigh with: `limit` times the lower median of `counts`. The
    lower median is a count some node claimed: an honest one while fewer than half of the nodes lie,
    and while half do if they claim more than the honest nodes (as inflating liars do), where the
    mean of the two middle counts would be half a liar's."""
    ordered = sorted(counts)
    return limit * float(ordered[(len(ordered) - 1) // 2])


def weighted_average(tensors: Sequence[Sequence[np.ndarray]], weights: Sequence[float]) -> list[np.ndarray]:
    """sum_n alpha_n x_n per tensor, accumulated in float64 and returned as float32."""
    alpha = normalise(weights)
    if len(tensors) != alpha.size:
        raise ValueError(f"{len(tensors)} tensor lists but {alpha.size} weights")
    out = []
    for i in range(len(tensors[0])):
        acc = np.zeros(np.shape(tensors[0][i]), dtype=np.float64)
        for a, t in zip(alpha, tensors):
            acc += a * t[i]
        out.append(acc.astype(np.float32))
    return out


def holder_average(kept: Sequence[Sequence[np.ndarray]], holds: Sequence[Sequence[np.ndarray]], weights: Sequence[float],
                   keep: Sequence[np.ndarray], fallback: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per entry, the weighted mean of the values of the nodes that hold it (`holds[n][i]`, e.g.
    each node's own mask); entries of `keep` that no node holds take `fallback`, entries outside
    `keep` are 0. Averaging over all nodes would pull every kept value towards 0 by the share of
    nodes that pruned it. `kept[n][i]` holds node n's values of the entries it holds, in row-major
    order (as they travel), so a thousand replies take a fraction of full tensors' memory."""
    alpha = normalise(weights)
    out = []
    for i, (k, previous) in enumerate(zip(keep, fallback)):
        total = np.zeros(np.size(k), dtype=np.float64)
        share = np.zeros(np.size(k), dtype=np.float64)
        for a, node, held in zip(alpha, kept, holds):
            where = np.flatnonzero(held[i])
            total[where] += a * node[i]
            share[where] += a
        mean = np.divide(total, share, out=np.zeros_like(total), where=share > 0)
        chosen = np.where(share > 0, mean, np.reshape(previous, -1))
        out.append(np.where(np.reshape(k, -1), chosen, 0.0).astype(np.float32).reshape(np.shape(k)))
    return out


def holder_robust_average(kept: Sequence[Sequence[np.ndarray]], holds: Sequence[Sequence[np.ndarray]],
                          weights: Sequence[float], keep: Sequence[np.ndarray], fallback: Sequence[np.ndarray],
                          rule: str, *, trim: float = 0.2, byzantine: int = 1) -> list[np.ndarray]:
    """`holder_average` under a robust aggregator `rule`: each node stands for its own values where it
    holds an entry and for `fallback` elsewhere, and `rule` combines those full tensors; entries outside
    `keep` are 0. Averaged over its holders only, an entry that few nodes hold would take whatever
    they sent; here it leans on `fallback` unless enough nodes agree on another value."""
    full = []
    for node, held in zip(kept, holds):
        tensors = []
        for values, where, previous in zip(node, held, fallback):
            tensor = np.array(previous, dtype=np.float32)
            tensor[where] = values
            tensors.append(tensor)
        full.append(tensors)
    combined = robust_average(full, weights, rule, trim=trim, byzantine=byzantine)
    return [np.where(k, c, np.float32(0)) for k, c in zip(keep, combined)]


Aggregator = Callable[..., list[np.ndarray]]
AGGREGATORS: Registry[Aggregator] = registry("aggregator")
"""Rules `rule(tensors, weights, *, trim, byzantine) -> tensors` that combine the nodes' values."""


def _flower_rule(name: str) -> Aggregator:
    """One of Flower's robust rules, which ignore sample counts (as robust rules do)."""

    def rule(tensors: Sequence[Sequence[np.ndarray]], weights: Sequence[float], *, trim: float = 0.2,
             byzantine: int = 1) -> list[np.ndarray]:
        from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

        results = [([np.asarray(t, dtype=np.float32) for t in node], int(w)) for node, w in zip(tensors, weights)]
        if name == "trimmed-mean":
            out = aggregate_trimmed_avg(results, trim)
        elif name == "median":
            out = aggregate_median(results)
        else:
            out = aggregate_krum(results, byzantine, 0)
        return [np.asarray(o, dtype=np.float32) for o in out]

    return rule


SETTINGS = ("trim", "byzantine")
"""The run settings every aggregator is given as keywords."""
AGGREGATORS.register("mean", lambda tensors, weights, **_: weighted_average(tensors, weights), reads=())
for _name, _reads in (("trimmed-mean", ("trim",)), ("median", ()), ("krum", ("byzantine",))):
    AGGREGATORS.register(_name, _flower_rule(_name), reads=_reads)


def register_aggregator(name: str, rule: Aggregator, *, reads: Sequence[str] | None = None) -> None:
    """Add an aggregation rule `rule(tensors, weights, *, trim, byzantine) -> tensors`: `tensors[n][i]`
    is node n's tensor i (full shape, float32), `weights[n]` its sample count; it returns one
    finite float array per tensor, of that tensor's shape. `reads` names the settings of `SETTINGS`
    it uses: `mpfl run` then says when --trim or --byzantine has no effect on it (left unsaid, it never does)."""
    check_callable(rule, "aggregator", name, "rule(tensors, weights, *, trim, byzantine)", [], [], trim=0.2,
                   byzantine=1)
    AGGREGATORS.register(name, rule, reads=checked_reads(reads, SETTINGS, "aggregator", name))


def checked_aggregate(out: object, like: Sequence[np.ndarray], rule: str) -> list[np.ndarray]:
    """`out` (what the aggregator `rule` returned) as float32 arrays, once it is one finite float array
    per tensor of `like`'s shapes; otherwise a MethodError naming the rule, before the server keeps
    it: a broken rule's output would go into the checkpoint the run resumes from."""
    contract = (f"the aggregator {rule!r} must return a list of {len(like)} float arrays, one per tensor, each the "
                "shape of its tensor and without NaN or infinity")
    checked = checked_arrays(out, [np.shape(t) for t in like], "f", contract)
    for i, tensor in enumerate(checked):
        if not np.isfinite(tensor).all():
            raise MethodError(f"{contract}; item {i} holds NaN or infinity")
    return [tensor.astype(np.float32, copy=False) for tensor in checked]


def robust_average(tensors: Sequence[Sequence[np.ndarray]], weights: Sequence[float], rule: str = "mean", *,
                   trim: float = 0.2, byzantine: int = 1) -> list[np.ndarray]:
    """Aggregate with the named rule: the sample-weighted mean, or Flower's coordinate-wise trimmed
    mean, coordinate-wise median or Krum, or a plug-in rule (held to its contract: `checked_aggregate`)."""
    return checked_aggregate(AGGREGATORS.get(rule)(tensors, weights, trim=trim, byzantine=byzantine), tensors[0], rule)
